"""Stopping a run anywhere loses nothing: signals are honoured at safe points (after an optimizer
step), checkpoint_every writes inside epochs, a second and third Ctrl+C behave as documented, and
SIGKILL at any moment (inside a step, during a checkpoint write) leaves an experiment that
--resume continues to the same weights as a run never stopped."""
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from agents.base import BaseAgent
from tests.conftest import ROOT, mnist_overrides, run_main_in_process, set_args
from tests.test_shipped_configs import differences
from utils import checkpoint as ckpt

MNIST = ROOT / "configs" / "mnist_exp_0.json"
IRIS = ROOT / "configs" / "iris_exp_0.json"
END_ITERATION = BaseAgent._end_iteration
REPRODUCED = ("epoch", "iteration", "models", "optimizers", "schedulers", "rng", "position")


def latest(cwd: Path, exp: str, name: str = ckpt.LATEST) -> dict:
    return torch.load(cwd / "experiments" / exp / "checkpoints" / name, weights_only=True)


def signal_at_step(step: int, count: int = 1):
    """A BaseAgent._end_iteration that sends this process SIGINT `count` times after optimizer
    step `step`."""
    original = END_ITERATION

    def end_iteration(agent):
        original(agent)
        if agent.current_iteration == step:
            for _ in range(count):
                os.kill(os.getpid(), signal.SIGINT)

    return end_iteration


def test_a_signal_inside_a_step_stops_after_it_with_counters_that_match_the_weights(tmp_path, monkeypatch):
    """SIGINT delivered in the middle of train_step (forward pass) of step 7: that step is
    finished, then the run stops; the checkpoint's iteration is the number of optimizer steps
    applied (Adam counts them in its state)."""
    args = [IRIS, *set_args(max_epoch=5)]
    assert run_main_in_process(args, tmp_path / "straight").returncode == 0
    from agents.iris import IrisAgent

    original = IrisAgent.train_step

    def train_step(agent, batch):
        if agent.current_iteration == 6:               # inside the 7th step, before its backward
            os.kill(os.getpid(), signal.SIGINT)
        return original(agent, batch)

    monkeypatch.setattr(IrisAgent, "train_step", train_step)
    stopped = run_main_in_process(args, tmp_path / "split")
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    state = latest(tmp_path / "split", "iris_exp_0")
    steps = {int(group["step"]) for group in state["optimizers"]["optimizer"]["state"].values()}
    assert state["iteration"] == 7 and steps == {7}
    per_epoch = json.loads((tmp_path / "straight" / "experiments" / "iris_exp_0" / "results.json").read_text())
    per_epoch = per_epoch["iterations"] // per_epoch["epochs_done"]
    assert state["position"]["epoch_position"] == 7 - state["epoch"] * per_epoch > 0
    monkeypatch.undo()
    resumed = run_main_in_process([*args, "--resume"], tmp_path / "split")
    assert resumed.returncode == 0, resumed.stderr
    straight, split = latest(tmp_path / "straight", "iris_exp_0"), latest(tmp_path / "split", "iris_exp_0")
    assert differences({k: straight[k] for k in REPRODUCED}, {k: split[k] for k in REPRODUCED}) == []


def test_checkpoint_every_writes_the_latest_checkpoint_inside_epochs(mnist_folder, tmp_path, monkeypatch):
    saved = []
    original = ckpt.CheckpointSaver.save

    def save(saver, state, epoch, is_best, keep_history=True):
        saved.append((state["iteration"], state["position"] and state["position"]["epoch_position"]))
        return original(saver, state, epoch, is_best, keep_history)

    monkeypatch.setattr(ckpt.CheckpointSaver, "save", save)
    result = run_main_in_process([MNIST, *mnist_overrides(mnist_folder, checkpoint_every=3)], tmp_path)
    assert result.returncode == 0, result.stderr
    # 256 training digits / 32: 8 steps an epoch, 2 epochs; every 3 steps and at each epoch's end
    assert saved == [(3, 3), (6, 6), (8, None), (11, 3), (14, 6), (16, None)]


def test_a_second_ctrl_c_waits_for_the_checkpoint_and_a_third_aborts(mnist_folder, tmp_path, monkeypatch):
    args = [MNIST, *mnist_overrides(mnist_folder)]
    monkeypatch.setattr(BaseAgent, "_end_iteration", signal_at_step(5, count=2))
    twice = run_main_in_process(args, tmp_path / "twice")
    assert twice.returncode == 130 and "Traceback" not in twice.stderr
    assert latest(tmp_path / "twice", "mnist_exp_0")["iteration"] == 5
    assert "still finishing the current step" in twice.stdout

    # The third signal arrives while the interrupted run's checkpoint is being written: that write
    # is abandoned (its temporary file removed), the checkpoint from before stays as it was.
    monkeypatch.setattr(BaseAgent, "_end_iteration", signal_at_step(3, count=1))
    first = run_main_in_process([*args[:1], *mnist_overrides(mnist_folder, checkpoint_every=2)], tmp_path / "thrice")
    assert first.returncode == 130
    folder = tmp_path / "thrice" / "experiments" / "mnist_exp_0" / "checkpoints"
    before = (folder / ckpt.LATEST).read_bytes()
    monkeypatch.setattr(BaseAgent, "_end_iteration", signal_at_step(6, count=1))
    original_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iteration") == 6:   # the interrupted run's own save
            f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGINT)                     # the second: it waits
            os.kill(os.getpid(), signal.SIGINT)                     # the third: abort
        return original_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    aborted = run_main_in_process([*args[:1], *mnist_overrides(mnist_folder, checkpoint_every=2), "--resume"],
                                  tmp_path / "thrice")
    assert aborted.returncode == 130 and "Traceback" not in aborted.stderr
    assert "aborting now, without saving" in aborted.stdout
    state = latest(tmp_path / "thrice", "mnist_exp_0")
    assert state["iteration"] == 5     # the last complete write: checkpoint_every, 2 steps after 3
    assert (folder / ckpt.LATEST).read_bytes() != before
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- SIGKILL anywhere

