"""TensorBoard event files written synchronously by the training process.

tensorboardX's SummaryWriter hands every event to a multiprocessing queue drained by two threads:
about 150 us of the caller's time and GIL per scalar, a tenth of a small model's training step.
This writer builds the same protocol buffers with tensorboardX.summary and appends them to one
buffered event file, flushed every `flush_secs` and on flush()/close(). Scalars wait in memory as
tuples (at most MAX_QUEUED) and are built and written together: built one at a time between
training steps, each cost ~50 us in cold caches and slowed the steps after it (bench/overhead.py,
docs/benchmarks.md); together, ~8 us each.
"""
import itertools
import os
import time

from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary

_writers_opened = itertools.count()
MAX_QUEUED = 256   # scalars waiting in memory: about what the file's 8 KiB buffer held before


class SummaryWriter:
    """The subset of tensorboardX.SummaryWriter that agents use, with the same signatures."""

    def __init__(self, logdir, flush_secs: float = 10.0):
        os.makedirs(logdir, exist_ok=True)
        self.logdir = str(logdir)
        # Event file names carry the time in whole seconds: the suffix keeps a second writer in
        # the same second (a quick resume) from truncating the first one's file.
        self._events = EventsWriter(os.path.join(self.logdir, "events"),
                                    filename_suffix=f".{os.getpid()}.{next(_writers_opened)}")
        self._flush_secs = flush_secs
        self._last_flush = time.time()
        self._scalars = []   # (tag, value, step, wall time) not written yet

    def add_summary(self, summary_proto: Summary, global_step=None, walltime=None):
        self._write_scalars()   # the file keeps the order events arrived in
        now = time.time()
        self._write(summary_proto, global_step, now if walltime is None else walltime)
        if now - self._last_flush > self._flush_secs:
            self.flush()

    def add_scalar(self, tag: str, scalar_value, global_step=None, walltime=None):
        now = time.time()
        self._scalars.append((tag, float(scalar_value), global_step, now if walltime is None else walltime))
        if len(self._scalars) >= MAX_QUEUED:
            self._write_scalars()
        if now - self._last_flush > self._flush_secs:
            self.flush()

    def _write(self, summary_proto: Summary, step, walltime: float):
        event = Event(wall_time=walltime, summary=summary_proto)
        if step is not None:
            event.step = int(step)
        self._events.write_event(event)

    def _write_scalars(self):
        for tag, value, step, walltime in self._scalars:
            self._write(Summary(value=[Summary.Value(tag=tag, simple_value=value)]), step, walltime)
        self._scalars.clear()

    def add_image(self, tag: str, img_tensor, global_step=None, dataformats="CHW"):
        self.add_summary(summary.image(tag, img_tensor, dataformats=dataformats), global_step)

    def add_images(self, tag: str, img_tensor, global_step=None, dataformats="NCHW"):
        """A batch of images in [0, 1], shown as one grid."""
        self.add_summary(summary.image(tag, img_tensor, dataformats=dataformats), global_step)

    def add_histogram(self, tag: str, values, global_step=None, bins="tensorflow"):
        self.add_summary(summary.histogram(tag, values, bins), global_step)

    def add_text(self, tag: str, text_string: str, global_step=None):
        self.add_summary(summary.text(tag, text_string), global_step)

    def add_hparams(self, hparam_dict: dict, metric_dict: dict):
        """The HParams tab's entry for this run; metric_dict's tags are scalars of this run."""
        for part in summary.hparams(hparam_dict, metric_dict):
            self.add_summary(part)

    def flush(self):
        self._write_scalars()
        self._events.flush()
        self._last_flush = time.time()

    def close(self):
        self._write_scalars()
        self._events.close()


class NullWriter:
    """The writer of a process that is not rank 0 in a distributed run: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
