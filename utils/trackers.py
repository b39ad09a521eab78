"""Where a run's numbers go: trackers behind one small interface (scalars with a step, images,
hparams), and results.json, the machine-readable record of how the run went.

Agents never hold a tracker: they call BaseAgent.log_scalars / log_images, which fan out to every
tracker of the run. A new tracker is one class with these methods.
"""
import json
import math
from pathlib import Path

import torch

from utils.errors import UserError
from utils.files import write_json_atomic
from utils.summary import SummaryWriter


class TensorBoardTracker:
    """Event files under `logdir`, for `tensorboard --logdir experiments`. The file is created at
    the first value logged, so a run that logs nothing leaves nothing."""

    def __init__(self, logdir: Path):
        self.logdir = Path(logdir)
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


class Trackers:
    """Every tracker of a run, called as one. Empty on the processes of a distributed run that do
    not write (rank > 0)."""

    def __init__(self, trackers: list):
        self.trackers = list(trackers)

    def log_scalars(self, values: dict, step: int):
        for tracker in self.trackers:
            tracker.log_scalars(values, step)

    def log_images(self, tag: str, images: torch.Tensor, step: int):
        for tracker in self.trackers:
            tracker.log_images(tag, images, step)

    def log_hparams(self, hparams: dict, metrics: dict):
        for tracker in self.trackers:
            tracker.log_hparams(hparams, metrics)

    def flush(self):
        for tracker in self.trackers:
            tracker.flush()

    def close(self):
        for tracker in self.trackers:
            tracker.close()


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
