"""A worker of a sweep: it claims the study's queued trials one at a time and runs each trial as
one experiment per seed, in this process, through main.run: the same checks, files and resume as
`main.py CONFIG --set ...`, plus a validation callback that reports the monitored value to the
trial and ends the run as "pruned" when the pruner says so.

A run that fails (a user error such as a diverged loss, or an exception) fails its trial with a
one-line reason and the worker goes on; one killed with its worker leaves the trial RUNNING,
which the next worker to look (utils/study.py: lock file, heartbeat) queues again, and the re-run
continues each seed's experiment with --resume from its checkpoints.
"""
import argparse
import contextlib
import json
import logging
import math
import signal
import statistics
import threading
import time
import traceback
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from commands.sweep_file import MACHINE_KEYS, Sweep
from utils import study as studies
from utils.config import experiment_paths, has_checkpoints
from utils.errors import UserError

logger = logging.getLogger("sweep")
# Statuses of a run that trained to its end (or stopped by its own rule): reused by a re-run.
DONE = ("completed", "early_stopped", "reached_target", "pruned")


@dataclass
class Outcome:
    trial: object          # the FrozenTrial, finished
    crashed: bool = False  # an exception that is not a user error: a fresh worker process is safer


class PruningReporter:
    """validation callback: the monitored value to the trial at step seed_index x epochs_per_seed
    + epoch - 1, so that each trial is compared with the others at the same seed and epoch."""

    def __init__(self, trial, monitor: str, offset: int):
        self.trial, self.monitor, self.offset = trial, monitor, offset

    def __call__(self, agent, metrics: dict):
        value = metrics.get(self.monitor)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        self.trial.report(float(value), self.offset + agent.current_epoch - 1)
        if self.trial.should_prune():
            agent.logger.info(f"pruned by the sweep: {self.monitor} {value:.4g} at epoch {agent.current_epoch} "
                              "is worse than the other trials had there")
            return "pruned"
        return None


