"""Where a run's numbers go: trackers behind one small interface (scalars with a step, images,
hparams), and results.json, the machine-readable record of how the run went.

Agents never hold a tracker: they call BaseAgent.log_scalars / log_images, which fan out to every
tracker of the run. A new tracker is one subclass of Tracker, named in LOGGERS and make_trackers.
The config's "loggers" list picks a run's trackers: tensorboard and csv by default, mlflow when asked.
"""
import difflib
import functools
import importlib.util
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from types import NoneType

import torch

from utils.config import Key
from utils.errors import ConfigError, UserError
from utils.files import write_json_atomic
from utils.lock import waiting_for_lock
from utils.metrics_csv import MetricsCSV
from utils.summary import SummaryWriter

logger = logging.getLogger(__name__)
LOGGERS = ("tensorboard", "csv", "mlflow")

# The trackers' config keys (merged into BaseAgent.DEFAULTS); docs/trackers.md.
TRACKER_KEYS = {
    "loggers": Key(["tensorboard", "csv"], types=(list,)),   # any of LOGGERS
    "mlflow_experiment": Key(None, types=(str, NoneType)),    # null: the agent's class name
    "mlflow_tracking_uri": Key(None, types=(str, NoneType)),  # null: $MLFLOW_TRACKING_URI, else experiments/mlflow.db
}


class Tracker:
    """The interface. Every method but log_scalars may be left as it is here (does nothing). A
    tracker opens its files or connection at the first value logged: an agent is built before its
    experiment folder exists, and one that never runs leaves nothing."""

    name = "tracker"      # as in the config's "loggers", and in the warning when it fails
    target = ""           # where it writes, for that warning: a folder, a file, a tracking URI

    def log_scalars(self, values: dict, step: int):
        raise NotImplementedError

    def log_images(self, tag: str, images: torch.Tensor, step: int):
        """(C, H, W) one image, or (N, C, H, W) a batch shown as a grid; values in [0, 1]."""

    def log_hparams(self, hparams: dict, metrics: dict):
        """At the end of a training run: the config (hparams_of) and its final metrics."""

    def log_epoch(self, epoch: int, iteration: int, wall_time_s: float, metrics: dict):
        """After each epoch: its metrics (train, validation, learning rates) as one record."""

    def log_artifact(self, path: Path):
        """A file of the run (config.json, results.json) to keep with it."""

    def set_status(self, status: str):
        """How the run ended (results.json's status), before close()."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this tracker's record (plain types only)."""
        return {}

    def load_state_dict(self, state: dict):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class TensorBoardTracker(Tracker):
    """Event files under `logdir`, for `tensorboard --logdir experiments`. The file is created at
    the first value logged, so a run that logs nothing leaves nothing."""

    name = "tensorboard"

    def __init__(self, logdir: Path):
        self.logdir = Path(logdir)
        self.target = str(logdir)
        self._writer = None

    @property
    def writer(self) -> SummaryWriter:
        if self._writer is None:
            self._writer = SummaryWriter(str(self.logdir))
        return self._writer

    def log_scalars(self, values: dict, step: int):
        writer = self.writer
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)

    def log_images(self, tag: str, images: torch.Tensor, step: int):
        """(C, H, W) one image, or (N, C, H, W) a batch shown as a grid; values in [0, 1]."""
        if images.dim() == 4:
            self.writer.add_images(tag, images, step)
        else:
            self.writer.add_image(tag, images, step)

    def log_hparams(self, hparams: dict, metrics: dict):
        self.writer.add_hparams(hparams, metrics)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class CSVTracker(Tracker):
    """metrics.csv in the experiment folder, one row per epoch (utils/metrics_csv.py); a resumed
    run appends to it, and never repeats an epoch."""

    name = "csv"

    def __init__(self, path: Path):
        self.file = MetricsCSV(path)
        self.target = str(path)

    def log_scalars(self, values: dict, step: int):
        pass      # the epoch's values arrive together in log_epoch

    def log_epoch(self, epoch: int, iteration: int, wall_time_s: float, metrics: dict):
        self.file.add_row(epoch, iteration, wall_time_s, metrics)


