"""CIFAR-10 held as one uint8 tensor per split on the device, batched by index, with the standard
augmentation (4-pixel padded random crop, horizontal flip) done on whole batches there."""
import builtins
import codecs
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.data import TensorBatchLoader
from utils.errors import ConfigError, DataError
from utils.files import atomic_write, quiet_output

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PADDING = 4
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATA_MODES = ("download", "local", "numpy")

BATCHES_FOLDER = "cifar-10-batches-py"      # what cifar-10-python.tar.gz extracts to
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
NUMPY_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")


def download_split(data_folder: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) through torchvision, which fetches and
    extracts the archive into <data_folder>/cifar-10-batches-py/ unless its checksums match there."""
    from torchvision.datasets import CIFAR10  # only this mode needs torchvision

    try:
        with quiet_output():   # torchvision prints the download and extraction
            dataset = CIFAR10(data_folder, train=train, download=True)
    except (OSError, RuntimeError) as e:  # URLError (no network) is an OSError; a bad archive, a RuntimeError
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"could not download CIFAR-10 into '{data_folder}' ({reason}); "
                        f"fetch {ARCHIVE_URL} by hand, extract it there (giving "
                        f"{Path(data_folder) / BATCHES_FOLDER}/data_batch_1..5 and test_batch) "
                        f"and set \"data_mode\": \"local\"") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return images, torch.tensor(dataset.targets, dtype=torch.int64)


def _numpy_array_builders() -> dict:
    """What pickles of numpy arrays ask for, whatever numpy wrote them (numpy.core in 1.x,
    numpy._core in 2.x): the functions numpy's own ndarray.__reduce_ex__ names, taken from numpy
    itself so that no module is imported by a name read from the file."""
    reconstruct = np.zeros(1).__reduce__()[0]            # protocols 0-4: _reconstruct + setstate
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]         # protocol 5: _frombuffer(buffer, dtype, ...)
    builders = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        builders[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        builders[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return builders


class BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, strings, numbers and numpy arrays.
    A pickle names the callables it runs while loading; a crafted data_batch_1 asking for
    os.system or builtins.exec is refused before anything of it runs."""

    ALLOWED = {**{("builtins", name): getattr(builtins, name)
                  for name in ("dict", "list", "str", "bytes", "int", "float")},
               ("_codecs", "encode"): codecs.encode,   # bytes as Python 3 writes them at protocol <= 2
               **_numpy_array_builders()}

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")   # the official batches are Python 2 pickles
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"'{self.path}' is not a CIFAR-10 python batch (it asks to load "
                            f"{module}.{name}, which a batch of images never does); replace it with "
                            f"the file from {ARCHIVE_URL}") from None


def _read_batch(path: Path) -> tuple[np.ndarray, list]:
    """One pickled batch: {"data": (N, 3072) uint8, "labels": N ints}. The official files are
    Python 2 pickles (str keys under latin1); ones written by Python 3 may have bytes keys."""
    try:
        with open(path, "rb") as f:
            entry = BatchUnpickler(f, path).load()
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data, labels = np.asarray(entry["data"], dtype=np.uint8), list(entry["labels"])
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from None
    except Exception as e:  # a damaged pickle fails in whichever opcode it breaks
        raise DataError(f"'{path}' is not a CIFAR-10 python batch ({type(e).__name__}: {e}); "
                        f"expected a pickled dict with 'data' (N, 3072) uint8 and 'labels'") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"'{path}' holds data of shape {data.shape} and {len(labels)} labels; "
                        f"expected (N, 3072) and N labels")
    return data, labels


