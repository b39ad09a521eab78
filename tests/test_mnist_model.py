"""MNIST's parts: the two networks, the one-cycle schedule, the held-out validation split."""
import pytest
import torch
from torch import optim

from agents import make_config
from datasets.mnist import MnistDataLoader, load_split
from graphs.models.mnist import NETWORKS
from tests.conftest import ROOT, mnist_overrides, run_main_in_process, set_args
from utils.errors import ConfigError

CONFIG = ROOT / "configs" / "mnist_exp_0.json"
CPU = torch.device("cpu")


@pytest.mark.parametrize("name, params", [("examples", 1_199_882), ("fast", 29_178)])
def test_networks_parameter_counts_and_output_shape(name, params):
    model = NETWORKS[name]()
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def built_agent(mnist_folder, tmp_path, monkeypatch, config=CONFIG, **settings):
    monkeypatch.chdir(tmp_path)
    overrides = [arg for arg in mnist_overrides(mnist_folder, progress_bar=False, **settings) if arg != "--set"]
    agent_class, config = make_config(str(config), overrides)
    return agent_class(config)


def test_one_cycle_steps_every_iteration(mnist_folder, tmp_path, monkeypatch):
    agent = built_agent(mnist_folder, tmp_path, monkeypatch, max_epoch=3)
    scheduler, interval = agent.parts.schedulers["scheduler"]
    assert isinstance(scheduler, optim.lr_scheduler.OneCycleLR) and interval == "iteration"
    assert scheduler.total_steps == 3 * 8                        # (320 - 64 held out) / 32 an epoch
    # What OneCycleLR does with the config's values, stepped by hand.
    reference_optimizer = optim.SGD([torch.zeros(1)], lr=0.2, momentum=0.9)
    reference = optim.lr_scheduler.OneCycleLR(reference_optimizer, max_lr=0.2, total_steps=24, cycle_momentum=False)
    assert agent.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 / 25)   # the cycle starts low
    agent.train_one_epoch()
    for _ in range(8):
        reference_optimizer.step()
        reference.step()
    assert agent.current_iteration == scheduler.last_epoch == 8
    assert agent.optimizer.param_groups[0]["lr"] == pytest.approx(reference_optimizer.param_groups[0]["lr"])
    assert agent.optimizer.param_groups[0]["momentum"] == 0.9  # the config's, not cycled


def test_the_recipe_keeps_step_lr_per_epoch(mnist_folder, tmp_path, monkeypatch):
    agent = built_agent(mnist_folder, tmp_path, monkeypatch, config=ROOT / "configs" / "mnist_exp_1.json")
    scheduler, interval = agent.parts.schedulers["scheduler"]
    assert isinstance(scheduler, optim.lr_scheduler.StepLR) and interval == "epoch"
    assert isinstance(agent.optimizer, optim.Adadelta) and type(agent.model).__name__ == "MnistNet"


def test_resuming_with_another_max_epoch_plans_the_cycle_again(mnist_folder, tmp_path):
    first = run_main_in_process([CONFIG, *mnist_overrides(mnist_folder, max_epoch=1)], tmp_path)
    assert first.returncode == 0, first.stderr
    more = run_main_in_process([CONFIG, *mnist_overrides(mnist_folder, max_epoch=3), "--resume"], tmp_path)
    assert more.returncode == 0, more.stderr
    assert ("resumed at iteration 8 with 16 to go: the one-cycle learning rate, planned over 8 iterations, "
            "is planned again over 24") in more.stdout + more.stderr
    state = torch.load(tmp_path / "experiments" / "mnist_exp_0" / "checkpoints" / "checkpoint.pth.tar",
                       weights_only=True)
    assert state["iteration"] == 24 and state["schedulers"]["scheduler"]["total_steps"] == 24


def loader(mnist_folder, valid_size=64, split_seed=0):
    return MnistDataLoader(data_folder=str(mnist_folder), data_mode="local", batch_size=32, test_batch_size=64,
                           valid_size=valid_size, split_seed=split_seed, device=CPU)


def test_the_valid_split_is_held_out_of_training_and_fixed_by_split_seed(mnist_folder):
    images, labels = load_split(str(mnist_folder), train=True, download=False)
    torch.manual_seed(1)
    data = loader(mnist_folder)
    held_out = data.valid_indices.tolist()
    rest = sorted(set(range(320)) - set(held_out))
    assert len(set(held_out)) == 64 and len(rest) == 256
    assert torch.equal(data.valid_loader.inputs, images[held_out])
    assert torch.equal(data.train_loader.inputs, images[rest]) and torch.equal(data.train_loader.targets, labels[rest])
    test_images, _ = load_split(str(mnist_folder), train=False, download=False)
    assert torch.equal(data.test_loader.inputs, test_images)

    torch.manual_seed(2)                       # another training seed: the same held-out digits
    assert loader(mnist_folder).valid_indices.tolist() == held_out
    assert loader(mnist_folder, split_seed=1).valid_indices.tolist() != held_out


def test_valid_size_0_validates_on_the_test_split_as_pytorch_examples(mnist_folder):
    images, _ = load_split(str(mnist_folder), train=True, download=False)
    data = loader(mnist_folder, valid_size=0)
    assert data.valid_loader is data.test_loader
    assert torch.equal(data.train_loader.inputs, images)       # all of them, in the file's order


def test_the_agent_splits_by_split_seed_not_seed(mnist_folder, tmp_path, monkeypatch):
    one = built_agent(mnist_folder, tmp_path, monkeypatch, seed=1).data_loader.valid_indices
    other = built_agent(mnist_folder, tmp_path, monkeypatch, seed=2).data_loader.valid_indices
    assert torch.equal(one, other)


def test_a_valid_size_as_large_as_the_training_split_is_refused(mnist_folder):
    with pytest.raises(ConfigError, match="valid_size 320 is not smaller than the 320 training images"):
        loader(mnist_folder, valid_size=320)


def test_valid_size_is_a_count_not_below_0(mnist_folder, tmp_path):
    result = run_main_in_process([CONFIG, *mnist_overrides(mnist_folder), *set_args(valid_size=-1)], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "valid_size" in lines[0]
    assert not (tmp_path / "experiments").exists()
