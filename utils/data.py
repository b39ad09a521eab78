"""Batching from whole-data-set tensors: for data sets small enough to hold in memory (or on the
GPU) as one tensor, index slicing replaces per-sample __getitem__, PIL conversion and collation."""
import math
from typing import Callable

import torch

from utils.config import Key
from utils.errors import DataError


class TensorBatchLoader:
    """Iterates (transform(inputs[idx]), targets[idx]) batches like a DataLoader would.

    Shuffling draws its permutation from torch's global generator, so seeding torch (and restoring
    its state on resume) reproduces the order. Tensors stay where they are: put them on the GPU
    once and every batch is built there.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
                 shuffle: bool = False, drop_last: bool = False,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if len(inputs) != len(targets):
            raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.transform = transform
        self.rank, self.world_size = 0, 1
        self.order = None      # the last pass's permutation, with shuffle

    @property
    def device(self) -> torch.device | None:
        """Where the batches are built: the device of the tensors (None if they differ)."""
        return self.inputs.device if self.inputs.device == self.targets.device else None

    def shard(self, rank: int, world_size: int):
        """Iterate only this process's share, as DistributedSampler would: every process draws the
        same permutation (same seed) and takes every world_size-th sample from `rank` on. A
        shuffled (training) loader drops the remainder so every process takes the same number of
        steps; an evaluation loader keeps every sample, in uneven shares."""
        self.rank, self.world_size = rank, world_size

    def _local_count(self) -> int:
        n = len(self.inputs)
        if self.shuffle:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self):
        n = self._local_count()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        return self.iterate()

    def iterate(self, start: int = 0, order: torch.Tensor | None = None):
        """The batches from batch `start` on. A shuffled loader draws the epoch's permutation (kept
        as self.order, the whole data set's, before sharding) or continues the pass of `order`."""
        n, local = len(self.inputs), self._local_count()
        if self.shuffle:
            self.order = torch.randperm(n) if order is None else order.cpu()
            index_order = self.order[self.rank::self.world_size][:local].to(self.inputs.device)
        elif self.world_size > 1:
            index_order = torch.arange(self.rank, n, self.world_size, device=self.inputs.device)
        else:
            index_order = None
        for i in range(start, len(self)):
            begin, stop = i * self.batch_size, min((i + 1) * self.batch_size, local)
            if index_order is None:
                inputs, targets = self.inputs[begin:stop], self.targets[begin:stop]
            else:
                index = index_order[begin:stop]
                inputs, targets = self.inputs[index], self.targets[index]
            yield (self.transform(inputs) if self.transform else inputs), targets


# Config keys of agents whose data comes through torch DataLoaders: merge into their DEFAULTS.
DATA_LOADER_KEYS = {
    "data_loader_workers": Key(0, minimum=0),
    # page-locked batches for fast, non-blocking copies; "auto": on CUDA
    "pin_memory": Key("auto", types=(bool, str), choices=("auto", True, False)),
}


def make_data_loader(dataset, batch_size: int, shuffle: bool, workers: int, pin_memory, device,
                     drop_last: bool = False, **kwargs) -> torch.utils.data.DataLoader:
    """A DataLoader set up as every agent wants one: pinned memory on CUDA. An agent's
    train_loader is rebuilt by BaseAgent on utils.batches' EpochSampler and SeededSamples (the
    order from (seed, epoch), each sample's augmentation from (seed, epoch, index)), so a run
    resumed inside an epoch shuffles and augments as the uninterrupted one, in any worker; under
    torchrun its other loaders get a DistributedSampler."""
    pin = torch.device(device).type == "cuda" if pin_memory == "auto" else bool(pin_memory)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       num_workers=workers, pin_memory=pin, **kwargs)


def move_to(batch, device: torch.device, channels_last: bool = False):
    """Tensors to the device (non-blocking: from pinned memory the copy overlaps compute); 4-D
    float batches to channels_last when asked. Lists, tuples and dicts are walked."""
    if torch.is_tensor(batch):
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            return batch.to(device, memory_format=torch.channels_last, non_blocking=True)
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        if channels_last:
            return type(batch)([move_to(item, device, True) for item in batch])
        # The common case inline: a tensor already on the device (batched there) is kept, as
        # .to() would, without the dispatcher call (~1 us a tensor, every step).
        return type(batch)([(item if item.device == device else item.to(device, non_blocking=True))
                            if torch.is_tensor(item) else move_to(item, device) for item in batch])
    if isinstance(batch, dict):
        return {key: move_to(value, device, channels_last) for key, value in batch.items()}
    return batch


def needs_moving(loader, device: torch.device, channels_last: bool = False) -> bool:
    """False for a TensorBatchLoader whose tensors are on the device already: its batches are
    built there, and moving them would only cost time every step."""
    return not (isinstance(loader, TensorBatchLoader) and loader.device == device and not channels_last)


def open_image(path):
    """PIL.Image.open(path) (use it as `with open_image(path) as image:`), refusing an image too
    large to decode safely as a DataError that names the file. PIL raises DecompressionBombError
    above twice MAX_IMAGE_PIXELS (about 179 million pixels) and only warns above it; decoding such
    a file would still take gigabytes in every DataLoader worker, so both are refused."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            size = str(e).split(",")[0]           # "Image size (N pixels) exceeds limit of M pixels"
            raise DataError(f"image '{path}' is too large to decode safely ({size}); resize it, or "
                            "delete it") from None
