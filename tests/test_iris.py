"""The Cookiecutter baselines and the Iris example that trains them."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from agents import make_config
from datasets.iris import IrisDataLoader, load_iris_tensors, stratified_split
from graphs.models.baselines import build_baseline
from tests.conftest import ROOT, set_args
from utils.errors import ConfigError

CONFIG = str(ROOT / "configs" / "iris_exp_0.json")


@pytest.mark.parametrize("network, params, trainable", [
    ("linear", 4 * 3 + 3, 15),
    ("mlp", (4 * 64 + 64) + (64 * 3 + 3), 64 * 3 + 3 + 320),
    ("mlp_fixed", (4 * 64 + 64) + (64 * 3 + 3), 64 * 3 + 3),
])
def test_baseline_sizes(network, params, trainable):
    model = build_baseline(network, in_features=4, num_classes=3, hidden_size=64)
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert model(torch.randn(5, 2, 2)).shape == (5, 3)  # inputs are flattened


def test_xavier_init_draws_glorot_weights_and_zero_biases():
    torch.manual_seed(0)
    model = build_baseline("mlp", in_features=400, num_classes=100, hidden_size=600, init="xavier")
    hidden = model[1]
    bound = (6 / (400 + 600)) ** 0.5
    assert hidden.weight.abs().max() <= bound and hidden.weight.abs().max() > 0.95 * bound
    assert hidden.bias.abs().sum() == 0
    default = build_baseline("mlp", in_features=400, num_classes=100, hidden_size=600)
    assert default[1].weight.abs().max() <= 1 / 400 ** 0.5 < bound  # PyTorch's Kaiming-uniform bound
    with pytest.raises(ValueError, match="xavier"):
        build_baseline("mlp", 4, 3, init="normal")


def test_split_is_stratified_and_fixed():
    _, labels = load_iris_tensors()
    train, valid = stratified_split(labels, 0.2, seed=0)
    assert len(train) == 120 and len(valid) == 30 and not set(train.tolist()) & set(valid.tolist())
    assert labels[valid].bincount().tolist() == [10, 10, 10]
    assert torch.equal(valid, stratified_split(labels, 0.2, seed=0)[1])


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.99, 1.0])
def test_a_split_that_leaves_a_side_empty_is_a_config_error(fraction):
    with pytest.raises(ConfigError, match=f"valid_fraction {fraction} leaves"):
        IrisDataLoader(batch_size=16, valid_fraction=fraction, split_seed=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="'valid_fraction' must be between 0 and 1, got 1.5"):
        make_config(CONFIG, ["valid_fraction=1.5"])


@pytest.mark.parametrize("network", ["linear", "mlp", "mlp_fixed"])
def test_each_baseline_learns_iris(network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    agent_class, config = make_config(CONFIG, [f'network="{network}"', "max_epoch=30", 'init="xavier"'])
    agent = agent_class(config)
    frozen = [p.detach().clone() for p in agent.model.parameters() if not p.requires_grad]
    agent.run()
    agent.finalize()
    assert agent.status == "completed"
    assert agent.best_value >= 0.9  # chance is 1/3
    assert all(torch.equal(before, p) for before, p in
               zip(frozen, [p for p in agent.model.parameters() if not p.requires_grad]))
    assert (tmp_path / "experiments" / "iris_exp_0" / "results.json").is_file()


def test_baseline_experiments_script_reruns_all_three(tmp_path):
    """experiments/baseline_experiments.sh in a copy of the project (it writes next to itself), with
    max_epoch lowered through its pass-through arguments. The copy already holds an iris_mlp run
    with checkpoints: a record is re-run over its earlier results."""
    project = tmp_path / "project"
    for folder in ("agents", "commands", "graphs", "datasets", "utils", "configs"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("main.py", "run.sh", "requirements.txt", "experiments/baseline_experiments.sh"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    earlier = project / "experiments" / "iris_mlp" / "checkpoints"
    earlier.mkdir(parents=True)
    (earlier / "checkpoint.pth.tar").write_bytes(b"an earlier run's checkpoint")
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(project / "experiments" / "baseline_experiments.sh"), *set_args(max_epoch=3)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("experiment "))   # ./run.sh list
    table = {line.split()[0]: line.split() for line in lines[header + 2:]}
    assert set(table) == {"iris_linear", "iris_mlp", "iris_mlp_fixed"}
    assert all(row[1:4] == ["IrisAgent", "completed", "3"] for row in table.values())
