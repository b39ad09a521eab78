"""MNIST through torchvision's reader, held as one uint8 tensor and batched by index."""
from pathlib import Path

import torch
from torchvision.datasets import MNIST

from utils.data import TensorBatchLoader
from utils.errors import ConfigError, DataError
from utils.files import quiet_output

MEAN, STD = 0.1307, 0.3081
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATA_MODES = ("download", "local")   # "local": the raw files must be in <data_folder>/MNIST/raw already


def load_split(data_folder: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split, read from
    <data_folder>/MNIST/raw/ (the layout torchvision uses), downloaded there first if asked."""
    raw = Path(data_folder) / "MNIST" / "raw"
    try:
        with quiet_output():   # torchvision prints each mirror it tries
            dataset = MNIST(data_folder, train=train, download=download)
    except RuntimeError as e:
        fix = ("the download failed (no network?); put them there by hand" if download
               else "put them there, or set \"data_mode\": \"download\" to fetch them")
        raise DataError(f"MNIST files not found in '{raw}' ({str(e).splitlines()[0].rstrip(':')}); "
                        f"{fix}: {', '.join(RAW_FILES)} (uncompressed IDX files)") from None
    return dataset.data, dataset.targets


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float, standardised with MNIST's mean and std."""
    return images.unsqueeze(1).float().div_(255.0).sub_(MEAN).div_(STD)


class MnistDataLoader:
    """train_loader: the 60,000 training digits, shuffled each epoch; valid_loader and test_loader:
    the 10,000 test digits, as pytorch/examples validates MNIST. All images live on `device`."""

    def __init__(self, *, data_folder: str, data_mode: str, batch_size: int, test_batch_size: int,
                 device: torch.device):
        if data_mode not in DATA_MODES:
            raise ConfigError(f"data_mode '{data_mode}' is not one of {', '.join(DATA_MODES)}")
        download = data_mode == "download"
        train_images, train_labels = load_split(data_folder, train=True, download=download)
        test_images, test_labels = load_split(data_folder, train=False, download=download)
        self.train_loader = TensorBatchLoader(train_images.to(device), train_labels.to(device),
                                              batch_size, shuffle=True, transform=normalize)
        self.valid_loader = TensorBatchLoader(test_images.to(device), test_labels.to(device),
                                              test_batch_size, transform=normalize)
        self.test_loader = self.valid_loader


def _write_idx(path: Path, array: torch.Tensor):
    """IDX format: 0x00 0x00, a type byte (0x08: unsigned byte), the number of dimensions, each
    dimension as a big-endian int32, then the raw bytes."""
    array = array.to(torch.uint8).contiguous()
    header = bytes([0, 0, 0x08, array.dim()])
    header += b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    path.write_bytes(header + array.numpy().tobytes())


def write_raw_split(data_folder: str, train: bool, images: torch.Tensor, labels: torch.Tensor):
    """Write images (N, 28, 28) uint8 and labels (N,) where torchvision's MNIST reads them:
    <data_folder>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte."""
    raw = Path(data_folder) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prefix = "train" if train else "t10k"
    _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
    _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
