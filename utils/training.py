"""What every trainer has, each a small part that BaseAgent's one optimizer step and epoch loop
call: an EMA of the weights, learning-rate warmup, gradient clipping, a profiler for a few steps,
and the batch limits of debug runs (fast_dev_run, limit_*_batches, overfit_batches)."""
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from types import NoneType

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from utils.config import Key

logger = logging.getLogger(__name__)

# The trainer's config keys (merged into BaseAgent.DEFAULTS); all off by default.
TRAINER_KEYS = {
    "grad_accumulation": Key(1, minimum=1),   # an optimizer step every k batches, the loss divided by k
    "grad_clip": Key(None, types=(float, NoneType), minimum=0),   # max total gradient norm
    "ema": Key(None, types=(dict, NoneType)),  # {"decay": 0.999, "every": 1}: validate/test the average
    "warmup_iterations": Key(0, minimum=0),   # linear learning-rate warmup over that many steps
    "stop_at": Key(None, types=(float, NoneType)),  # stop once the monitored value reaches it
    # Debug runs: fast_dev_run true (or n) runs 1 (n) training and validation batches, keeps nothing.
    "fast_dev_run": Key(False, types=(bool, int), minimum=1),
    "limit_train_batches": Key(None, types=(int, float, NoneType), minimum=0),  # a count, or a fraction
    "limit_val_batches": Key(None, types=(int, float, NoneType), minimum=0),
    "overfit_batches": Key(0, minimum=0),     # train and validate on the first n training batches
    "detect_anomaly": False,                  # torch.autograd anomaly mode: the op that made a NaN
    "profile": Key(None, types=(int, NoneType), minimum=1),   # torch.profiler over that many steps
}


def optimizer_tag(prefix: str, optimizers: dict, name: str) -> str:
    """`prefix` with one optimizer, `prefix_<name>` with several."""
    return prefix if len(optimizers) == 1 else f"{prefix}_{name}"


def per_optimizer(prefix: str, optimizers: dict, value) -> dict:
    """{optimizer_tag: value(optimizer)} of every optimizer."""
    return {optimizer_tag(prefix, optimizers, name): value(optimizer) for name, optimizer in optimizers.items()}


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float, scaler=None) -> torch.Tensor:
    """The optimizer's gradients scaled to a total norm of at most max_norm (unscaled first under
    fp16); returns the norm they had."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


class EMA:
    """An exponential moving average of a model's weights (torch's AveragedModel, buffers
    averaged too, as its use_buffers=True does), updated every `every` optimizer steps."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int = 1):
        self.model = model
        self.every = every
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @classmethod
    def of(cls, models: dict, name: str | None, options: dict | None):
        """The config's "ema" ({"decay", "every"}, or None: no average) of models[name] (the first
        model when name is None)."""
        if options is None:
            return None
        return cls(models[name or next(iter(models))], options.get("decay", 0.999), options.get("every", 1))

    @staticmethod
    def averaged_weights(state: dict) -> dict:
        """The model's weights inside a saved EMA state (AveragedModel keeps them under "module.")."""
        return {key[len("module."):]: value for key, value in state.items() if key.startswith("module.")}

    def update(self, iteration: int):
        if iteration % self.every == 0:
            self.averaged.update_parameters(self.model)

    @contextmanager
    def weights_in_model(self):
        """The model holds the averaged weights inside the block (validation, test), its own after."""
        own = {name: value.clone() for name, value in self.model.state_dict().items()}
        self.model.load_state_dict(self.averaged.module.state_dict())
        try:
            yield
        finally:
            self.model.load_state_dict(own)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict):
        self.averaged.load_state_dict(state)


class Warmup:
    """The learning rate rises linearly from lr/steps to lr over the first `steps` optimizer steps.
    It scales each group's lr around optimizer.step() only, so the agent's own schedule, which
    reads and writes group["lr"], runs exactly as without warmup."""

    def __init__(self, steps: int):
        self.steps = steps

    def factor(self, iteration: int) -> float:
        return min(1.0, (iteration + 1) / self.steps)

    def logged_rates(self, optimizers: dict, iterations_done: int) -> dict:
        """The warmed-up learning rates the last step used ({} once warmup is over)."""
        if iterations_done > self.steps:
            return {}
        factor = self.factor(iterations_done - 1)
        return per_optimizer("train/warmup_lr", optimizers, lambda opt: opt.param_groups[0]["lr"] * factor)

    @contextmanager
    def scaled(self, optimizer: torch.optim.Optimizer, iteration: int):
        if iteration >= self.steps:
            yield
            return
        factor = self.factor(iteration)
        saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        try:
            yield
        finally:
            for group, lr in zip(optimizer.param_groups, saved):
                group["lr"] = lr


