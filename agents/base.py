"""The lifecycle every agent shares, written once.

BaseAgent: config -> seed -> device -> trackers -> build() -> resume; run() dispatches on the
mode; the epoch loop validates, keeps the best value, stops early, checkpoints and records
results.json; optimizer_step() is the one place a gradient step happens, log_scalars() /
log_images() the one way numbers and pictures leave an agent. The parts it uses live on their own:
utils.checkpoint (files, parts, clock), utils.trackers, utils.batches (the epoch's batches, its
position, accumulation), utils.training (EMA, warmup, clipping, batch limits, profiler),
utils.metrics.Monitor (best value, early stopping, stop_at), utils.distributed, utils.interrupts,
agents.run_state (what a checkpoint holds, and a run restored from one), agents.trained (predict
and export).
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

from agents import run_state
from agents.trained import USING_MODES, TrainedModelHooks
from utils import checkpoint as ckpt
from utils import distributed, interrupts
from utils.batches import Accumulation, EpochBatches, EpochProgress, make_train_loader_resumable
from utils.checkpoint import BEST, CHECKPOINT_KEYS, LATEST, CheckpointClock, CheckpointSaver, TrainingParts
from utils.config import Key, create_experiment_dirs, experiment_paths, inherit
from utils.data import move_to, needs_moving
from utils.errors import ConfigError, UserError
from utils.files import remove_unfinished
from utils.metrics import MONITOR_KEYS, MeterGroup, Monitor, RunningLoss, epoch_line, metrics_table
from utils.runtime import RUNTIME_KEYS, prepare_device, seed_everything
from utils.trackers import TRACKER_KEYS, Trackers, check_loggers, hparams_of, make_trackers, write_results
from utils.training import (EMA, TRAINER_KEYS, BatchLimits, StepProfiler, Warmup, check_trainer_keys, clip_gradients,
                            optimizer_tag, per_optimizer)

__all__ = ["BEST", "LATEST", "USING_MODES", "BaseAgent", "SupervisedAgent"]
_NOTHING = contextlib.nullcontext()  # reusable: entering it does nothing


class BaseAgent(TrainedModelHooks, abc.ABC):
    # Every key an agent reads is declared here or in a subclass's DEFAULTS; a config key that is
    # declared nowhere is an error. Subclasses add to and override these.
    DEFAULTS = {
        "exp_name": Key(None, types=(str,)),
        "agent": Key(None, types=(str,)),
        "description": "",
        "mode": "train",
        "max_epoch": Key(10, minimum=1),
        "log_interval": Key(10, minimum=1),
        "validate_every": Key(1, minimum=1),
        # tqdm bars: "auto" shows them on a terminal and leaves them out of redirected output.
        "progress_bar": Key("auto", types=(bool, str), choices=("auto", True, False)),
        "predict_input": Key(None, types=(str, NoneType)),   # mode=predict: a file, a folder or a glob
        # The keys of the parts, declared with them: seed, device, amp, compile, ...; monitor, its
        # mode, early_stopping_patience; checkpoint_file, keep_last_checkpoints, checkpoint_every;
        # loggers, mlflow_*; grad_accumulation, grad_clip, ema, warmup, stop_at, debug runs, profile.
        **RUNTIME_KEYS, **MONITOR_KEYS, **CHECKPOINT_KEYS, **TRACKER_KEYS, **TRAINER_KEYS,
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
    ema_model = None              # the model whose weights "ema" averages (None: the first declared)
    epoch_unit = "batches"        # what an epoch is made of, as the log names a position inside one

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
        known = [f"val/{name}" for name in cls.metrics]
        if known and config.monitor is not None and config.monitor not in known:
            raise ConfigError(f"monitor \"{config.monitor}\" is not a metric of {cls.__name__}; "
                              f"use one of: {', '.join(known)}")
        defaults = {key: (spec.default if isinstance(spec, Key) else spec) for key, spec in BaseAgent.DEFAULTS.items()}
        check_trainer_keys(config, cls.__name__, cls.unsupported_keys, defaults)
        check_loggers(config)
        if config.mode in USING_MODES and distributed.world_size() > 1:   # each process would write the same files
            raise ConfigError(f"mode \"{config.mode}\" runs in one process: start it without torchrun "
                              f"(./run.sh CONFIG --set mode={config.mode} ...)")
        if config.mode == "predict" and not config.predict_input:
            raise ConfigError("mode \"predict\" needs the inputs: --set predict_input=PATH (a file, a folder, "
                              "or a quoted glob like 'images/*.png')")

    # ------------------------------------------------------------------ construction

    def __init__(self, config, checkpoint: dict | None = None):
        """Builds the agent and restores `checkpoint` into it; writes no file (run() does)."""
        self.config = config
        self.logger = logging.getLogger(type(self).__name__)
        self.paths = experiment_paths(config.exp_name)
        self.world_size, self.rank, self.is_main = distributed.world_size(), distributed.rank(), distributed.is_main()

        # Seed before anything random is built, then the device, then the trackers. Every process
        # of a distributed run gets the same seed: same initial weights, same data permutation.
        seed_everything(config.seed)
        gpu = distributed.local_rank() if self.world_size > 1 else config.gpu_device
        self.device = prepare_device(config.device, config.cuda, gpu, config.deterministic)
        distributed.init(self.device, config.distributed_timeout_s)
        # Only rank 0 writes (the other processes have no tracker); a fast_dev_run keeps nothing.
        self.keeps_files = self.is_main and not config.fast_dev_run
        logs = self.keeps_files and config.mode not in USING_MODES
        self.trackers = make_trackers(config, self.paths, type(self).__name__) if logs else Trackers([])
        self._create_parts(config)
        if config.mode in USING_MODES:
            self.build_networks(checkpoint)
        else:
            self.build()
        self._check_built()
        if checkpoint is not None:
            self.load_checkpoint(checkpoint, training=config.mode == "train")

    def _create_parts(self, config):
        self.parts = TrainingParts()       # models, optimizers, schedulers, scaler: what checkpoints hold
        self.scaler = self.parts.scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None
        self.ddp_models = []               # the DistributedDataParallel wrappers, for no_sync while accumulating
        self.checkpoints = CheckpointSaver(self.paths.checkpoints, config.keep_last_checkpoints)
        self.checkpoint_clock = CheckpointClock(config.checkpoint_every, config.checkpoint_every_minutes)
        self.monitor = Monitor(config.monitor, config.monitor_mode, config.early_stopping_patience, config.stop_at)
        self.accumulation = Accumulation(config.grad_accumulation)
        self.limits = BatchLimits(config.fast_dev_run, config.limit_train_batches, config.limit_val_batches,
                                  config.overfit_batches)
        self.max_epoch = self.limits.epochs(config.max_epoch)
        self._warmup = Warmup(config.warmup_iterations) if config.warmup_iterations else None
        self._profiler = None              # a StepProfiler while training profiles
        self.ema = None                    # utils.training.EMA, once the models are built
        self.stop = None                   # utils.interrupts.GracefulStop while run() trains
        self.in_epoch = EpochProgress()    # where the run is inside the current epoch
        self.current_epoch = 0             # epochs completed
        self.current_iteration = 0         # optimizer steps taken
        self.last_metrics, self.learning_rates = {}, {}   # the last validation's; the epoch's, for metrics.csv
        self.mode_results = None           # what a mode other than train reports, for results.json
        self.status, self._finalized = "built", False
        self.wall_time_before, self._started = 0.0, time.perf_counter()   # earlier sessions' seconds; this one's start
        # Called after every validation as callback(agent, metrics); one that returns a status
        # (a sweep's pruner: "pruned") ends training cleanly after the epoch with that status.
        self.validation_callbacks = []

    def _check_built(self):
        if not self.parts.models:
            raise TypeError(f"{type(self).__name__}.build() declared no model: use self.add_model(name, module)")
        self.ema = EMA.of(self.parts.models, self.ema_model, self.config.ema)
        data = getattr(self, "data_loader", None)
        make_train_loader_resumable(data, self.config.seed, self.checkpoint_clock.inside_epochs, type(self).__name__)
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
        self.parts.models[name] = model = raw_model
        if self.world_size > 1 and any(p.requires_grad for p in raw_model.parameters()):
            model = DistributedDataParallel(raw_model, device_ids=[self.device] if self.device.type == "cuda" else None)
            self.ddp_models.append(model)
        return torch.compile(model) if self.config.compile else model

    def add_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.parts.optimizers[name] = optimizer
        return optimizer

    def add_scheduler(self, name: str, scheduler, interval: str = "epoch"):
        """interval "epoch": stepped once after each epoch; "iteration": after each optimizer step."""
        self.parts.add_scheduler(name, scheduler, interval)
        return scheduler

    def parameter_counts(self) -> dict:
        return {name: sum(p.numel() for p in model.parameters()) for name, model in self.parts.models.items()}

    # ------------------------------------------------------------------ the one optimizer step

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, last: bool = True) -> bool:
        """The one gradient step of every agent: zero_grad, backward (scaled under fp16), with
        grad_accumulation k the loss / k and a step every k batches (and at the epoch's last batch),
        the gradient norm clipped to grad_clip (unscaled first), the warmup factor, step. `last`
        ends the iteration: scaler update, iteration count, per-iteration schedulers, EMA, profiler.
        An iteration with several optimizers (a GAN's two) passes last=False to all but its final
        step. Returns whether the optimizer stepped (False on a batch that only accumulates)."""
        group = self.accumulation
        if group.between_groups:
            optimizer.zero_grad(set_to_none=True)
            group.start_group()
        if group.group_size > 1:   # the mean over the group's batches, as one batch of them
            loss = loss / group.group_size
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if not group.passed():
            return False
        if self.config.grad_clip is not None:
            norm = clip_gradients(optimizer, self.config.grad_clip, self.scaler)
            if (self.current_iteration + 1) % self.config.log_interval == 0:   # the step this one ends
                name = next(name for name, opt in self.parts.optimizers.items() if opt is optimizer)
                self.log_scalars({optimizer_tag("train/grad_norm", self.parts.optimizers, name): norm},
                                 self.current_iteration + 1)
        with self._warmup.scaled(optimizer, self.current_iteration) if self._warmup else _NOTHING:
            if self.scaler is None:
                optimizer.step()
            else:
                self.scaler.step(optimizer)
        if last:
            self._end_iteration()
        return True

    def _end_iteration(self):
        if self.scaler is not None:
            self.scaler.update()
        self.current_iteration += 1
        for scheduler in self.parts.iteration_schedulers:
            scheduler.step()
        if self.ema is not None:
            self.ema.update(self.current_iteration)
        if self._warmup is not None and self.current_iteration <= self._warmup.steps \
                and self.current_iteration % self.config.log_interval == 0:
            self.log_scalars(self._warmup.logged_rates(self.parts.optimizers, self.current_iteration),
                             self.current_iteration)
        if self._profiler is not None:
            self._profiler.step()

    def no_sync_while_accumulating(self):
        """Around forward and backward of a batch: under torchrun, a batch that will not step
        skips DDP's gradient all-reduce (no_sync); the batch that steps all-reduces the sum."""
        group = self.accumulation
        if not self.ddp_models or group.micro_batch + 1 >= group.next_group_size():
            return _NOTHING
        stack = contextlib.ExitStack()
        for model in self.ddp_models:
            stack.enter_context(model.no_sync())
        return stack

    # ------------------------------------------------------------------ helpers for agents

    def train_batches(self, loader):
        """The training batches of one epoch, as limit_train_batches / overfit_batches /
        fast_dev_run allow, from where a resumed checkpoint stopped; len() is the epoch's count.
        Before each batch is fetched the run may stop or checkpoint (safe_point)."""
        source, count = self.limits.train(loader)
        start, order = self.in_epoch.take_start()
        group = self.accumulation

        def before_batch(index):
            group.batches_left = count - index
            if group.micro_batch == 0:
                self.safe_point(index)

        self.in_epoch.batches = EpochBatches(source, count, start, before_batch, order)
        return self.in_epoch.batches

    def val_batches(self, loader):
        """The validation batches, as limit_val_batches / fast_dev_run allow (with overfit_batches
        the training batches). A stop request is honoured between them (the epoch's training is
        kept: the resumed run validates again); under torchrun the processes' shares may differ in
        length, so they stop at the next training step instead."""
        source, count = self.limits.val(loader)
        check = None if self.stop is None or self.world_size > 1 else (lambda index: self.stop.check())
        return EpochBatches(source, count, before_batch=check)

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
        if self.checkpoint_clock.inside_epochs and self.checkpoint_clock.due(self.current_iteration):
            self.save_checkpoint(is_best=False)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch: what per-iteration schedules are as long as."""
        return math.ceil(self.limits.train_count(self.data_loader.train_loader) / self.accumulation.k)

    def steps_left(self) -> int:
        """Optimizer steps until max_epoch, from where the run is (inside an epoch too)."""
        done_in_epoch = math.ceil(((self.in_epoch.resumed or {}).get("epoch_position") or 0) / self.accumulation.k)
        return max(0, (self.max_epoch - self.current_epoch) * self.steps_per_epoch() - done_in_epoch)

    def log_scalars(self, values: dict, step: int):
        """{tag: number} to every tracker of the run, at `step` (an iteration, epoch, env step)."""
        self.trackers.log_scalars(values, step)

    def log_images(self, tag: str, images: torch.Tensor, step: int):
        """(C, H, W) one image or (N, C, H, W) a batch, values in [0, 1], to every tracker."""
        self.trackers.log_images(tag, images, step)

    def autocast(self):
        if self.config.amp == "off":
            return _NOTHING
        return torch.autocast(device_type=self.device.type,
                              dtype=torch.bfloat16 if self.config.amp == "bf16" else torch.float16)

    def evaluation_weights(self):
        """Inside the block the model holds the weights to evaluate: the EMA's with "ema"."""
        return self.ema.weights_in_model() if self.ema is not None else _NOTHING

    def to_device(self, batch):
        """Tensors (in lists, tuples, dicts) to the device; channels_last if the config asks."""
        return move_to(batch, self.device, self.config.channels_last)

    def progress(self, iterable, **kwargs):
        """A tqdm bar on stderr (log lines print above it, see utils.config.TqdmHandler)."""
        setting = self.config.progress_bar
        show = self.is_main and (sys.stderr.isatty() if setting == "auto" else setting)
        return tqdm(iterable, disable=not show, dynamic_ncols=True, file=sys.stderr, **kwargs)

    def train_mode(self, training: bool = True):
        for model in self.parts.models.values():
            model.train(training)

    @property
    def best_value(self):
        return self.monitor.value

    @property
    def best_epoch(self):
        return self.monitor.epoch

    # ------------------------------------------------------------------ running

    def run(self):
        """Dispatch on config.mode. Training: the first signal stops the run at its next safe
        point, which saves a checkpoint that --resume continues from; the third aborts
        (utils.interrupts). The other modes have no state to keep: Ctrl+C stops them at once."""
        if self.keeps_files and self.config.mode not in USING_MODES:   # those make only the folder they write
            create_experiment_dirs(self.paths)
            unfinished = remove_unfinished(self.paths.root) + remove_unfinished(self.paths.checkpoints)
            if unfinished:
                self.logger.info(f"removed {len(unfinished)} unfinished file(s) of a run killed while "
                                 f"writing: {', '.join(unfinished)}")
        self.status, self._started = "running", time.perf_counter()
        self.checkpoint_clock.saved(self.current_iteration)
        anomaly = torch.autograd.detect_anomaly() if self.config.detect_anomaly else _NOTHING
        with interrupts.GracefulStop() if self.config.mode == "train" else _NOTHING as self.stop:
            try:
                with anomaly:
                    getattr(self, self.config.mode)()
            except interrupts.Aborted:
                self.status = "interrupted"
                self.logger.warning("aborted: nothing more was saved; --resume continues from the last checkpoint written")
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
        self._profiler = StepProfiler(self.config.profile, self.paths.out) if self.config.profile else None
        try:
            for _ in self.progress(range(self.current_epoch, self.max_epoch), desc="epochs",
                                   initial=self.current_epoch, total=self.max_epoch):
                if self._train_epoch():
                    break
        finally:
            if self._profiler is not None:
                self._profiler.finish()
        if self.config.fast_dev_run:
            self.logger.info(self.limits.debug_run_report())

    def _nothing_left_to_train(self) -> bool:
        stopped = self.monitor.stopped_before()
        if self.current_epoch >= self.max_epoch:
            line = f"already trained {self.current_epoch} epochs (max_epoch is {self.max_epoch}); raise max_epoch to train on"
        elif stopped is not None:
            self.status, line = stopped
        elif self.training_done():
            line = "this run already spent its training budget; raise it to train on"
        else:
            return False
        self.logger.info(line)
        return True

    def _train_epoch(self) -> bool:
        """One epoch: train (or go on with a resumed one), validate when due, step the epoch
        schedulers, checkpoint, record. True when training should stop (early stopping, stop_at,
        a validation callback, the agent's budget spent)."""
        started = time.perf_counter()
        metrics = self._train_part()
        self.current_epoch += 1
        is_best = False
        if self.current_epoch % self.config.validate_every == 0 or self.current_epoch == self.max_epoch:
            with self.evaluation_weights():
                self.last_metrics = self.validate()
            self.log_scalars(self.last_metrics, self.current_epoch)
            metrics.update(self.last_metrics)
            is_best = self.monitor.observe(self.last_metrics, self.current_epoch)
            for callback in self.validation_callbacks:
                self.status = callback(self, self.last_metrics) or self.status
        self.parts.step_epoch_schedulers(metrics.get(self.config.monitor))
        self.logger.info(epoch_line(self.current_epoch, self.max_epoch, metrics, is_best, time.perf_counter() - started))
        self.trackers.log_epoch(self.current_epoch, self.current_iteration, self.wall_time(),
                                {**metrics, **self.learning_rates})
        self.in_epoch.end_epoch()
        self.save_checkpoint(is_best)
        self.write_results()
        self.trackers.flush()
        return self._should_stop()

    def _should_stop(self) -> bool:
        if self.status != "running":          # a validation callback stopped the run (a sweep's pruner)
            self.logger.info(f"stopped after epoch {self.current_epoch}: {self.status}")
            return True
        stop = self.monitor.stop_after(self.last_metrics, self.current_epoch)
        if stop is not None:
            self.status, line = stop
            self.logger.info(line)
        return stop is not None or self.training_done()

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
        if position is None:                   # a resumed epoch logged them when it started
            self.learning_rates = per_optimizer("train/lr", self.parts.optimizers, lambda opt: opt.param_groups[0]["lr"])
            self.log_scalars(self.learning_rates, self.current_epoch)
        metrics = dict(self.train_one_epoch() or {})
        self.log_scalars(metrics, self.current_epoch + 1)
        self.in_epoch.training_done(ckpt.plain(metrics), ckpt.rng_states())
        return metrics

    # ------------------------------------------------------------------ hooks an agent overrides

    @abc.abstractmethod
    def train_one_epoch(self) -> dict | None:
        """One pass over the training data; returns epoch-level metrics, e.g. {"train/epoch_loss": x},
        printed in the epoch line and logged at the epoch."""

    @abc.abstractmethod
    def validate(self) -> dict:
        """Validation metrics keyed "val/<name>"."""

    def test(self):
        raise NotImplementedError(f"{type(self).__name__} has no test mode")

    def training_done(self) -> bool:
        """True once the agent's own training budget is spent (an RL agent's environment steps):
        train() then stops after the epoch, as at max_epoch."""
        return False

    def extra_state(self) -> dict:
        """Agent-specific state for the checkpoint (plain types and tensors only)."""
        return {}

    def load_extra_state(self, state: dict):
        pass

    def epoch_state(self) -> dict:
        """What train_one_epoch has summed so far in the epoch (plain types and tensors), for a
        checkpoint written inside it."""
        return {}

    def load_epoch_state(self, state: dict | None):
        """Before train_one_epoch: the sums of a resumed epoch, or None to start them afresh."""

    # ------------------------------------------------------------------ checkpoints and results

    def state_dict(self) -> dict:
        """The checkpoint: one dict of plain types and tensors (agents.run_state says what it holds)."""
        return run_state.gather(self)

    def save_checkpoint(self, is_best: bool):
        """The latest checkpoint (and model_best, epoch_NNNN copies at epoch ends)."""
        self.checkpoint_clock.saved(self.current_iteration)
        if self.keeps_files:
            self.checkpoints.save(self.state_dict(), self.current_epoch, is_best,
                                  keep_history=self.in_epoch.at_epoch_start and self.status != "interrupted")

    def load_checkpoint(self, state: dict, training: bool = True):
        """Restore models (for evaluation the EMA's weights, if the run kept one); when training
        also optimizers, schedulers, counters, the position inside the epoch and RNG states, so the
        resumed run continues exactly as the uninterrupted one would have."""
        run_state.restore(self, state, training)
        if training:
            self.logger.info(f"resumed from epoch {self.current_epoch}, iteration {self.current_iteration}"
                             + self.in_epoch.describe_resumed(self.epoch_unit, self.current_epoch))

    def wall_time(self) -> float:
        return self.wall_time_before + (time.perf_counter() - self._started)

    def results(self) -> dict:
        return {"agent": type(self).__name__, "exp_name": self.config.exp_name, "status": self.status,
                "epochs_done": self.current_epoch, "iterations": self.current_iteration,
                "wall_time_s": round(self.wall_time(), 3), "monitor": self.config.monitor,
                "monitor_mode": self.config.monitor_mode, "best": {"value": self.best_value, "epoch": self.best_epoch},
                "last": dict(self.last_metrics), "params": self.parameter_counts()}

    def write_results(self):
        if self.keeps_files:
            write_results(self.paths.root / "results.json", self.results(), self.config.mode, self.mode_results)

    def finalize(self):
        """After run(): results.json and the HParams summary (with the best value); closes the
        trackers. An agent that never ran writes nothing; a mode that uses a trained model records
        only a finished result (a failed predict leaves results.json as it was). Safe to call twice."""
        if self._finalized:
            return
        self._finalized = True
        mode = self.config.mode
        try:
            if self.status == "completed" or (self.status != "built" and mode not in USING_MODES):
                self.write_results()
                if mode == "train" and self.last_metrics:
                    if self.best_value is not None:
                        self.log_scalars({f"best/{self.config.monitor}": self.best_value}, self.current_epoch)
                    self.trackers.log_hparams(hparams_of(self.config), self.monitor.summary(self.last_metrics))
                config_file = "config.json" if mode == "train" else f"config_{mode}.json"
                self.trackers.end_run(self.status, [self.paths.root / config_file, self.paths.root / "results.json"])
        finally:
            self.trackers.close()


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
        self.running_loss = RunningLoss()   # the epoch's training loss
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

    def batch_size_of(self, batch) -> int:
        """Samples in a batch, for weighting the averages: the first tensor's leading dimension."""
        if isinstance(batch, dict):
            batch = next(iter(batch.values()))
        return (batch[0] if isinstance(batch, (list, tuple)) else batch).shape[0]

    def train_one_epoch(self):
        self.train_mode(True)
        loader = self.data_loader.train_loader
        move = needs_moving(loader, self.device, self.config.channels_last)
        batches = self.train_batches(loader)
        bar = self.progress(batches, desc=f"epoch {self.current_epoch + 1}", leave=False, total=len(batches),
                            initial=batches.start)
        for batch in bar:
            batch = self.to_device(batch) if move else batch
            if self.current_iteration == 0 and self.accumulation.between_groups:
                self.log_samples(batch)
            with self.no_sync_while_accumulating():
                with self.autocast():
                    out = self.train_step(batch)
                loss = out["loss"] if isinstance(out, dict) else out
                stepped = self.optimizer_step(loss, self.optimizer)
            self.running_loss.add(loss, self.batch_size_of(batch))
            if stepped and self.current_iteration % self.config.log_interval == 0:
                self.running_loss.fold()
                self._log_train_values(out if isinstance(out, dict) else {"loss": loss}, bar)
        epoch_loss = self.running_loss.epoch_mean()
        self.running_loss.load_state_dict(None)      # the next epoch sums afresh
        return {"train/epoch_loss": epoch_loss}

    def epoch_state(self):
        return self.running_loss.state_dict()

    def load_epoch_state(self, state):
        self.running_loss.load_state_dict(state)

    def _log_train_values(self, logged: dict, bar):
        values = {f"train/{name}": float(value.detach() if torch.is_tensor(value) else value)
                  for name, value in logged.items()}
        if not math.isfinite(values["train/loss"]):
            raise UserError(f"training diverged: the loss is {values['train/loss']} at epoch "
                            f"{self.current_epoch + 1}, iteration {self.current_iteration}; "
                            "lower learning_rate (the last checkpoint is kept)")
        self.log_scalars(values, self.current_iteration)
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", refresh=False)

    def log_samples(self, batch):
        """A grid of the first training images (a float (B, C, H, W) batch), shown once per run."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if torch.is_tensor(images) and images.dim() == 4 and images.is_floating_point():
            images = images[:64].detach().float().cpu()
            low, high = images.min(), images.max()
            self.log_images("train/samples", (images - low) / (high - low + 1e-8), self.current_iteration)

    @torch.no_grad()
    def evaluate(self, loader, prefix: str) -> dict:
        self.train_mode(False)
        meters = MeterGroup()
        move = needs_moving(loader, self.device, self.config.channels_last)
        batches = self.val_batches(loader)
        for batch in self.progress(batches, desc=prefix, leave=False, total=len(batches)):
            batch = self.to_device(batch) if move else batch
            with self.autocast():
                meters.update(self.validate_step(batch), self.batch_size_of(batch))
        return meters.averages(prefix + "/")

    def validate(self):
        return self.evaluate(self.data_loader.valid_loader, "val")

    def test(self):
        loader = getattr(self.data_loader, "test_loader", None) or self.data_loader.valid_loader
        self.mode_results = self.evaluate(loader, "test")
        self.log_scalars(self.mode_results, self.current_epoch)
        self.logger.info(f"test of the model from epoch {self.current_epoch}:\n{metrics_table(self.mode_results)}")
