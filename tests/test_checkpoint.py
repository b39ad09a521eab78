import random

import numpy as np
import pytest
import torch

from agents import make_config
from tests.tiny_agent import TINY, build, trained
from utils import checkpoint as ckpt
from utils.errors import CheckpointError, UserError



@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def latest(exp="tiny"):
    return ckpt.load(f"experiments/{exp}/checkpoints/checkpoint.pth.tar")


def test_checkpoint_is_plain_and_holds_every_declared_part():
    agent = trained(max_epoch=2)
    state = torch.load("experiments/tiny/checkpoints/checkpoint.pth.tar", weights_only=True)
    assert set(state["models"]) == {"model"} and set(state["optimizers"]) == {"optimizer"}
    assert set(state["schedulers"]) == {"scheduler"}
    assert state["epoch"] == 2 and state["iteration"] == agent.current_iteration == 12
    assert state["best"]["epoch"] in (1, 2) and state["best"]["value"] == agent.best_value
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert state["config"]["exp_name"] == "tiny"


def test_loading_restores_optimizer_scheduler_counters_and_rng():
    first = trained(max_epoch=2)
    state = latest()
    second = build(checkpoint=state, max_epoch=2)
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    buffers = [s["momentum_buffer"] for s in second.optimizer.state_dict()["state"].values()]
    expected = [s["momentum_buffer"] for s in first.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(buffers, expected))
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** 2)
    assert (second.current_epoch, second.current_iteration) == (2, 12)
    assert (second.best_value, second.best_epoch) == (first.best_value, first.best_epoch)
    ckpt.set_rng_states(state["rng"])
    draws = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_states(state["rng"])
    assert draws == (random.random(), np.random.rand(), torch.rand(1))


