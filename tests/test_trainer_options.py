"""What every trainer has, built once in BaseAgent: gradient accumulation, clipping, EMA, warmup,
stop_at, debug runs, anomaly detection, the profiler; and each refused where an agent cannot use it."""
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import make_config
from tests.tiny_agent import TINY, build, trained
from utils import checkpoint as ckpt
from utils.errors import ConfigError



@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def events(exp="tiny"):
    accumulator = EventAccumulator(f"experiments/{exp}/summaries")
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("n_samples", [96, 88])      # 88: the last group of the epoch is one batch
def test_k_accumulated_batches_equal_one_batch_k_times_larger(n_samples):
    big = trained(exp_name="big", n_samples=n_samples, batch_size=16, max_epoch=2, shuffle=False)
    small = trained(exp_name="small", n_samples=n_samples, batch_size=8, grad_accumulation=2, max_epoch=2,
                    shuffle=False)
    assert small.current_iteration == big.current_iteration == 2 * -(-n_samples // 16)
    for a, b in zip(big.model.parameters(), small.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert small.optimizer.param_groups[0]["lr"] == big.optimizer.param_groups[0]["lr"]   # epoch schedule


def test_clipping_bounds_the_gradient_norm_and_logs_it():
    agent = build(grad_clip=0.01, learning_rate=0.0, log_interval=1, max_epoch=1)
    points, labels = next(iter(agent.data_loader.train_loader))
    loss = torch.nn.functional.cross_entropy(agent.model(points), labels)
    assert agent.optimizer_step(loss, agent.optimizer)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in agent.model.parameters()]))
    assert norm <= 0.01 + 1e-6
    agent.run()
    agent.finalize()
    logged = events().Scalars("train/grad_norm")
    assert len(logged) == 1 + 6 and all(e.value > 0.01 for e in logged)    # the norm before clipping


def test_ema_is_the_hand_computed_average_and_resumes_exactly():
    agent = build(ema={"decay": 0.5}, max_epoch=1, learning_rate=0.1)
    expected = None
    for points, labels in agent.data_loader.train_loader:
        loss = torch.nn.functional.cross_entropy(agent.model(points), labels)
        agent.optimizer_step(loss, agent.optimizer)
        weight = agent.model.weight.detach().clone()
        expected = weight if expected is None else 0.5 * expected + 0.5 * weight
    assert torch.allclose(agent.ema.averaged.module.weight, expected, atol=1e-7)

    straight = trained(exp_name="straight", ema={"decay": 0.9, "every": 2}, max_epoch=3)
    trained(exp_name="split", ema={"decay": 0.9, "every": 2}, max_epoch=1)
    resumed = build(checkpoint=ckpt.load("experiments/split/checkpoints/checkpoint.pth.tar"), exp_name="split",
                    ema={"decay": 0.9, "every": 2}, max_epoch=3)
    resumed.run()
    resumed.finalize()
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    # The best model is evaluated with the averaged weights.
    tester = build(checkpoint=ckpt.load("experiments/straight/checkpoints/checkpoint.pth.tar"),
                   exp_name="straight", ema={"decay": 0.9, "every": 2}, mode="test")
    assert torch.equal(tester.model.weight, straight.ema.averaged.module.weight)
    assert not torch.equal(tester.model.weight, straight.model.weight)


def test_warmup_rises_linearly_then_the_schedule_runs_unchanged():
    warm = trained(exp_name="warm", warmup_iterations=4, log_interval=1, max_epoch=2, lr_gamma=0.5)
    cold = trained(exp_name="cold", log_interval=1, max_epoch=2, lr_gamma=0.5)
    curve = [(e.step, e.value) for e in events("warm").Scalars("train/warmup_lr")]
    assert curve == [(step, pytest.approx(0.1 * step / 4)) for step in (1, 2, 3, 4)]
    assert warm.optimizer.param_groups[0]["lr"] == cold.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert not torch.equal(warm.model.weight, cold.model.weight)