# How a run that ended with results.json's status ends in MLflow (any other status: FINISHED).
_MLFLOW_STATUS = {"interrupted": "KILLED", "failed": "FAILED", "running": "KILLED"}
MAX_PARAM_LENGTH = 6000      # MLflow refuses a longer param value
MAX_PARAMS_PER_REQUEST = 100
MAX_METRICS_PER_REQUEST = 1000


@functools.lru_cache(maxsize=4096)
def mlflow_name(key: str) -> str:
    """A param or metric name as MLflow takes it (letters, digits, _ - . / and spaces): a key of an
    agent's own, such as "val/f1@0.5", would otherwise fail its whole batch."""
    return re.sub(r"[^/\w.\- ]", "_", key)


class MLflowTracker(Tracker):
    """A run in an MLflow tracking store, named after exp_name, in the experiment named
    mlflow_experiment (default: the agent's class name): every config value as a param (dotted
    keys), scalars with their step, images and files as artifacts, tags agent, exp_name, status.
    The store is mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, else experiments/mlflow.db (SQLite:
    no server). The run id is in the checkpoint, so --resume continues the same MLflow run.

    Scalars are sent in batches (at flush(), which the agent calls after every epoch, and every
    FLUSH_SECS): one request per logged value would cost more than a training step."""

    name = "mlflow"
    FLUSH_SECS = 10.0

    def __init__(self, config: dict, agent_name: str, experiments_root: Path):
        self.config = config
        self.agent_name = agent_name
        self.experiment_name = config.get("mlflow_experiment") or agent_name
        self.tracking_uri = config.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        self.experiments_root = Path(experiments_root)
        self.target = self.tracking_uri or f"sqlite:///{self.experiments_root / 'mlflow.db'}"
        self.training = config.get("mode", "train") == "train"
        self.run_id = None        # a resumed run's, from its checkpoint; else created at the first value
        self._client = None
        self._created = False     # this session created the run (so it ends it, in any mode)
        self._pending = []        # (tag, value, timestamp in ms, step), not sent yet
        self._last_sent = time.monotonic()
        self._status = None

    @property
    def client(self):
        """The MlflowClient, with the run started (or continued) at the first use."""
        if self._client is None:
            # The first use of a SQLite store creates (migrates) it; runs starting together (a
            # sweep's workers) would each migrate it at once and all fail: one process at a time.
            with waiting_for_lock(self._sqlite_file()):
                self._client = self._connect()
                if self.run_id is None or not self._continue_run():
                    self._start_run()
        return self._client

    def _sqlite_file(self) -> Path | None:
        return Path(self.target[len("sqlite:///"):]) if self.target.startswith("sqlite:///") else None

    def _connect(self):
        # MLflow's defaults retry a tracking server that is down for minutes before the tracker can fail.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)   # not its "creating database tables" lines
        # A retry is a warning line of urllib3's each; the tracker's own warning says it when all fail.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        default = f"sqlite:///{(self.experiments_root / 'mlflow.db').resolve()}"
        return MlflowClient(tracking_uri=self.tracking_uri or default)

    def _continue_run(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(self.run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning(f"MLflow run {self.run_id} is not in {self._client.tracking_uri}; "
                           "this run goes on in a new MLflow run")
            return False
        if self.training:
            self._client.update_run(self.run_id, status="RUNNING")
        # MLflow refuses to change a param: what --resume may change (max_epoch) keeps its first value.
        self._log_params({key: value for key, value in self.params().items() if key not in run.data.params})
        return True

    def _start_run(self):
        config = self.config
        tags = {"agent": self.agent_name, "exp_name": config.exp_name, "status": "running"}
        if config.get("description"):
            tags["mlflow.note.content"] = config.description     # the run's description in the MLflow UI
        run = self._client.create_run(self._experiment_id(), run_name=config.exp_name, tags=tags)
        self.run_id, self._created = run.info.run_id, True
        self._log_params(self.params())

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        database = self._client.tracking_uri
        if database.startswith("sqlite:///"):  # artifacts beside the file, not in the cwd's ./mlruns
            folder = re.sub(r"[^\w.-]", "_", self.experiment_name)
            location = (Path(database[len("sqlite:///"):]).parent / "mlruns" / folder).resolve().as_uri()
        try:
            return self._client.create_experiment(self.experiment_name, artifact_location=location)
        except MlflowException as e:   # another process (a sweep's worker) created it meanwhile
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._client.get_experiment_by_name(self.experiment_name).experiment_id

    def params(self) -> dict:
        """Every config value, under its dotted key: strings as they are, anything else as JSON."""
        return {mlflow_name(key): (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_LENGTH]
                for key, value in flatten(self.config).items()}

    def _log_params(self, params: dict):
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_REQUEST):
            self._client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_REQUEST])

    def log_scalars(self, values: dict, step: int):
        now = time.time()
        stamp, step = int(now * 1000), int(step)
        self._pending.extend((tag, float(value), stamp, step) for tag, value in values.items())
        if time.monotonic() - self._last_sent > self.FLUSH_SECS:
            self.flush()

    def log_images(self, tag: str, images: torch.Tensor, step: int):
        from torchvision.utils import save_image

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"step_{int(step):07d}.png"
            save_image(images.detach().float().cpu(), path, nrow=8)
            self.client.log_artifact(self.run_id, str(path), artifact_path="images/" + re.sub(r"[^\w/.-]", "_", tag))

    def log_artifact(self, path: Path):
        self.client.log_artifact(self.run_id, str(path))

    def set_status(self, status: str):
        self._status = status

    def state_dict(self) -> dict:
        if self._pending:
            self.flush()          # starts the run, so that the checkpoint holds its id
        return {"run_id": self.run_id} if self.run_id is not None else {}

    def load_state_dict(self, state: dict):
        self.run_id = state.get("run_id")

    def flush(self):
        from mlflow.entities import Metric

        pending, self._pending = self._pending, []
        self._last_sent = time.monotonic()
        for start in range(0, len(pending), MAX_METRICS_PER_REQUEST):
            metrics = [Metric(mlflow_name(tag), value, stamp, step)
                       for tag, value, stamp, step in pending[start:start + MAX_METRICS_PER_REQUEST]]
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self):
        if self._client is None and not self._pending:
            return                # never used: there is no run to end
        self.flush()
        # Training ends the run with its status; a test (or other mode) of a trained model adds
        # its values to the training's run and leaves its status as training left it.
        if self.training or self._created:
            status = self._status or "completed"
            if self.training:
                self.client.set_tag(self.run_id, "status", status)
            self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(status, "FINISHED"))
        self._client = None


