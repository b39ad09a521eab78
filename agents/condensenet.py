"""CondenseNet on CIFAR-10: learned group convolutions pruned during the first half of training,
then `mode=condense` turns the network into standard group convolutions (same logits)."""
import math

import torch
import torch.nn.functional as F
from torch import optim

from agents.base import SupervisedAgent
from agents.trained import ClassifiesImages
from datasets.cifar10 import CLASSES, DATA_MODES, MEAN, STD, Cifar10DataLoader
from graphs.models.condensenet import CondenseNet, condense, condensed_skeleton, count_macs
from graphs.models.custom_layers.learned_group_conv import stage_at
from utils import checkpoint as ckpt
from utils.config import Key
from utils.errors import ConfigError, UserError
from utils.metrics import classification_metrics
from utils.predict import image_inference

CONDENSED = "condensed.pth.tar"


class CondenseNetAgent(ClassifiesImages, SupervisedAgent):
    DEFAULTS = {
        "stages": [14, 14, 14],
        "growth": [8, 16, 32],
        "bottleneck": Key(4, minimum=1),
        "group_1x1": Key(4, minimum=1),
        "group_3x3": Key(4, minimum=1),
        "condense_factor": Key(4, minimum=1),
        "init_stride": Key(1, minimum=1),
        "pool_size": Key(8, minimum=1),
        "dropout_rate": Key(0.0, minimum=0, maximum=1),
        "num_classes": Key(10, minimum=1),
        "learning_rate": Key(0.1, minimum=0),        # cosine decay to 0, stepped every iteration
        "momentum": Key(0.9, minimum=0, maximum=1),
        "nesterov": True,
        "weight_decay": Key(1e-4, minimum=0),
        "group_lasso_lambda": Key(0.0, minimum=0),   # weight of the group-lasso term (the paper's code: 0)
        "batch_size": 64,
        "test_batch_size": 256,
        "max_epoch": 300,
        "data_folder": "data/cifar10",
        "data_mode": Key("download", choices=DATA_MODES),
        "condensed": False,          # mode=test, predict, export: use checkpoints/condensed.pth.tar
        "monitor": "val/accuracy",
        "monitor_mode": "max",
    }
    metrics = ("loss", "accuracy")
    modes = ("train", "test", "condense", "predict", "export")
    condensed_modes = ("test", "predict", "export")   # the modes "condensed": true applies to

    @classmethod
    def checkpoint_for_mode(cls, config):
        if config.condensed and config.mode in cls.condensed_modes:
            return CONDENSED
        return super().checkpoint_for_mode(config)

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config.condensed and config.mode not in cls.condensed_modes:
            raise ConfigError("\"condensed\": true uses the condensed network in modes \"test\", \"predict\" and "
                              f"\"export\"; it cannot be used with mode \"{config.mode}\"")

    @classmethod
    def networks(cls, config, inference):
        """The trained form, or the condensed one where the checkpoint holds it."""
        network = CondenseNet(stages=config.stages, growth=config.growth, bottleneck=config.bottleneck,
                              group_1x1=config.group_1x1, group_3x3=config.group_3x3,
                              condense_factor=config.condense_factor, init_stride=config.init_stride,
                              pool_size=config.pool_size, dropout_rate=config.dropout_rate,
                              num_classes=config.num_classes)
        return {"model": condensed_skeleton(network) if inference.get("condensed") else network}

    def inference_info(self):
        # CIFAR-10's 32 x 32 RGB, standardised with its channel statistics (datasets/cifar10.py)
        names = CLASSES if self.config.num_classes == len(CLASSES) else range(self.config.num_classes)
        return image_inference(3, (32, 32), names, MEAN, STD)

    def build(self):
        cfg = self.config
        self.raw_model = self.networks(cfg, {"condensed": cfg.condensed})["model"]
        # raw_model: the network with its own methods (condense_to, lasso_loss); model: what is
        # called, the same module wrapped in DDP under torchrun or compiled.
        self.model = self.add_model("model", self.raw_model)
        optimizer = self.add_optimizer("optimizer", optim.SGD(
            self.model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay))
        self.data_loader = Cifar10DataLoader(data_folder=cfg.data_folder, data_mode=cfg.data_mode,
                                             batch_size=cfg.batch_size, test_batch_size=cfg.test_batch_size,
                                             device=self.device)
        cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, self.total_iterations) / self.total_iterations))
        self.add_scheduler("scheduler", optim.lr_scheduler.LambdaLR(optimizer, cosine), interval="iteration")
        self._stage = None

    @property
    def total_iterations(self) -> int:
        # Read when used, not in build(): under torchrun each process steps through its share.
        return self.max_epoch * self.steps_per_epoch()

    def train_step(self, batch):
        # Pruning follows the iteration count, which the checkpoint holds: a resumed run condenses
        # at the same steps as an uninterrupted one.
        progress = self.current_iteration / self.total_iterations
        stage = stage_at(progress, self.config.condense_factor)
        if stage != self._stage:
            self.raw_model.condense_to(progress)
            self._stage = stage
        images, labels = batch
        loss = F.cross_entropy(self.model(images), labels)
        if self.config.group_lasso_lambda > 0:
            loss = loss + self.config.group_lasso_lambda * self.raw_model.lasso_loss()
        return loss

    def validate_step(self, batch):
        images, labels = batch
        return classification_metrics(self.model(images), labels)

    def train_one_epoch(self):
        metrics = super().train_one_epoch()
        for block, fraction in enumerate(self.raw_model.pruned_fraction_per_block(), start=1):
            metrics[f"condense/pruned_block{block}"] = fraction
        return metrics

    def condense(self):
        """Convert the best checkpoint into the condensed network, check that it computes the same
        logits, and save it as checkpoints/condensed.pth.tar."""
        trained = self.raw_model.eval()
        unfinished = [layer for layer in trained.learned_group_convs()
                      if int(layer.stage) < layer.condense_factor - 1]
        if unfinished:
            raise UserError(f"the checkpoint (epoch {self.current_epoch}) was saved before condensation "
                            "finished (it ends half-way through max_epoch); train further, then condense")
        condensed = condense(trained).eval()
        images, _ = self.to_device(next(iter(self.data_loader.valid_loader)))
        with torch.no_grad():
            difference = float((trained(images) - condensed(images)).abs().max())
        state = {"format_version": ckpt.FORMAT_VERSION, "agent": type(self).__name__,
                 "config": dict(self.config), "epoch": self.current_epoch, "condensed": True,
                 "models": {"model": condensed.state_dict()},
                 "inference": {**self.inference_info(), "condensed": True}}   # what networks() rebuilds
        ckpt.save_atomic(state, self.paths.checkpoints / CONDENSED)
        shape = (1, 3, 32, 32)
        self.mode_results = {
            "trained": {"params": sum(p.numel() for p in trained.parameters()), "macs": count_macs(trained, shape)},
            "condensed": {"params": sum(p.numel() for p in condensed.parameters()),
                          "macs": count_macs(condensed, shape)},
            "max_logit_difference": difference,
        }
        self.logger.info(f"condensed: {self.mode_results['trained']['params']:,} -> "
                         f"{self.mode_results['condensed']['params']:,} parameters, "
                         f"{self.mode_results['trained']['macs'] / 1e6:.1f}M -> "
                         f"{self.mode_results['condensed']['macs'] / 1e6:.1f}M multiply-adds; "
                         f"largest logit difference {difference:.2e}; saved {CONDENSED}")
