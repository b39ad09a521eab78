"""MNIST from its raw IDX files (torchvision downloads them), held as one uint8 tensor and batched
by index."""
import math
from pathlib import Path

import torch
from torchvision.datasets import MNIST

from utils.data import TensorBatchLoader
from utils.errors import ConfigError, DataError
from utils.files import quiet_output

MEAN, STD = 0.1307, 0.3081
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NUM_CLASSES = 10
DATA_MODES = ("download", "local")   # "local": the raw files must be in <data_folder>/MNIST/raw already


def _download(data_folder: str, raw: Path):
    """torchvision fetches the four raw files into `raw` (it tries each of its mirrors)."""
    try:
        with quiet_output():   # torchvision prints each mirror it tries
            MNIST(data_folder, train=True, download=True)
    except (OSError, RuntimeError) as e:  # URLError (no network) is an OSError; no mirror worked, a RuntimeError
        reason = (str(e).splitlines() or [type(e).__name__])[0].rstrip(":")
        raise DataError(f"could not download MNIST into '{raw}' ({reason}); put the files there by "
                        f"hand: {', '.join(RAW_FILES)} (uncompressed IDX files), and set "
                        f"\"data_mode\": \"local\"") from None


def read_idx(path: Path, dims: int) -> torch.Tensor:
    """An IDX file of unsigned bytes with `dims` dimensions, as MNIST's are: 0x00 0x00 0x08 dims,
    each size as a big-endian int32, then the bytes. Every way the file can be wrong is a DataError
    that names it (torchvision's reader fails on them with bare asserts and IndexErrors)."""
    data = path.read_bytes()
    header = 4 + 4 * dims
    expected = bytes([0, 0, 0x08, dims])
    fix = "replace it with the uncompressed file from the MNIST site, or delete it and use \"data_mode\": \"download\""
    if not data:
        raise DataError(f"'{path}' is empty (0 bytes); {fix}")
    if len(data) < header and expected.startswith(data[:4]):
        raise DataError(f"'{path}' is truncated ({len(data)} bytes, shorter than its header); {fix}")
    if data[:4] != expected:
        kind = "gzip-compressed: gunzip it" if data[:2] == b"\x1f\x8b" else f"its magic number is {data[:4].hex()}"
        raise DataError(f"'{path}' is not an MNIST IDX file of {dims}-dimensional unsigned bytes "
                        f"(magic number {expected.hex()}; {kind}); {fix}")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    size = math.prod(shape)
    if len(data) - header != size:
        state = "truncated" if len(data) - header < size else "longer than its header says"
        raise DataError(f"'{path}' is {state}: its header says {' x '.join(map(str, shape))} = {size:,} "
                        f"bytes, it holds {len(data) - header:,}; {fix}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*shape)


def load_split(data_folder: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, H, W), labels int64 (N,)) of one split, read from <data_folder>/MNIST/raw/
    (the layout torchvision uses), downloaded there first if asked and not there yet. Files that
    are there are read as they are, never downloaded over."""
    raw = Path(data_folder) / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    images_path, labels_path = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    if download and not (images_path.is_file() and labels_path.is_file()):
        _download(data_folder, raw)
    missing = [path.name for path in (images_path, labels_path) if not path.is_file()]
    if missing:
        raise DataError(f"MNIST files not found in '{raw}' (missing {', '.join(missing)}); put them there, "
                        f"or set \"data_mode\": \"download\" to fetch them: {', '.join(RAW_FILES)} "
                        "(uncompressed IDX files)")
    try:
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    except OSError as e:
        raise DataError(f"cannot read MNIST file '{e.filename}': {e.strerror}") from None
    if len(images) != len(labels):
        raise DataError(f"'{images_path}' holds {len(images):,} images but '{labels_path}' {len(labels):,} "
                        "labels; the two files must come from the same split")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise DataError(f"'{labels_path}' has a label {labels.max()}; MNIST's labels are 0..{NUM_CLASSES - 1}")
    return images, labels.long()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float, standardised with MNIST's mean and std."""
    return images.unsqueeze(1).float().div_(255.0).sub_(MEAN).div_(STD)


class MnistDataLoader:
    """valid_loader: `valid_size` of the 60,000 training digits, drawn with a generator of its own
    seeded by `split_seed` (the same digits whatever the training seed); train_loader: the rest,
    shuffled each epoch; test_loader: the 10,000 test digits. valid_size 0 trains on all 60,000
    and validates on the test digits, as pytorch/examples does. All images live on `device`;
    valid_indices holds the held-out digits' positions in the training file."""

    def __init__(self, *, data_folder: str, data_mode: str, batch_size: int, test_batch_size: int,
                 valid_size: int, split_seed: int, device: torch.device):
        if data_mode not in DATA_MODES:
            raise ConfigError(f"data_mode '{data_mode}' is not one of {', '.join(DATA_MODES)}")
        download = data_mode == "download"
        train_images, train_labels = load_split(data_folder, train=True, download=download)
        test_images, test_labels = load_split(data_folder, train=False, download=download)
        for split, images in (("train", train_images), ("t10k", test_images)):
            if images.shape[1:] != (28, 28):
                raise DataError(f"the {split} images in '{Path(data_folder) / 'MNIST' / 'raw'}' are "
                                f"{images.shape[1]} x {images.shape[2]} pixels; MNIST's are 28 x 28")
        if valid_size >= len(train_images):
            raise ConfigError(f"valid_size {valid_size} is not smaller than the {len(train_images):,} training "
                              f"images in '{Path(data_folder) / 'MNIST' / 'raw'}'; hold out fewer, or set "
                              "valid_size 0 to validate on the test split")
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(split_seed))
        self.valid_indices = order[:valid_size]
        train = order[valid_size:].sort().values   # in file order: valid_size 0 trains on the file as it is
        self.test_loader = TensorBatchLoader(test_images.to(device), test_labels.to(device),
                                             test_batch_size, transform=normalize)
        if valid_size:
            self.valid_loader = TensorBatchLoader(train_images[self.valid_indices].to(device),
                                                  train_labels[self.valid_indices].to(device),
                                                  test_batch_size, transform=normalize)
        else:
            self.valid_loader = self.test_loader
        self.train_loader = TensorBatchLoader(train_images[train].to(device), train_labels[train].to(device),
                                              batch_size, shuffle=True, transform=normalize)


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
