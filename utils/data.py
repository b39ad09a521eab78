"""Batching from whole-data-set tensors: for data sets small enough to hold in memory (or on the
GPU) as one tensor, index slicing replaces per-sample __getitem__, PIL conversion and collation."""
import math
from typing import Callable

import torch


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

    def __len__(self):
        n = len(self.inputs)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.inputs)
        if self.shuffle:
            order = torch.randperm(n).to(self.inputs.device)
        else:
            order = None
        for i in range(len(self)):
            start, stop = i * self.batch_size, min((i + 1) * self.batch_size, n)
            if order is None:
                inputs, targets = self.inputs[start:stop], self.targets[start:stop]
            else:
                index = order[start:stop]
                inputs, targets = self.inputs[index], self.targets[index]
            yield (self.transform(inputs) if self.transform else inputs), targets
