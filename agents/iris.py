"""Iris species from four measurements: the Cookiecutter baselines (linear, mlp, mlp_fixed) side by
side. experiments/baseline_experiments.sh trains all three."""
import torch.nn.functional as F
from torch import optim

from agents.base import SupervisedAgent
from datasets.iris import IrisDataLoader
from graphs.models.baselines import INITS, NETWORKS, build_baseline
from utils.config import Key
from utils.metrics import classification_metrics


class IrisAgent(SupervisedAgent):
    DEFAULTS = {
        "network": Key("mlp", choices=NETWORKS),
        "init": Key("default", choices=INITS),   # "default": PyTorch's; "xavier": Glorot uniform
        "hidden_size": Key(64, minimum=1),
        "learning_rate": Key(0.01, minimum=0),
        "weight_decay": Key(0.0, minimum=0),
        "batch_size": 16,
        "max_epoch": 100,
        "valid_fraction": Key(0.2, minimum=0, maximum=1),
        # the train/valid split; fixed while `seed` varies the training
        "split_seed": Key(0, minimum=0, maximum=2**32 - 1),
        "monitor": "val/accuracy",
        "monitor_mode": "max",
    }
    metrics = ("loss", "accuracy")

    def build(self):
        cfg = self.config
        self.data_loader = IrisDataLoader(batch_size=cfg.batch_size, valid_fraction=cfg.valid_fraction,
                                          split_seed=cfg.split_seed, device=self.device)
        network = build_baseline(cfg.network, self.data_loader.num_features, self.data_loader.num_classes,
                                 cfg.hidden_size, cfg.init)
        self.model = self.add_model("model", network)
        trainable = [p for p in network.parameters() if p.requires_grad]
        self.add_optimizer("optimizer", optim.Adam(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay))

    def train_step(self, batch):
        features, labels = batch
        return F.cross_entropy(self.model(features), labels)

    def validate_step(self, batch):
        features, labels = batch
        return classification_metrics(self.model(features), labels)
