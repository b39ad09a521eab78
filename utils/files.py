"""Writing files so that a crash, a full disk or Ctrl+C never leaves a half-written one, and
keeping third-party download chatter out of the user's console. Every file the framework writes
(checkpoints, JSON, .npy) goes through atomic_write."""
import contextlib
import io
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from utils import interrupts


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl+C (SIGINT) and SIGTERM until the block is done, then raise KeyboardInterrupt.
    torch.save interrupted halfway raises a RuntimeError from its zip writer instead of the
    KeyboardInterrupt, which would turn a clean Ctrl+C into a crash. While a run trains, its
    utils.interrupts.GracefulStop owns the signals: they count, and the third aborts the write."""
    stop = interrupts.active()
    if stop is not None:
        with stop.writing():
            yield
        return
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


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file object for a temporary file beside `path`; when the block ends without an
    error it is flushed, fsynced and renamed over `path`, otherwise removed. Readers see the old
    file or the new one, never a part of it; signals wait until the rename is done."""
    path = Path(path)
    with interrupts_deferred():
        tmp = _temporary_beside(path)
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError) and e.filename is None:
                e.filename = str(path)   # a write or fsync on a full disk names no file
            stop = interrupts.active()
            if stop is not None and stop.aborted and not isinstance(e, interrupts.Aborted):
                raise interrupts.Aborted from None   # torch.save's zip writer turns it into a RuntimeError
            raise


def remove_unfinished(folder) -> list[str]:
    """Delete the temporary files atomic_write left in `folder` when its process was killed
    mid-write (SIGKILL, a lost node); they were never renamed, so no reader saw them. Only for the
    one process that writes there (the experiment lock's holder). Returns their names."""
    folder = Path(folder)
    removed = []
    for path in folder.glob("*.*.tmp") if folder.is_dir() else []:
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def write_json_atomic(path, data):
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def copy_atomic(source, destination):
    with atomic_write(destination) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)


@contextlib.contextmanager
def quiet_output():
    """Swallow what the block prints to stdout and stderr (torchvision's download and extraction
    progress, gdown's bars), so the user's console holds only the framework's own lines."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
