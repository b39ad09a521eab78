"""MNIST classification. The defaults (configs/mnist_exp_0.json): a small batch-normalised net, SGD
with a one-cycle learning rate, 3 epochs. configs/mnist_exp_1.json: pytorch/examples' recipe
(its network, Adadelta lr 1.0 x 0.7 per epoch, 14 epochs)."""
import torch
import torch.nn.functional as F
from torch import optim

from agents.base import SupervisedAgent
from agents.trained import ClassifiesImages
from datasets.mnist import DATA_MODES, MEAN, NUM_CLASSES, STD, MnistDataLoader
from graphs.models.mnist import NETWORKS
from utils.config import Key
from utils.metrics import classification_metrics
from utils.predict import image_inference

# What of a OneCycleLR's state depends on the number of iterations it was planned over.
CYCLE_PLAN = ("total_steps", "_schedule_phases")


class MnistAgent(ClassifiesImages, SupervisedAgent):
    DEFAULTS = {
        "network": Key("fast", choices=tuple(NETWORKS)),   # "examples": pytorch/examples' MnistNet
        "max_epoch": 3,
        "optimizer": Key("sgd", choices=("adadelta", "sgd", "adam")),
        "learning_rate": Key(0.2, minimum=0),            # onecycle: the peak; step: the start
        "momentum": Key(0.9, minimum=0, maximum=1),      # sgd only
        # onecycle: warm up to learning_rate over the first 30% of the iterations, then anneal to
        # ~0, stepped every iteration; step: learning rate x lr_gamma after every epoch
        "schedule": Key("onecycle", choices=("onecycle", "step")),
        "lr_gamma": Key(0.7, minimum=0),                 # step only
        # digits of the training split held out to validate on (picking model_best); 0: validate
        # on the test split, as pytorch/examples does. split_seed fixes which, whatever `seed` is.
        "valid_size": Key(5000, minimum=0),
        "split_seed": Key(0, minimum=0, maximum=2**32 - 1),
        "data_folder": "data/mnist",
        "data_mode": Key("download", choices=DATA_MODES),
        "monitor": "val/accuracy",
        "monitor_mode": "max",
    }
    metrics = ("loss", "accuracy")
    modes = ("train", "test", "predict", "export")

    @classmethod
    def networks(cls, config, inference):
        return {"model": NETWORKS[config.network]()}

    def inference_info(self):
        # 28 x 28 grayscale, white digits on black, standardised as datasets/mnist.py does
        return image_inference(1, (28, 28), range(NUM_CLASSES), (MEAN,), (STD,))

    def build(self):
        cfg = self.config
        self.data_loader = MnistDataLoader(data_folder=cfg.data_folder, data_mode=cfg.data_mode,
                                           batch_size=cfg.batch_size, test_batch_size=cfg.test_batch_size,
                                           valid_size=cfg.valid_size, split_seed=cfg.split_seed,
                                           device=self.device)
        self.model = self.add_model("model", self.networks(cfg, {})["model"])
        if cfg.optimizer == "sgd":
            optimizer = optim.SGD(self.model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
        elif cfg.optimizer == "adam":
            optimizer = optim.Adam(self.model.parameters(), lr=cfg.learning_rate)
        else:
            optimizer = optim.Adadelta(self.model.parameters(), lr=cfg.learning_rate)
        self.add_optimizer("optimizer", optimizer)
        if cfg.schedule == "onecycle":
            # The base shards the loaders after build(); this process's steps per epoch are needed now.
            self.data_loader.train_loader.shard(self.rank, self.world_size)
            self.add_scheduler("scheduler", self.one_cycle(optimizer, self.max_epoch * self.steps_per_epoch()),
                               interval="iteration")
        else:
            self.add_scheduler("scheduler", optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=cfg.lr_gamma))

    def one_cycle(self, optimizer, total_steps: int):
        """A one-cycle schedule over total_steps optimizer steps. The momentum stays the config's
        (cycle_momentum=False), and Adadelta, which has none, works too."""
        return optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.config.learning_rate, total_steps=total_steps,
                                             cycle_momentum=False)

    def train_step(self, batch):
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def validate_step(self, batch):
        images, labels = batch
        return classification_metrics(self.model(images), labels)

    def load_extra_state(self, state):
        """A one-cycle schedule is planned over the run's iterations. Resumed with another max_epoch,
        the iterations left differ from the plan's: it is planned again over the new total
        (stepping past its end fails)."""
        super().load_extra_state(state)
        scheduler = self.parts.schedulers["scheduler"][0]
        if self.config.schedule != "onecycle" or self.current_epoch >= self.max_epoch:
            return
        left = self.steps_left()
        total = self.current_iteration + left
        if total == scheduler.total_steps:
            return
        self.logger.warning(f"resumed at iteration {self.current_iteration:,} with {left:,} to go: the one-cycle "
                            f"learning rate, planned over {scheduler.total_steps:,} iterations, is planned again "
                            f"over {total:,}")
        # A throwaway optimizer: constructing a OneCycleLR sets its optimizer's learning rate.
        plan = self.one_cycle(optim.SGD([torch.zeros(1)], lr=self.config.learning_rate), total).state_dict()
        scheduler.load_state_dict({**scheduler.state_dict(), **{key: plan[key] for key in CYCLE_PLAN}})
