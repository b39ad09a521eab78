"""What checkpoint_every costs: configs/mnist_exp_0.json trained on the same real digits as
bench/mnist_epoch.py (8,000 of MNIST's test digits, torchvision's raw layout in a temporary
folder), once at epoch ends only (checkpoint_every null) and once with a checkpoint inside the
epoch every N optimizer steps, alternating, --repeats times each. Reports the milliseconds one
mid-epoch save takes (timed around the saver: the state assembled, torch.save to a temporary file,
fsync, rename) against the milliseconds of one training step, and the epoch's wall time with and
without them (medians).

    .venv/bin/python bench/checkpoint_cost.py [--every N] [--repeats N] [--threads N]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

from agents import make_config
from bench.mnist_epoch import TRAIN_SIZE, load_digits
from datasets.mnist import write_raw_split
from utils.config import create_experiment_dirs


def one_epoch(data_folder: str, workdir: Path, every: int | None, save_times: list) -> tuple[float, int]:
    """Seconds of one epoch of agent.train() and its optimizer steps; mid-epoch saves timed into
    save_times."""
    agent_class, config = make_config(str(REPO / "configs" / "mnist_exp_0.json"), [
        "data_mode=local", f"data_folder={data_folder}", "valid_size=0", "progress_bar=false", "max_epoch=1",
        "validate_every=1", f"checkpoint_every={'null' if every is None else every}",
        f"exp_name=bench_checkpoint_{every}"])
    workdir.mkdir(parents=True)
    os.chdir(workdir)                        # experiments/ of this run goes there
    agent = agent_class(config)
    create_experiment_dirs(agent.paths)
    save = agent.checkpoints.save

    def timed_save(state, epoch, is_best, keep_history=True):
        started = time.perf_counter()
        save(state, epoch, is_best, keep_history)
        if state["position"] is not None:
            save_times.append(time.perf_counter() - started)

    agent.checkpoints.save = timed_save
    started = time.perf_counter()
    agent.train_one_epoch()
    seconds = time.perf_counter() - started
    agent.finalize()
    return seconds, agent.current_iteration


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=20, help="checkpoint_every (optimizer steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels, source = load_digits()
    with tempfile.TemporaryDirectory() as tmp:
        data_folder = str(Path(tmp) / "mnist")
        write_raw_split(data_folder, True, images[:TRAIN_SIZE], labels[:TRAIN_SIZE])
        write_raw_split(data_folder, False, images[TRAIN_SIZE:], labels[TRAIN_SIZE:])
        plain, saving, save_times, steps = [], [], [], 0
        for repeat in range(args.repeats + 1):              # the first of each is a warm-up
            seconds, steps = one_epoch(data_folder, Path(tmp) / f"plain{repeat}", None, [])
            plain.append(seconds)
            times = []
            seconds, _ = one_epoch(data_folder, Path(tmp) / f"every{repeat}", args.every, times)
            saving.append(seconds)
            if repeat:
                save_times += times
        os.chdir(REPO)
    plain, saving = statistics.median(plain[1:]), statistics.median(saving[1:])
    step_ms = 1000 * plain / steps
    save_ms = 1000 * statistics.median(save_times)
    print(f"MNIST (configs/mnist_exp_0.json, {TRAIN_SIZE:,} {source}, {steps} steps an epoch, "
          f"{args.threads} thread(s)), checkpoint_every {args.every}:")
    print(f"  one mid-epoch save: {save_ms:.1f} ms (median of {len(save_times)}) = {save_ms / step_ms:.1f} training "
          f"steps of {step_ms:.2f} ms")
    print(f"  epoch: {plain:.2f} s without, {saving:.2f} s with ({len(save_times) // args.repeats} saves): "
          f"x{saving / plain:.3f}")


if __name__ == "__main__":
    main()
