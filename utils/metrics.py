"""Meters that average correctly over batches of unequal size, without a device sync per batch."""
import math

import torch

from utils.distributed import all_reduce_sum


class AverageMeter:
    """Mean of a per-batch value weighted by the batch's sample count.

    Tensor values are accumulated as tensors on their device; the one sync happens when `avg` is
    read, so updating every step costs no GPU stall.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.total = 0.0
        self.count = 0

    def update(self, value, n: int = 1):
        if torch.is_tensor(value):
            value = value.detach()
        self.total = self.total + value * n
        self.count += n

    @property
    def avg(self) -> float:
        if self.count == 0:
            return math.nan
        return float(self.total) / self.count


class MeterGroup:
    """One AverageMeter per metric name, filled from the dicts that validate_step returns."""

    def __init__(self):
        self.meters = {}

    def update(self, values: dict, n: int):
        for name, value in values.items():
            self.meters.setdefault(name, AverageMeter()).update(value, n)

    def averages(self, prefix: str = "") -> dict:
        """Means over everything seen, by every process of a distributed run."""
        names = list(self.meters)
        sums = torch.tensor([[float(self.meters[name].total), self.meters[name].count] for name in names],
                            dtype=torch.float64).reshape(-1, 2)
        sums = all_reduce_sum(sums)
        return {prefix + name: (total / count if count else math.nan)
                for name, (total, count) in zip(names, sums.tolist())}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Batch-mean cross entropy and accuracy of logits (B, classes) against labels (B,): what a
    classification agent's validate_step returns."""
    return {"loss": torch.nn.functional.cross_entropy(logits, labels),
            "accuracy": (logits.argmax(dim=1) == labels).float().mean()}
