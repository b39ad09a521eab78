"""The lifecycle every agent shares, written once.

BaseAgent: config -> seed -> device -> trackers -> build() -> resume; run() dispatches on the
mode; the epoch loop validates, tracks the best value, stops early, checkpoints and records
results.json; optimizer_step() is the one place a gradient step happens, log_scalars() /
log_images() the one way numbers and pictures leave an agent. What it uses lives in parts of its
own: utils.checkpoint (CheckpointSaver, TrainingParts), utils.trackers, utils.distributed.
SupervisedAgent: the batch loop, so a task only writes train_step(batch) and validate_step(batch).
"""
import abc
import contextlib
import logging
import math
import sys
import time
from types import NoneType

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from utils import checkpoint as ckpt
from utils import distributed, interrupts
from utils.batches import Accumulation, EpochBatches, EpochProgress, can_resume_inside_epoch, resumable_loader
from utils.checkpoint import BEST, LATEST, CheckpointClock, CheckpointSaver, TrainingParts
from utils.config import Key, create_experiment_dirs, experiment_paths, inherit
from utils.data import move_to, needs_moving
from utils.errors import CheckpointError, ConfigError, UserError
from utils.files import remove_unfinished
from utils.metrics import BestValue, MeterGroup
from utils.runtime import seed_everything, select_device, set_determinism
from utils.trackers import Trackers, check_loggers, hparams_of, make_trackers, write_results
from utils.training import EMA, StepProfiler, Warmup, batch_count, check_trainer_keys, unshuffled_first_batches

__all__ = ["BEST", "LATEST", "BaseAgent", "SupervisedAgent"]
_NO_AUTOCAST = contextlib.nullcontext()  # reusable: entering it does nothing
# Modes that use a trained model: they build its networks alone (no data set, no optimizer) and
# write only their own output (out/, export/) and their entry in results.json.
USING_MODES = ("predict", "export")


