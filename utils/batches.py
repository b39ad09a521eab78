"""Where a run is inside an epoch, so that a checkpoint written there (checkpoint_every, Ctrl+C,
SIGTERM) resumes with the next batch as if the run had never stopped.

- `EpochSampler`: a torch DataLoader's order as a function of (seed, epoch) alone, sharded across
  torchrun's processes as DistributedSampler does, and able to start at a position.
- `SeededSamples`: a data set whose per-sample random transforms (crops, flips, scales) draw from
  generators seeded by (seed, epoch, sample index), so the augmentation does not depend on which
  worker process, or which session, loaded the sample.
- `resumable_loader`: a DataLoader rebuilt with both; `EpochBatches`: the batches of one epoch from a
  position, calling back before each one is fetched (the safe point of BaseAgent's loop);
  `Accumulation`: which backward passes of grad_accumulation step.

A TensorBatchLoader (utils/data.py) keeps its epoch's permutation and starts at a position itself.
"""
import math
import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler


def mixed_seed(*values: int) -> int:
    """A 32-bit seed from several integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) pairs: the data set's indices, shuffled by a generator seeded from
    (seed, epoch) when `shuffle`, this process's share of them under torchrun (padded by repeating,
    or cut with drop_last, so every process takes the same number of batches, as DistributedSampler
    does). `start_at(n)` makes the next pass begin at its n-th sample."""

    def __init__(self, size: int, shuffle: bool, seed: int, drop_last: bool = False):
        self.size, self.shuffle, self.seed, self.drop_last = size, shuffle, seed, drop_last
        self.epoch, self.rank, self.world_size = 0, 0, 1
        self._start = 0

    def shard(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def start_at(self, sample: int):
        self._start = sample

    def __len__(self):
        if self.drop_last:
            return self.size // self.world_size
        return math.ceil(self.size / self.world_size)

    def order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch))
            indices = torch.randperm(self.size, generator=generator).tolist()
        else:
            indices = list(range(self.size))
        total = len(self) * self.world_size
        if total > len(indices):                      # pad: every process the same count
            indices += (indices * math.ceil(total / len(indices)))[:total - len(indices)]
        return indices[:total][self.rank::self.world_size]

    def __iter__(self):
        start, self._start = self._start, 0
        epoch = self.epoch
        return iter([(epoch, index) for index in self.order()[start:]])


