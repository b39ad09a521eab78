"""`python main.py sweep SWEEP.json [--workers N] [--status]`: a hyperparameter search with Optuna.

Every trial x seed is an ordinary experiment, experiments/<sweep_name>.t<trial>.s<seed>/; the
study (its storage: experiments/<sweep_name>.sweep/study.db unless the sweep file names another)
is the shared state, so that

- the same command again continues the sweep (finished trials are kept, the trials of a killed
  sweep are found and re-run, their experiments continued with --resume);
- --workers N runs N trials at once, each in a worker process of its own (a crash, even a
  segfault, fails that one trial with its reason; the others go on);
- the same command on several machines, with one shared storage, works on the one study: every
  trial runs once, and together they run `trials` trials;
- --status prints the table of trials at any time (and refreshes trials.csv, best_config.json
  and the plots in the sweep's folder).

The parts: commands/sweep_file.py (the file and its checks), utils/study.py (the study as a work
queue), commands/sweep_worker.py (running a trial), commands/sweep_report.py (table and files).
"""
import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from commands import sweep_file
from utils.config import EXPERIMENTS_ROOT, setup_logging
from utils.errors import ConfigError, UserError

HELP = "search hyperparameters (Optuna): each trial x seed an experiment; pruning, resume, workers, machines"
MAIN = Path(__file__).resolve().parents[1] / "main.py"
POLL_S = 1.0
RECORD_WAIT_S = 60    # how long a second process waits for a study's creator to queue its trials
CRASHED = 3           # exit code of a worker that stopped after a crash, to be replaced by a fresh one
logger = logging.getLogger("sweep")


