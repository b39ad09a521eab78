"""Fisher's Iris data set (150 flowers, 4 measurements, 3 species), bundled with scikit-learn, so
it needs no download."""
import torch

from utils.data import TensorBatchLoader
from utils.errors import ConfigError

CLASS_NAMES = ("setosa", "versicolor", "virginica")
FEATURE_NAMES = ("sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)")


def load_iris_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (150, 4), labels int64 (150,))."""
    from sklearn.datasets import load_iris

    data = load_iris()
    return torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target, dtype=torch.int64)


def stratified_split(labels: torch.Tensor, valid_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, valid indices): the same fraction of every class held out, drawn with its
    own generator so the split does not depend on (or disturb) the training seed's stream."""
    generator = torch.Generator().manual_seed(seed)
    train, valid = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(len(members) * valid_fraction)
        valid.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train), torch.cat(valid)


class IrisDataLoader:
    """train_loader / valid_loader over a stratified split; features standardised with the
    training split's mean and standard deviation."""

    def __init__(self, *, batch_size: int, valid_fraction: float, split_seed: int, device: torch.device):
        features, labels = load_iris_tensors()
        train, valid = stratified_split(labels, valid_fraction, split_seed)
        if len(valid) == 0 or len(train) < 2:   # the standard deviation needs two training flowers
            raise ConfigError(f"valid_fraction {valid_fraction} leaves {len(train)} training and {len(valid)} "
                              f"validation flowers of {len(labels)}; use a fraction like 0.2")
        mean, std = features[train].mean(0), features[train].std(0)
        features = (features - mean) / std
        self.mean, self.std = mean, std      # what new measurements are standardised with (predict)
        self.num_features, self.num_classes = features.shape[1], len(CLASS_NAMES)
        self.train_loader = TensorBatchLoader(features[train].to(device), labels[train].to(device),
                                              batch_size, shuffle=True)
        self.valid_loader = TensorBatchLoader(features[valid].to(device), labels[valid].to(device),
                                              len(valid))
