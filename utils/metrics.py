"""Meters that average correctly over batches of unequal size, without a device sync per batch."""
import math
from types import NoneType

import torch

from utils.config import Key
from utils.distributed import all_reduce_sum
from utils.errors import ConfigError

# The keys of the monitored metric (merged into BaseAgent.DEFAULTS; stop_at is a trainer key).
MONITOR_KEYS = {
    "monitor": Key("val/loss", types=(str, NoneType)),   # null: no best model, no early stopping
    "monitor_mode": Key("min", choices=("min", "max")),
    "early_stopping_patience": Key(None, types=(int, NoneType), minimum=1),
}


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


class ConfusionMatrix:
    """Pixel counts (num_classes, num_classes), rows the ground truth, columns the prediction,
    accumulated on the labels' device with one bincount per update. Labels outside 0..num_classes-1
    (the ignore index 255) are not counted."""

    def __init__(self, num_classes: int, device=None):
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor):
        """predictions and labels: integer tensors of the same shape, e.g. (B, H, W)."""
        n = self.num_classes
        labels, predictions = labels.reshape(-1).long(), predictions.reshape(-1).long()
        # Uncounted pixels go to one extra bin, dropped after: no data-dependent shapes.
        index = torch.where((labels >= 0) & (labels < n), labels * n + predictions, n * n)
        self.counts += torch.bincount(index, minlength=n * n + 1)[:n * n].view(n, n)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the counts of every process of a distributed run (a no-op otherwise)."""
        self.counts = all_reduce_sum(self.counts)
        return self


def segmentation_metrics(counts: torch.Tensor) -> dict:
    """From a confusion matrix (rows ground truth, columns prediction):
      pixel_accuracy       correct pixels / labelled pixels
      class_accuracy       per class: correct / that class's labelled pixels (NaN: not in the labels)
      mean_class_accuracy  mean of class_accuracy over the classes present in the labels
      iou                  per class: TP / (TP + FP + FN); NaN where the class is in neither the labels
                           nor the predictions (0 / 0), 0 where it is only predicted
      mIoU                 mean of iou over the classes that are not NaN
    Per-class values are lists of floats; a class absent from both sides does not pull the mean down."""
    counts = counts.double().cpu()
    true_positives = counts.diag()
    labelled = counts.sum(dim=1)           # per class: pixels of that class in the ground truth
    predicted = counts.sum(dim=0)
    union = labelled + predicted - true_positives
    nan = torch.tensor(math.nan, dtype=torch.float64)
    class_accuracy = torch.where(labelled > 0, true_positives / labelled, nan)
    iou = torch.where(union > 0, true_positives / union, nan)
    total = float(labelled.sum())
    return {
        "pixel_accuracy": float(true_positives.sum()) / total if total else math.nan,
        "mean_class_accuracy": _nanmean(class_accuracy),
        "mIoU": _nanmean(iou),
        "class_accuracy": class_accuracy.tolist(),
        "iou": iou.tolist(),
    }


def _nanmean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return float(present.mean()) if len(present) else math.nan


class BestValue:
    """The best value of the monitored metric so far, the epoch it came at, and how many
    validations in a row have not improved on it (early stopping's count)."""

    def __init__(self, mode: str = "min", patience: int | None = None):
        self.mode, self.patience = mode, patience
        self.value, self.epoch, self.bad_epochs = None, None, 0

    def update(self, value: float, epoch: int) -> bool:
        """Record a validation's value; True when it is a new best. NaN never is."""
        improved = math.isfinite(value) and (
            self.value is None or (value > self.value if self.mode == "max" else value < self.value))
        if improved:
            self.value, self.epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def patience_spent(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": {"value": self.value, "epoch": self.epoch},
                "early_stopping": {"bad_epochs": self.bad_epochs}}

    def load_state_dict(self, state: dict):
        self.value, self.epoch = state["best"]["value"], state["best"]["epoch"]
        self.bad_epochs = state["early_stopping"]["bad_epochs"]


class Monitor(BestValue):
    """The monitored validation metric (`tag`, e.g. "val/loss"; None: nothing is monitored): its
    best value, early stopping after `patience` validations without a new best, and `stop_at`, a
    value that ends training once reached. A stop is (status for results.json, line for the log)."""

    def __init__(self, tag: str | None, mode: str = "min", patience: int | None = None, stop_at: float | None = None):
        super().__init__(mode, patience)
        self.tag, self.stop_at = tag, stop_at

    def observe(self, metrics: dict, epoch: int) -> bool:
        """A validation's metrics; True when the monitored one is a new best."""
        if self.tag is None:
            return False
        if self.tag not in metrics:
            raise ConfigError(f"monitor \"{self.tag}\" is not among the validation metrics "
                              f"({', '.join(metrics)}); set \"monitor\" to one of them")
        return self.update(metrics[self.tag], epoch)

    def reached(self, value) -> bool:
        if self.stop_at is None or value is None or not math.isfinite(value):
            return False
        return value >= self.stop_at if self.mode == "max" else value <= self.stop_at

    def stop_after(self, metrics: dict, epoch: int) -> tuple[str, str] | None:
        """After a validation: why training stops here, or None."""
        if self.patience_spent:
            return "early_stopped", (f"early stopping: {self.tag} has not improved for {self.bad_epochs} "
                                     f"validations (best {self.value} at epoch {self.epoch})")
        if self.reached(metrics.get(self.tag)):
            return "reached_target", (f"stop_at: {self.tag} reached {metrics[self.tag]:.4g} (target "
                                      f"{self.stop_at}) at epoch {epoch}")
        return None

    def stopped_before(self) -> tuple[str, str] | None:
        """For a resumed run: whether it had already stopped on its own."""
        if self.patience_spent:
            return "early_stopped", "this run already stopped early; raise early_stopping_patience to train on"
        if self.reached(self.value):
            return "reached_target", f"this run already reached stop_at ({self.stop_at}); raise it to train on"
        return None

    def summary(self, metrics: dict) -> dict:
        """The last metrics and the best value (as "best/<tag>"), for the HParams summary."""
        return {**metrics, f"best/{self.tag}": self.value} if self.value is not None else dict(metrics)


class RunningLoss:
    """An epoch's training loss: the mean of per-batch mean losses weighted by batch size. On an
    accelerator the losses wait as tensors and are folded in at each log interval: no device sync
    per step. On the CPU each is added at once: a float costs less than a kept tensor there
    (2-4% of a small model's step in bench/overhead.py)."""

    def __init__(self):
        self.load_state_dict(None)

    def add(self, loss: torch.Tensor, batch_size: int):
        if loss.device.type == "cpu":
            self.loss_sum += loss.item() * batch_size
            self.sample_count += batch_size
        else:
            self._pending.append(loss.detach())
            self._sizes.append(batch_size)

    def fold(self):
        if self._pending:
            losses = torch.stack(self._pending).tolist()   # one copy to the host for the interval
            self.loss_sum += sum(loss * size for loss, size in zip(losses, self._sizes))
            self.sample_count += sum(self._sizes)
            self._pending, self._sizes = [], []

    def epoch_mean(self) -> float:
        """Over every process of a distributed run."""
        self.fold()
        loss_sum, count = all_reduce_sum(torch.tensor([self.loss_sum, self.sample_count],
                                                      dtype=torch.float64)).tolist()
        return loss_sum / count if count else math.nan

    def state_dict(self) -> dict:
        self.fold()
        return {"loss_sum": self.loss_sum, "sample_count": self.sample_count}

    def load_state_dict(self, state: dict | None):
        state = state or {"loss_sum": 0.0, "sample_count": 0}
        self.loss_sum, self.sample_count = state["loss_sum"], state["sample_count"]
        self._pending, self._sizes = [], []


def metrics_table(metrics: dict) -> str:
    """'  tag  value' lines, the tags aligned."""
    width = max(len(tag) for tag in metrics)
    return "\n".join(f"  {tag:<{width}}  {value:.4f}" for tag, value in metrics.items())


def epoch_line(epoch: int, max_epoch: int, metrics: dict, is_best: bool, seconds: float) -> str:
    shown = "  ".join(f"{name} {value}" if isinstance(value, int) else f"{name} {value:.4f}"
                      for name, value in metrics.items())
    return f"epoch {epoch}/{max_epoch}  {shown}{'  (best)' if is_best else ''}  [{seconds:.1f}s]"
