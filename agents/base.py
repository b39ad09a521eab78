"""The lifecycle every agent shares, written once.

BaseAgent: seed -> device -> TensorBoard writer -> build() -> resume; the epoch loop with
validation, best-metric tracking, early stopping, checkpoints and results.json; Ctrl+C handling.
SupervisedAgent: the batch loop, so a task only writes train_step(batch) and validate_step(batch).
"""
import abc
import contextlib
import json
import logging
import math
import os
import sys
import time
from types import NoneType

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from utils import checkpoint as ckpt
from utils import distributed
from utils.config import Key, create_experiment_dirs, experiment_paths, write_json_atomic
from utils.data import TensorBatchLoader
from utils.errors import CheckpointError, ConfigError, UserError
from utils.metrics import MeterGroup
from utils.runtime import seed_everything, select_device
from utils.summary import NullWriter, SummaryWriter

LATEST = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"
_NO_AUTOCAST = contextlib.nullcontext()  # reusable: entering it does nothing


class BaseAgent(abc.ABC):
    # Every key an agent reads is declared here or in a subclass's DEFAULTS; a config key that is
    # declared nowhere is an error. Subclasses add to and override these.
    DEFAULTS = {
        "exp_name": Key(None, types=(str,)),
        "agent": Key(None, types=(str,)),
        "description": "",
        "mode": "train",
        "seed": 1,
        "device": Key("auto", pattern=r"auto|cpu|mps|cuda(:\d+)?",
                      pattern_hint='use "auto", "cpu", "cuda", "cuda:N" or "mps"'),
        "cuda": True,
        "gpu_device": 0,
        "max_epoch": 10,
        "log_interval": 10,
        "validate_every": 1,
        "monitor": Key("val/loss", types=(str, NoneType)),   # null: no best model, no early stopping
        "monitor_mode": Key("min", choices=("min", "max")),
        "early_stopping_patience": Key(None, types=(int, NoneType)),
        "checkpoint_file": Key(None, types=(str, NoneType)),
        "keep_last_checkpoints": 0,
        "amp": Key("off", choices=("off", "bf16", "fp16")),
        "compile": False,             # torch.compile the declared models
        "channels_last": False,       # NHWC memory format for models and 4-D input batches
        "deterministic": False,       # deterministic algorithms; otherwise cudnn.benchmark on GPU
        "distributed_timeout_s": 600,  # under torchrun: a collective waiting longer fails
        # tqdm bars: "auto" shows them on a terminal and leaves them out of redirected output.
        "progress_bar": Key("auto", types=(bool, str), choices=("auto", True, False)),
    }
    # Values `mode` may take: each names a method of the agent.
    modes = ("train", "test")
    # Names of the metrics validate() reports without the "val/" prefix; when declared, a
    # `monitor` that is not one of them is rejected before anything runs.
    metrics = ()

    # ------------------------------------------------------------------ config declaration

    @classmethod
    def config_spec(cls) -> dict:
        spec = {}
        for klass in reversed(cls.__mro__):
            spec.update(vars(klass).get("DEFAULTS", {}))
        mode_default = spec["mode"].default if isinstance(spec["mode"], Key) else spec["mode"]
        spec["mode"] = Key(mode_default, choices=tuple(cls.modes))
        return spec

    @classmethod
    def checkpoint_for_mode(cls, config) -> str:
        """The file in checkpoints/ that a mode other than train evaluates."""
        return BEST

    @classmethod
    def check_config(cls, config):
        """Checks across keys, run before the experiment folder is touched."""
        for key in ("max_epoch", "log_interval", "validate_every", "early_stopping_patience"):
            if config[key] is not None and config[key] < 1:
                raise ConfigError(f"config key '{key}' must be at least 1, got {config[key]}")
        if config.keep_last_checkpoints < 0:
            raise ConfigError("config key 'keep_last_checkpoints' cannot be negative")
        if cls.metrics and config.monitor is not None:
            known = [f"val/{name}" for name in cls.metrics]
            if config.monitor not in known:
                raise ConfigError(f"monitor \"{config.monitor}\" is not a metric of {cls.__name__}; "
                                  f"use one of: {', '.join(known)}")

    # ------------------------------------------------------------------ construction

    def __init__(self, config, checkpoint: dict | None = None):
        self.config = config
        self.logger = logging.getLogger(type(self).__name__)
        self.paths = experiment_paths(config.exp_name)
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = distributed.is_main()
        if self.is_main:
            create_experiment_dirs(self.paths)

        # Seed before anything random is built, then the device, then the writer. Every process
        # of a distributed run gets the same seed: same initial weights, same data permutation.
        seed_everything(config.seed)
        gpu = distributed.local_rank() if self.world_size > 1 else config.gpu_device
        self.device = select_device(config.device, config.cuda, gpu)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        distributed.init(self.device, config.distributed_timeout_s)
        self._set_determinism(config.deterministic)
        self.writer = SummaryWriter(str(self.paths.summaries)) if self.is_main else NullWriter()

        self.current_epoch = 0        # epochs completed
        self.current_iteration = 0    # optimizer steps taken
        self.best_value = None
        self.best_epoch = None
        self.bad_epochs = 0           # validations in a row without improvement
        self.last_metrics = {}
        self.mode_results = None     # what a mode other than train reports, for results.json
        self.status = "built"
        self._wall_time_before = 0.0  # seconds spent in earlier sessions of this run
        self._started = time.perf_counter()
        self._models, self._optimizers, self._schedulers = {}, {}, {}
        self.scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None

        self.build()
        if not self._models:
            raise TypeError(f"{type(self).__name__}.build() declared no model: "
                            "use self.add_model(name, module)")
        self._shard_data()
        for name, count in self.parameter_counts().items():
            self.logger.info(f"{name}: {count:,} parameters")
        self.logger.info(f"device: {self.device}" + (f" (x {self.world_size} processes)" if self.world_size > 1 else ""))
        if checkpoint is not None:
            self.load_checkpoint(checkpoint, training=config.mode == "train")

    @abc.abstractmethod
    def build(self):
        """Create models, losses, optimizers, schedulers and the data loader (self.data_loader),
        declaring the stateful ones with add_model / add_optimizer / add_scheduler."""

    def add_model(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """Declare a model: moved to the device (channels_last if asked), checkpointed by name.
        Returns what the agent should call: wrapped in DistributedDataParallel under torchrun and
        compiled with "compile": true; checkpoints always hold the plain module's weights."""
        module = module.to(self.device)
        if self.config.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self._models[name] = module
        if self.world_size > 1 and any(p.requires_grad for p in module.parameters()):
            module = DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None)
        if self.config.compile:
            module = torch.compile(module)
        return module

    def add_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self._optimizers[name] = optimizer
        return optimizer

    def add_scheduler(self, name: str, scheduler, interval: str = "epoch"):
        """interval "epoch": stepped once after each epoch; "iteration": after each optimizer step."""
        if interval not in ("epoch", "iteration"):
            raise ValueError(f"scheduler interval must be 'epoch' or 'iteration', not {interval!r}")
        self._schedulers[name] = (scheduler, interval)
        return scheduler

    def parameter_counts(self) -> dict:
        return {name: sum(p.numel() for p in model.parameters()) for name, model in self._models.items()}

    # ------------------------------------------------------------------ helpers for agents

    def autocast(self):
        if self.config.amp == "off":
            return _NO_AUTOCAST
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def to_device(self, batch):
        """Tensors to the device (non-blocking: from pinned memory the copy overlaps compute);
        4-D float batches to channels_last when the config asks for it."""
        device = self.device
        if torch.is_tensor(batch):
            if self.config.channels_last and batch.dim() == 4 and batch.is_floating_point():
                return batch.to(device, memory_format=torch.channels_last, non_blocking=True)
            return batch if batch.device == device else batch.to(device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            if self.config.channels_last:
                return type(batch)([self.to_device(item) for item in batch])
            # The common case inline: a tensor already on the device (batched there) is kept, as
            # .to() would, without the dispatcher call (~1 us a tensor, every step).
            return type(batch)([(item if item.device == device else item.to(device, non_blocking=True))
                                if torch.is_tensor(item) else self.to_device(item) for item in batch])
        if isinstance(batch, dict):
            return {key: self.to_device(value) for key, value in batch.items()}
        return batch

    def _needs_moving(self, loader) -> bool:
        """False for a TensorBatchLoader whose tensors are on the device already: its batches are
        built there, and to_device would only cost time every step."""
        return not (isinstance(loader, TensorBatchLoader) and loader.device == self.device
                    and not self.config.channels_last)

    def progress(self, iterable, **kwargs):
        """A tqdm bar on stderr (log lines print above it, see utils.config.TqdmHandler)."""
        setting = self.config.progress_bar
        show = self.is_main and (sys.stderr.isatty() if setting == "auto" else setting)
        return tqdm(iterable, disable=not show, dynamic_ncols=True, file=sys.stderr, **kwargs)

    def _set_determinism(self, deterministic: bool):
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fastest kernels for fixed input shapes

    def _shard_data(self):
        """Under torchrun, give each process its share of self.data_loader's loaders: the agent
        builds them as for one process."""
        data = getattr(self, "data_loader", None)
        if self.world_size == 1 or data is None:
            return
        replaced = {}
        for attribute in ("train_loader", "valid_loader", "test_loader"):
            loader = getattr(data, attribute, None)
            if isinstance(loader, TensorBatchLoader):
                loader.shard(self.rank, self.world_size)
            elif isinstance(loader, torch.utils.data.DataLoader):
                if id(loader) not in replaced:
                    replaced[id(loader)] = distributed.shard_data_loader(loader, self.config.seed,
                                                                             self.rank, self.world_size)
                setattr(data, attribute, replaced[id(loader)])
        batch_size = self.config.get("batch_size")
        if batch_size:
            self.logger.info(f"batch_size {batch_size} per process x {self.world_size} processes: "
                             f"global batch {batch_size * self.world_size}")

    def _set_data_epoch(self):
        """DistributedSampler reshuffles only when told the epoch."""
        for attribute in ("train_loader", "valid_loader", "test_loader"):
            sampler = getattr(getattr(getattr(self, "data_loader", None), attribute, None), "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.current_epoch)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer):
        """zero_grad, backward and step for one of several optimizers (fp16: through the scaler);
        call end_iteration() once all of an iteration's optimizers have stepped."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)

    def end_iteration(self):
        if self.scaler is not None:
            self.scaler.update()
        self.current_iteration += 1
        self._step_schedulers("iteration")

    def train_mode(self, training: bool = True):
        for model in self._models.values():
            model.train(training)

    def extra_state(self) -> dict:
        """Agent-specific state for the checkpoint (plain types and tensors only)."""
        return {}

    def load_extra_state(self, state: dict):
        pass

    # ------------------------------------------------------------------ running

    def run(self):
        """Dispatch on config.mode; Ctrl+C saves a checkpoint that --resume continues from."""
        self.status = "running"
        self._started = time.perf_counter()
        try:
            getattr(self, self.config.mode)()
        except KeyboardInterrupt:
            self.status = "interrupted"
            if self.config.mode == "train":
                self.save_checkpoint(is_best=False)  # no collective here: other ranks may be gone
                self.logger.warning(f"interrupted: checkpoint saved at epoch {self.current_epoch}, "
                                    f"iteration {self.current_iteration}; continue with --resume")
            else:
                self.logger.warning("interrupted")
        except BaseException:
            self.status = "failed"
            raise
        else:
            if self.status == "running":
                self.status = "completed"

    def train(self):
        cfg = self.config
        if self.current_epoch >= cfg.max_epoch:
            self.logger.info(f"already trained {self.current_epoch} epochs (max_epoch is "
                             f"{cfg.max_epoch}); raise max_epoch to train on")
            return
        if self._patience_spent():
            self.logger.info("this run already stopped early; raise early_stopping_patience to train on")
            self.status = "early_stopped"
            return
        if self.training_done():
            self.logger.info("this run already spent its training budget; raise it to train on")
            return
        epochs = self.progress(range(self.current_epoch, cfg.max_epoch), desc="epochs",
                               initial=self.current_epoch, total=cfg.max_epoch)
        for _ in epochs:
            started = time.perf_counter()
            self._set_data_epoch()
            self.log_learning_rates()
            metrics = dict(self.train_one_epoch() or {})
            self.current_epoch += 1
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, self.current_epoch)
            is_best = False
            if self.current_epoch % cfg.validate_every == 0 or self.current_epoch == cfg.max_epoch:
                self.last_metrics = self.validate()
                for tag, value in self.last_metrics.items():
                    self.writer.add_scalar(tag, value, self.current_epoch)
                metrics.update(self.last_metrics)
                if cfg.monitor is not None:
                    is_best = self._update_best(self.last_metrics)
            self._step_schedulers("epoch", metrics)
            self._log_epoch(metrics, is_best, time.perf_counter() - started)
            self.save_checkpoint(is_best)
            self.write_results()
            self.writer.flush()
            if self._patience_spent():
                self.logger.info(f"early stopping: {cfg.monitor} has not improved for "
                                 f"{self.bad_epochs} validations (best {self.best_value} "
                                 f"at epoch {self.best_epoch})")
                self.status = "early_stopped"
                break
            if self.training_done():
                break

    def _patience_spent(self) -> bool:
        patience = self.config.early_stopping_patience
        return patience is not None and self.bad_epochs >= patience

    def training_done(self) -> bool:
        """True once the agent's own training budget is spent (an RL agent's environment steps):
        train() then stops after the epoch, as at max_epoch."""
        return False

    @abc.abstractmethod
    def train_one_epoch(self) -> dict | None:
        """One pass over the training data; returns epoch-level metrics, e.g. {"train/epoch_loss": x},
        printed in the epoch line and written to TensorBoard at the epoch."""

    @abc.abstractmethod
    def validate(self) -> dict:
        """Validation metrics keyed "val/<name>"."""

    def test(self):
        raise NotImplementedError(f"{type(self).__name__} has no test mode")

    def log_learning_rates(self):
        for name, optimizer in self._optimizers.items():
            tag = "train/lr" if len(self._optimizers) == 1 else f"train/lr_{name}"
            self.writer.add_scalar(tag, optimizer.param_groups[0]["lr"], self.current_epoch)

    def _step_schedulers(self, interval: str, metrics: dict | None = None):
        for scheduler, when in self._schedulers.values():
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
        value = metrics[monitor]
        improved = math.isfinite(value) and (
            self.best_value is None
            or (value > self.best_value if self.config.monitor_mode == "max" else value < self.best_value))
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, self.current_epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def _log_epoch(self, metrics: dict, is_best: bool, seconds: float):
        shown = "  ".join(f"{name} {value}" if isinstance(value, int) else f"{name} {value:.4f}"
                          for name, value in metrics.items())
        self.logger.info(f"epoch {self.current_epoch}/{self.config.max_epoch}  {shown}"
                         f"{'  (best)' if is_best else ''}  [{seconds:.1f}s]")

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "agent": type(self).__name__,
            "config": dict(self.config),
            "epoch": self.current_epoch,
            "iteration": self.current_iteration,
            "models": {name: model.state_dict() for name, model in self._models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self._optimizers.items()},
            "schedulers": {name: s.state_dict() for name, (s, _) in self._schedulers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best": {"value": self.best_value, "epoch": self.best_epoch},
            "early_stopping": {"bad_epochs": self.bad_epochs},
            "last_metrics": dict(self.last_metrics),
            "wall_time_s": self.wall_time(),
            "rng": ckpt.rng_states(),
            "extra": self.extra_state(),
        }

    def save_checkpoint(self, is_best: bool):
        if not self.is_main:
            return
        folder = self.paths.checkpoints
        latest = folder / LATEST
        ckpt.save_atomic(self.state_dict(), latest)
        if is_best:
            ckpt.copy_atomic(latest, folder / BEST)
        keep = self.config.keep_last_checkpoints
        if keep > 0 and self.status != "interrupted":
            ckpt.copy_atomic(latest, folder / f"epoch_{self.current_epoch:04d}.pth.tar")
            for old in sorted(folder.glob("epoch_*.pth.tar"))[:-keep]:
                old.unlink()

    def load_checkpoint(self, state: dict, training: bool = True):
        """Restore models; when training also optimizers, schedulers, counters and RNG states, so
        the resumed run continues exactly as the uninterrupted one would have."""
        source = state.get("agent", "?")
        for name, model in self._models.items():
            if name not in state["models"]:
                raise CheckpointError(f"the checkpoint (from {source}) has no weights for model "
                                      f"'{name}'; it holds: {', '.join(state['models']) or 'none'}")
            try:
                model.load_state_dict(state["models"][name])
            except RuntimeError as e:
                detail = " ".join(str(e).split())
                raise CheckpointError(f"the checkpoint's weights do not fit model '{name}' "
                                      f"(was it trained with another architecture?): {detail[:300]}") from None
        self.current_epoch = state["epoch"]
        if not training:
            return
        for kind, table, stored in (("optimizer", self._optimizers, state.get("optimizers", {})),
                                    ("scheduler", {n: s for n, (s, _) in self._schedulers.items()},
                                     state.get("schedulers", {}))):
            for name, obj in table.items():
                if name not in stored:
                    raise CheckpointError(f"the checkpoint has no state for {kind} '{name}'")
                try:
                    obj.load_state_dict(stored[name])
                except (ValueError, KeyError, RuntimeError) as e:
                    raise CheckpointError(f"the checkpoint's state does not fit {kind} '{name}': {e}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.current_iteration = state["iteration"]
        self.best_value = state["best"]["value"]
        self.best_epoch = state["best"]["epoch"]
        self.bad_epochs = state["early_stopping"]["bad_epochs"]
        self.last_metrics = dict(state.get("last_metrics", {}))
        self._wall_time_before = state.get("wall_time_s", 0.0)
        self.load_extra_state(state.get("extra", {}))
        ckpt.set_rng_states(state["rng"])  # last: nothing after this may draw random numbers
        self.logger.info(f"resumed from epoch {self.current_epoch}, iteration {self.current_iteration}")

    # ------------------------------------------------------------------ results

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
            "best": {"value": self.best_value, "epoch": self.best_epoch},
            "last": dict(self.last_metrics),
            "params": self.parameter_counts(),
        }

    def write_results(self):
        if not self.is_main:
            return
        path = self.paths.root / "results.json"
        if self.config.mode == "train":
            results = self.results()
        else:
            # Evaluation adds to what training recorded instead of replacing it.
            try:
                results = json.loads(path.read_text())
            except (OSError, ValueError):
                results = {key: value for key, value in self.results().items()
                           if key in ("agent", "exp_name", "params")}
            results[self.config.mode] = self.mode_results
        write_json_atomic(path, _finite(results))

    def finalize(self):
        """Write results.json and the HParams summary, close the writer. Safe to call twice."""
        if self.writer is None:
            return
        try:
            self.write_results()
            if self.config.mode == "train" and self.last_metrics:
                self._write_hparams()
        finally:
            self.writer.close()
            self.writer = None

    def _write_hparams(self):
        hparams = {}
        for key, value in _flatten(dict(self.config)).items():
            if key in ("exp_name", "agent", "description"):
                continue
            hparams[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        best_tag = f"best/{self.config.monitor}"
        metric_tags = {tag: value for tag, value in self.last_metrics.items()}
        if self.best_value is not None:
            metric_tags[best_tag] = self.best_value
            self.writer.add_scalar(best_tag, self.best_value, self.current_epoch)
        self.writer.add_hparams(hparams, metric_tags)


class SupervisedAgent(BaseAgent):
    """One model, one optimizer, batches of (inputs, targets): write train_step and validate_step.

    build() must set self.data_loader with `train_loader` and `valid_loader` (and optionally
    `test_loader`, else mode=test evaluates valid_loader).
    """

    DEFAULTS = {
        "batch_size": 64,
        "test_batch_size": 1000,
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
        if len(self._optimizers) != 1:
            raise TypeError(f"{type(self).__name__}: a SupervisedAgent declares exactly one optimizer "
                            f"in build() (found {len(self._optimizers)}); agents with several "
                            "override train_one_epoch")
        if not hasattr(self, "data_loader"):
            raise TypeError(f"{type(self).__name__}.build() must set self.data_loader")
        self.optimizer = next(iter(self._optimizers.values()))

    def batch_size_of(self, batch) -> int:
        """Samples in a batch, for weighting the averages: the first tensor's leading dimension."""
        if isinstance(batch, dict):
            batch = next(iter(batch.values()))
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        return first.shape[0]

    def train_one_epoch(self):
        cfg, optimizer, scaler = self.config, self.optimizer, self.scaler
        has_iteration_schedulers = any(when == "iteration" for _, when in self._schedulers.values())
        self.train_mode(True)
        # Losses wait as tensors and are summed at each log_interval: no device sync per step.
        pending_losses, pending_sizes, loss_sum, sample_count = [], [], 0.0, 0
        loader = self.data_loader.train_loader
        move = self._needs_moving(loader)
        bar = self.progress(loader, desc=f"epoch {self.current_epoch + 1}", leave=False, total=len(loader))
        for batch in bar:
            if move:
                batch = self.to_device(batch)
            if self.current_iteration == 0:
                self.log_samples(batch)
            with self.autocast():
                out = self.train_step(batch)
            loss = out["loss"] if isinstance(out, dict) else out
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            self.current_iteration += 1
            if has_iteration_schedulers:
                self._step_schedulers("iteration")
            pending_losses.append(loss.detach())
            pending_sizes.append(self.batch_size_of(batch))
            if self.current_iteration % cfg.log_interval == 0:
                loss_sum, sample_count = self._sum_losses(pending_losses, pending_sizes, loss_sum, sample_count)
                logged = out if isinstance(out, dict) else {"loss": loss}
                values = {f"train/{name}": float(value.detach() if torch.is_tensor(value) else value)
                          for name, value in logged.items()}
                if not math.isfinite(values["train/loss"]):
                    raise UserError(f"training diverged: the loss is {values['train/loss']} at epoch "
                                    f"{self.current_epoch + 1}, iteration {self.current_iteration}; "
                                    "lower learning_rate (the last checkpoint is kept)")
                for tag, value in values.items():
                    self.writer.add_scalar(tag, value, self.current_iteration)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", refresh=False)
        loss_sum, sample_count = self._sum_losses(pending_losses, pending_sizes, loss_sum, sample_count)
        loss_sum, sample_count = distributed.all_reduce_sum(
            torch.tensor([loss_sum, sample_count], dtype=torch.float64)).tolist()
        return {"train/epoch_loss": loss_sum / sample_count if sample_count else math.nan}

    @staticmethod
    def _sum_losses(losses: list, sizes: list, loss_sum: float, count: int):
        """Fold the pending per-batch mean losses into the running sum, weighted by batch size;
        empties the lists."""
        if losses:
            # One stack and one copy to the host (a single sync on GPU) for the whole interval.
            loss_sum += sum(loss * size for loss, size in zip(torch.stack(losses).tolist(), sizes))
            count += sum(sizes)
            losses.clear()
            sizes.clear()
        return loss_sum, count

    def log_samples(self, batch):
        """A grid of the first training images, shown once per run in TensorBoard."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not (torch.is_tensor(images) and images.dim() == 4 and images.is_floating_point()):
            return
        images = images[:64].detach().float().cpu()
        low, high = images.min(), images.max()
        self.writer.add_images("train/samples", (images - low) / (high - low + 1e-8), self.current_iteration)

    @torch.no_grad()
    def evaluate(self, loader, prefix: str) -> dict:
        self.train_mode(False)
        meters = MeterGroup()
        move = self._needs_moving(loader)
        for batch in self.progress(loader, desc=prefix, leave=False, total=len(loader)):
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
        for tag, value in self.mode_results.items():
            self.writer.add_scalar(tag, value, self.current_epoch)
        width = max(len(tag) for tag in self.mode_results)
        lines = [f"  {tag:<{width}}  {value:.4f}" for tag, value in self.mode_results.items()]
        self.logger.info(f"test of the model from epoch {self.current_epoch}:\n" + "\n".join(lines))


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _finite(value):
    """JSON has no NaN or Infinity: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
