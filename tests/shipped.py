"""Every shipped config (configs/*_exp_*.json), made tiny, run through main.py twice: straight, and
interrupted by a real SIGINT after an optimizer step inside an epoch, then resumed. tests/test_shipped_configs.py checks both runs; the examples'
own tests read what the runs left (through the session fixture `shipped_runs` of conftest.py)
instead of training their example again."""
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Tiny:
    settings: dict              # --set values that make the config train in seconds on CPU
    data: str | None = None     # the fixture of conftest.py whose folder becomes data_folder
    # The optimizer step after which SIGINT arrives; None: half-way into the second epoch (the run
    # stops at its next safe point: at once, or for DQN when the episode ends).
    interrupt_at: int | None = None
    # Whether interrupted + resumed ends bitwise where the straight run ends: false where resuming
    # is another run by design (a replay memory left out of the checkpoint is refilled by playing).
    resumes_bitwise: bool = True
    needs: str | None = None    # an optional package it cannot run without


DQN = {"max_steps": 600, "learning_starts": 100, "batch_size": 32, "hidden_sizes": [32, 32], "memory_capacity": 1000,
       "eps_decay": 200, "eval_every": 2, "eval_episodes": 2, "test_episodes": 3, "log_interval": 10, "device": "cpu"}
CONDENSENET = {"stages": [2, 2], "growth": [4, 8], "pool_size": 16}     # 4 steps an epoch, 16 in all
# two workers: random scale, crop and flip drawn in other processes still resume bitwise
ERFNET = {"data_mode": "local", "sbd": False, "pretrained_encoder": None, "img_size": 32, "batch_size": 4,
          "test_batch_size": 3, "max_epoch": 2, "log_interval": 1, "val_examples": 2, "data_loader_workers": 2,
          "device": "cpu"}
# valid_size 64: the default 5000 is more than the fixture's 320 training digits
MNIST = {"data_mode": "local", "batch_size": 32, "test_batch_size": 64, "max_epoch": 2, "log_interval": 2,
         "valid_size": 64, "device": "cpu"}

# A new config in configs/ fails test_shipped_configs until it has an entry here.
SHIPPED = {
    "condensenet_exp_0": Tiny({**CONDENSENET, "data_mode": "local", "batch_size": 32, "test_batch_size": 64,
                               "max_epoch": 4, "log_interval": 2, "device": "cpu"}, data="cifar_folder"),
    "dcgan_exp_0": Tiny({"dataset": "folder", "data_mode": "local", "image_size": 32, "num_filt_g": 8, "num_filt_d": 8,
                         "batch_size": 8, "max_epoch": 2, "log_interval": 1, "num_samples": 16,
                         "data_loader_workers": 0, "device": "cpu"}, data="image_folder"),
    "dqn_exp_0": Tiny(DQN, interrupt_at=280),
    "dqn_pixels_exp_0": Tiny({**DQN, "max_steps": 160, "learning_starts": 40, "batch_size": 8, "memory_capacity": 200,
                              "conv_filters": [4, 8, 8], "eval_episodes": 1, "log_interval": 5},
                             interrupt_at=20, resumes_bitwise=False, needs="pygame"),
    "erfnet_exp_0": Tiny(ERFNET, data="voc_folder"),
    "iris_exp_0": Tiny({"max_epoch": 3}),
    "mnist_exp_0": Tiny(MNIST, data="mnist_folder"),
    "mnist_exp_1": Tiny(MNIST, data="mnist_folder"),
}


def shipped_configs() -> list[str]:
    return sorted(path.stem for path in CONFIGS.glob("*_exp_*.json"))


@dataclass
class ShippedRun:
    name: str
    args: list                  # [config, --set ...]: what every run of it was given
    straight: Path              # the experiment folder of the uninterrupted run
    straight_output: object     # its Ran (returncode, stdout, stderr)
    split: Path                 # the experiment folder of the interrupted, then resumed run
    interrupted_output: object
    interrupted_results: dict   # results.json as the interruption left it
    interrupted_checkpoint: dict = field(repr=False)  # checkpoint.pth.tar as the interruption left it
    resumed_output: object = None
    interrupt_at: int = 0       # the optimizer step after which SIGINT was sent

    def copy_to(self, cwd: Path, which: str = "straight") -> Path:
        """A copy of one run's experiments/ under cwd, for a test that runs more on it; returns the
        experiment folder in the copy."""
        source = getattr(self, which)
        shutil.copytree(source.parent, cwd / "experiments", dirs_exist_ok=True)
        return cwd / "experiments" / source.name


def checkpoint(exp: Path, name: str = "checkpoint.pth.tar") -> dict:
    return torch.load(exp / "checkpoints" / name, weights_only=True)


def interrupt_step(tiny: Tiny, straight_results: dict) -> int:
    if tiny.interrupt_at is not None:
        return tiny.interrupt_at
    per_epoch = straight_results["iterations"] // straight_results["epochs_done"]
    assert per_epoch >= 2, "give the tiny run at least two steps an epoch, to stop inside one"
    return per_epoch + per_epoch // 2


def run_shipped(name: str, data_folder: Path | None, root: Path) -> ShippedRun:
    """Train configs/<name>.json straight in root/straight, and in root/split with SIGINT sent
    after an optimizer step inside an epoch, then --resume. Both through main.main, in this
    process (the signal goes to this process: the run's handler takes it)."""
    import os
    import signal

    from agents.base import BaseAgent
    from tests.conftest import run_main_in_process, set_args

    tiny = SHIPPED[name]
    config = CONFIGS / f"{name}.json"
    settings = dict(tiny.settings, **({"data_folder": str(data_folder)} if data_folder else {}))
    args = [config, *set_args(**settings)]

    straight = run_main_in_process(args, root / "straight")
    assert straight.returncode == 0, straight.stderr
    exp_name = json.loads(config.read_text())["exp_name"]
    at = interrupt_step(tiny, json.loads((root / "straight" / "experiments" / exp_name / "results.json").read_text()))

    original = BaseAgent._end_iteration

    def end_iteration(agent):
        original(agent)
        if agent.current_iteration == at:
            os.kill(os.getpid(), signal.SIGINT)      # what Ctrl+C sends

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BaseAgent, "_end_iteration", end_iteration)
        interrupted = run_main_in_process(args, root / "split")
    split = root / "split" / "experiments" / exp_name
    assert interrupted.returncode == 130, interrupted.stderr
    at_interruption = json.loads((split / "results.json").read_text()), checkpoint(split)
    resumed = run_main_in_process([*args, "--resume"], root / "split")
    assert resumed.returncode == 0, resumed.stderr
    return ShippedRun(name, args, root / "straight" / "experiments" / exp_name, straight, split,
                      interrupted, *at_interruption, resumed, at)
