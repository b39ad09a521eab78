"""Trials per minute of a sweep against the bash loop it replaces (experiments/baseline_experiments.sh).

The same runs on both sides: the Iris example over network (linear, mlp, mlp_fixed) x learning
rate (0.01, 0.1), each trial over the same seeds, `--epochs` epochs a run.
  loop:  a bash `for` loop of `python main.py configs/iris_exp_0.json --set ...`, one run after
         the other, a new process (and a new `import torch`) for every run;
  sweep: `python main.py sweep SWEEP.json --workers N`: N worker processes, each importing torch
         once and running its trials' experiments in-process (plus the study in SQLite, the
         table, trials.csv, best_config.json and the plots at the end).
Each side starts in an empty folder and is timed from the command to its exit, OMP_NUM_THREADS=1
for every process. Both must leave the same best value in each run's results.json (same seeds,
same runs). Prints trials per minute of each and sweep/loop (higher is better).

    .venv/bin/python bench/sweep_throughput.py [--workers N] [--epochs N] [--seeds N] [--repeats N]
"""
import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"
CONFIG = ROOT / "configs" / "iris_exp_0.json"
SPACE = {"network": ["linear", "mlp", "mlp_fixed"], "learning_rate": [0.01, 0.1]}


def runs(seeds: list[int]) -> list[tuple[int, dict, int]]:
    """(trial, params, seed) in the sweep's order: the grid in the order of its keys."""
    grid = [dict(zip(SPACE, values)) for values in itertools.product(*SPACE.values())]
    return [(trial, params, seed) for trial, params in enumerate(grid) for seed in seeds]


def bash_loop(folder: Path, epochs: int, seeds: list[int]) -> float:
    lines = ["set -euo pipefail"]
    for trial, params, seed in runs(seeds):
        sets = " ".join(f"--set {key}={json.dumps(value)}" for key, value in params.items())
        lines.append(f"{shlex.quote(sys.executable)} {shlex.quote(str(MAIN))} {shlex.quote(str(CONFIG))} {sets} "
                     f"--set seed={seed} --set max_epoch={epochs} --set exp_name=loop.t{trial:04d}.s{seed} > /dev/null")
    script = folder / "loop.sh"
    script.write_text("\n".join(lines) + "\n")
    return timed(["bash", str(script)], folder)


def sweep(folder: Path, epochs: int, seeds: list[int], workers: int) -> float:
    path = folder / "sweep.json"
    path.write_text(json.dumps({"sweep_name": "loop", "config": str(CONFIG), "set": {"max_epoch": epochs},
                                "space": SPACE, "method": "grid", "seeds": seeds}))
    return timed([sys.executable, str(MAIN), "sweep", str(path), "--workers", str(workers)], folder)


def timed(command: list, folder: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} ... failed:\n{done.stderr[-2000:]}")
    return seconds


def best_values(folder: Path) -> dict:
    return {path.parent.name: json.loads(path.read_text())["best"]["value"]
            for path in sorted((folder / "experiments").glob("loop.t*/results.json"))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per trial (1, 2, ...)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; medians are printed")
    args = parser.parse_args()
    seeds = list(range(1, args.seeds + 1))
    trials = len(runs(seeds)) // len(seeds)
    print(f"Iris, {trials} trials x {len(seeds)} seeds = {len(runs(seeds))} runs of {args.epochs} epochs; "
          f"{os.cpu_count()} cores")
    loop_s, sweep_s = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            loop_s.append(bash_loop(Path(a), args.epochs, seeds))
            sweep_s.append(sweep(Path(b), args.epochs, seeds, args.workers))
            same = best_values(Path(a)) == best_values(Path(b))
            print(f"  repeat {repeat + 1}: loop {loop_s[-1]:.1f} s, sweep {sweep_s[-1]:.1f} s; "
                  f"the same best value in every run: {'yes' if same else 'NO'}")
            if not same:
                sys.exit("the two sides trained different runs")
    loop_rate = trials / (statistics.median(loop_s) / 60)
    sweep_rate = trials / (statistics.median(sweep_s) / 60)
    print(f"bash loop:                   {loop_rate:6.2f} trials/min")
    print(f"sweep --workers {args.workers}:            {sweep_rate:6.2f} trials/min")
    print(f"sweep / loop:                {sweep_rate / loop_rate:6.2f}x")


if __name__ == "__main__":
    main()
