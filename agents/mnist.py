"""MNIST classification: pytorch/examples' recipe (Adadelta, lr 1.0 decayed by 0.7 per epoch)."""
import torch.nn.functional as F
from torch import optim

from agents.base import SupervisedAgent
from datasets.mnist import DATA_MODES, MnistDataLoader
from graphs.models.mnist import MnistNet
from utils.config import Key
from utils.metrics import classification_metrics


class MnistAgent(SupervisedAgent):
    DEFAULTS = {
        "max_epoch": 14,
        "learning_rate": Key(1.0, minimum=0),
        "optimizer": Key("adadelta", choices=("adadelta", "sgd", "adam")),
        "momentum": Key(0.5, minimum=0, maximum=1),   # sgd only
        "lr_gamma": Key(0.7, minimum=0),              # learning rate x lr_gamma after every epoch
        "data_folder": "data/mnist",
        "data_mode": Key("download", choices=DATA_MODES),
        "monitor": "val/accuracy",
        "monitor_mode": "max",
    }
    metrics = ("loss", "accuracy")

    def build(self):
        cfg = self.config
        self.model = self.add_model("model", MnistNet())
        if cfg.optimizer == "sgd":
            optimizer = optim.SGD(self.model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
        elif cfg.optimizer == "adam":
            optimizer = optim.Adam(self.model.parameters(), lr=cfg.learning_rate)
        else:
            optimizer = optim.Adadelta(self.model.parameters(), lr=cfg.learning_rate)
        self.add_optimizer("optimizer", optimizer)
        self.add_scheduler("scheduler", optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=cfg.lr_gamma))
        self.data_loader = MnistDataLoader(data_folder=cfg.data_folder, data_mode=cfg.data_mode,
                                           batch_size=cfg.batch_size, test_batch_size=cfg.test_batch_size,
                                           device=self.device)

    def train_step(self, batch):
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def validate_step(self, batch):
        images, labels = batch
        return classification_metrics(self.model(images), labels)
