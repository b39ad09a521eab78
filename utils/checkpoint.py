"""Checkpoint files: atomic writes, safe loads (weights_only), RNG state capture."""
import contextlib
import os
import pickle
import random
import shutil
import signal
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch

from utils.errors import CheckpointError

FORMAT_VERSION = 1


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl+C (SIGINT) and SIGTERM until the block is done, then raise KeyboardInterrupt.
    torch.save interrupted halfway raises a RuntimeError from its zip writer instead of the
    KeyboardInterrupt, which would turn a clean Ctrl+C into a crash."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt


def _temporary_beside(path: Path) -> str:
    """A new file in path's folder, with the permissions a plain open() would have given it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def save_atomic(obj, path: Path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a crash or Ctrl+C mid-write leaves the previous file intact."""
    path = Path(path)
    with interrupts_deferred():
        tmp = _temporary_beside(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def copy_atomic(src: Path, dst: Path):
    dst = Path(dst)
    tmp = _temporary_beside(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint written by save_atomic, turning every way it can be broken into one
    CheckpointError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint '{path}' is unreadable (truncated or corrupt: {reason}); "
                              "restore it, or start over with --force") from None
    if not isinstance(state, dict) or "models" not in state:
        raise CheckpointError(f"'{path}' is not a checkpoint written by this framework "
                              "(no 'models' entry)")
    return state


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
