"""Using a trained model on new inputs: the files a `predict_input` names, the transforms that turn
an image file or a CSV row into what the model was trained on, and the predictions.csv that
mode=predict writes. Knows no agent and no data set: the agents pass their statistics in (from
the "inference" entry of their checkpoints)."""
import csv
import glob
import io
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.data import open_image
from utils.errors import DataError
from utils.files import atomic_write

# What PIL reads and torchvision's ImageFolder takes, compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
MODES = {1: "L", 3: "RGB"}     # channels -> the PIL mode an image is converted to
PREDICT_BATCH = 256            # inputs per forward pass
TABLE_ROWS = 10                # rows of the table printed after predicting; predictions.csv has all


def _image_functions():
    """torchvision.transforms.v2.functional, imported where images are converted: importing
    torchvision costs 1.6 s, which an agent of rows (Iris) does not pay."""
    from torchvision.transforms.v2 import functional

    return functional


def input_files(pattern: str, extensions: tuple, what: str) -> list[Path]:
    """The files predict_input names: that file; every `extensions` file under that folder, at any
    depth (hidden ones skipped); or every file the glob matches ("**" for any depth). Sorted."""
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"predict_input: no {what} in '{path}' (looked for {', '.join(extensions)} files at "
                            "any depth)")
        return files
    if any(char in pattern for char in "*?["):
        files = sorted({Path(match) for match in glob.glob(pattern, recursive=True) if Path(match).is_file()})
        if not files:
            raise DataError(f"predict_input: the pattern '{pattern}' matches no file")
        return files
    raise DataError(f"predict_input: '{pattern}' does not exist; give a file, a folder or a glob "
                    "(quoted: --set 'predict_input=images/*.png')")


def read_image(path: Path, mode: str):
    """The image file decoded whole and converted to `mode` ("L" or "RGB"), as the training images
    were: a palette, grayscale, RGBA or 16-bit image is converted, a file that is not an image is a
    DataError naming it."""
    try:
        with open_image(path) as image:
            if image.mode == "I" or image.mode.startswith("I;16"):
                # 16-bit grayscale: its top 8 bits (PIL's convert would clip every value above 255)
                image = Image.fromarray((np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8))
            return image.convert(mode)
    except OSError as e:        # UnidentifiedImageError, a truncated file
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise DataError(f"predict_input: '{path}' is not an image that can be read ({reason}); give "
                        f"image files ({', '.join(IMAGE_EXTENSIONS)})") from None
    except ValueError as e:     # a mode PIL has no conversion for
        raise DataError(f"predict_input: '{path}' cannot be converted to {mode} ({e}); save it as an 8-bit "
                        "grayscale or RGB image") from None


def image_inference(channels: int, size, class_names, mean=None, std=None) -> dict:
    """The "inference" entry of an image classifier's checkpoints: what turns an image file into its
    input (channels, (height, width), per-channel mean and std after scaling to [0, 1], or none)."""
    return {"input": "image", "channels": channels, "size": [int(side) for side in size],
            "mean": None if mean is None else [float(m) for m in mean],
            "std": None if std is None else [float(s) for s in std],
            "class_names": [str(name) for name in class_names]}


class ImageTransform:
    """Images -> the (N, C, H, W) float batch a classifier trained on `size` images takes, on
    `device`: each image (a path or a PIL image) converted to "L" (1 channel) or "RGB" (3), resized
    to size (antialiased, whatever its own size and aspect), scaled to [0, 1] and normalised with
    mean and std when the training images were."""

    def __init__(self, channels: int, size, mean=None, std=None, device="cpu", class_names=()):
        if channels not in MODES:
            raise ValueError(f"images are read with 1 or 3 channels, not {channels}")
        self.channels, self.size, self.mode = channels, [int(side) for side in size], MODES[channels]
        self.mean, self.std = mean, std
        self.device = torch.device(device)
        self.class_names = list(class_names)

    def __call__(self, images) -> torch.Tensor:
        images = images if isinstance(images, (list, tuple)) else [images]
        return torch.stack([self.tensor(image) for image in images]).to(self.device)

    def tensor(self, image) -> torch.Tensor:
        """One image -> (C, H, W) float on the CPU."""
        if isinstance(image, (str, Path)):
            image = read_image(Path(image), self.mode)
        elif image.mode != self.mode:
            image = image.convert(self.mode)
        TF = _image_functions()
        pixels = TF.pil_to_tensor(image)                                  # (C, h, w) uint8
        if list(pixels.shape[-2:]) != self.size:
            pixels = TF.resize(pixels, self.size, antialias=True)
        return self.normalize(pixels.float().div_(255.0))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.mean is None else _image_functions().normalize(images, self.mean, self.std)

    def random_batch(self, count: int) -> torch.Tensor:
        """(count, C, H, W) of uniform random pixels through the normalisation: an input of the
        right shape and range (for export), drawn with a generator of its own."""
        pixels = torch.rand(count, self.channels, *self.size, generator=torch.Generator().manual_seed(0))
        return self.normalize(pixels).to(self.device)