def read_local_split(data_folder: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from the pickled batches in
    <data_folder>/cifar-10-batches-py/, without torchvision's md5 check, so that re-packed copies
    and small fixtures load too."""
    folder = Path(data_folder) / BATCHES_FOLDER
    names = TRAIN_BATCHES if train else (TEST_BATCH,)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 files missing in '{folder}': {', '.join(missing)}; put the python "
                        f"batches there ({', '.join(TRAIN_BATCHES + (TEST_BATCH,))}, as {ARCHIVE_URL} "
                        f"extracts them), or set \"data_mode\": \"download\" to fetch them")
    batches = [_read_batch(folder / name) for name in names]
    data = np.concatenate([data for data, _ in batches])            # (N, 3072): R plane, G, B; rows
    labels = [label for _, batch_labels in batches for label in batch_labels]
    return torch.from_numpy(data).view(-1, 3, 32, 32), _checked_labels(torch.tensor(labels), folder)


def read_numpy_split(data_folder: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from <data_folder>/{x,y}_{train,test}.npy;
    images are stored (N, 32, 32, 3) as CIFAR's arrays are usually handed around, or (N, 3, 32, 32)."""
    folder = Path(data_folder)
    missing = [name for name in NUMPY_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 numpy files missing in '{folder}': {', '.join(missing)}; save them "
                        f"with numpy.save: x_train.npy and x_test.npy images (N, 32, 32, 3) uint8, "
                        f"y_train.npy and y_test.npy labels (N,) integers 0-9")
    split = "train" if train else "test"
    x_path, y_path = folder / f"x_{split}.npy", folder / f"y_{split}.npy"
    try:
        # allow_pickle=False: an .npy of objects would unpickle (run) whatever it names
        images, labels = np.load(x_path, allow_pickle=False), np.load(y_path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise DataError(f"could not read '{x_path}' or '{y_path}' ({e}); save plain arrays with numpy.save") from None
    for path, array in ((x_path, images), (y_path, labels)):
        if not isinstance(array, np.ndarray):   # an .npz archive loads as a dict of arrays
            raise DataError(f"'{path}' is an .npz archive, not one array; save it with numpy.save")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] not in ((32, 32, 3), (3, 32, 32)):
        raise DataError(f"'{x_path}' holds {images.dtype} images of shape {images.shape}; expected "
                        f"uint8 (N, 32, 32, 3) or (N, 3, 32, 32)")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"'{y_path}' holds {labels.dtype} labels of shape {labels.shape}; expected "
                        f"({len(images)},) integers")
    images = torch.from_numpy(images)
    if images.shape[1:] == (32, 32, 3):
        images = images.permute(0, 3, 1, 2)                          # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return images.contiguous(), _checked_labels(torch.from_numpy(labels).long(), y_path)


def _checked_labels(labels: torch.Tensor, where) -> torch.Tensor:
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"labels in '{where}' range {labels.min()}..{labels.max()}; CIFAR-10 has 0..9")
    return labels.long()


@lru_cache(maxsize=None)
def _channel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors, made once per device: building them every batch
    would copy from the host, which on CUDA waits for the GPU."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(STD, device=device).view(1, 3, 1, 1))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) uint8 -> (B, 3, 32, 32) float, standardised per channel."""
    mean, std = _channel_stats(images.device)
    return images.float().div_(255.0).sub_(mean).div_(std)


def crop_and_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
                  padding: int = PADDING) -> torch.Tensor:
    """Crop each image of (B, C, H, W) at its own (top[b], left[b]) of the image zero-padded by
    `padding` on every side, mirrored along the width where flip[b]: one gather, no loop over
    images (twice as fast on CPU as indexing an unfold view and flipping with torch.where)."""
    B, C, H, W = images.shape
    padded = F.pad(images, (padding,) * 4).flatten(2)                  # (B, C, (H+2p)*(W+2p))
    padded_width = W + 2 * padding
    rows = top[:, None] + torch.arange(H, device=images.device)       # (B, H)
    columns = torch.arange(W, device=images.device)                    # (W,)
    columns = left[:, None] + torch.where(flip[:, None], W - 1 - columns, columns)  # (B, W)
    index = rows[:, :, None] * padded_width + columns[:, None, :]      # (B, H, W), flat padded positions
    index = index.view(B, 1, H * W).expand(B, C, H * W)                # same pixels in every channel
    return padded.gather(2, index).view(B, C, H, W)