class BaseAgent(abc.ABC):
    # Every key an agent reads is declared here or in a subclass's DEFAULTS; a config key that is
    # declared nowhere is an error. Subclasses add to and override these.
    DEFAULTS = {
        "exp_name": Key(None, types=(str,)),
        "agent": Key(None, types=(str,)),
        "description": "",
        "mode": "train",
        "seed": Key(1, minimum=0, maximum=2**32 - 1),   # np.random.seed's range; gymnasium refuses negatives
        "device": Key("auto", pattern=r"auto|cpu|mps|cuda(:\d+)?",
                      pattern_hint='use "auto", "cpu", "cuda", "cuda:N" or "mps"'),
        "cuda": True,
        "gpu_device": Key(0, minimum=0),
        "max_epoch": Key(10, minimum=1),
        "log_interval": Key(10, minimum=1),
        "validate_every": Key(1, minimum=1),
        "monitor": Key("val/loss", types=(str, NoneType)),   # null: no best model, no early stopping
        "monitor_mode": Key("min", choices=("min", "max")),
        "early_stopping_patience": Key(None, types=(int, NoneType), minimum=1),
        "checkpoint_file": Key(None, types=(str, NoneType)),
        "keep_last_checkpoints": Key(0, minimum=0),
        "amp": Key("off", choices=("off", "bf16", "fp16")),
        "compile": False,             # torch.compile the declared models
        "channels_last": False,       # NHWC memory format for models and 4-D input batches
        "deterministic": False,       # deterministic algorithms; otherwise cudnn.benchmark on GPU
        "distributed_timeout_s": Key(600, minimum=1),  # under torchrun: a collective waiting longer fails
        # Where the numbers go (utils/trackers.py, docs/trackers.md): "tensorboard", "csv" (metrics.csv), "mlflow".
        "loggers": Key(["tensorboard", "csv"], types=(list,)),
        "mlflow_experiment": Key(None, types=(str, NoneType)),    # null: the agent's class name
        "mlflow_tracking_uri": Key(None, types=(str, NoneType)),  # null: $MLFLOW_TRACKING_URI, else experiments/mlflow.db
        # tqdm bars: "auto" shows them on a terminal and leaves them out of redirected output.
        "progress_bar": Key("auto", types=(bool, str), choices=("auto", True, False)),
        # What every trainer has; all off by default.
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
        # The latest checkpoint also inside epochs, every N optimizer steps and/or M minutes (null:
        # at epoch ends only); --resume continues with the next batch.
        "checkpoint_every": Key(None, types=(int, NoneType), minimum=1),
        "checkpoint_every_minutes": Key(None, types=(float, NoneType), minimum=0.01),
        "predict_input": Key(None, types=(str, NoneType)),   # mode=predict: a file, a folder or a glob
    }
    # Values `mode` may take: each names a method of the agent.
    modes = ("train", "test")
    # Keys that --set may change when a run is resumed: how long it trains and how it logs, its
    # data loader workers, the machine it runs on. Any other change would make the resumed run
    # another run than the one that was started, and is refused.
    resumable_keys = ("max_epoch", "early_stopping_patience", "log_interval", "progress_bar",
                      "data_loader_workers", "checkpoint_file", "device", "cuda", "gpu_device",
                      "distributed_timeout_s", "checkpoint_every", "checkpoint_every_minutes",
                      "loggers", "mlflow_tracking_uri")
    # Names of the metrics validate() reports without the "val/" prefix; when declared, a
    # `monitor` that is not one of them is rejected before anything runs.
    metrics = ()
    # Trainer keys an agent cannot honour, with the reason: set to anything but their default they
    # are refused before the run starts, instead of being silently ignored.
    unsupported_keys: dict = {}
    # The model whose weights "ema" averages (the first declared one when None).
    ema_model = None
    # What an epoch is made of, as the log names a position inside one.
    epoch_unit = "batches"

    # ------------------------------------------------------------------ config declaration

    @classmethod
    def config_spec(cls) -> dict:
        spec = {}
        for klass in reversed(cls.__mro__):
            for key, declared in vars(klass).get("DEFAULTS", {}).items():
                spec[key] = inherit(spec.get(key), declared)   # a plain value keeps the parent's range
        mode_default = spec["mode"].default if isinstance(spec["mode"], Key) else spec["mode"]
        spec["mode"] = Key(mode_default, choices=tuple(cls.modes))
        return spec

    @classmethod
    def checkpoint_for_mode(cls, config) -> str:
        """The file in checkpoints/ that a mode other than train evaluates."""
        return BEST

    @classmethod
    def check_config(cls, config):
        """Checks across keys, run before the experiment folder is touched (each key's own type
        and range are declared in DEFAULTS)."""
        if cls.metrics and config.monitor is not None:
            known = [f"val/{name}" for name in cls.metrics]
            if config.monitor not in known:
                raise ConfigError(f"monitor \"{config.monitor}\" is not a metric of {cls.__name__}; "
                                  f"use one of: {', '.join(known)}")
        defaults = {key: (spec.default if isinstance(spec, Key) else spec) for key, spec in BaseAgent.DEFAULTS.items()}
        check_trainer_keys(config, cls.__name__, cls.unsupported_keys, defaults)
        check_loggers(config)
        if config.mode == "predict" and not config.predict_input:
            raise ConfigError("mode \"predict\" needs the inputs: --set predict_input=PATH (a file, a folder, "
                              "or a quoted glob like 'images/*.png')")

    # ------------------------------------------------------------------ construction

    def __init__(self, config, checkpoint: dict | None = None):
        """Builds the agent and restores `checkpoint` into it; writes no file (run() does)."""
        self.config = config
        self.logger = logging.getLogger(type(self).__name__)
        self.paths = experiment_paths(config.exp_name)
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = distributed.is_main()

        # Seed before anything random is built, then the device, then the trackers. Every process
        # of a distributed run gets the same seed: same initial weights, same data permutation.
        seed_everything(config.seed)
        gpu = distributed.local_rank() if self.world_size > 1 else config.gpu_device
        self.device = select_device(config.device, config.cuda, gpu)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        distributed.init(self.device, config.distributed_timeout_s)
        set_determinism(config.deterministic, self.device)
        # Only rank 0 writes (the other processes have no tracker); a fast_dev_run keeps nothing.
        self.keeps_files = self.is_main and not config.fast_dev_run
        logs = self.keeps_files and config.mode not in USING_MODES
        self.trackers = make_trackers(config, self.paths, type(self).__name__) if logs else Trackers([])
        self.checkpoints = CheckpointSaver(self.paths.checkpoints, config.keep_last_checkpoints)

        self.parts = TrainingParts()  # models, optimizers, schedulers, scaler: what checkpoints hold
        self.scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None
        self.parts.scaler = self.scaler
        self._iteration_schedulers = []
        self._ddp_models = []         # DistributedDataParallel wrappers, for no_sync while accumulating
        self._setup_trainer_options(config)
        self.current_epoch = 0        # epochs completed
        self.current_iteration = 0    # optimizer steps taken
        self.best = BestValue(config.monitor_mode, config.early_stopping_patience)
        self.last_metrics = {}
        self.learning_rates = {}      # as the epoch began, for its row in metrics.csv
        self.mode_results = None      # what a mode other than train reports, for results.json
        self.status = "built"
        self._wall_time_before = 0.0  # seconds spent in earlier sessions of this run
        self._started = time.perf_counter()
        self._finalized = False
        # Called after every validation as callback(agent, metrics); one that returns a status
        # (a sweep's pruner: "pruned") ends training cleanly after the epoch with that status.
        self.validation_callbacks = []

        if config.mode in USING_MODES:
            self.build_networks(checkpoint)
        else:
            self.build()
        self._check_built()
        if checkpoint is not None:
            self.load_checkpoint(checkpoint, training=config.mode == "train")

    def _setup_trainer_options(self, config):
        debug_batches = int(config.fast_dev_run) if config.fast_dev_run else None
        self.max_epoch = 1 if debug_batches else config.max_epoch
        self._train_limit = debug_batches or config.limit_train_batches
        self._val_limit = debug_batches or config.limit_val_batches
        self._overfit = None               # the cached first batches, with overfit_batches
        self.accumulation = Accumulation(config.grad_accumulation)
        self.in_epoch = EpochProgress()    # where the run is inside the current epoch
        self.checkpoint_clock = CheckpointClock(config.checkpoint_every, config.checkpoint_every_minutes)
        self.stop = None                   # utils.interrupts.GracefulStop while run() runs
        self._warmup = Warmup(config.warmup_iterations) if config.warmup_iterations else None
        self._profiler = None
        self.ema = None                    # set once the models are built

    def _check_built(self):
        if not self.parts.models:
            raise TypeError(f"{type(self).__name__}.build() declared no model: "
                            "use self.add_model(name, module)")
        if self.config.ema is not None:
            name = self.ema_model or next(iter(self.parts.models))
            self.ema = EMA(self.parts.models[name], self.config.ema.get("decay", 0.999),
                           self.config.ema.get("every", 1))
        data = getattr(self, "data_loader", None)
        if getattr(data, "train_loader", None) is not None:   # an order a checkpoint can hold
            data.train_loader = resumable_loader(data.train_loader, self.config.seed)
            if not can_resume_inside_epoch(data.train_loader) and self.checkpoint_clock.inside_epochs:
                raise ConfigError(f"{type(self).__name__}'s train_loader ({type(data.train_loader).__name__} "
                                  "with its own sampler) cannot restart inside an epoch: set checkpoint_every "
                                  "and checkpoint_every_minutes to null, or build it with shuffle=True/False")
        if self.world_size > 1 and data is not None:
            distributed.shard_loaders(data, self.config.seed, self.rank, self.world_size)
            if self.config.get("batch_size"):
                k = self.accumulation.k
                self.logger.info(f"batch_size {self.config.batch_size} per process x {self.world_size} processes"
                                 + (f" x {k} accumulated batches" if k > 1 else "")
                                 + f": global batch {self.config.batch_size * self.world_size * k}")
        for name, count in self.parameter_counts().items():
            self.logger.info(f"{name}: {count:,} parameters")
        self.logger.info(f"device: {self.device}" + (f" (x {self.world_size} processes)" if self.world_size > 1 else ""))

    @abc.abstractmethod
    def build(self):
        """Create models, losses, optimizers, schedulers and the data loader (self.data_loader),
        declaring the stateful ones with add_model / add_optimizer / add_scheduler."""

    def add_model(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """Declare a model: moved to the device (channels_last if asked), checkpointed by name.
        Returns the module to call: wrapped in DistributedDataParallel under torchrun and compiled
        with "compile": true. Keep the argument (the raw model) for its own methods and weights;
        checkpoints always hold the raw model's weights."""
        raw_model = module.to(self.device)
        if self.config.channels_last:
            raw_model = raw_model.to(memory_format=torch.channels_last)
        self.parts.models[name] = raw_model
        model = raw_model
        if self.world_size > 1 and any(p.requires_grad for p in raw_model.parameters()):
            model = DistributedDataParallel(raw_model, device_ids=[self.device] if self.device.type == "cuda" else None)
            self._ddp_models.append(model)
        if self.config.compile:
            model = torch.compile(model)
        return model

    def add_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.parts.optimizers[name] = optimizer
        return optimizer

    def add_scheduler(self, name: str, scheduler, interval: str = "epoch"):
        """interval "epoch": stepped once after each epoch; "iteration": after each optimizer step."""
        if interval not in ("epoch", "iteration"):
            raise ValueError(f"scheduler interval must be 'epoch' or 'iteration', not {interval!r}")
        self.parts.schedulers[name] = (scheduler, interval)
        if interval == "iteration":
            self._iteration_schedulers.append(scheduler)
        return scheduler

    def parameter_counts(self) -> dict:
        return {name: sum(p.numel() for p in model.parameters()) for name, model in self.parts.models.items()}

    # ------------------------------------------------------------------ helpers for agents

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, last: bool = True) -> bool:
        """The one gradient step of every agent: zero_grad, backward (scaled under fp16), with
        grad_accumulation k the loss / k and a step every k batches (and at the epoch's last batch),
        the gradient norm clipped to grad_clip (unscaled first), the warmup factor, step. `last`
        ends the iteration: scaler update, iteration count, per-iteration schedulers, EMA, profiler.
        An iteration with several optimizers (a GAN's two) passes last=False to all but its final
        step. Returns whether the optimizer stepped (False on a batch that only accumulates)."""
        scaler, group = self.scaler, self.accumulation
        accumulating = group.k > 1
        if not accumulating or group.between_groups:
            optimizer.zero_grad(set_to_none=True)
            if accumulating:
                group.start_group()
        if accumulating and group.group_size > 1:   # the mean over the group's batches, as one batch of them
            loss = loss / group.group_size
        (loss if scaler is None else scaler.scale(loss)).backward()
        if accumulating and not group.passed():
            return False
        if self.config.grad_clip is not None:
            self._clip_gradients(optimizer)
        with self._warmup.scaled(optimizer, self.current_iteration) if self._warmup else _NO_AUTOCAST:
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
        if last:
            self._end_iteration()
        return True

    def _clip_gradients(self, optimizer):
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        if (self.current_iteration + 1) % self.config.log_interval == 0:   # the step this one ends
            names = [name for name, opt in self.parts.optimizers.items() if opt is optimizer]
            tag = "train/grad_norm" if len(self.parts.optimizers) == 1 else f"train/grad_norm_{names[0]}"
            self.log_scalars({tag: norm}, self.current_iteration + 1)

    def _end_iteration(self):
        if self.scaler is not None:
            self.scaler.update()
        self.current_iteration += 1
        for scheduler in self._iteration_schedulers:
            scheduler.step()
        if self.ema is not None:
            self.ema.update(self.current_iteration)
        if self._warmup is not None and self.current_iteration <= self._warmup.steps \
                and self.current_iteration % self.config.log_interval == 0:
            self._log_warmup_rates()
        if self._profiler is not None:
            self._profiler.step()

    def _log_warmup_rates(self):
        factor = self._warmup.factor(self.current_iteration - 1)
        optimizers = self.parts.optimizers
        self.log_scalars({("train/warmup_lr" if len(optimizers) == 1 else f"train/warmup_lr_{name}"):
                          opt.param_groups[0]["lr"] * factor for name, opt in optimizers.items()},
                         self.current_iteration)

    def no_sync_while_accumulating(self):
        """Around forward and backward of a batch: under torchrun, a batch that will not step
        skips DDP's gradient all-reduce (no_sync); the batch that steps all-reduces the sum."""
        group = self.accumulation
        if not self._ddp_models or group.micro_batch + 1 >= group.next_group_size():
            return _NO_AUTOCAST
        stack = contextlib.ExitStack()
        for model in self._ddp_models:
            stack.enter_context(model.no_sync())
        return stack

    def evaluation_weights(self):
        """Inside the block the model holds the weights to evaluate: the EMA's with "ema"."""
        return self.ema.weights_in_model() if self.ema is not None else _NO_AUTOCAST

    def train_batches(self, loader):
        """The training batches of one epoch, as limit_train_batches / overfit_batches /
        fast_dev_run allow, from where a resumed checkpoint stopped; len() is the epoch's count.
        Before each batch is fetched the run may stop or checkpoint (safe_point)."""
        if self.config.overfit_batches:
            if self._overfit is None:
                self._overfit = unshuffled_first_batches(loader, self.config.overfit_batches)
            loader = self._overfit
        count = len(loader) if isinstance(loader, list) else batch_count(self._train_limit, len(loader))
        start, order = self.in_epoch.take_start()

        group = self.accumulation

        def before_batch(index):
            group.batches_left = count - index
            if group.micro_batch == 0:
                self.safe_point(index)

        self.in_epoch.batches = EpochBatches(loader, count, start, before_batch, order)
        return self.in_epoch.batches

    def val_batches(self, loader):
        """The validation batches, as limit_val_batches / fast_dev_run allow; with
        overfit_batches the training batches the run overfits. A stop request is honoured
        between them (the epoch's training is kept: the resumed run validates again)."""
        if self.config.overfit_batches and self._overfit is not None:
            loader = self._overfit
        count = len(loader) if isinstance(loader, list) else batch_count(self._val_limit, len(loader))
        return EpochBatches(loader, count, before_batch=self._stop_between_val_batches)

    def _stop_between_val_batches(self, index: int):
        # Under torchrun the processes' shares of a validation set may differ in length, so they
        # cannot agree batch by batch: they stop at the next training step instead.
        if self.stop is not None and self.world_size == 1:
            self.stop.check()

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch: what per-iteration schedules are as long as."""
        loader = self.data_loader.train_loader
        batches = self.config.overfit_batches or batch_count(self._train_limit, len(loader))
        return math.ceil(batches / self.accumulation.k)

    def steps_left(self) -> int:
        """Optimizer steps until max_epoch, from where the run is (inside an epoch too)."""
        done_in_epoch = math.ceil(((self.in_epoch.resumed or {}).get("epoch_position") or 0) / self.accumulation.k)
        return max(0, (self.max_epoch - self.current_epoch) * self.steps_per_epoch() - done_in_epoch)

    # ------------------------------------------------------------------ safe points

    def safe_point(self, epoch_position: int):
        """Between two optimizer steps (agents with their own loop call it, e.g. between episodes),
        `epoch_position` batches (episodes) of the epoch done: a stop request stops the run here,
        and a checkpoint due by checkpoint_every(_minutes) is written here."""
        self.in_epoch.position = epoch_position
        stop = self.stop
        if stop is not None and (stop.count or self.world_size > 1):
            # every process stops after the same step, or the others would wait for it forever
            if distributed.any_process(stop.requested) if self.world_size > 1 else stop.requested:
                raise interrupts.StopRequested
        clock = self.checkpoint_clock
        if clock.inside_epochs and clock.due(self.current_iteration):
            self.save_checkpoint(is_best=False)

    def log_scalars(self, values: dict, step: int):
        """{tag: number} to every tracker of the run, at `step` (an iteration, epoch, env step)."""
        self.trackers.log_scalars(values, step)

    def log_images(self, tag: str, images: torch.Tensor, step: int):
        """(C, H, W) one image or (N, C, H, W) a batch, values in [0, 1], to every tracker."""
        self.trackers.log_images(tag, images, step)

    def autocast(self):
        if self.config.amp == "off":
            return _NO_AUTOCAST
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def to_device(self, batch):
        """Tensors (in lists, tuples, dicts) to the device; channels_last if the config asks."""
        return move_to(batch, self.device, self.config.channels_last)

    def _needs_moving(self, loader) -> bool:
        return needs_moving(loader, self.device, self.config.channels_last)

    def progress(self, iterable, **kwargs):
        """A tqdm bar on stderr (log lines print above it, see utils.config.TqdmHandler)."""
        setting = self.config.progress_bar
        show = self.is_main and (sys.stderr.isatty() if setting == "auto" else setting)
        return tqdm(iterable, disable=not show, dynamic_ncols=True, file=sys.stderr, **kwargs)

    def train_mode(self, training: bool = True):
        for model in self.parts.models.values():
            model.train(training)

    def extra_state(self) -> dict:
        """Agent-specific state for the checkpoint (plain types and tensors only)."""
        return {}

    def load_extra_state(self, state: dict):
        pass

    @property
    def best_value(self):
        return self.best.value

    @property
    def best_epoch(self):
        return self.best.epoch

    # ------------------------------------------------------------------ running

    def run(self):
        """Dispatch on config.mode; Ctrl+C saves a checkpoint that --resume continues from."""
        if self.keeps_files and self.config.mode not in USING_MODES:   # those make only the folder they write
            create_experiment_dirs(self.paths)
            unfinished = remove_unfinished(self.paths.root) + remove_unfinished(self.paths.checkpoints)
            if unfinished:
                self.logger.info(f"removed {len(unfinished)} unfinished file(s) of a run killed while "
                                 f"writing: {', '.join(unfinished)}")
        self.status = "running"
        self._started = time.perf_counter()
        self.checkpoint_clock.saved(self.current_iteration)
        anomaly = torch.autograd.detect_anomaly() if self.config.detect_anomaly else _NO_AUTOCAST
        # Training: the first signal stops the run at its next safe point, the third aborts
        # (utils.interrupts). The other modes have no state to keep: Ctrl+C stops them at once.
        with interrupts.GracefulStop() if self.config.mode == "train" else contextlib.nullcontext() as self.stop:
            try:
                with anomaly:
                    getattr(self, self.config.mode)()
            except interrupts.Aborted:
                self.status = "interrupted"
                self.logger.warning("aborted: nothing more was saved; --resume continues from the last "
                                    "checkpoint written")
            except KeyboardInterrupt:
                self.status = "interrupted"
                if self.config.mode == "train":
                    self._save_interrupted()
                else:
                    self.logger.warning("interrupted")
            except BaseException:
                self.status = "failed"
                raise
            else:
                if self.status == "running":
                    self.status = "completed"

    def _save_interrupted(self):
        self.save_checkpoint(is_best=False)  # no collective here: other ranks may be gone
        done = self.current_epoch - (self.in_epoch.trained is not None)
        self.logger.warning(f"interrupted: checkpoint saved at epoch {done}, iteration {self.current_iteration}"
                            f"{self.in_epoch.describe(self.epoch_unit, done)}; continue with --resume")

    def train(self):
        if self._nothing_left_to_train():
            return
        if self.config.profile:
            self._profiler = StepProfiler(self.config.profile, self.paths.out)
        try:
            epochs = self.progress(range(self.current_epoch, self.max_epoch), desc="epochs",
                                   initial=self.current_epoch, total=self.max_epoch)
            for _ in epochs:
                if self._train_epoch():
                    break
        finally:
            if self._profiler is not None:
                self._profiler.finish()
        if self.config.fast_dev_run:
            self.logger.info(f"fast_dev_run: {self._train_limit} training and {self._val_limit} validation "
                             "batch(es) ran without error; no checkpoint, results or summaries were kept")

    def _nothing_left_to_train(self) -> bool:
        if self.current_epoch >= self.max_epoch:
            self.logger.info(f"already trained {self.current_epoch} epochs (max_epoch is "
                             f"{self.max_epoch}); raise max_epoch to train on")
        elif self.best.patience_spent:
            self.logger.info("this run already stopped early; raise early_stopping_patience to train on")
            self.status = "early_stopped"
        elif self._target_reached(self.best.value):
            self.logger.info(f"this run already reached stop_at ({self.config.stop_at}); raise it to train on")
            self.status = "reached_target"
        elif self.training_done():
            self.logger.info("this run already spent its training budget; raise it to train on")
        else:
            return False
        return True

    def _train_epoch(self) -> bool:
        """One epoch: train (or go on with a resumed one), validate when due, step the epoch
        schedulers, checkpoint, record. True when training should stop (early stopping, stop_at,
        the agent's budget spent)."""
        cfg, started = self.config, time.perf_counter()
        metrics = self._train_part()
        self.current_epoch += 1
        is_best = False
        if self.current_epoch % cfg.validate_every == 0 or self.current_epoch == self.max_epoch:
            with self.evaluation_weights():
                self.last_metrics = self.validate()
            self.log_scalars(self.last_metrics, self.current_epoch)
            metrics.update(self.last_metrics)
            if cfg.monitor is not None:
                is_best = self._update_best(self.last_metrics)
            for callback in self.validation_callbacks:
                self.status = callback(self, self.last_metrics) or self.status
        self._step_schedulers("epoch", metrics)
        self._log_epoch(metrics, is_best, time.perf_counter() - started)
        self.in_epoch.end_epoch()
        self.save_checkpoint(is_best)
        self.write_results()
        self.trackers.flush()
        return self._should_stop()

    def _train_part(self) -> dict:
        """The epoch's training, from its start or from a resumed checkpoint's position; returns
        train_one_epoch's metrics (kept until the epoch ends, for a checkpoint written during
        validation)."""
        if getattr(self, "data_loader", None) is not None:
            distributed.set_epoch(self.data_loader, self.current_epoch)
        position = self.in_epoch.start_epoch()
        if self.in_epoch.trained is not None:    # stopped while validating: the training was done
            return dict(self.in_epoch.trained)
        self.load_epoch_state(position["epoch_state"] if position else None)
        if position is None:
            self.log_learning_rates()          # a resumed epoch logged them when it started
        metrics = dict(self.train_one_epoch() or {})
        self.log_scalars(metrics, self.current_epoch + 1)
        self.in_epoch.training_done(ckpt.plain(metrics), ckpt.rng_states())
        return metrics

    def _should_stop(self) -> bool:
        cfg = self.config
        if self.status != "running":          # a validation callback stopped the run (e.g. pruned)
            self.logger.info(f"stopped after epoch {self.current_epoch}: {self.status}")
            return True
        if self.best.patience_spent:
            self.logger.info(f"early stopping: {cfg.monitor} has not improved for {self.best.bad_epochs} "
                             f"validations (best {self.best.value} at epoch {self.best.epoch})")
            self.status = "early_stopped"
            return True
        if self._target_reached(self.last_metrics.get(cfg.monitor)):
            self.logger.info(f"stop_at: {cfg.monitor} reached {self.last_metrics[cfg.monitor]:.4g} "
                             f"(target {cfg.stop_at}) at epoch {self.current_epoch}")
            self.status = "reached_target"
            return True
        return self.training_done()

    def _target_reached(self, value) -> bool:
        target = self.config.stop_at
        if target is None or value is None or not math.isfinite(value):
            return False
        return value >= target if self.config.monitor_mode == "max" else value <= target

    def training_done(self) -> bool:
        """True once the agent's own training budget is spent (an RL agent's environment steps):
        train() then stops after the epoch, as at max_epoch."""
        return False

    @abc.abstractmethod
    def train_one_epoch(self) -> dict | None:
        """One pass over the training data; returns epoch-level metrics, e.g. {"train/epoch_loss": x},
        printed in the epoch line and logged at the epoch."""

    @abc.abstractmethod
    def validate(self) -> dict:
        """Validation metrics keyed "val/<name>"."""

    def test(self):
        raise NotImplementedError(f"{type(self).__name__} has no test mode")

    def log_learning_rates(self):
        optimizers = self.parts.optimizers
        self.learning_rates = {("train/lr" if len(optimizers) == 1 else f"train/lr_{name}"): opt.param_groups[0]["lr"]
                               for name, opt in optimizers.items()}
        self.log_scalars(self.learning_rates, self.current_epoch)

    def _step_schedulers(self, interval: str, metrics: dict | None = None):
        for scheduler, when in self.parts.schedulers.values():
            if when != interval:
                continue
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if metrics and self.config.monitor in metrics:
                    scheduler.step(metrics[self.config.monitor])
            else:
                scheduler.step()

    def _update_best(self, metrics: dict) -> bool:
        monitor = self.config.monitor
        if monitor not in metrics:
            raise ConfigError(f"monitor \"{monitor}\" is not among the validation metrics "
                              f"({', '.join(metrics)}); set \"monitor\" to one of them")
        return self.best.update(metrics[monitor], self.current_epoch)

    def _log_epoch(self, metrics: dict, is_best: bool, seconds: float):
        shown = "  ".join(f"{name} {value}" if isinstance(value, int) else f"{name} {value:.4f}"
                          for name, value in metrics.items())
        self.logger.info(f"epoch {self.current_epoch}/{self.max_epoch}  {shown}"
                         f"{'  (best)' if is_best else ''}  [{seconds:.1f}s]")
        self.trackers.log_epoch(self.current_epoch, self.current_iteration, self.wall_time(),
                                {**metrics, **self.learning_rates})

    # ------------------------------------------------------------------ using a trained model
    # predict, export and agents.trained.load_trained rebuild an agent's networks from a checkpoint
    # alone: its config and the "inference" entry that inference_info() filled when it was saved.

    @classmethod
    def networks(cls, config, inference: dict) -> dict:
        """{checkpoint name: module} of the networks a trained model is used through (the first is
        "the model"), built from the training run's config and a checkpoint's inference entry."""
        raise NotImplementedError(f"{cls.__name__} does not say how to rebuild its networks (networks())")

    def inference_info(self) -> dict:
        """What using the trained model needs besides its weights (input size and channels,
        normalisation, class names), saved in every checkpoint; plain types only."""
        return {}

    @classmethod
    def input_transform(cls, inference: dict, device="cpu"):
        """The callable from the agent's raw inputs to the batch the model takes (load_trained's preprocess)."""
        raise NotImplementedError(f"{cls.__name__} defines no input transform (input_transform())")

    def build_networks(self, checkpoint: dict):
        """predict and export: the checkpoint's networks as agents.trained rebuilds them (from the
        config they were trained with), declared, and set as attributes of their names."""
        from agents.trained import inference_entry, rebuild_networks, trained_config

        _, trained = trained_config(checkpoint)
        self.inference = inference_entry(checkpoint)
        for name, module in rebuild_networks(type(self), trained, self.inference).items():
            self.add_model(name, module)
            setattr(self, name, self.parts.models[name])

    def record_predictions(self, names: list, probabilities: torch.Tensor, class_names: list, noun: str):
        """A classifier's predict: out/predictions.csv, results.json's entry, a short table in the log."""
        from utils.predict import prediction_table, write_predictions

        self.mode_results = {**write_predictions(self.paths.out / "predictions.csv", names, probabilities,
                                                 class_names), "epoch": self.current_epoch}
        self.logger.info(f"{len(names):,} {noun} classified by the model of epoch {self.current_epoch}; "
                         f"{self.mode_results['predictions']}:\n"
                         + prediction_table(names, probabilities, class_names))

    def export_target(self):
        """utils.export.ExportTarget: the module mode=export writes, and the inputs it is traced on."""
        raise NotImplementedError(f"{type(self).__name__} has no export_target()")

    def export(self):
        """export/model.onnx (torch.onnx, dynamo exporter) and export/model.pt2 (torch.export) of
        export_target(), each checked against eager PyTorch on a batch before it is kept."""
        from utils.export import export_verified

        target = self.export_target()
        results = export_verified(target.module, target.example, self.paths.export, target.dynamic_shapes,
                                  target.check, inference=self.inference)
        self.mode_results = {**results, "epoch": self.current_epoch}
        differences = ", ".join(f"{name} {value:.2g}" for name, value in results["max_abs_difference"].items())
        self.logger.info(f"exported the model of epoch {self.current_epoch} to {results['onnx']} and {results['pt2']}; "
                         f"on a batch of {results['check_shapes'][0][0]} against eager PyTorch, the largest absolute "
                         f"difference: {differences} (tolerance {results['tolerance']:.1g})")

    # ------------------------------------------------------------------ checkpoints and results

    def state_dict(self) -> dict:
        """The checkpoint: one dict of plain types and tensors (torch.load(weights_only=True))."""
        position = self.in_epoch.state(self.epoch_state)
        validating = self.in_epoch.trained is not None
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "agent": type(self).__name__,
            "config": ckpt.plain(self.config),
            "epoch": self.current_epoch - validating,     # epochs completed
            "iteration": self.current_iteration,
            "world_size": self.world_size,   # batch_size is per process: resuming checks the global batch
            **self.parts.state_dict(),
            **self.best.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "last_metrics": dict(self.last_metrics),
            "wall_time_s": self.wall_time(),
            # while validating: the state the epoch's training ended in, where the resumed run goes on
            "rng": self.in_epoch.rng_after_training if validating else ckpt.rng_states(),
            "position": position,
            "extra": self.extra_state(),
            "trackers": self.trackers.state_dict(),   # the MLflow run id, which --resume continues
            "learning_rates": dict(self.learning_rates),   # a resumed epoch's metrics.csv row has them
            "inference": ckpt.plain(self.inference_info()),   # what predict and export need: a copied folder is enough
        }

    def epoch_state(self) -> dict:
        """What train_one_epoch has summed so far in the epoch (plain types and tensors), for a
        checkpoint written inside it."""
        return {}

    def load_epoch_state(self, state: dict | None):
        """Before train_one_epoch: the sums of a resumed epoch, or None to start them afresh."""

    def save_checkpoint(self, is_best: bool):
        """The latest checkpoint (and model_best, epoch_NNNN copies at epoch ends)."""
        self.checkpoint_clock.saved(self.current_iteration)
        if self.keeps_files:
            self.checkpoints.save(self.state_dict(), self.current_epoch, is_best,
                                  keep_history=self.in_epoch.at_epoch_start and self.status != "interrupted")

    def load_checkpoint(self, state: dict, training: bool = True):
        """Restore models; when training also optimizers, schedulers, counters, the position
        inside the epoch and RNG states, so the resumed run continues exactly as the uninterrupted
        one would have."""
        self.parts.load_models(state)
        self.current_epoch = state["epoch"]
        self.trackers.load_state_dict(state.get("trackers", {}))   # a test logs into the training's MLflow run
        if not training:
            if state.get("ema") is not None:     # evaluation and prediction use the averaged weights
                self._load_ema_weights(state["ema"])
            return
        self.parts.load_training(state)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.current_iteration = state["iteration"]
        self.in_epoch.resumed = state.get("position")
        if self.in_epoch.resumed is not None and state.get("world_size", 1) != self.world_size:
            raise CheckpointError(f"the checkpoint was written inside epoch {self.current_epoch + 1} by "
                                  f"{state.get('world_size', 1)} process(es): resume it with as many "
                                  f"(this run has {self.world_size}); at an epoch's end the number may change")
        self.best.load_state_dict(state)
        self.last_metrics = dict(state.get("last_metrics", {}))
        self.learning_rates = dict(state.get("learning_rates", {}))
        self._wall_time_before = state.get("wall_time_s", 0.0)
        self.load_extra_state(state.get("extra", {}))
        ckpt.set_rng_states(state["rng"])  # last: nothing after this may draw random numbers
        self.logger.info(f"resumed from epoch {self.current_epoch}, iteration {self.current_iteration}"
                         + self._resume_description())

    def _resume_description(self) -> str:
        position = self.in_epoch.resumed
        if position is None:
            return ""
        if position["train_metrics"] is not None:
            return f" (epoch {self.current_epoch + 1} trained: its validation runs again)"
        return f", {position['epoch_position']} {self.epoch_unit} into epoch {self.current_epoch + 1}"

    def _load_ema_weights(self, ema_state: dict):
        name = self.ema_model or next(iter(self.parts.models))
        weights = {key[len("module."):]: value for key, value in ema_state.items() if key.startswith("module.")}
        self.parts.models[name].load_state_dict(weights)

    def wall_time(self) -> float:
        return self._wall_time_before + (time.perf_counter() - self._started)

    def results(self) -> dict:
        return {
            "agent": type(self).__name__,
            "exp_name": self.config.exp_name,
            "status": self.status,
            "epochs_done": self.current_epoch,
            "iterations": self.current_iteration,
            "wall_time_s": round(self.wall_time(), 3),
            "monitor": self.config.monitor,
            "monitor_mode": self.config.monitor_mode,
            "best": {"value": self.best.value, "epoch": self.best.epoch},
            "last": dict(self.last_metrics),
            "params": self.parameter_counts(),
        }

    def write_results(self):
        if self.keeps_files:
            write_results(self.paths.root / "results.json", self.results(), self.config.mode, self.mode_results)

    def finalize(self):
        """After run(): results.json and the HParams summary; closes the trackers. An agent that
        never ran writes nothing. Safe to call twice."""
        if self._finalized:
            return
        self._finalized = True
        try:
            # A mode that uses a trained model records only its finished result: a failed or
            # interrupted predict leaves results.json as it was.
            if self.status == "completed" or (self.status != "built" and self.config.mode not in USING_MODES):
                self.write_results()
                if self.config.mode == "train" and self.last_metrics:
                    self._log_hparams()
                records = ("config.json" if self.config.mode == "train" else f"config_{self.config.mode}.json",
                           "results.json")
                self.trackers.end_run(self.status, [self.paths.root / name for name in records])
        finally:
            self.trackers.close()

    def _log_hparams(self):
        metrics = dict(self.last_metrics)
        if self.best.value is not None:
            best_tag = f"best/{self.config.monitor}"
            metrics[best_tag] = self.best.value
            self.log_scalars({best_tag: self.best.value}, self.current_epoch)
        self.trackers.log_hparams(hparams_of(self.config), metrics)