def test_stop_at_stops_and_records_its_status():
    agent = trained(stop_at=0.8, max_epoch=20)
    results = json.loads(open("experiments/tiny/results.json").read())
    assert results["status"] == agent.status == "reached_target"
    assert agent.current_epoch < 20 and results["best"]["value"] >= 0.8
    again = build(checkpoint=ckpt.load("experiments/tiny/checkpoints/checkpoint.pth.tar"), stop_at=0.8, max_epoch=20)
    again.run()
    assert again.status == "reached_target" and again.current_epoch == agent.current_epoch
    with pytest.raises(ConfigError, match="stop_at.*monitor"):
        build(stop_at=0.5, monitor=None)


def test_fast_dev_run_runs_n_batches_and_keeps_nothing(capsys):
    import main

    (open("tiny.json", "w")).write(json.dumps({**TINY, "max_epoch": 5}))
    assert main.main(["tiny.json", "--set", "fast_dev_run=2"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "fast_dev_run: 2 training and 2 validation batch(es)" in out
    import pathlib
    assert not pathlib.Path("experiments/tiny").exists()
    agent = trained(fast_dev_run=True, max_epoch=5)
    assert agent.current_iteration == 1 and agent.current_epoch == 1


def test_limits_count_batches_or_take_a_fraction():
    assert trained(limit_train_batches=2, max_epoch=1).current_iteration == 2
    assert trained(exp_name="half", limit_train_batches=0.5, max_epoch=1).current_iteration == 3
    with pytest.raises(ConfigError, match="limit_val_batches.*fraction"):
        build(limit_val_batches=1.5)


def test_overfit_batches_drives_the_loss_to_zero():
    agent = trained(overfit_batches=1, max_epoch=60, learning_rate=0.5, lr_gamma=1.0)
    assert agent.current_iteration == 60
    assert agent.last_metrics["val/loss"] < 0.05           # validated on the batch it trains on


def test_detect_anomaly_names_the_operation_that_made_a_nan():
    agent = build(detect_anomaly=True, max_epoch=1)
    agent.train_step = lambda batch: torch.sqrt(-agent.model(batch[0]).sum() ** 2 - 1)    # NaN in backward
    with pytest.raises(RuntimeError, match="SqrtBackward"):
        agent.run()


def test_profile_writes_a_chrome_trace():
    agent = trained(profile=2, max_epoch=1)
    trace = json.loads(open("experiments/tiny/out/profile_trace.json").read())
    assert agent.status == "completed" and trace["traceEvents"]


@pytest.mark.parametrize("config, message", [
    ({"agent": "DQNAgent", "grad_accumulation": 2}, "DQNAgent cannot use 'grad_accumulation'"),
    ({"agent": "DQNAgent", "limit_train_batches": 2}, "DQNAgent cannot use 'limit_train_batches'"),
    ({"agent": "DCGANAgent", "grad_accumulation": 2}, "DCGANAgent cannot use 'grad_accumulation'"),
    ({"agent": "ERFNetAgent", "overfit_batches": 2, "pretrained_encoder": None},
     "ERFNetAgent cannot use 'overfit_batches'"),
    ({"agent": "MnistAgent", "ema": {"decay": 1.5}}, "ema.decay"),
    ({"agent": "MnistAgent", "ema": {"decya": 0.9}}, "unknown entries"),
])
def test_a_key_an_agent_cannot_use_is_one_clear_error(config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_config({"exp_name": "x", **config})


def test_a_validation_callback_can_stop_the_run_with_its_status():
    agent = build(max_epoch=10)
    seen = []
    agent.validation_callbacks.append(lambda a, metrics: seen.append(metrics["val/accuracy"]) or
                                      ("pruned" if a.current_epoch == 2 else None))
    agent.run()
    agent.finalize()
    results = json.loads(open("experiments/tiny/results.json").read())
    assert len(seen) == 2 and agent.status == results["status"] == "pruned" and results["epochs_done"] == 2
    assert ckpt.load("experiments/tiny/checkpoints/checkpoint.pth.tar")["epoch"] == 2