class Trackers:
    """Every tracker of a run, called as one. A tracker that raises (a tracking server that is
    down, a file that cannot be written) is one warning line and is left out from then on: the
    run goes on with the others. Empty on the processes of a distributed run that do not write
    (rank > 0)."""

    def __init__(self, trackers: list):
        self.trackers = list(trackers)

    def _each(self, method: str, *args):
        for tracker in tuple(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as error:
                self._drop(tracker, error)

    def _drop(self, tracker, error: Exception):
        self.trackers.remove(tracker)
        where = f" ({tracker.target})" if getattr(tracker, "target", None) else ""
        logger.warning(f"the {getattr(tracker, 'name', type(tracker).__name__)} tracker{where} failed: "
                       f"{_root_cause(error)}; the run goes on without it")

    def log_scalars(self, values: dict, step: int):
        self._each("log_scalars", values, step)

    def log_images(self, tag: str, images: torch.Tensor, step: int):
        self._each("log_images", tag, images, step)

    def log_hparams(self, hparams: dict, metrics: dict):
        self._each("log_hparams", hparams, metrics)

    def log_epoch(self, epoch: int, iteration: int, wall_time_s: float, metrics: dict):
        self._each("log_epoch", epoch, iteration, wall_time_s, metrics)

    def log_artifact(self, path: Path):
        self._each("log_artifact", Path(path))

    def end_run(self, status: str, files: list):
        """Before close(): how the run ended (results.json's status), and the files of its record
        that exist (config.json, results.json), kept with it by the trackers that keep files."""
        self._each("set_status", status)
        for path in files:
            if Path(path).is_file():
                self._each("log_artifact", Path(path))

    def state_dict(self) -> dict:
        """{tracker name: its state} for the checkpoint: the MLflow run id."""
        states = {}
        for tracker in tuple(self.trackers):
            try:
                state = tracker.state_dict()
            except Exception as error:
                self._drop(tracker, error)
                continue
            if state:
                states[tracker.name] = state
        return states

    def load_state_dict(self, states: dict):
        for tracker in self.trackers:
            if tracker.name in states:
                tracker.load_state_dict(states[tracker.name])

    def flush(self):
        self._each("flush")

    def close(self):
        self._each("close")


def _root_cause(error: BaseException) -> str:
    """The innermost exception of a chain, on one line: a server that is down reaches MLflow as
    MlflowException <- requests' ConnectionError <- ... <- ConnectionRefusedError, and only the
    last says it plainly."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    for cause in reversed(seen):
        lines = str(cause).strip().splitlines()
        if lines:
            text = lines[0] if len(lines[0]) <= 300 else lines[0][:297] + "..."
            return f"{type(cause).__name__}: {text}"
    return type(seen[0]).__name__


def make_trackers(config, paths, agent_name: str) -> Trackers:
    """The trackers that the config's "loggers" names, for the experiment at `paths`."""
    makers = {"tensorboard": lambda: TensorBoardTracker(paths.summaries),
              "csv": lambda: CSVTracker(paths.root / "metrics.csv"),
              "mlflow": lambda: MLflowTracker(config, agent_name, paths.root.parent)}
    return Trackers([makers[name]() for name in config.loggers])


def check_loggers(config):
    """Before anything is written: "loggers" names known trackers, each once, and the packages
    they need are installed."""
    loggers = config.loggers
    for index, name in enumerate(loggers):
        if name not in LOGGERS:
            close = difflib.get_close_matches(str(name), LOGGERS, n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            raise ConfigError(f'"loggers" names {json.dumps(name)}, which is not a tracker; {hint}'
                              f"the trackers are: {', '.join(LOGGERS)}")
        if name in loggers[:index]:
            raise ConfigError(f'"loggers" names "{name}" twice; give each tracker once')
    if "mlflow" in loggers:
        uri = config.get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:"
        # mlflow-skinny talks to a server by itself; a database store also needs SQLAlchemy and alembic.
        database = uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql")
        needed = ["mlflow"] + (["sqlalchemy", "alembic"] if database else [])
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f'"loggers" names "mlflow", but {" and ".join(missing)} '
                              f"{'is' if len(missing) == 1 else 'are'} not installed: pip install "
                              f"{' '.join('mlflow-skinny' if name == 'mlflow' else name for name in missing)} "
                              '(or ./run.sh, which installs requirements.txt), or leave "mlflow" out of "loggers"')
    for key in ("mlflow_tracking_uri", "mlflow_experiment"):
        if config.get(key) is not None and "mlflow" not in loggers:
            raise ConfigError(f'{key} is set, but "loggers" does not name "mlflow"; add it '
                              f'("loggers": {json.dumps([*loggers, "mlflow"])}), or set {key} to null')


def hparams_of(config: dict) -> dict:
    """The config as HParams-tab values: flattened dotted keys; lists and null as JSON text."""
    hparams = {}
    for key, value in flatten(config).items():
        if key in ("exp_name", "agent", "description"):
            continue
        hparams[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return hparams


def recorded_results(path: Path) -> dict | None:
    """What results.json holds; None when there is none. One that is not a JSON object (edited by
    hand, written by another program) is a UserError, checked before a run starts: it is never
    overwritten, nor taken as absent."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read '{path}': {e.strerror or e}") from None
    try:
        recorded = json.loads(text)
        problem = None if isinstance(recorded, dict) else f"holds {type(recorded).__name__}, not an object"
    except ValueError as e:     # JSONDecodeError, and UnicodeDecodeError for a binary file
        problem = f"is not valid JSON: {str(e).splitlines()[0]}"
    if problem:
        raise UserError(f"'{path}' {problem}, so it is not the record this framework writes; fix it, or move "
                        "it away (a run never overwrites it), or start over with --force")
    return recorded


def write_results(path: Path, results: dict, mode: str = "train", mode_results=None):
    """results.json. Training writes the whole record; another mode (test, generate, ...) adds its
    entry to what training recorded instead of replacing it."""
    path = Path(path)
    if mode != "train":
        recorded = recorded_results(path)
        if recorded is None:
            recorded = {key: value for key, value in results.items() if key in ("agent", "exp_name", "params")}
        recorded[mode] = mode_results
        results = recorded
    write_json_atomic(path, finite(results))


def flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def finite(value):
    """JSON has no NaN or Infinity: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value