def add_arguments(parser):
    parser.add_argument("sweep_file", metavar="SWEEP.json", help="the sweep file (see docs/sweeps.md)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="trials at once on this machine, each in a process of its own (default 1: in this one)")
    parser.add_argument("--status", action="store_true",
                        help="print the table of trials and refresh the sweep's files; runs nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)   # one of --workers N
    parser.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    setup_logging(None)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    sweep = sweep_file.load(args.sweep_file)
    if args.status:
        return status(sweep)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)   # a scheduler's stop, like Ctrl+C
    try:
        if args.worker:
            return worker(sweep, args.parent)
        return start(sweep, args.workers)
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- the study


def _journal_path(sweep) -> Path | None:
    if sweep.storage is None or "://" in sweep.storage:
        return None
    return (sweep.file.resolve().parent / sweep.storage).resolve()


def _default_db(sweep) -> Path:
    return (sweep.folder / "study.db").resolve()


def open_storage(sweep, create: bool):
    """The sweep's storage; the default SQLite file in the sweep's folder is created only when
    `create` (a --status or a worker of a sweep that never started finds none)."""
    from utils import study as studies

    if sweep.storage is None:
        path = _default_db(sweep)
        if not create and not path.is_file():
            return None
        if create:
            sweep.folder.mkdir(parents=True, exist_ok=True)
        return studies.open_storage(f"sqlite:///{path}")
    journal = _journal_path(sweep)
    return studies.open_storage(None if journal else sweep.storage, journal)


def _samplers(sweep):
    import optuna

    sampler = {"grid": lambda: optuna.samplers.RandomSampler(),   # grid trials come queued with their params
               "random": lambda: optuna.samplers.RandomSampler(),
               "tpe": lambda: optuna.samplers.TPESampler(constant_liar=True)}[sweep.method]()
    pruner = optuna.pruners.NopPruner()
    if sweep.pruner is not None:
        options = {key: value for key, value in sweep.pruner.items() if key != "type"}
        pruner = optuna.pruners.MedianPruner(**options)
    return sampler, pruner


def _leftovers(sweep) -> list[str]:
    if not EXPERIMENTS_ROOT.is_dir():
        return []
    prefix = f"{sweep.name}.t"
    return sorted(p.name for p in EXPERIMENTS_ROOT.iterdir() if p.is_dir() and p.name.startswith(prefix))


def _identity_changes(recorded: dict, now: dict) -> list[str]:
    changes = []
    fixed_then, fixed_now = recorded.get("fixed", {}), now["fixed"]
    for key in sorted(set(fixed_then) | set(fixed_now)):
        if fixed_then.get(key) != fixed_now.get(key):
            changes.append(f"{key}: {json.dumps(fixed_then.get(key))} -> {json.dumps(fixed_now.get(key))}")
    for part in ("space", "seeds"):
        if recorded.get(part) != now[part]:
            changes.append(f"{part}: {json.dumps(recorded.get(part))} -> {json.dumps(now[part])}")
    return changes


def open_sweep_study(sweep, create: bool = True):
    """The study of the sweep, created with its queue of trials on the first start; on a later
    start (or on another machine) the same study, after checking that the sweep is still the one
    it was started as. Everything that can be wrong with the input fails here, before any trial."""
    from utils import study as studies

    storage = open_storage(sweep, create=False)     # an unreachable one: one line, nothing written
    if storage is None or not studies.study_exists(storage, sweep.name):
        if not create:
            raise UserError(f"the sweep '{sweep.name}' has not started: its storage holds no study of that "
                            f"name; start it with ./run.sh sweep {sweep.file}")
        if EXPERIMENTS_ROOT.exists() and not EXPERIMENTS_ROOT.is_dir():
            raise UserError(f"'{EXPERIMENTS_ROOT}' is a file, not a folder; move it away")
        leftovers = _leftovers(sweep)
        if leftovers:
            raise UserError(f"experiments/ holds runs of an earlier sweep named '{sweep.name}' "
                            f"({leftovers[0]}{' and more' if len(leftovers) > 1 else ''}) but its storage has no "
                            "such study; delete or move those runs, or give this sweep another sweep_name")
        storage = storage or open_storage(sweep, create=True)
    sampler, pruner = _samplers(sweep)
    study, created = studies.open_study(storage, sweep.name, sweep.direction, sampler, pruner)
    identity = sweep.identity()
    grid = sweep.grid_points() if sweep.method == "grid" else None
    if grid is not None and sweep.trial_count() < len(grid):
        # fewer trials than points: a sample of the grid, the same in every process and session
        grid = random.Random(0).sample(grid, len(grid))
    if created:
        # The queue first, then the record that says the study is ready: a process that loads the
        # study meanwhile waits for the record instead of queueing the same trials again.
        studies.queue_trials(study, sweep.trial_count(), grid)
        study.set_user_attr("sweep", identity)
    else:
        recorded = study.user_attrs.get("sweep")
        for _ in range(RECORD_WAIT_S * 5):
            if recorded is not None:
                break
            time.sleep(0.2)
            recorded = study.user_attrs.get("sweep")
        changes = _identity_changes(recorded, identity) if recorded is not None else []
        if changes:
            raise ConfigError(f"the sweep '{sweep.name}' was started with another config than it has now "
                              f"({'; '.join(changes[:3])}{'; ...' if len(changes) > 3 else ''}); finish it as it "
                              "was, or start a new sweep under another sweep_name")
        if create:
            studies.queue_trials(study, sweep.trial_count(), grid)    # `trials` raised since: the new ones
            if recorded is None:       # its creator died before it was ready
                study.set_user_attr("sweep", identity)
    if create:
        _write_record(sweep)
    return study


def _write_record(sweep):
    """sweep.json in the sweep's folder: what `main.py list` says about the sweep's runs."""
    from utils.files import write_json_atomic

    sweep.folder.mkdir(parents=True, exist_ok=True)
    (sweep.folder / "logs").mkdir(exist_ok=True)
    try:
        shown = os.path.relpath(sweep.file.resolve())
    except ValueError:
        shown = str(sweep.file.resolve())
    write_json_atomic(sweep.folder / "sweep.json", {
        "sweep_name": sweep.name, "sweep_file": shown, "agent": sweep.agent, "monitor": sweep.monitor,
        "direction": sweep.direction, "trials": sweep.trial_count(), "seeds": sweep.seed_list(),
        "storage": sweep.storage})


# ----------------------------------------------------------------------------- running


def start(sweep, workers: int) -> int:
    from commands import sweep_report
    from utils import study as studies

    sweep = sweep_file.check_against_agent(sweep)
    study = open_sweep_study(sweep)
    for stale in studies.requeue_stale(study):
        logger.warning(f"trial {studies.sweep_trial(stale)} was left running by a killed sweep: queued again "
                       "(its experiments continue from their checkpoints)")
    queued = sum(1 for t in study.get_trials(deepcopy=False) if t.state.name == "WAITING"
                 and not studies.is_duplicate(t) and (studies.sweep_trial(t) or 0) < sweep.trial_count())
    logger.info(f"sweep {sweep.name}: {sweep.trial_count()} trials x {len(sweep.seed_list())} seeds, "
                f"{sweep.method}, {queued} to run -> {sweep.folder}")

    def announce(trial):
        logger.info(sweep_report.trial_line(sweep, trial))

    try:
        if workers == 1:
            from commands.sweep_worker import work

            outcome = work(sweep, study, announce)
        else:
            outcome = supervise(sweep, study, workers)
    except KeyboardInterrupt:
        outcome = "interrupted"
    found = sweep_report.rows(sweep, study)
    print(sweep_report.table(sweep, found))
    written = sweep_report.write_files(sweep, study, found)
    print(f"in {sweep.folder}: {', '.join(written)}")
    best = sweep_report.best_row(found)
    if best is not None:
        print(f"train the best config: ./run.sh {sweep.folder / 'best_config.json'}")
    if outcome == "interrupted":
        print("interrupted: run the same command again to continue the sweep", file=sys.stderr)
        return 130
    running = [t for t in studies.current(study.get_trials(deepcopy=False)) if t.state.name == "RUNNING"]
    if running:
        print(f"{len(running)} trial(s) still running in other processes or machines; "
              f"./run.sh sweep {sweep.file} --status shows them", file=sys.stderr)
    return 0


def status(sweep) -> int:
    from commands import sweep_report

    try:
        sweep = sweep_file.check_against_agent(sweep)
    except UserError as e:
        raise UserError(f"{e} (--status reads the sweep as its file now says)") from None
    study = open_sweep_study(sweep, create=False)
    found = sweep_report.rows(sweep, study)
    print(sweep_report.table(sweep, found))
    written = sweep_report.write_files(sweep, study, found)
    print(f"in {sweep.folder}: {', '.join(written)}")
    return 0


def _die_with_parent(parent: int | None):
    """A worker ends (as on Ctrl+C: checkpoint, trial queued again) when its sweep process dies,
    even by SIGKILL: Linux's parent-death signal."""
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:      # it died before the line above
        raise KeyboardInterrupt


def worker(sweep, parent: int | None) -> int:
    """One of --workers N: the sweep was opened by its parent; claim and run until none is left."""
    from commands import sweep_report
    from commands.sweep_worker import work

    try:
        _die_with_parent(parent)
        sweep = sweep_file.check_against_agent(sweep)
        study = open_sweep_study(sweep)
        outcome = work(sweep, study, lambda trial: logger.info(sweep_report.trial_line(sweep, trial)),
                       replace_after_crash=True)
    except KeyboardInterrupt:
        return 130
    return {"done": 0, "interrupted": 130, "crashed": CRASHED}[outcome]


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def supervise(sweep, study, workers: int) -> str:
    """N worker processes on this machine, each logging to the sweep's logs/; one that dies while
    the sweep goes on (a segfault, the out-of-memory killer) fails the trial it was running, with
    the reason, and a fresh worker takes its place. Prints each trial as it finishes."""
    from commands import sweep_report
    from utils import study as studies

    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", threads)      # N workers share the cores instead of fighting over them
    logs = sweep.folder / "logs"
    running: dict[int, subprocess.Popen] = {}
    files = []

    def spawn(index: int):
        log = open(logs / f"{studies.HOST}.worker{index}.log", "a")
        files.append(log)
        running[index] = subprocess.Popen(
            [sys.executable, str(MAIN), "sweep", str(sweep.file), "--worker", "--parent", str(os.getpid())],
            stdout=log, stderr=subprocess.STDOUT, env=env)

    def queued() -> int:
        trials = study.get_trials(deepcopy=False)
        return sum(1 for t in trials if t.state.name == "WAITING" and not studies.is_duplicate(t)
                   and (studies.sweep_trial(t) or 0) < sweep.trial_count())

    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}

    def report_finished():
        trials = study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state.is_finished() and trial.number not in seen:
                seen.add(trial.number)
                if not studies.is_duplicate(trial) and not studies.is_rerun(trial, trials):
                    logger.info(sweep_report.trial_line(sweep, trial))

    if not queued():
        return "done"
    for index in range(min(workers, queued())):
        spawn(index)
    logger.info(f"{len(running)} worker processes; their logs: {logs}/")
    try:
        while running:
            time.sleep(POLL_S)
            for index, process in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[index]
                if code in (0, 130):
                    continue
                why = f"killed by {_signal_name(code)}" if code < 0 else f"exit code {code}"
                log = f"{logs}/{studies.HOST}.worker{index}.log"
                held = [trial for trial in study.get_trials(deepcopy=False, states=(studies.TrialState.RUNNING,))
                        if (trial.system_attrs.get(studies.WORKER_ATTR) or {}).get("pid") == process.pid
                        and trial.system_attrs[studies.WORKER_ATTR].get("host") == studies.HOST]
                for trial in held:
                    studies.fail(study, trial, f"its worker process died ({why}) running it; see {log}")
                    logger.warning(f"worker {index} died ({why}) running trial {studies.sweep_trial(trial)}: "
                                   "the trial is recorded as failed")
                # A worker that stopped after a crash, or died on a trial, is replaced; one that
                # failed on its own (it could not start) is not, or it would fail again and again.
                if code == CRASHED or held:
                    if queued():
                        spawn(index)
                else:
                    logger.warning(f"worker {index} stopped ({why}) without running a trial; see {log}")
            report_finished()
        report_finished()
        return "done"
    except KeyboardInterrupt:
        # Ctrl+C reached every worker (one process group); a SIGTERM only this process: pass it on.
        for process in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        try:
            for process in running.values():
                process.wait()
        except KeyboardInterrupt:       # a second Ctrl+C: do not wait
            for process in running.values():
                process.kill()
        return "interrupted"
    finally:
        for log in files:
            log.close()