class SeededSamples(torch.utils.data.Dataset):
    """`dataset`, read with (epoch, index) keys: python's, numpy's and torch's generators are seeded
    from (seed, epoch, index) for the sample's transforms, and the caller's generators are put back
    after (in the main process they are the training's)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):      # the wrapped data set's own attributes (classes, files, ...)
        if name in ("dataset", "seed"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        epoch, index = key
        with _generators_seeded(mixed_seed(self.seed, epoch, index)):
            return self.dataset[index]


@contextmanager
def _generators_seeded(seed: int):
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        # The CPU generator alone, which transforms draw from and fork_rng restores: torch.manual_seed
        # would also reseed every CUDA generator (the training's, when the main process loads the
        # batches), and costs 0.2 ms a sample where this costs 2 us.
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def resumable_loader(loader, seed: int):
    """`loader` rebuilt on an EpochSampler and SeededSamples, or `loader` itself when it is one
    already or is not a torch DataLoader over a map-style data set with a plain sequential or random
    sampler (a custom sampler's order cannot be restored; such a loader resumes at epoch starts)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, EpochSampler):
        return loader
    plain_random = isinstance(loader.sampler, RandomSampler) and not loader.sampler.replacement \
        and loader.sampler._num_samples is None
    if not (plain_random or isinstance(loader.sampler, SequentialSampler)) \
            or isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return loader
    sampler = EpochSampler(len(loader.dataset), plain_random, seed)
    return DataLoader(SeededSamples(loader.dataset, seed), batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers,
                      # its own generator: creating an iterator draws the workers' base seed from it,
                      # not from torch's global generator, whose state the checkpoint restores
                      generator=torch.Generator().manual_seed(seed),
                      prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None)


def can_resume_inside_epoch(loader) -> bool:
    from utils.data import TensorBatchLoader

    return isinstance(loader, (TensorBatchLoader, list)) or \
        isinstance(getattr(loader, "sampler", None), EpochSampler)


class EpochBatches:
    """The first `count` batches of `source` (a loader, or a list of cached batches), from batch
    `start` on. Before fetching batch i it calls before_batch(i) (i batches of the epoch done), and
    at the end before_batch(count): where a stop request or a due checkpoint is honoured, since
    nothing of the next batch has been drawn yet. len() is the epoch's count."""

    def __init__(self, source, count: int, start: int = 0, before_batch=None, order=None):
        self.source, self.count, self.start = source, count, start
        self.before_batch, self.order = before_batch, order

    def __len__(self):
        return self.count

    def _iterator(self):
        from utils.data import TensorBatchLoader

        source, start = self.source, self.start
        if isinstance(source, list):
            return iter(source[start:])
        if isinstance(source, TensorBatchLoader):
            return source.iterate(start, self.order)
        if start and isinstance(getattr(source, "sampler", None), EpochSampler):
            source.sampler.start_at(start * source.batch_size)
            return iter(source)
        if start:
            raise ValueError("this loader cannot start inside an epoch")
        return iter(source)

    def __iter__(self):
        batches = self._iterator()
        for index in range(self.start, self.count):
            if self.before_batch is not None:
                self.before_batch(index)
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch
        if self.before_batch is not None:
            self.before_batch(self.count)


class Accumulation:
    """grad_accumulation k: backward passes are summed over groups of k batches and the optimizer
    steps at each group's last one; the epoch's last group has the batches that are left."""

    def __init__(self, k: int):
        self.k = k
        self.micro_batch = 0     # backward passes so far in the current group
        self.group_size = 1      # batches in the current group
        self.batches_left = 1    # in the epoch, the current one included

    @property
    def between_groups(self) -> bool:
        return self.micro_batch == 0

    def next_group_size(self) -> int:
        return min(self.k, self.batches_left) if self.micro_batch == 0 else self.group_size

    def start_group(self):
        self.group_size = self.next_group_size()

    def passed(self) -> bool:
        """After a backward pass: whether the group is complete (the optimizer steps now)."""
        self.micro_batch += 1
        if self.micro_batch < self.group_size:
            return False
        self.micro_batch = 0
        return True


class EpochProgress:
    """Where the run is inside the current epoch, and the checkpoint's "position" entry that
    holds it: None at an epoch's start; the batches (an RL agent's episodes) done, the epoch's
    order and the agent's running sums; or, once the epoch's training is done and its validation
    under way, the training's metrics and the random state it ended in."""

    def __init__(self):
        self.position = 0           # batches (episodes) of the epoch done
        self.batches = None         # the epoch's EpochBatches (agents with their own loop: None)
        self.trained = None         # train_one_epoch's metrics, until the epoch ends
        self.rng_after_training = None
        self.resumed = None         # a checkpoint's entry, until the epoch it resumes starts
        self.starting = None        # that entry, while the resumed epoch's batches are made

    @property
    def at_epoch_start(self) -> bool:
        return self.trained is None and self.position == 0

    def state(self, epoch_state) -> dict | None:
        """`epoch_state`: the agent's hook, called only inside an epoch. None too when the train
        loader's order cannot be saved (the resumed run starts the epoch again)."""
        if self.trained is not None:
            return {"epoch_position": None, "order": None, "epoch_state": None,
                    "train_metrics": self.trained, "rng_after_training": self.rng_after_training}
        source = getattr(self.batches, "source", None)
        if self.position == 0 or (source is not None and not can_resume_inside_epoch(source)):
            return None
        return {"epoch_position": self.position, "order": getattr(source, "order", None),
                "epoch_state": epoch_state(), "train_metrics": None, "rng_after_training": None}

    def start_epoch(self) -> dict | None:
        """The resumed entry this epoch continues (None: a fresh epoch)."""
        entry, self.resumed = self.resumed, None
        self.starting = entry
        if entry is not None and entry["train_metrics"] is not None:   # stopped while validating
            self.trained, self.rng_after_training = entry["train_metrics"], entry["rng_after_training"]
        return entry

    def take_start(self) -> tuple[int, torch.Tensor | None]:
        """(first batch, order) for the epoch's batches."""
        entry, self.starting = self.starting or {}, None
        return entry.get("epoch_position") or 0, entry.get("order")

    def training_done(self, metrics: dict, rng: dict):
        self.trained, self.rng_after_training = metrics, rng

    def end_epoch(self):
        self.position, self.batches, self.trained, self.rng_after_training = 0, None, None, None

    def describe_resumed(self, unit: str, epochs_done: int) -> str:
        """How the resume line names the checkpoint's position: ", 3 batches into epoch 5"."""
        if self.resumed is None:
            return ""
        if self.resumed["train_metrics"] is not None:
            return f" (epoch {epochs_done + 1} trained: its validation runs again)"
        return f", {self.resumed['epoch_position']} {unit} into epoch {epochs_done + 1}"

    def describe(self, unit: str, epochs_done: int) -> str:
        """How a log line names the position: " (3 batches into epoch 5)"."""
        if self.trained is not None:
            return f" (epoch {epochs_done + 1} trained, its validation left)"
        return f" ({self.position} {unit} into epoch {epochs_done + 1})" if self.position else ""


def make_train_loader_resumable(data_loader, seed: int, inside_epochs: bool, owner: str):
    """data_loader.train_loader (if it has one) rebuilt by resumable_loader; one clear error when
    checkpoint_every(_minutes) asks for checkpoints inside epochs of a loader whose order a
    checkpoint cannot hold."""
    from utils.errors import ConfigError

    loader = getattr(data_loader, "train_loader", None)
    if loader is None:
        return
    data_loader.train_loader = loader = resumable_loader(loader, seed)
    if inside_epochs and not can_resume_inside_epoch(loader):
        raise ConfigError(f"{owner}'s train_loader ({type(loader).__name__} with its own sampler) cannot restart "
                          "inside an epoch: set checkpoint_every and checkpoint_every_minutes to null, or build "
                          "it with shuffle=True/False")