def random_crop_and_flip(images: torch.Tensor, padding: int = PADDING) -> torch.Tensor:
    """RandomCrop(32, padding=4) and RandomHorizontalFlip() for every image of (B, C, H, W), with
    offsets and flips drawn from torch's global generator of the images' device (seeded by
    torch.manual_seed and saved in checkpoints), so runs and resumes reproduce them."""
    B = len(images)
    top, left = torch.randint(0, 2 * padding + 1, (2, B), device=images.device)  # (B,), (B,)
    flip = torch.rand(B, device=images.device) < 0.5                             # (B,)
    return crop_and_flip(images, top, left, flip, padding)


def train_transform(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) uint8 -> augmented, normalised (B, 3, 32, 32) float."""
    return normalize(random_crop_and_flip(batch))


def test_transform(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) uint8 -> normalised (B, 3, 32, 32) float."""
    return normalize(batch)


test_transform.__test__ = False   # a transform, not a test, when pytest imports it by name


class Cifar10DataLoader:
    """train_loader: the 50,000 training images, shuffled and augmented each epoch; valid_loader
    and test_loader: the 10,000 test images, as the CondenseNet paper validates. All images live on
    `device` as uint8 and every batch is built there.

    data_mode: "download" (torchvision fetches into data_folder), "local" (the extracted python
    batches in <data_folder>/cifar-10-batches-py/, checksums not checked) or "numpy"
    (<data_folder>/{x,y}_{train,test}.npy)."""

    def __init__(self, *, data_folder: str, data_mode: str, batch_size: int, test_batch_size: int,
                 device: torch.device):
        if data_mode not in DATA_MODES:
            raise ConfigError(f"data_mode '{data_mode}' is not one of {', '.join(DATA_MODES)}")
        read = {"download": download_split, "local": read_local_split, "numpy": read_numpy_split}[data_mode]
        train_images, train_labels = read(data_folder, train=True)
        test_images, test_labels = read(data_folder, train=False)
        self.train_loader = TensorBatchLoader(train_images.to(device), train_labels.to(device),
                                              batch_size, shuffle=True, transform=train_transform)
        self.valid_loader = TensorBatchLoader(test_images.to(device), test_labels.to(device),
                                              test_batch_size, transform=test_transform)
        self.test_loader = self.valid_loader


def write_cifar10_batches(data_folder: str, train_images: torch.Tensor, train_labels: torch.Tensor,
                          test_images: torch.Tensor, test_labels: torch.Tensor):
    """Write images (N, 3, 32, 32) uint8 and labels (N,) in the layout of the official archive:
    <data_folder>/cifar-10-batches-py/{data_batch_1..5 (the training set in 5 parts), test_batch,
    batches.meta}, each a pickled dict; "data" rows are the 1024 red, 1024 green, 1024 blue bytes."""
    folder = Path(data_folder) / BATCHES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, batch_label: str, images: torch.Tensor, labels: torch.Tensor):
        entry = {"batch_label": batch_label,
                 "data": images.to(torch.uint8).reshape(len(images), 3 * 32 * 32).numpy(),  # (N, 3072)
                 "labels": [int(label) for label in labels]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)

    for i, (images, labels) in enumerate(zip(train_images.tensor_split(5), train_labels.tensor_split(5)), 1):
        dump(f"data_batch_{i}", f"training batch {i} of 5", images, labels)
    dump(TEST_BATCH, "testing batch 1 of 1", test_images, test_labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CLASSES), "num_cases_per_batch": len(test_images),
                     "num_vis": 3 * 32 * 32}, f)


def write_cifar10_numpy(data_folder: str, train_images: torch.Tensor, train_labels: torch.Tensor,
                        test_images: torch.Tensor, test_labels: torch.Tensor):
    """Write images (N, 3, 32, 32) uint8 and labels (N,) for the numpy mode:
    <data_folder>/x_{train,test}.npy (N, 32, 32, 3) uint8 and y_{train,test}.npy (N,) int64."""
    folder = Path(data_folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        with atomic_write(folder / f"x_{split}.npy") as f:
            np.save(f, images.to(torch.uint8).permute(0, 2, 3, 1).numpy())
        with atomic_write(folder / f"y_{split}.npy") as f:
            np.save(f, labels.to(torch.int64).numpy())
