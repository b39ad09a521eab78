"""Checkpoints: the run's stateful parts as one dict of plain types and tensors, the files that hold
it (written atomically, loaded with weights_only), and RNG state capture."""
import pickle
import random
import time
from collections.abc import Mapping
from pathlib import Path
from types import NoneType

import numpy as np
import torch

from utils.config import Key
from utils.errors import CheckpointError
from utils.files import atomic_write, copy_atomic

FORMAT_VERSION = 1
LATEST = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"

# The checkpoint config keys (merged into BaseAgent.DEFAULTS).
CHECKPOINT_KEYS = {
    "checkpoint_file": Key(None, types=(str, NoneType)),   # what --resume / mode=test load (default: by mode)
    "keep_last_checkpoints": Key(0, minimum=0),            # epoch_NNNN copies kept besides the latest
    # The latest checkpoint also inside epochs, every N optimizer steps and/or M minutes (null:
    # at epoch ends only); --resume continues with the next batch.
    "checkpoint_every": Key(None, types=(int, NoneType), minimum=1),
    "checkpoint_every_minutes": Key(None, types=(float, NoneType), minimum=0.01),
}


def plain(value):
    """Nested EasyDicts (and other mappings) as plain dicts, tuples as lists: what
    torch.load(weights_only=True) accepts back."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def save_atomic(obj, path: Path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a crash or Ctrl+C mid-write leaves the previous file intact."""
    with atomic_write(path) as f:
        torch.save(obj, f)


# How a file torch.save wrote begins: a zip archive (torch >= 1.6), or the legacy format's pickled
# magic number (after the pickle protocol header, and a frame header from protocol 4 on).
_ZIP_START = b"PK\x03\x04"
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]


def is_torch_file(path: Path) -> bool:
    """Whether `path` begins as torch.save output does; anything else (a text file, a numpy
    array, someone's pickle) is not read by torch.load, whose errors for it are IndexError,
    KeyError, "Invalid magic number" and the like."""
    with open(path, "rb") as f:
        head = f.read(32)
    return head.startswith(_ZIP_START) or (head.startswith(b"\x80") and _LEGACY_MAGIC in head)


def torch_load(path: Path, what: str, fix: str, map_location="cpu"):
    """torch.load(weights_only=True) of a file the user named, every way it can fail as one
    CheckpointError: "`what` 'path' is not a checkpoint" for a file torch.save did not write,
    "... is unreadable (truncated or corrupt: ...)" for one it did that is broken."""
    path = Path(path)
    try:
        if not is_torch_file(path):
            raise CheckpointError(f"{what} '{path}' is not a checkpoint (not a file torch.save "
                                  f"wrote); {fix}")
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read {what} '{path}': {e.strerror or e}") from None
    except CheckpointError:
        raise
    except Exception as e:  # a broken zip or pickle raises whatever the reader tripped over
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{what} '{path}' is unreadable (truncated or corrupt: {reason}); "
                              f"{fix}") from None


