"""CondenseNet: parameter counts, pruning, conversion, and the example end to end on a CIFAR-10
fixture in the pickled-batch layout (tests/fixtures.py)."""
import json

import pytest
import torch
from torch import nn

from graphs.models.condensenet import CondenseNet, condense, condensed_skeleton, count_macs
from graphs.models.custom_layers.learned_group_conv import stage_at
from tests.conftest import run_main_in_process, set_args
from tests.shipped import CONDENSENET as SMALL
from tests.shipped import checkpoint


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
# The training run is the one of tests/test_shipped_configs.py (which also checks that it resumes
# bitwise), on the cifar_folder fixture: 4 steps an epoch, 16 in all, the pruning stages starting
# at steps 3, 6 and 8. The tests that read it are on the worker that trains it.
on_its_worker = pytest.mark.xdist_group("condensenet_exp_0")


@pytest.fixture
def trained(shipped_runs):
    """configs/condensenet_exp_0.json for 4 epochs (read only: copy it to run more on it)."""
    return shipped_runs["condensenet_exp_0"]


def pruned_fractions(state: dict) -> list:
    model = CondenseNet(**SMALL)
    model.load_state_dict(state["models"]["model"])
    return model.pruned_fraction_per_block()


@on_its_worker
def test_resume_mid_training_condenses_at_the_same_steps(trained):
    assert trained.interrupted_checkpoint["epoch"] == 1
    assert pruned_fractions(trained.interrupted_checkpoint) == [0.25, 0.25]   # one stage done, two to come
    assert pruned_fractions(checkpoint(trained.split)) == [0.75, 0.75]


@on_its_worker
def test_condense_and_test_both_forms_through_main(trained, tmp_path):
    exp = trained.copy_to(tmp_path)
    state = checkpoint(exp)["models"]["model"]
    masks = [key for key in state if key.endswith(".mask")]
    assert masks and all(state[key].mean() == 0.25 for key in masks)     # fully condensed

    latest = set_args(checkpoint_file="checkpoint.pth.tar")
    condensed = run_main_in_process([*trained.args, *set_args(mode="condense"), *latest], tmp_path)
    assert condensed.returncode == 0, condensed.stderr
    report = json.loads((exp / "results.json").read_text())["condense"]
    assert report["trained"]["params"] == params(CondenseNet(**SMALL))
    assert report["condensed"]["params"] < report["trained"]["params"]
    assert report["condensed"]["macs"] < report["trained"]["macs"]
    assert report["max_logit_difference"] < 1e-4
    assert (exp / "checkpoints" / "condensed.pth.tar").is_file()

    as_trained = run_main_in_process([*trained.args, *set_args(mode="test"), *latest], tmp_path)
    assert as_trained.returncode == 0, as_trained.stderr
    trained_metrics = json.loads((exp / "results.json").read_text())["test"]
    as_condensed = run_main_in_process([*trained.args, *set_args(mode="test", condensed=True)], tmp_path)
    assert as_condensed.returncode == 0, as_condensed.stderr
    condensed_metrics = json.loads((exp / "results.json").read_text())["test"]
    assert condensed_metrics["test/accuracy"] == pytest.approx(trained_metrics["test/accuracy"])
    assert condensed_metrics["test/loss"] == pytest.approx(trained_metrics["test/loss"], abs=1e-4)


@on_its_worker
def test_condensing_too_early_is_a_clear_error(trained, tmp_path):
    exp = trained.copy_to(tmp_path, "split")
    early = exp / "checkpoints" / "epoch_1_of_4.pth.tar"     # one pruning stage of three done
    torch.save(trained.interrupted_checkpoint, early)
    result = run_main_in_process([*trained.args, *set_args(mode="condense", checkpoint_file=str(early))], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "before condensation finished" in result.stderr and len(result.stderr.strip().splitlines()) == 1
