"""A seconds-fast agent for testing BaseAgent: a linear classifier on fixed random points.
Used in configs as "agent": "tests.tiny_agent:TinyAgent" (a user's own agent, not registered)."""
import os
import signal
import time
from types import NoneType, SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn, optim

from agents.base import SupervisedAgent
from utils import interrupts
from utils.config import Key
from utils.data import DATA_LOADER_KEYS, TensorBatchLoader, make_data_loader
from utils.metrics import classification_metrics


class TinyAgent(SupervisedAgent):
    DEFAULTS = {
        **DATA_LOADER_KEYS,
        # "tensor": TensorBatchLoader; "torch": torch DataLoaders over a TensorDataset
        "loader": Key("tensor", choices=("tensor", "torch")),
        "shuffle": True,
        "learning_rate": Key(0.1, minimum=0),
        "momentum": Key(0.9, minimum=0, maximum=1),
        "n_samples": Key(96, minimum=1),
        "batch_size": 16,
        "max_epoch": 3,
        "log_interval": 1,
        "lr_gamma": Key(0.9, minimum=0),
        "sgd": {"nesterov": False, "dampening": 0.0},   # a nested object: checkpoints must hold it as plain dicts
        "scheduler_interval": Key("epoch", choices=("epoch", "iteration")),
        "monitor": "val/accuracy",
        "monitor_mode": "max",
        # For the distributed tests: this rank raises at this iteration, as a crashing process would.
        "crash_at_iteration": Key(None, types=(int, NoneType), minimum=0),
        "crash_rank": Key(1, minimum=0),
        "crash_by_hanging": False,    # instead of raising, stop answering (a stuck process)
        # This rank sends torchrun SIGTERM at this iteration, as a preempted job gets (torchrun
        # passes it on to every process).
        "sigterm_at_iteration": Key(None, types=(int, NoneType), minimum=0),
    }
    metrics = ("loss", "accuracy")
    # Fault injection is not part of the run: a resumed run may drop it.
    resumable_keys = SupervisedAgent.resumable_keys + ("crash_at_iteration", "crash_rank", "crash_by_hanging",
                                                       "sigterm_at_iteration")

    def build(self):
        cfg = self.config
        generator = torch.Generator().manual_seed(0)
        points = torch.randn(cfg.n_samples, 8, generator=generator)
        labels = (points[:, 0] + 0.5 * points[:, 1] > 0).long()
        self.model = self.add_model("model", nn.Linear(8, 2))
        optimizer = self.add_optimizer("optimizer", optim.SGD(self.model.parameters(), lr=cfg.learning_rate,
                                                              momentum=cfg.momentum, **cfg.sgd))
        self.add_scheduler("scheduler", optim.lr_scheduler.StepLR(optimizer, 1, gamma=cfg.lr_gamma),
                           interval=cfg.scheduler_interval)
        if cfg.loader == "tensor":
            train = TensorBatchLoader(points, labels, cfg.batch_size, shuffle=cfg.shuffle)
            valid = TensorBatchLoader(points[:40], labels[:40], 16)
        else:
            def loader(n, batch_size, shuffle):
                dataset = torch.utils.data.TensorDataset(points[:n], labels[:n])
                return make_data_loader(dataset, batch_size, shuffle, cfg.data_loader_workers,
                                        cfg.pin_memory, self.device)
            train, valid = loader(len(points), cfg.batch_size, cfg.shuffle), loader(40, 16, False)
        self.data_loader = SimpleNamespace(train_loader=train, valid_loader=valid)

    def train_step(self, batch):
        if self.current_iteration == self.config.sigterm_at_iteration and self.rank == self.config.crash_rank:
            os.kill(os.getppid(), signal.SIGTERM)
        if self.current_iteration == self.config.crash_at_iteration and self.rank == self.config.crash_rank:
            if self.config.crash_by_hanging:   # stuck, until torchrun's SIGTERM asks it to stop
                while not self.stop.requested:
                    time.sleep(0.05)
                raise interrupts.StopRequested
            raise RuntimeError(f"simulated crash of rank {self.rank}")
        points, labels = batch
        return F.cross_entropy(self.model(points), labels)

    def validate_step(self, batch):
        points, labels = batch
        return classification_metrics(self.model(points), labels)


# For the tests that run it in-process: its config, built (and restored from `checkpoint`), or
# built and run to the end.
TINY = {"exp_name": "tiny", "agent": "tests.tiny_agent:TinyAgent", "progress_bar": False}


def build(overrides=(), checkpoint=None, **config):
    from agents import make_config

    cls, cfg = make_config({**TINY, **config}, overrides)
    return cls(cfg, checkpoint)


def trained(**config):
    agent = build(**config)
    agent.run()
    agent.finalize()
    return agent