def suggest(trial, param):
    """The trial's value of one searched key (a queued grid trial has its params already)."""
    if param.choices is not None:
        value = trial.suggest_categorical(param.key, param.distribution().choices)
    elif param.integer:
        value = trial.suggest_int(param.key, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    else:
        value = trial.suggest_float(param.key, param.low, param.high, step=param.step, log=param.log)
    return param.decode(value)


def comparable(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in MACHINE_KEYS}


def _read_json(path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def one_line(error: BaseException) -> str:
    import main

    if isinstance(error, UserError):
        return main._one_line(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def run_seed(sweep: Sweep, trial, number: int, params: dict, index: int, seed: int) -> dict:
    """One experiment of the trial: kept if it already finished with this config, continued with
    --resume if it has checkpoints, trained otherwise. Returns its results.json."""
    import main
    from agents import make_config

    overrides = sweep.overrides(params, seed, number)
    paths = experiment_paths(sweep.exp_name(number, seed))
    expected = json.loads(json.dumps(make_config(str(sweep.config), overrides)[1]))
    saved = _read_json(paths.root / "config.json")
    results = _read_json(paths.root / "results.json")
    same = saved is not None and comparable(saved) == comparable(expected)
    if same and results is not None and results.get("status") in DONE:
        logger.info(f"{paths.root.name}: {results['status']} in an earlier session, kept")
        return results
    if saved is not None and not same and has_checkpoints(paths):
        raise UserError(f"'{paths.root}' holds a run with another config than this trial's; it is not the "
                        "sweep's: move it away, or give the sweep another sweep_name")
    args = argparse.Namespace(config=str(sweep.config), set=overrides, resume=same and has_checkpoints(paths),
                              force=False, print_config=False)
    reporter = PruningReporter(trial, sweep.monitor, index * sweep.epochs_per_seed)
    if main.run(args, [reporter]) == 130:
        raise KeyboardInterrupt
    results = _read_json(paths.root / "results.json")
    if results is None:
        raise UserError(f"'{paths.root}' has no results.json after its run")
    return results


def run_trial(sweep: Sweep, study, claimed) -> Outcome:
    """Every seed of one claimed trial, then the trial told to the study: COMPLETE with the mean
    of the seeds' best monitored values, PRUNED, or FAIL with a one-line reason."""
    trial = optuna.Trial(study, claimed._trial_id)
    number = studies.sweep_trial(claimed)
    params = {param.key: suggest(trial, param) for param in sweep.space}
    shown = " ".join(f"{key}={json.dumps(value)}" for key, value in params.items())
    logger.info(f"trial {number}: {shown}")
    seeds = {}
    values, started, crashed = [], time.perf_counter(), False
    state, reason = TrialState.COMPLETE, None
    for index, seed in enumerate(sweep.seed_list()):
        try:
            results = run_seed(sweep, trial, number, params, index, seed)
        except UserError as e:
            state, reason = TrialState.FAIL, f"seed {seed}: {one_line(e)}"
        except Exception as e:     # a bug, or the machine: logged whole, the trial fails, the sweep goes on
            logger.error(f"trial {number}, seed {seed} crashed:\n{traceback.format_exc()}", extra={"console": False})
            state, reason, crashed = TrialState.FAIL, f"seed {seed}: {one_line(e)}", True
        else:
            value = studies.finite_or_none((results.get("best") or {}).get("value"))
            seeds[str(seed)] = {"experiment": results.get("exp_name"), "status": results.get("status"),
                                "value": value, "epochs": results.get("epochs_done")}
            trial.set_user_attr("seeds", seeds)
            if results.get("status") == "pruned":
                state = TrialState.PRUNED
            elif value is None:
                state, reason = TrialState.FAIL, f"seed {seed}: no finite {sweep.monitor} was recorded"
            else:
                values.append(value)
        if state != TrialState.COMPLETE:
            break
    finished = [s["value"] for s in seeds.values() if s.get("value") is not None]
    if finished:
        trial.set_user_attr("mean", statistics.fmean(finished))
        trial.set_user_attr("std", statistics.stdev(finished) if len(finished) > 1 else None)
    trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
    if reason:
        trial.set_user_attr(studies.REASON_ATTR, reason)
    try:
        if state == TrialState.COMPLETE:
            study.tell(trial, statistics.fmean(values))
        else:
            study.tell(trial, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        logger.warning(f"trial {number} was taken over by another worker (this one was thought dead); "
                       "its result here is dropped")
    return Outcome(study._storage.get_trial(claimed._trial_id), crashed)


@contextlib.contextmanager
def signals_ignored():
    """SIGINT and SIGTERM ignored inside the block (the main thread only can change handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def work(sweep: Sweep, study, announce, replace_after_crash: bool = False) -> str:
    """Claim and run trials until none is queued. Returns "done", "interrupted" (Ctrl+C or SIGTERM:
    the running trial is queued again, its checkpoints kept) or "crashed" (replace_after_crash: a
    worker process that saw an exception other than a user error stops, and a fresh one goes on)."""
    lock = studies.WorkerLock(sweep.folder / "workers")
    try:
        while True:
            for stale in studies.requeue_stale(study):
                logger.warning(f"trial {studies.sweep_trial(stale)} was left running by a killed worker: "
                               "queued again (its experiments continue from their checkpoints)")
            claimed = studies.claim_next(study, sweep.trial_count(), lock.describe())
            if claimed is None:
                return "done"
            heartbeat = None
            try:
                heartbeat = studies.Heartbeat(study, claimed)
                outcome = run_trial(sweep, study, claimed)
            except KeyboardInterrupt:
                with signals_ignored():      # a second Ctrl+C (or the sweep's SIGTERM) must not cut this short
                    if heartbeat is not None:
                        heartbeat.stop()
                    studies.requeue(study, study._storage.get_trial(claimed._trial_id),
                                    "interrupted (Ctrl+C or SIGTERM); re-run as a new Optuna trial")
                return "interrupted"
            finally:
                if heartbeat is not None:
                    heartbeat.stop()
            announce(outcome.trial)
            if outcome.crashed and replace_after_crash:
                return "crashed"
    finally:
        lock.release()
