"""utils/training.py alone: the batch limits of debug runs, gradient clipping, warmup's logged
rates, per-optimizer tags and the EMA's construction from the config."""
import pytest
import torch

from utils.data import TensorBatchLoader
from utils.training import EMA, BatchLimits, Warmup, clip_gradients, per_optimizer


def loader(batches: int, batch_size: int = 2) -> TensorBatchLoader:
    n = batches * batch_size
    return TensorBatchLoader(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n), batch_size,
                             shuffle=True)


def test_batch_limits_count_batches_as_each_option_says():
    ten = loader(10)
    assert BatchLimits(False, None, None, 0).train(ten) == (ten, 10)
    assert BatchLimits(False, 3, 0.25, 0).train(ten)[1] == 3 and BatchLimits(False, 3, 0.25, 0).val(ten)[1] == 2
    assert BatchLimits(False, 0.01, None, 0).train(ten)[1] == 1              # a fraction is at least one batch
    debug = BatchLimits(2, 7, 7, 0)                                          # fast_dev_run wins over the limits
    assert debug.train(ten)[1] == debug.val(ten)[1] == 2 and debug.epochs(10) == 1
    assert "2 training and 2 validation batch(es)" in debug.debug_run_report()
    assert BatchLimits(False, None, None, 0).epochs(10) == 10


def test_overfit_batches_are_the_first_unshuffled_ones_for_training_and_validation():
    ten, limits = loader(10), BatchLimits(False, None, None, 3)
    source, count = limits.train(ten)
    assert count == 3 and [batch[0][:, 0].tolist() for batch in source] == [[0, 1], [2, 3], [4, 5]]
    assert limits.train(ten)[0] is source and limits.val(loader(4))[0] is source    # cached, validated on
    assert ten.shuffle and limits.train_count(ten) == 3


def test_clip_gradients_returns_the_norm_before_clipping():
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    (weight * torch.tensor([3.0, 4.0])).sum().backward()        # gradient (3, 4): norm 5
    assert clip_gradients(optimizer, 1.0).item() == pytest.approx(5.0)
    assert weight.grad.norm().item() == pytest.approx(1.0)


def test_per_optimizer_tags_and_warmup_rates():
    net = torch.nn.Linear(1, 1)
    one = {"opt": torch.optim.SGD(net.parameters(), lr=0.4)}
    two = {"G": torch.optim.SGD(net.parameters(), lr=0.4), "D": torch.optim.SGD(net.parameters(), lr=0.2)}
    assert per_optimizer("train/lr", one, lambda opt: opt.param_groups[0]["lr"]) == {"train/lr": 0.4}
    assert per_optimizer("train/lr", two, lambda opt: opt.param_groups[0]["lr"]) == {"train/lr_G": 0.4, "train/lr_D": 0.2}
    assert Warmup(4).logged_rates(two, 2) == {"train/warmup_lr_G": pytest.approx(0.2), "train/warmup_lr_D": pytest.approx(0.1)}


def test_ema_of_the_config_and_its_saved_weights():
    models = {"first": torch.nn.Linear(2, 2), "second": torch.nn.Linear(2, 2)}
    assert EMA.of(models, None, None) is None
    ema = EMA.of(models, "second", {"decay": 0.5})
    assert ema.model is models["second"] and ema.every == 1
    assert EMA.of(models, None, {"every": 3}).model is models["first"]
    ema.update(1)                                   # the first update copies the weights
    with torch.no_grad():
        models["second"].weight.add_(2.0)
    ema.update(2)
    weights = EMA.averaged_weights(ema.state_dict())
    assert set(weights) == {"weight", "bias"}
    assert torch.allclose(weights["weight"], models["second"].weight - 1.0)     # halfway, with decay 0.5