class StepProfiler:
    """torch.profiler over `steps` optimizer steps after a one-step warm-up; then a Chrome trace
    in `out_dir` and the top operators by self time in the log."""

    WAIT, WARMUP = 1, 1

    def __init__(self, steps: int, out_dir: Path):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out_dir = Path(out_dir)
        self.remaining = self.WAIT + self.WARMUP + steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities, record_shapes=False,
                                schedule=schedule(wait=self.WAIT, warmup=self.WARMUP, active=steps, repeat=1))
        self.profiler.__enter__()
        self.steps = steps

    def step(self):
        if self.profiler is None:
            return
        self.profiler.step()
        self.remaining -= 1
        if self.remaining == 0:
            self.finish()

    def finish(self):
        """Stop (also when training ended before all steps were profiled) and write the trace."""
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / "profile_trace.json"
        try:
            profiler.export_chrome_trace(str(trace))
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        except (RuntimeError, AssertionError):    # no step reached the active phase
            logger.warning("profile: training ended before any step was profiled; raise max_epoch or "
                           "lower profile")
            return
        logger.info(f"profile of {self.steps} training steps: Chrome trace {trace} (open it in "
                    f"chrome://tracing or https://ui.perfetto.dev); top operators by self time:\n{table}")


class BatchLimits:
    """How many batches an epoch trains and validates on: all of them, or as fast_dev_run (n
    batches each, one epoch), limit_train_batches / limit_val_batches (a count or a fraction) or
    overfit_batches (the first n training batches, cached, for both) say."""

    def __init__(self, fast_dev_run, limit_train, limit_val, overfit_batches: int):
        self.debug_batches = int(fast_dev_run) if fast_dev_run else None
        self.train_limit = self.debug_batches or limit_train
        self.val_limit = self.debug_batches or limit_val
        self.overfit_batches = overfit_batches
        self._overfit = None         # the cached first batches

    def epochs(self, max_epoch: int) -> int:
        return 1 if self.debug_batches else max_epoch

    def train(self, loader) -> tuple:
        """(source, count) of an epoch's training batches."""
        if self.overfit_batches:
            if self._overfit is None:
                self._overfit = unshuffled_first_batches(loader, self.overfit_batches)
            return self._overfit, len(self._overfit)
        return loader, batch_count(self.train_limit, len(loader))

    def val(self, loader) -> tuple:
        """(source, count) of the validation batches: with overfit_batches, the training ones."""
        if self.overfit_batches and self._overfit is not None:
            return self._overfit, len(self._overfit)
        return loader, batch_count(self.val_limit, len(loader))

    def train_count(self, loader) -> int:
        return self.overfit_batches or batch_count(self.train_limit, len(loader))

    def debug_run_report(self) -> str:
        return (f"fast_dev_run: {self.train_limit} training and {self.val_limit} validation batch(es) ran "
                "without error; no checkpoint, results or summaries were kept")


def batch_count(limit, available: int) -> int:
    """How many of `available` batches a limit allows: null all, an int that many, a float that
    fraction (at least one)."""
    if limit is None:
        return available
    if isinstance(limit, float):
        return max(1, math.floor(available * limit)) if available else 0
    return min(limit, available)


def unshuffled_first_batches(loader, count: int) -> list:
    """The first `count` batches in the data set's own order (overfit_batches): a shuffled torch
    DataLoader is iterated through a sequential twin, a TensorBatchLoader with shuffling off."""
    from utils.data import TensorBatchLoader

    if isinstance(loader, TensorBatchLoader):
        shuffle, loader.shuffle = loader.shuffle, False
        try:
            return _take(loader, count)
        finally:
            loader.shuffle = shuffle
    if isinstance(loader, torch.utils.data.DataLoader):
        from utils.batches import EpochSampler

        if isinstance(loader.sampler, EpochSampler):      # its data set takes (epoch, index) keys
            sampler = EpochSampler(len(loader.dataset), shuffle=False, seed=loader.sampler.seed)
            return _take(torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                                                     num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                                     drop_last=loader.drop_last), count)
        loader = torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False,
                                             num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                             drop_last=loader.drop_last)
    return _take(loader, count)


def _take(loader, count: int) -> list:
    batches = []
    for batch in loader:
        if len(batches) == count:
            break
        batches.append(batch)
    return batches


def check_trainer_keys(config, agent: str, unsupported: dict, defaults: dict):
    """The trainer keys' checks across values, before anything runs: one line each."""
    from utils.errors import ConfigError

    for key, reason in unsupported.items():
        if config[key] != defaults[key]:
            raise ConfigError(f"{agent} cannot use '{key}': {reason}; leave it at its default "
                              f"({json.dumps(defaults[key])})")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = config[key]
        if isinstance(value, float) and not 0 < value <= 1 or isinstance(value, int) and value < 1:
            raise ConfigError(f"config key '{key}' is {value}: give a number of batches (an integer >= 1) "
                              "or a fraction of them (a number in (0, 1], e.g. 0.25), or null for all")
    ema = config.ema
    if ema is not None:
        unknown = set(ema) - {"decay", "every"}
        if unknown:
            raise ConfigError(f"config key 'ema' has unknown entries {sorted(unknown)}; it takes "
                              "{\"decay\": 0.999, \"every\": 1}")
        decay, every = ema.get("decay", 0.999), ema.get("every", 1)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ConfigError(f"config key 'ema.decay' must be a number in (0, 1), e.g. 0.999; got {decay}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"config key 'ema.every' must be an integer >= 1 (optimizer steps); got {every}")
    if config.stop_at is not None and config.monitor is None:
        raise ConfigError("\"stop_at\" stops at a value of the monitored metric, but \"monitor\" is null; "
                          "set monitor (e.g. \"val/accuracy\") or stop_at to null")
    if config.fast_dev_run and config.overfit_batches:
        raise ConfigError("give fast_dev_run or overfit_batches, not both")
