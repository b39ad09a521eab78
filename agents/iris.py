"""Iris species from four measurements: the Cookiecutter baselines (linear, mlp, mlp_fixed) side by
side. experiments/baseline_experiments.sh trains all three."""
import torch.nn.functional as F
from torch import optim

from agents.base import SupervisedAgent
from datasets.iris import CLASS_NAMES, FEATURE_NAMES, IrisDataLoader
from graphs.models.baselines import INITS, NETWORKS, build_baseline
from utils.config import Key
from utils.export import ExportTarget
from utils.metrics import classification_metrics
from utils.predict import FeatureTransform, class_probabilities, input_files, read_feature_rows


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
    modes = ("train", "test", "predict", "export")

    @classmethod
    def networks(cls, config, inference):
        return {"model": build_baseline(config.network, len(inference["feature_names"]), len(inference["class_names"]),
                                        config.hidden_size, config.init)}

    def inference_info(self):
        # new measurements are standardised with the training split's statistics
        data = self.data_loader
        return {"input": "features", "feature_names": list(FEATURE_NAMES), "mean": data.mean.tolist(),
                "std": data.std.tolist(), "class_names": list(CLASS_NAMES)}

    @classmethod
    def input_transform(cls, inference, device="cpu"):
        return FeatureTransform(inference["feature_names"], inference["mean"], inference["std"], device,
                                inference["class_names"])

    def build(self):
        cfg = self.config
        self.data_loader = IrisDataLoader(batch_size=cfg.batch_size, valid_fraction=cfg.valid_fraction,
                                          split_seed=cfg.split_seed, device=self.device)
        network = self.networks(cfg, self.inference_info())["model"]
        self.model = self.add_model("model", network)
        trainable = [p for p in network.parameters() if p.requires_grad]
        self.add_optimizer("optimizer", optim.Adam(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay))

    def train_step(self, batch):
        features, labels = batch
        return F.cross_entropy(self.model(features), labels)

    def validate_step(self, batch):
        features, labels = batch
        return classification_metrics(self.model(features), labels)

    def predict(self):
        """The species of every row of the CSV files predict_input names (a row: sepal length, sepal
        width, petal length, petal width in cm; a header row may come first), into out/predictions.csv."""
        transform = self.input_transform(self.inference, self.device)
        names, rows = [], []
        for file in input_files(self.config.predict_input, (".csv",), "CSV files"):
            for line, values in read_feature_rows(file, transform.feature_names):
                names.append(f"{file}:{line}")
                rows.append(values)
        probabilities = class_probabilities(self.model, transform(rows), self.device)
        self.record_predictions(names, probabilities, transform.class_names, "flowers")

    def export_target(self):
        """The network on 2 rows of standardised measurements."""
        return ExportTarget(self.model, (self.input_transform(self.inference, self.device).random_batch(2),))