def load(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint written by save_atomic, turning every way it can be broken into one
    CheckpointError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'")
    state = torch_load(path, "checkpoint", "point checkpoint_file at a .pth.tar in experiments/<name>/"
                       "checkpoints/, or restore that file, or start over with --force", map_location)
    if not isinstance(state, dict) or "models" not in state:
        raise CheckpointError(f"'{path}' is not a checkpoint written by this framework "
                              "(no 'models' entry)")
    return state


class CheckpointSaver:
    """Owns a run's checkpoint files in one folder: checkpoint.pth.tar (the latest state, what
    --resume continues), model_best.pth.tar (a copy at the best validation) and, with
    keep_last > 0, epoch_NNNN.pth.tar copies of the last keep_last epochs."""

    def __init__(self, folder: Path, keep_last: int = 0):
        self.folder = Path(folder)
        self.keep_last = keep_last

    @property
    def latest(self) -> Path:
        return self.folder / LATEST

    @property
    def best(self) -> Path:
        return self.folder / BEST

    def save(self, state: dict, epoch: int, is_best: bool, keep_history: bool = True):
        """keep_history False (an interrupted epoch): no epoch_NNNN copy of a half-done epoch."""
        self.folder.mkdir(parents=True, exist_ok=True)
        save_atomic(state, self.latest)
        if is_best:
            copy_atomic(self.latest, self.best)
        if self.keep_last > 0 and keep_history:
            copy_atomic(self.latest, self.folder / f"epoch_{epoch:04d}.pth.tar")
            for old in sorted(self.folder.glob("epoch_*.pth.tar"))[:-self.keep_last]:
                old.unlink()


class CheckpointClock:
    """When a checkpoint is due inside an epoch: `every` optimizer steps and/or `minutes` after
    the last one (both None: never; epoch ends save anyway)."""

    def __init__(self, every: int | None, minutes: float | None):
        self.every, self.minutes = every, minutes
        self.inside_epochs = every is not None or minutes is not None
        self.saved(0)

    def saved(self, iteration: int):
        self.iteration, self.when = iteration, time.monotonic()

    def due(self, iteration: int) -> bool:
        if iteration == self.iteration:
            return False
        if self.every is not None and iteration - self.iteration >= self.every:
            return True
        return self.minutes is not None and time.monotonic() - self.when >= 60 * self.minutes


class TrainingParts:
    """The stateful parts a run declares by name (models, optimizers, schedulers, the fp16 grad
    scaler), turned into the checkpoint's entries and restored from them."""

    def __init__(self):
        self.models: dict[str, torch.nn.Module] = {}      # the plain modules, never DDP/compiled
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, tuple] = {}            # name -> (scheduler, "epoch" | "iteration")
        self.iteration_schedulers = []                    # stepped after every optimizer step
        self.scaler = None

    def add_scheduler(self, name: str, scheduler, interval: str):
        if interval not in ("epoch", "iteration"):
            raise ValueError(f"scheduler interval must be 'epoch' or 'iteration', not {interval!r}")
        self.schedulers[name] = (scheduler, interval)
        if interval == "iteration":
            self.iteration_schedulers.append(scheduler)

    def step_epoch_schedulers(self, monitored: float | None):
        """After an epoch; a ReduceLROnPlateau steps on the monitored value (not at all without one)."""
        for scheduler, interval in self.schedulers.values():
            if interval != "epoch":
                continue
            if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()
            elif monitored is not None:
                scheduler.step(monitored)

    def state_dict(self) -> dict:
        return {
            "models": {name: model.state_dict() for name, model in self.models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: s.state_dict() for name, (s, _) in self.schedulers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_models(self, state: dict):
        source = state.get("agent", "?")
        for name, model in self.models.items():
            if name not in state["models"]:
                raise CheckpointError(f"the checkpoint (from {source}) has no weights for model "
                                      f"'{name}'; it holds: {', '.join(state['models']) or 'none'}")
            try:
                model.load_state_dict(state["models"][name])
            except RuntimeError as e:
                detail = " ".join(str(e).split())
                raise CheckpointError(f"the checkpoint's weights do not fit model '{name}' "
                                      f"(was it trained with another architecture?): {detail[:300]}") from None

    def load_training(self, state: dict):
        """Optimizers, schedulers and the scaler, for a run that trains on."""
        schedulers = {name: scheduler for name, (scheduler, _) in self.schedulers.items()}
        for kind, table, stored in (("optimizer", self.optimizers, state.get("optimizers", {})),
                                    ("scheduler", schedulers, state.get("schedulers", {}))):
            for name, part in table.items():
                if name not in stored:
                    raise CheckpointError(f"the checkpoint has no state for {kind} '{name}'")
                try:
                    part.load_state_dict(stored[name])
                except (ValueError, KeyError, RuntimeError) as e:
                    raise CheckpointError(f"the checkpoint's state does not fit {kind} '{name}': {e}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def rng_states() -> dict:
    np_state = np.random.get_state(legacy=False)
    states = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32),
                                   "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
