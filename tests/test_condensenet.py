"""CondenseNet: parameter counts, pruning, conversion, and the example end to end on a CIFAR-10
fixture in the pickled-batch layout."""
import json

import pytest
import torch
from torch import nn

from datasets.cifar10 import write_cifar10_batches
from graphs.models.condensenet import CondenseNet, condense, condensed_skeleton, count_macs
from graphs.models.custom_layers.learned_group_conv import stage_at
from tests.conftest import ROOT, run_main

CONFIG = ROOT / "configs" / "condensenet_exp_0.json"
SMALL = {"stages": [2, 2], "growth": [4, 8], "pool_size": 16}


def params(model):
    return sum(p.numel() for p in model.parameters())


def randomize_batch_norms(model):
    """Trained-looking BN statistics, so that a wrong channel order cannot go unnoticed."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


def test_condensenet_86_sizes_match_the_paper():
    model = CondenseNet()                               # the original config's settings
    assert params(model) == 1_451_594
    assert params(condensed_skeleton(model)) == 520_202
    model.condense_to(1.0)
    macs = count_macs(condense(model))
    assert 62e6 <= macs <= 66e6                          # paper: 65.8M FLOPs (mult-adds)
    assert count_macs(model) > 2.5 * macs


def test_other_depths_come_from_the_config():
    model = CondenseNet(stages=(4, 6, 8), growth=(8, 8, 16))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_pruning_stages_over_the_first_half():
    assert [stage_at(p, 4) for p in (0.0, 0.16, 0.17, 0.34, 0.49, 0.5, 0.9)] == [0, 0, 1, 2, 2, 3, 3]
    model = CondenseNet(**SMALL)
    model.condense_to(0.2)
    assert model.pruned_fraction_per_block() == [0.25, 0.25]
    model.condense_to(0.6)
    assert model.pruned_fraction_per_block() == [0.75, 0.75]
    for layer in model.learned_group_convs():           # each group keeps in / condense_factor inputs
        groups = layer._group_weights(layer.mask)[:, 0, :]
        assert (groups.sum(1) == layer.in_channels // layer.condense_factor).all()


def test_condensed_network_computes_the_same_logits():
    model = CondenseNet()
    randomize_batch_norms(model)
    model.condense_to(1.0)
    model.eval()
    condensed = condense(model).eval()
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(images), condensed(images), atol=1e-4)
    with pytest.raises(ValueError, match="not fully condensed"):
        condense(CondenseNet(**SMALL))


def test_lasso_loss_is_differentiable_and_ignores_pruned_weights():
    model = CondenseNet(**SMALL)
    before = model.lasso_loss()
    before.backward()
    assert before > 0 and model.learned_group_convs()[0].conv.weight.grad is not None
    model.condense_to(1.0)
    assert model.lasso_loss() < before


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (192, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (192,), generator=generator)
    write_cifar10_batches(str(folder), images[:128], labels[:128], images[128:], labels[128:])
    return folder


def overrides(folder, **extra):
    settings = {**SMALL, "data_folder": str(folder), "data_mode": "local", "batch_size": 32,
                "test_batch_size": 64, "max_epoch": 4, "log_interval": 2, **extra}
    args = []
    for key, value in settings.items():
        args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return args


def small_config(folder, **extra):
    from agents import make_config

    return make_config({"exp_name": "condensenet_exp_0", "agent": "CondenseNetAgent", **SMALL,
                        "data_folder": str(folder), "data_mode": "local", "batch_size": 32,
                        "test_batch_size": 64, "max_epoch": 4, "log_interval": 2, "progress_bar": False,
                        **extra})


def run_until_ctrl_c(agent, epoch: int):
    """agent.run(), with Ctrl+C pressed as epoch `epoch` + 1 starts: run() saves the checkpoint of
    `epoch` epochs, as in a real interruption."""
    one_epoch = agent.train_one_epoch

    def interrupted():
        if agent.current_epoch == epoch:
            raise KeyboardInterrupt
        return one_epoch()

    agent.train_one_epoch = interrupted
    agent.run()


def test_resume_mid_training_condenses_at_the_same_steps(cifar_folder, tmp_path, monkeypatch):
    from utils import checkpoint as ckpt

    # 4 steps an epoch, 16 in all: the pruning stages start at steps 3, 6 and 8.
    monkeypatch.chdir(tmp_path)
    cls, cfg = small_config(cifar_folder, exp_name="straight")
    straight = cls(cfg)
    straight.run()
    cls, cfg = small_config(cifar_folder, exp_name="split")
    first = cls(cfg)
    run_until_ctrl_c(first, epoch=1)
    assert first.status == "interrupted" and first.current_epoch == 1
    assert first.raw_model.pruned_fraction_per_block() == [0.25, 0.25]     # one stage done, two to come
    resumed = cls(cfg, ckpt.load("experiments/split/checkpoints/checkpoint.pth.tar"))
    resumed.run()
    assert resumed.raw_model.pruned_fraction_per_block() == [0.75, 0.75]
    for (name, a), b in zip(straight.raw_model.state_dict().items(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_condense_and_test_both_forms_through_main(cifar_folder, tmp_path):
    exp = tmp_path / "experiments" / "condensenet_exp_0"
    trained = run_main([CONFIG, *overrides(cifar_folder)], tmp_path)
    assert trained.returncode == 0, trained.stderr
    state = torch.load(exp / "checkpoints" / "checkpoint.pth.tar", weights_only=True)["models"]["model"]
    masks = [key for key in state if key.endswith(".mask")]
    assert masks and all(state[key].mean() == 0.25 for key in masks)     # fully condensed

    latest = ["--set", "checkpoint_file=checkpoint.pth.tar"]
    condensed = run_main([CONFIG, *overrides(cifar_folder, mode="condense"), *latest], tmp_path)
    assert condensed.returncode == 0, condensed.stderr
    report = json.loads((exp / "results.json").read_text())["condense"]
    assert report["trained"]["params"] == params(CondenseNet(**SMALL))
    assert report["condensed"]["params"] < report["trained"]["params"]
    assert report["condensed"]["macs"] < report["trained"]["macs"]
    assert report["max_logit_difference"] < 1e-4
    assert (exp / "checkpoints" / "condensed.pth.tar").is_file()

    as_trained = run_main([CONFIG, *overrides(cifar_folder, mode="test"), *latest], tmp_path)
    assert as_trained.returncode == 0, as_trained.stderr
    trained_metrics = json.loads((exp / "results.json").read_text())["test"]
    as_condensed = run_main([CONFIG, *overrides(cifar_folder, mode="test", condensed=True)], tmp_path)
    assert as_condensed.returncode == 0, as_condensed.stderr
    condensed_metrics = json.loads((exp / "results.json").read_text())["test"]
    assert condensed_metrics["test/accuracy"] == pytest.approx(trained_metrics["test/accuracy"])
    assert condensed_metrics["test/loss"] == pytest.approx(trained_metrics["test/loss"], abs=1e-4)


def test_condensing_too_early_is_a_clear_error(cifar_folder, tmp_path, monkeypatch):
    from utils import checkpoint as ckpt
    from utils.errors import UserError

    monkeypatch.chdir(tmp_path)
    cls, cfg = small_config(cifar_folder)
    early = cls(cfg)
    run_until_ctrl_c(early, epoch=1)    # epoch 1 of 4: one pruning stage of three done
    cfg.mode = "condense"
    agent = cls(cfg, ckpt.load("experiments/condensenet_exp_0/checkpoints/checkpoint.pth.tar"))
    with pytest.raises(UserError, match="before condensation finished"):
        agent.run()