class SegmentationTransform:
    """An image (a path or a PIL image) -> (1, 3, h', w') on `device`, as a segmentation network
    was validated: RGB, resized so that its shorter side is img_size (antialiased), scaled to [0, 1],
    normalised, zero-padded (the mean colour, once normalised) at the bottom and right to multiples
    of `multiple`. to_image_size(logits, image) crops and resizes the logits back to the image."""

    def __init__(self, img_size: int, mean, std, multiple: int = 8, device="cpu", class_names=()):
        self.img_size, self.mean, self.std, self.multiple = img_size, mean, std, multiple
        self.device = torch.device(device)
        self.class_names = list(class_names)

    def __call__(self, image) -> torch.Tensor:
        resized = self.resized(self.rgb(image))
        h, w = resized.shape[-2:]
        padded = F.pad(resized, (0, -w % self.multiple, 0, -h % self.multiple))
        return padded.unsqueeze(0).to(self.device)

    @staticmethod
    def rgb(image):
        return read_image(Path(image), "RGB") if isinstance(image, (str, Path)) else image.convert("RGB")

    def resized(self, image) -> torch.Tensor:
        """(3, h, w) normalised, the shorter side img_size."""
        TF = _image_functions()
        pixels = TF.resize(TF.pil_to_tensor(image), self.img_size, antialias=True)
        return self.normalize(pixels.float().div_(255.0))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> standardised per channel."""
        return _image_functions().normalize(images, self.mean, self.std)

    def to_image_size(self, logits: torch.Tensor, image) -> torch.Tensor:
        """(1, C, h', w') logits of __call__(image) -> (1, C, H, W) at the image's own size."""
        image = self.rgb(image) if isinstance(image, (str, Path)) else image
        width, height = image.size
        # As torchvision's resize sizes it: the shorter side img_size, the longer one truncated.
        longer = int(self.img_size * max(width, height) / min(width, height))
        h, w = (self.img_size, longer) if height <= width else (longer, self.img_size)
        return F.interpolate(logits[:, :, :h, :w].float(), size=(height, width), mode="bilinear", align_corners=False)


class FeatureTransform:
    """Rows of measurements (a list of lists, an array, a tensor) -> (N, features) float on
    `device`, standardised with the training split's mean and std."""

    def __init__(self, feature_names, mean, std, device="cpu", class_names=()):
        self.feature_names = list(feature_names)
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.device = torch.device(device)
        self.class_names = list(class_names)

    def __call__(self, rows) -> torch.Tensor:
        features = torch.as_tensor(rows, dtype=torch.float32).reshape(-1, len(self.feature_names))
        return ((features - self.mean) / self.std).to(self.device)

    def random_batch(self, count: int) -> torch.Tensor:
        """(count, features) standard normal: standardised features' range (for export)."""
        return torch.randn(count, len(self.feature_names), generator=torch.Generator().manual_seed(0)).to(self.device)


def read_feature_rows(path: Path, feature_names: list) -> list[tuple[int, list[float]]]:
    """(line number, values) of every row of a CSV file of len(feature_names) numbers each, in that
    order; a first row that is not numbers is a header and skipped. Anything else is a DataError
    naming the line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"predict_input: cannot read '{path}' as a CSV text file ({e})") from None
    expected = f"{len(feature_names)} numbers a row ({', '.join(feature_names)})"
    rows = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(feature_names):
            raise DataError(f"predict_input: '{path}' line {number} has {len(row)} values; expected {expected}")
        try:
            values = [float(cell) for cell in row]
        except ValueError:
            if number == 1:
                continue     # a header
            raise DataError(f"predict_input: '{path}' line {number} is not numbers ({','.join(row)}); "
                            f"expected {expected}") from None
        if not all(math.isfinite(value) for value in values):
            raise DataError(f"predict_input: '{path}' line {number} has a value that is not finite")
        rows.append((number, values))
    if not rows:
        raise DataError(f"predict_input: '{path}' has no rows of data; expected {expected}")
    return rows


@torch.no_grad()
def class_probabilities(model: torch.nn.Module, inputs: torch.Tensor, device) -> torch.Tensor:
    """(N, classes) softmax of the model's logits, PREDICT_BATCH inputs at a time, on the CPU."""
    model.eval()
    parts = [model(batch.to(device)).float().softmax(dim=1).cpu() for batch in inputs.split(PREDICT_BATCH)]
    return torch.cat(parts)


def output_names(files: list) -> list[str]:
    """Where each input's own outputs go, unique: its path below the inputs' common folder, without
    its suffix ("a/001.png", "b/001.png" -> "a/001", "b/001")."""
    common = Path(os.path.commonpath([str(file.resolve().parent) for file in files]))
    return [file.resolve().relative_to(common).with_suffix("").as_posix() for file in files]


def write_csv(path: Path, header: list, rows: list):
    """A CSV file written atomically (its folder made first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_predictions(path: Path, names: list, probabilities: torch.Tensor, class_names: list) -> dict:
    """predictions.csv: one row per input (its name, the predicted class, the probability of every
    class). Returns the results.json entry: the file and the count per class."""
    predicted = probabilities.argmax(dim=1).tolist()
    write_csv(path, ["input", "prediction", *class_names],
              [[name, class_names[index], *(f"{p:.6f}" for p in row)]
               for name, index, row in zip(names, predicted, probabilities.tolist())])
    counts = {name: predicted.count(i) for i, name in enumerate(class_names) if i in predicted}
    return {"inputs": len(names), "predictions": str(path), "counts": counts}


def prediction_table(names: list, probabilities: torch.Tensor, class_names: list) -> str:
    """The first TABLE_ROWS predictions as an aligned table: input, class, its probability."""
    confidence, predicted = probabilities.max(dim=1)
    shown = list(zip(names, predicted.tolist(), confidence.tolist()))[:TABLE_ROWS]
    width = max(len(str(name)) for name, _, _ in shown)
    lines = [f"  {str(name):<{width}}  {class_names[index]:<12} {p:6.1%}" for name, index, p in shown]
    if len(names) > TABLE_ROWS:
        lines.append(f"  ... and {len(names) - TABLE_ROWS:,} more")
    return "\n".join(lines)