class SupervisedAgent(BaseAgent):
    """One model, one optimizer, batches of (inputs, targets): write train_step and validate_step.

    build() must set self.data_loader with `train_loader` and `valid_loader` (and optionally
    `test_loader`, else mode=test evaluates valid_loader).
    """

    DEFAULTS = {
        "batch_size": Key(64, minimum=1),
        "test_batch_size": Key(1000, minimum=1),
    }

    @abc.abstractmethod
    def train_step(self, batch):
        """Forward pass on one batch (already on self.device, inside autocast); return the loss
        tensor, or a dict with "loss" and other scalars to log."""

    @abc.abstractmethod
    def validate_step(self, batch) -> dict:
        """Metrics of one batch as batch means, e.g. {"loss": ..., "accuracy": ...}; they are
        averaged over the data set weighted by batch size."""

    def __init__(self, config, checkpoint=None):
        super().__init__(config, checkpoint)
        if config.mode in USING_MODES:      # the trained network alone (build_networks)
            return
        if len(self.parts.optimizers) != 1:
            raise TypeError(f"{type(self).__name__}: a SupervisedAgent declares exactly one optimizer "
                            f"in build() (found {len(self.parts.optimizers)}); agents with several "
                            "override train_one_epoch")
        if not hasattr(self, "data_loader"):
            raise TypeError(f"{type(self).__name__}.build() must set self.data_loader")
        self.optimizer = next(iter(self.parts.optimizers.values()))
        self.load_epoch_state(None)

    def batch_size_of(self, batch) -> int:
        """Samples in a batch, for weighting the averages: the first tensor's leading dimension."""
        if isinstance(batch, dict):
            batch = next(iter(batch.values()))
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        return first.shape[0]

    def train_one_epoch(self):
        self.train_mode(True)
        log_interval = self.config.log_interval
        loader = self.data_loader.train_loader
        move = self._needs_moving(loader)
        batches = self.train_batches(loader)
        bar = self.progress(batches, desc=f"epoch {self.current_epoch + 1}", leave=False, total=len(batches),
                            initial=batches.start)
        for batch in bar:
            if move:
                batch = self.to_device(batch)
            if self.current_iteration == 0 and self.accumulation.between_groups:
                self.log_samples(batch)
            with self.no_sync_while_accumulating():
                with self.autocast():
                    out = self.train_step(batch)
                loss = out["loss"] if isinstance(out, dict) else out
                stepped = self.optimizer_step(loss, self.optimizer)
            # Losses wait as tensors and are summed at each log_interval: no device sync per step.
            self._pending_losses.append(loss.detach())
            self._pending_sizes.append(self.batch_size_of(batch))
            if stepped and self.current_iteration % log_interval == 0:
                self._sum_losses()
                self._log_train_values(out if isinstance(out, dict) else {"loss": loss}, bar)
        self._sum_losses()
        loss_sum, sample_count = distributed.all_reduce_sum(
            torch.tensor([self._loss_sum, self._sample_count], dtype=torch.float64)).tolist()
        self.load_epoch_state(None)      # the next epoch sums afresh
        return {"train/epoch_loss": loss_sum / sample_count if sample_count else math.nan}

    def epoch_state(self):
        self._sum_losses()
        return {"loss_sum": self._loss_sum, "sample_count": self._sample_count}

    def load_epoch_state(self, state):
        state = state or {"loss_sum": 0.0, "sample_count": 0}
        self._loss_sum, self._sample_count = state["loss_sum"], state["sample_count"]
        self._pending_losses, self._pending_sizes = [], []

    def _log_train_values(self, logged: dict, bar):
        values = {f"train/{name}": float(value.detach() if torch.is_tensor(value) else value)
                  for name, value in logged.items()}
        if not math.isfinite(values["train/loss"]):
            raise UserError(f"training diverged: the loss is {values['train/loss']} at epoch "
                            f"{self.current_epoch + 1}, iteration {self.current_iteration}; "
                            "lower learning_rate (the last checkpoint is kept)")
        self.log_scalars(values, self.current_iteration)
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", refresh=False)

    def _sum_losses(self):
        """Fold the pending per-batch mean losses into the epoch's sum, weighted by batch size."""
        if self._pending_losses:
            # One stack and one copy to the host (a single sync on GPU) for the whole interval.
            losses = torch.stack(self._pending_losses).tolist()
            self._loss_sum += sum(loss * size for loss, size in zip(losses, self._pending_sizes))
            self._sample_count += sum(self._pending_sizes)
            self._pending_losses.clear()
            self._pending_sizes.clear()

    def log_samples(self, batch):
        """A grid of the first training images, shown once per run in TensorBoard."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not (torch.is_tensor(images) and images.dim() == 4 and images.is_floating_point()):
            return
        images = images[:64].detach().float().cpu()
        low, high = images.min(), images.max()
        self.log_images("train/samples", (images - low) / (high - low + 1e-8), self.current_iteration)

    @torch.no_grad()
    def evaluate(self, loader, prefix: str) -> dict:
        self.train_mode(False)
        meters = MeterGroup()
        move = self._needs_moving(loader)
        batches = self.val_batches(loader)
        for batch in self.progress(batches, desc=prefix, leave=False, total=len(batches)):
            if move:
                batch = self.to_device(batch)
            with self.autocast():
                values = self.validate_step(batch)
            meters.update(values, self.batch_size_of(batch))
        return meters.averages(prefix + "/")

    def validate(self):
        return self.evaluate(self.data_loader.valid_loader, "val")

    def test(self):
        loader = getattr(self.data_loader, "test_loader", None) or self.data_loader.valid_loader
        self.mode_results = self.evaluate(loader, "test")
        self.log_scalars(self.mode_results, self.current_epoch)
        width = max(len(tag) for tag in self.mode_results)
        lines = [f"  {tag:<{width}}  {value:.4f}" for tag, value in self.mode_results.items()]
        self.logger.info(f"test of the model from epoch {self.current_epoch}:\n" + "\n".join(lines))
