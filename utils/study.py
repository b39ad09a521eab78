"""An Optuna study as the shared state of a sweep, so that any number of worker processes, on any
number of machines, can work on it together and a killed sweep can be continued.

- The storage is an RDB URL (SQLite, PostgreSQL, MySQL) or a journal file (a shared file system).
- The study holds one queued (WAITING) trial per sweep trial, numbered by the user attribute
  "sweep_trial". A worker claims the lowest one with Optuna's own compare-and-set (WAITING ->
  RUNNING), so no trial runs twice, and together the workers run exactly that many trials.
- A running trial names its worker (host, pid, a lock file the worker holds) and carries a
  heartbeat. A trial whose worker is gone (its lock free on this machine, or no heartbeat for
  STALE_AFTER_S from another one) is failed and queued again under the same sweep_trial, with its
  params: a re-run, not a new trial.

Optuna's own heartbeat (RDBStorage(heartbeat_interval=...)) exists for RDB storages only; the
one here works on every storage, and on the sweep's own machine it finds a killed worker at once.
Knows Optuna, nothing of agents or configs.
"""
import fcntl
import logging
import math
import os
import socket
import threading
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from utils.errors import UserError

logger = logging.getLogger("sweep")

TRIAL_ATTR = "sweep_trial"          # user attribute: the sweep's trial number, kept by a re-run
REASON_ATTR = "reason"              # user attribute: one line on why a trial failed or was re-run
WORKER_ATTR = "sweep:worker"        # system attributes: who runs it, and when it last said so
HEARTBEAT_ATTR = "sweep:heartbeat"
DUPLICATE_ATTR = "sweep:duplicate_of"
HEARTBEAT_S = 20
STALE_AFTER_S = 120                 # a running trial unheard of this long, on another machine, is dead
HOST = socket.gethostname()
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def quiet_optuna():
    """Optuna logs every trial and warns about its experimental parts: the sweep prints its own lines."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", module="optuna")


# ----------------------------------------------------------------------------- storage


def _serialize_sqlite(engine):
    """Every transaction on a SQLite file takes its write lock when it begins (BEGIN IMMEDIATE,
    SQLAlchemy's recipe for pysqlite): Python's sqlite3 begins a transaction only at the first
    write, so two processes could both read a trial as WAITING and both claim it. Processes wait
    for each other's locks up to the connect timeout instead of failing at once."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None     # no implicit BEGIN from the driver

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()     # connections opened before the listeners go


def open_storage(url: str | None, journal: Path | None = None):
    """An RDBStorage for a URL, a JournalStorage for a journal file path. A storage that cannot be
    reached is a UserError: one line, before any trial starts."""
    quiet_optuna()
    if journal is not None:
        from optuna.storages.journal import JournalFileBackend

        folder = journal.parent
        if not folder.is_dir():
            raise UserError(f"storage: the journal file's folder '{folder}' does not exist; create it "
                            "(on a file system every machine of the sweep mounts), or fix the path")
        if not os.access(folder, os.W_OK) or (journal.exists() and not os.access(journal, os.R_OK | os.W_OK)):
            raise UserError(f"storage: cannot write the journal file '{journal}'; check its permissions")
        return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    import sqlalchemy

    engine_kwargs = {}
    dialect = url.split(":", 1)[0].split("+", 1)[0].lower()
    if dialect == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": 300}
    elif dialect in ("postgresql", "mysql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}   # an unreachable host fails in seconds
    for attempt in range(20):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
            if dialect == "sqlite":
                _serialize_sqlite(storage.engine)
            return storage
        except ImportError as e:
            raise UserError(f"storage '{_shown(url)}' needs a database driver that is not installed "
                            f"({e.__cause__ or e}); install it (e.g. pip install psycopg2-binary for "
                            "PostgreSQL)") from None
        except (sqlalchemy.exc.SQLAlchemyError, ValueError) as e:
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            # Processes that open a new database at the same moment race to create its tables: the
            # losers see "already exists" or a unique constraint, and find the tables on a retry.
            if isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in reason:
                time.sleep(0.1 + 0.1 * attempt)
                continue
            raise UserError(f"cannot open the storage '{_shown(url)}': {reason}; check the URL, that the "
                            "database server is up and reachable, and the credentials") from None
    raise UserError(f"cannot open the storage '{_shown(url)}': its tables could not be created")


def _shown(url: str) -> str:
    """The URL without its password."""
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{tail}"


def open_study(storage, name: str, direction: str, sampler, pruner):
    """(study, created): the study of that name, created when there is none yet. Two processes
    starting at once both end with the one study (the storage refuses a second of that name)."""
    if not study_exists(storage, name):
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction=direction,
                                        sampler=sampler, pruner=pruner)
            return study, True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    if study.direction.name.lower() != direction:
        raise UserError(f"the study '{name}' in this storage was created to {study.direction.name.lower()} "
                        f"its objective, and the sweep now asks to {direction} it (monitor_mode changed?); "
                        "keep it, or give the sweep another sweep_name")
    return study, False


def study_exists(storage, name: str) -> bool:
    return name in optuna.get_all_study_names(storage)


def load_study(storage, name: str):
    return optuna.load_study(study_name=name, storage=storage)


# ----------------------------------------------------------------------------- the queue


def sweep_trial(trial) -> int | None:
    return trial.user_attrs.get(TRIAL_ATTR)


def _lineage(trial) -> tuple:
    return sweep_trial(trial), tuple(trial.system_attrs.get("retry_history", ()))


def is_duplicate(trial) -> bool:
    return DUPLICATE_ATTR in trial.system_attrs


def is_rerun(trial, trials) -> bool:
    """A trial that was failed because its worker died, and queued again (a later trial re-runs it)."""
    return any(trial.number in other.system_attrs.get("retry_history", ()) for other in trials)


def queue_trials(study, count: int, grid: list[dict] | None = None):
    """Queue sweep trials 0..count-1 that the study does not hold yet (a first start, or `trials`
    raised since). Grid trials come with their params; other trials get theirs from the sampler
    when a worker claims them."""
    trials = study.get_trials(deepcopy=False)
    held = {sweep_trial(t) for t in trials}
    used = [t.system_attrs.get("fixed_params", t.params) for t in trials]
    points = [point for point in (grid or []) if point not in used]
    for number in range(count):
        if number in held:
            continue
        params = points.pop(0) if grid is not None else {}
        study.enqueue_trial(params, user_attrs={TRIAL_ATTR: number})


def claim_next(study, count: int, worker: dict):
    """The next queued sweep trial (the lowest number below `count`), now RUNNING for `worker`
    (WorkerLock.describe()); None when none is left. Optuna's state change is a compare-and-set:
    of two workers trying to claim the same trial, one gets it."""
    storage = study._storage
    while True:
        trials = study.get_trials(deepcopy=False)
        waiting = sorted((t for t in trials if t.state == TrialState.WAITING and not is_duplicate(t)
                          and sweep_trial(t) is not None and sweep_trial(t) < count),
                         key=lambda t: (sweep_trial(t), t.number))
        if not waiting:
            return None
        for candidate in waiting:
            try:
                if not storage.set_trial_state_values(candidate._trial_id, state=TrialState.RUNNING):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            # Two processes raising `trials` at the same moment may both have queued a trial for the
            # same number: the lower Optuna number is the one, the other is set aside.
            twin = next((t for t in trials if t.number < candidate.number and _lineage(t) == _lineage(candidate)
                         and not is_duplicate(t)), None)
            if twin is not None:
                storage.set_trial_system_attr(candidate._trial_id, DUPLICATE_ATTR, twin.number)
                storage.set_trial_state_values(candidate._trial_id, state=TrialState.FAIL)
                logger.debug(f"trial {candidate.number} duplicates trial {twin.number}: set aside")
                continue
            storage.set_trial_system_attr(candidate._trial_id, WORKER_ATTR, worker)
            storage.set_trial_system_attr(candidate._trial_id, HEARTBEAT_ATTR, time.time())
            return storage.get_trial(candidate._trial_id)
        # every candidate was taken by another worker meanwhile: look again


def requeue(study, trial, reason: str):
    """Fail a running trial whose run did not finish (its worker was killed or interrupted) and
    queue it again with its params, user attributes and sweep_trial: the trial is re-run, and its
    seeds' experiments continue with --resume. Returns False when another process was first."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    history = [*trial.system_attrs.get("retry_history", ()), trial.number]
    system_attrs = {key: value for key, value in trial.system_attrs.items()
                    if key not in (WORKER_ATTR, HEARTBEAT_ATTR)}
    # "failed_trial" and "retry_history" are what optuna's RetryHeartbeatStaleTrialCallback writes
    system_attrs.update(failed_trial=history[0], retry_history=history)
    user_attrs = {key: value for key, value in trial.user_attrs.items() if key != REASON_ATTR}
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions, user_attrs=user_attrs,
                                              system_attrs=system_attrs))
    return True


def fail(study, trial, reason: str):
    """A running trial failed, with its reason, and not run again (its worker crashed on it)."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, reason)
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def requeue_stale(study) -> list:
    """Queue again the running trials whose worker is gone: on this machine its lock file is free
    (killed, however: SIGKILL, a crash, the machine rebooted); on another, its heartbeat is older
    than STALE_AFTER_S. Returns the re-queued trials."""
    requeued = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.system_attrs.get(WORKER_ATTR)
        if not isinstance(worker, dict):   # claimed, and its worker killed before it said who it is
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            gone, why = now - started > STALE_AFTER_S, "its worker was killed as it claimed it"
        elif worker.get("host") == HOST:
            gone = not WorkerLock.is_held(Path(worker.get("lock", "")))
            why = f"its worker (process {worker.get('pid')} on this machine) was killed"
        else:
            beat = trial.system_attrs.get(HEARTBEAT_ATTR, 0)
            gone = now - beat > STALE_AFTER_S
            why = f"its worker (process {worker.get('pid')} on {worker.get('host')}) went silent"
        if gone and requeue(study, trial, f"{why}; re-run as a new Optuna trial"):
            requeued.append(trial)
    return requeued


def counted(trials) -> list:
    """The trials that count towards `trials`: finished, not re-run, not duplicates."""
    return [t for t in trials if t.state in FINISHED and not is_duplicate(t) and not is_rerun(t, trials)]


def current(trials) -> list:
    """One trial per sweep_trial: the latest of its re-runs (the one that counts)."""
    latest = {}
    for trial in trials:
        if is_duplicate(trial) or sweep_trial(trial) is None:
            continue
        if trial.state == TrialState.FAIL and is_rerun(trial, trials):
            continue
        number = sweep_trial(trial)
        if number not in latest or trial.number > latest[number].number:
            latest[number] = trial
    return [latest[number] for number in sorted(latest)]


# ----------------------------------------------------------------------------- a worker


class WorkerLock:
    """A file this worker holds an flock on while it lives: the kernel releases it however the
    process ends, so a free lock is a dead worker (of this machine)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = (folder / f"{HOST}.{os.getpid()}.lock").resolve()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    @staticmethod
    def is_held(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return False      # removed: its worker ended (a live worker keeps its file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def release(self):
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def describe(self) -> dict:
        return {"host": HOST, "pid": os.getpid(), "lock": str(self.path)}


class Heartbeat:
    """While a trial runs: a heartbeat every HEARTBEAT_S, from a thread."""

    def __init__(self, study, trial):
        self.storage, self.trial_id = study._storage, trial._trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sweep-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return    # another process failed it (it thought this worker dead)
            except Exception as e:   # the storage is busy or away for a moment: try at the next beat
                logger.debug(f"heartbeat of trial {self.trial_id} not recorded: {e}")

    def stop(self):
        self._stop.set()
        self._thread.join()


def finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