def _main_in(cwd: str, args: list):
    """A forkserver child: main.main in cwd, its output in cwd/output.txt."""
    os.chdir(cwd)
    output = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(output, 1)
    os.dup2(output, 2)
    import main
    sys.exit(main.main(args))


def _kill_while_writing(process, folder: Path, timeout: float):
    """SIGKILL the process as soon as a checkpoint write (its temporary file) is under way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.is_alive():
        if folder.is_dir() and any(name.endswith(".tmp") for name in os.listdir(folder)):
            break
    process.kill()


def test_sigkill_at_15_moments_then_resume_ends_where_a_straight_run_ends(mnist_folder, tmp_path):
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "main", "agents.mnist"])
    settings = mnist_overrides(mnist_folder, max_epoch=3, checkpoint_every=1, progress_bar=False)
    straight = tmp_path / "straight"
    straight.mkdir()
    child = context.Process(target=_main_in, args=(str(straight), [str(MNIST), *settings]))
    child.start()
    started = time.monotonic()
    child.join(120)
    run_seconds = time.monotonic() - started
    assert child.exitcode == 0, (straight / "output.txt").read_text()

    killed = tmp_path / "killed"
    killed.mkdir()
    folder = killed / "experiments" / "mnist_exp_0" / "checkpoints"
    chance = random.Random(0)
    for attempt in range(15):
        resume = ["--resume"] if (folder / ckpt.LATEST).is_file() else []
        child = context.Process(target=_main_in, args=(str(killed), [str(MNIST), *settings, *resume]))
        child.start()
        if attempt % 3 == 2:                            # during a checkpoint write
            _kill_while_writing(child, folder, run_seconds)
        else:                                           # anywhere: start-up, a step, validation, a write
            time.sleep(chance.uniform(0.2, run_seconds))
            child.kill()
        child.join(30)
        for path in folder.glob("*.pth.tar") if folder.is_dir() else []:
            ckpt.load(path)                             # every checkpoint file loads
    resume = ["--resume"] if (folder / ckpt.LATEST).is_file() else []
    child = context.Process(target=_main_in, args=(str(killed), [str(MNIST), *settings, *resume]))
    child.start()
    child.join(120)
    output = (killed / "output.txt").read_text()
    assert child.exitcode == 0, output
    assert "Traceback" not in output
    assert json.loads((killed / "experiments" / "mnist_exp_0" / "results.json").read_text())["status"] == "completed"
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    first, last = latest(straight, "mnist_exp_0"), latest(killed, "mnist_exp_0")
    assert differences({k: first[k] for k in REPRODUCED}, {k: last[k] for k in REPRODUCED}) == []


def test_a_signal_during_validation_keeps_the_epochs_training(tmp_path, monkeypatch):
    """SIGINT inside epoch 3's validation: the checkpoint holds epoch 3's training (2 epochs
    complete, the third trained), the resumed run validates it again and ends where the
    uninterrupted run ends."""
    args = [IRIS, *set_args(max_epoch=4)]
    assert run_main_in_process(args, tmp_path / "straight").returncode == 0
    from agents.iris import IrisAgent

    original = IrisAgent.validate_step

    def validate_step(agent, batch):
        if agent.current_epoch == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(agent, batch)

    monkeypatch.setattr(IrisAgent, "validate_step", validate_step)
    stopped = run_main_in_process(args, tmp_path / "split")
    assert stopped.returncode == 130, stopped.stderr
    assert "checkpoint saved at epoch 2, iteration" in stopped.stdout and "(epoch 3 trained" in stopped.stdout
    state = latest(tmp_path / "split", "iris_exp_0")
    assert state["epoch"] == 2 and "train/epoch_loss" in state["position"]["train_metrics"]
    monkeypatch.undo()
    resumed = run_main_in_process([*args, "--resume"], tmp_path / "split")
    assert resumed.returncode == 0 and "epoch 3 trained: its validation runs again" in resumed.stdout
    straight, split = latest(tmp_path / "straight", "iris_exp_0"), latest(tmp_path / "split", "iris_exp_0")
    assert differences({k: straight[k] for k in REPRODUCED}, {k: split[k] for k in REPRODUCED}) == []
    assert json.loads((tmp_path / "split" / "experiments" / "iris_exp_0" / "results.json").read_text())["last"] == \
        json.loads((tmp_path / "straight" / "experiments" / "iris_exp_0" / "results.json").read_text())["last"]
