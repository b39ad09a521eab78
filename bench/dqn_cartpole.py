"""Environment steps and wall time until DQN solves CartPole-v1, over several seeds.

Each seed trains configs/dqn_exp_0.json (state mode, its defaults) in this process, on one thread,
with the seed changed. Solved: the mean return of 100 greedy episodes is at least 475 (CartPole-v1's
reward_threshold). After every validation (10 greedy episodes, each eval_every = 10 training
episodes) that reaches 475, the bench plays 100 more greedy episodes, from start states that
neither validation nor mode=test uses, with the same network; the first time their mean reaches 475
is when the seed solved, and its training stops there. Otherwise it runs to --max-steps.
Wall time is the training run's own (acting, learning, validations, checkpoints) up to that point;
the bench's 100-episode checks are left out.

    .venv/bin/python bench/dqn_cartpole.py [--seeds 0 1 2] [--max-steps 100000]
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

import numpy as np
import torch

from agents import make_config
from agents.dqn import DQNAgent, episode_seeds

CONFIG = REPO / "configs" / "dqn_exp_0.json"
THRESHOLD = 475.0
CHECK_EPISODES = 100
CHECK_STREAM = 3        # start states of the bench's checks (validation uses 1, mode=test 2)


class SolveWatch(DQNAgent):
    """DQNAgent that checks each good validation with 100 episodes and stops once solved."""

    def build(self):
        super().build()
        self.solved = None           # (env steps, episodes, wall seconds, 100-episode mean) once solved
        self.check_seconds = 0.0     # time spent in the bench's own checks
        self.checks = 0

    def validate(self):
        metrics = super().validate()
        if self.solved is None and metrics["val/mean_return"] >= THRESHOLD:
            started = time.perf_counter()
            returns = self.play_greedy(self.eval_env, episode_seeds(self.config.seed, CHECK_STREAM, CHECK_EPISODES))
            self.check_seconds += time.perf_counter() - started
            self.checks += 1
            if np.mean(returns) >= THRESHOLD:
                self.solved = (self.env_steps, self.episodes, self.wall_time() - self.check_seconds,
                               float(np.mean(returns)))
        return metrics

    def training_done(self) -> bool:
        return super().training_done() or self.solved is not None


def run_seed(seed: int, max_steps: int) -> SolveWatch:
    _, config = make_config(str(CONFIG), [f"exp_name=bench_dqn_seed{seed}", f"seed={seed}", f"max_steps={max_steps}",
                                          "agent=__main__:SolveWatch", "device=cpu", "progress_bar=false"])
    agent = SolveWatch(config)
    agent.run()
    agent.finalize()
    return agent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to train (default 0 1 2)")
    parser.add_argument("--max-steps", type=int, default=100_000,
                        help="environment steps before a seed counts as unsolved (default 100000)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"DQN on CartPole-v1 ({CONFIG.relative_to(REPO)}), 1 thread; solved: mean greedy return >= "
          f"{THRESHOLD:.0f} over {CHECK_EPISODES} episodes, within {args.max_steps:,} steps")
    print(f"{'seed':>4}  {'solved':>6}  {'env steps':>9}  {'episodes':>8}  {'wall s':>7}  {'mean return':>11}  "
          f"{'checks':>6}")
    solved = []
    previous_dir = os.getcwd()
    with tempfile.TemporaryDirectory() as workdir:
        os.chdir(workdir)  # experiments/ goes here, not into the repository
        try:
            for seed in args.seeds:
                agent = run_seed(seed, args.max_steps)
                if agent.solved:
                    steps, episodes, seconds, mean_return = agent.solved
                    solved.append(agent.solved)
                    print(f"{seed:>4}  {'yes':>6}  {steps:>9,}  {episodes:>8,}  {seconds:>7.1f}  {mean_return:>11.1f}  "
                          f"{agent.checks:>6}", flush=True)
                else:
                    seconds = agent.wall_time() - agent.check_seconds
                    print(f"{seed:>4}  {'no':>6}  {agent.env_steps:>9,}  {agent.episodes:>8,}  {seconds:>7.1f}  "
                          f"{'-':>11}  {agent.checks:>6}   (best validation {agent.best_value:.1f})", flush=True)
        finally:
            os.chdir(previous_dir)  # leave the folder before it is deleted
    summary = f"solved {len(solved)}/{len(args.seeds)} seeds"
    if solved:
        summary += (f"; median {statistics.median(s[0] for s in solved):,.0f} environment steps, "
                    f"{statistics.median(s[2] for s in solved):.1f} s (max {max(s[0] for s in solved):,} steps, "
                    f"{max(s[2] for s in solved):.1f} s)")
    print(summary)


if __name__ == "__main__":
    main()
