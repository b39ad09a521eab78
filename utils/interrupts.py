"""Ctrl+C and SIGTERM while a run trains: the first one asks the run to stop at its next safe
point (after the current optimizer step, between episodes or validation batches), where it saves a
checkpoint and exits with 130; more signals wait while that checkpoint is written; the third one
aborts at once. Files are written atomically (utils/files.py), so an abort leaves the previous
checkpoint as it was."""
import contextlib
import logging
import signal
import threading

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
ABORT_AT = 3          # the signal that aborts without waiting for a safe point


class StopRequested(KeyboardInterrupt):
    """Raised at a safe point after a signal: the counters, weights and data position agree."""


class Aborted(KeyboardInterrupt):
    """The third signal: raised wherever the run was; nothing more is saved."""


_active = None        # the GracefulStop whose handlers are installed (signals are per process)


def active():
    return _active


class GracefulStop:
    """Installs the handlers for the block (in the main thread only: elsewhere Python cannot take
    signals, and KeyboardInterrupt behaves as it always does)."""

    def __init__(self):
        self.count = 0
        self.saving = 0
        self._previous = None

    @property
    def requested(self) -> bool:
        return self.count > 0

    @property
    def aborted(self) -> bool:
        return self.count >= ABORT_AT

    def __enter__(self):
        global _active
        if threading.current_thread() is threading.main_thread() and _active is None:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
            _active = self
        return self

    def __exit__(self, *exc):
        global _active
        if self._previous is not None:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous = None
            _active = None
        return False

    def _handle(self, signum, frame):
        self.count += 1
        name = signal.Signals(signum).name
        if self.aborted:
            logger.warning(f"{name} again: aborting now, without saving (the last checkpoint written is kept)")
            raise Aborted
        if self.count == 1:
            logger.warning(f"{name}: stopping after the current step, then saving a checkpoint "
                           f"(send it {ABORT_AT - 1} more times to abort at once)")
        elif self.saving:
            logger.warning(f"{name}: waiting for the checkpoint being written (once more aborts)")
        else:
            logger.warning(f"{name}: still finishing the current step (once more aborts without saving)")

    def check(self):
        """At a safe point: stop here if a signal asked for it."""
        if self.requested:
            raise StopRequested

    @contextlib.contextmanager
    def writing(self):
        """Around a file write: signals only count (and the third aborts)."""
        self.saving += 1
        try:
            yield
        finally:
            self.saving -= 1
