"""One writer per experiment: an exclusive flock on the experiment folder, held while a run writes.

The kernel releases a flock when its process ends, however it ends (SIGKILL, a lost node), so a
lock left behind by a killed run is never stale: the next run simply gets it. The holder's pid
and host are written to `<experiment>/.lock` for the message another process shows.
"""
import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path

from utils.errors import UserError

LOCK_FILE = ".lock"


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def describe_holder(folder: Path) -> str:
    try:
        holder = json.loads((Path(folder) / LOCK_FILE).read_text())
        return f"process {holder['pid']} on {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def is_held(folder: Path) -> bool:
    """True while some live process holds the experiment (a run that is writing it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _try_flock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def refuse_if_held(folder: Path):
    """Checked before anything else is read or built: a second writer stops at once."""
    if is_held(folder):
        raise UserError(f"'{folder}' is in use by {describe_holder(folder)}: wait for that run to end "
                        "(or stop it), or pick another exp_name")


class ExperimentLock:
    """Held from the first file a run writes into its experiment until the run ends."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd = None

    def acquire(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        if not _try_flock(fd):
            os.close(fd)
            raise UserError(f"'{self.folder}' is in use by {describe_holder(self.folder)}: wait for that "
                            "run to end (or stop it), or pick another exp_name")
        self._fd = fd
        (self.folder / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        return self

    def release(self):
        if self._fd is not None:
            (self.folder / LOCK_FILE).unlink(missing_ok=True)
            os.close(self._fd)      # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def waiting_for_lock(path: Path | None):
    """An exclusive flock on `path`.lock for the block, waiting for it (nothing when path is None):
    one process at a time for a step that must not run twice at once (creating an MLflow store)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