@pytest.mark.parametrize("interval", ["epoch", "iteration"])
def test_resume_ends_with_the_same_weights_as_a_straight_run(interval):
    straight = trained(max_epoch=4, scheduler_interval=interval, exp_name="straight")
    trained(max_epoch=2, scheduler_interval=interval, exp_name="split")
    resumed = build(checkpoint=latest("split"), max_epoch=4, scheduler_interval=interval, exp_name="split")
    resumed.run()
    resumed.finalize()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.current_iteration == straight.current_iteration == 24
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_iteration_scheduler_steps_once_per_optimizer_step():
    agent = trained(max_epoch=1, scheduler_interval="iteration")
    assert agent.current_iteration == 6
    assert agent.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** 6)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    ckpt.save_atomic({"models": {"m": torch.ones(3)}}, path)
    before = path.read_bytes()

    def crash_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"models": {"m": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth.tar"]


def test_truncated_or_foreign_files_are_clear_errors(tmp_path):
    path = tmp_path / "c.pth.tar"
    ckpt.save_atomic({"models": {"m": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="unreadable.*--force"):
        ckpt.load(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint written by this framework"):
        ckpt.load(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        ckpt.load(tmp_path / "missing.pth.tar")


def test_weights_that_do_not_fit_the_model_are_a_clear_error():
    trained(max_epoch=1)
    state = latest()
    state["models"]["model"]["weight"] = torch.zeros(3, 8)
    with pytest.raises(CheckpointError, match="do not fit model 'model'"):
        build(checkpoint=state)
    del state["models"]["model"]
    with pytest.raises(CheckpointError, match="no weights for model 'model'"):
        build(checkpoint=state)


def test_early_stopping_after_patience_validations_without_improvement():
    agent = trained(max_epoch=10, learning_rate=0.0, early_stopping_patience=2)
    assert agent.status == "early_stopped"
    assert agent.current_epoch == 3 and agent.best_epoch == 1
    resumed = build(checkpoint=latest(), max_epoch=10, learning_rate=0.0, early_stopping_patience=2)
    resumed.run()
    assert resumed.status == "early_stopped" and resumed.current_epoch == 3


def test_keep_last_checkpoints_and_best():
    trained(max_epoch=4, keep_last_checkpoints=2)
    names = sorted(p.name for p in (ckpt.Path("experiments/tiny/checkpoints")).iterdir())
    assert names == ["checkpoint.pth.tar", "epoch_0003.pth.tar", "epoch_0004.pth.tar", "model_best.pth.tar"]


def test_validate_every_and_always_at_the_end():
    agent = build(max_epoch=3, validate_every=2)
    validated = []
    original = agent.validate
    agent.validate = lambda: validated.append(agent.current_epoch) or original()
    agent.run()
    assert validated == [2, 3]


def test_a_missing_hook_fails_when_the_agent_is_built():
    from agents.base import SupervisedAgent

    class NoValidation(SupervisedAgent):       # forgot validate_step
        def build(self):
            pass

        def train_step(self, batch):
            pass

    _, cfg = make_config(TINY)
    with pytest.raises(TypeError, match="validate_step"):
        NoValidation(cfg)


def test_a_diverging_loss_stops_with_a_clear_error():
    agent = build(learning_rate=1e38, momentum=0.0)
    with pytest.raises(UserError, match="training diverged.*lower learning_rate"):
        agent.run()
    assert agent.status == "failed"


def test_bf16_autocast_trains_on_cpu():
    agent = trained(max_epoch=2, amp="bf16")
    assert agent.status == "completed" and agent.best_value > 0.5


def test_fp16_scaler_is_saved_and_restored():
    agent = trained(max_epoch=1, amp="fp16")
    assert agent.scaler is not None and agent.status == "completed"
    state = latest()
    assert state["scaler"]["scale"] == agent.scaler.get_scale()
    state["scaler"]["scale"] = 1024.0            # as if it had backed off after overflows
    resumed = build(checkpoint=state, amp="fp16")
    assert resumed.scaler.get_scale() == 1024.0


def test_checkpoint_saver_keeps_latest_best_and_the_last_n(tmp_path):
    saver = ckpt.CheckpointSaver(tmp_path / "checkpoints", keep_last=2)
    for epoch in range(1, 5):
        saver.save({"models": {}, "epoch": epoch}, epoch, is_best=epoch == 2)
    saver.save({"models": {}, "epoch": 5}, 5, is_best=False, keep_history=False)   # interrupted mid-epoch
    names = sorted(p.name for p in saver.folder.iterdir())
    assert names == ["checkpoint.pth.tar", "epoch_0003.pth.tar", "epoch_0004.pth.tar", "model_best.pth.tar"]
    assert ckpt.load(saver.latest)["epoch"] == 5 and ckpt.load(saver.best)["epoch"] == 2


def test_training_parts_round_trip_and_plain_configs(tmp_path):
    from easydict import EasyDict

    parts = ckpt.TrainingParts()
    parts.models["net"] = torch.nn.Linear(2, 2)
    parts.optimizers["opt"] = torch.optim.SGD(parts.models["net"].parameters(), lr=0.1, momentum=0.9)
    parts.schedulers["sched"] = (torch.optim.lr_scheduler.StepLR(parts.optimizers["opt"], 1, 0.5), "epoch")
    parts.models["net"](torch.ones(1, 2)).sum().backward()
    parts.optimizers["opt"].step()
    parts.schedulers["sched"][0].step()
    config = EasyDict({"adam": {"eps": 1e-8}, "sizes": (1, 2)})
    ckpt.save_atomic({**parts.state_dict(), "config": ckpt.plain(config)}, tmp_path / "c.pth.tar")
    state = ckpt.load(tmp_path / "c.pth.tar")                  # weights_only: plain types only
    assert state["config"] == {"adam": {"eps": 1e-8}, "sizes": [1, 2]}
    fresh = ckpt.TrainingParts()
    fresh.models["net"] = torch.nn.Linear(2, 2)
    fresh.optimizers["opt"] = torch.optim.SGD(fresh.models["net"].parameters(), lr=0.1, momentum=0.9)
    fresh.schedulers["sched"] = (torch.optim.lr_scheduler.StepLR(fresh.optimizers["opt"], 1, 0.5), "epoch")
    fresh.load_models(state)
    fresh.load_training(state)
    assert torch.equal(fresh.models["net"].weight, parts.models["net"].weight)
    assert fresh.optimizers["opt"].param_groups[0]["lr"] == 0.05
    del state["optimizers"]["opt"]
    with pytest.raises(CheckpointError, match="no state for optimizer 'opt'"):
        fresh.load_training(state)


def test_the_checkpoint_clock_counts_steps_and_minutes_from_the_last_save(monkeypatch):
    assert not ckpt.CheckpointClock(None, None).inside_epochs
    steps = ckpt.CheckpointClock(every=3, minutes=None)
    assert [steps.due(i) for i in range(5)] == [False, False, False, True, True]
    steps.saved(3)
    assert not steps.due(5) and steps.due(6)
    now = [1000.0]
    monkeypatch.setattr(ckpt.time, "monotonic", lambda: now[0])
    minutes = ckpt.CheckpointClock(every=None, minutes=0.5)
    assert minutes.inside_epochs and not minutes.due(10)
    now[0] += 30
    assert minutes.due(10) and not minutes.due(0)          # no step since the last save: nothing new


def test_training_parts_step_epoch_schedulers_and_plateau_on_the_monitored_value():
    parts = ckpt.TrainingParts()
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    step = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.1)
    per_step = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    parts.add_scheduler("step", step, "epoch")
    parts.add_scheduler("plateau", plateau, "epoch")
    parts.add_scheduler("per_step", per_step, "iteration")
    assert parts.iteration_schedulers == [per_step]
    optimizer.step()                                  # schedulers step after the optimizer
    parts.step_epoch_schedulers(None)                 # nothing monitored: the plateau does not step
    assert step.last_epoch == 1 and plateau.last_epoch == 0 and per_step.last_epoch == 0
    parts.step_epoch_schedulers(1.0)
    parts.step_epoch_schedulers(2.0)                  # worse: the plateau cuts the rate
    assert plateau.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(0.5 ** 3 * 0.1)
    with pytest.raises(ValueError, match="'epoch' or 'iteration', not 'batch'"):
        parts.add_scheduler("bad", step, "batch")
