"""Pascal VOC 2012 semantic segmentation (21 classes, border label 255), optionally with the SBD
augmented training set, through torchvision's VOCSegmentation and SBDataset.

Training samples: random scale, crop to img_size (padded with the mean colour and label 255 where
the scaled image is smaller), horizontal flip, on image and mask together (torchvision.transforms.v2:
masks resize with nearest neighbour). Validation samples: the image resized so that its shorter
side is img_size, and the mask at its original size, so that metrics follow the VOC protocol.
"""
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from utils.data import make_data_loader, open_image
from utils.errors import ConfigError, DataError
from utils.files import quiet_output

logger = logging.getLogger(__name__)

CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
           "tvmonitor")
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255          # object borders and "difficult" regions in the VOC masks
MEAN = (0.485, 0.456, 0.406)   # ImageNet statistics, as the authors' pretrained encoder expects
STD = (0.229, 0.224, 0.225)
MEAN_PIXEL = tuple(round(255 * m) for m in MEAN)   # fill of padded image pixels: 0 once normalised
DATA_MODES = ("download", "local")

VOC_ROOT = Path("VOCdevkit") / "VOC2012"         # under data_folder, as the archive extracts
VOC_URL = "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_ROOT = "SBD"                                  # under data_folder: img/ cls/ train.txt val.txt
SBD_URL = "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"


def voc_palette() -> list[int]:
    """The VOC colour map as 256 * [R, G, B]: the bits of the class index, three at a time, fill the
    colours' bits from the top (1 -> (128, 0, 0), 15 -> (192, 128, 128), 255 -> (224, 224, 192))."""
    colours = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for bit in range(7, -1, -1):
            red |= (code & 1) << bit
            green |= ((code >> 1) & 1) << bit
            blue |= ((code >> 2) & 1) << bit
            code >>= 3
        colours += [red, green, blue]
    return colours


PALETTE = torch.tensor(voc_palette(), dtype=torch.uint8).view(256, 3)


def colorize(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) class indices -> (3, H, W) float RGB in [0, 1], in the VOC colours."""
    palette = PALETTE.to(mask.device)
    return palette[mask.long().clamp(0, 255)].permute(2, 0, 1).float() / 255


def save_mask(mask: torch.Tensor, path: Path):
    """(H, W) class indices -> a palette ("P") PNG, as VOC stores its masks."""
    image = Image.fromarray(mask.to(torch.uint8).cpu().numpy())    # "L"
    image.putpalette(voc_palette())                                # -> "P"
    image.save(path)


def read_mask(path: str | Path) -> np.ndarray:
    """(H, W) uint8 class indices from a VOC palette PNG or an SBD .mat file (GTcls.Segmentation)."""
    path = Path(path)
    try:
        if path.suffix == ".mat":
            from scipy.io import loadmat  # SBD only

            try:
                mask = loadmat(path)["GTcls"][0]["Segmentation"][0]
            except Exception as e:  # scipy's MatReadError and a .mat without GTcls: one fix
                raise ValueError(f"not an SBD class mask: {e}") from None
        else:
            with open_image(path) as image:
                if image.mode not in ("P", "L"):
                    raise DataError(f"mask '{path}' is an {image.mode} image; VOC masks are palette (\"P\") "
                                    f"PNGs whose pixel values are class indices 0-{NUM_CLASSES - 1} and 255")
                mask = np.array(image)
    except (OSError, KeyError, IndexError, ValueError) as e:
        raise DataError(f"could not read mask '{path}' ({type(e).__name__}: {e}); replace that file") from None
    mask = np.asarray(mask, dtype=np.uint8)
    bad = (mask >= NUM_CLASSES) & (mask != IGNORE_INDEX)
    if bad.any():
        raise DataError(f"mask '{path}' has label {int(mask[bad][0])}; VOC labels are 0-{NUM_CLASSES - 1} "
                        f"and {IGNORE_INDEX} (ignored)")
    return mask


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _fetch_if_missing(needed: list[Path], download: bool, fetch, what: str, by_hand: str) -> Path | None:
    """Run fetch() (a torchvision download) when `download` and any of `needed` is missing; returns
    the first path still missing, or None."""
    if download and not all(path.exists() for path in needed):
        try:
            with quiet_output():   # torchvision prints download and extraction progress
                fetch()
        except Exception as e:  # no network (URLError is an OSError), a bad archive, a full disk: one fix
            raise DataError(f"could not download {what} ({_first_line(e)}); {by_hand}, and set "
                            "\"data_mode\": \"local\"") from None
    return next((path for path in needed if not path.exists()), None)


def voc_root(data_folder: str, download: bool) -> Path:
    """<data_folder>/VOCdevkit/VOC2012 with its segmentation lists, images and masks; fetched and
    extracted there by torchvision first when `download` and not there yet."""
    root = Path(data_folder) / VOC_ROOT
    lists = root / "ImageSets" / "Segmentation"
    needed = [root / "JPEGImages", root / "SegmentationClass", lists / "train.txt", lists / "val.txt"]
    by_hand = (f"download {VOC_URL} and extract it into '{data_folder}' (giving {root}/JPEGImages, "
               f"SegmentationClass and ImageSets/Segmentation)")
    def fetch():
        from torchvision.datasets import VOCSegmentation

        VOCSegmentation(data_folder, year="2012", image_set="train", download=True)

    missing = _fetch_if_missing(needed, download, fetch, f"Pascal VOC 2012 into '{data_folder}'", by_hand)
    if missing is not None:
        hint = ""
        for inner, above in ((Path("VOC2012"), "VOCdevkit"), (Path("JPEGImages"), "VOCdevkit/VOC2012")):
            if (Path(data_folder) / inner).exists():
                hint = (f" (data_folder looks like the {above} folder itself: set it to the folder holding "
                        "VOCdevkit)")
        raise DataError(f"Pascal VOC 2012 not found: there is no '{missing}'{hint}; {by_hand}"
                        + ("" if download else ", or set \"data_mode\": \"download\""))
    return root


def sbd_root(data_folder: str, download: bool) -> Path:
    """<data_folder>/SBD in torchvision's SBDataset layout (img/, cls/, train.txt, val.txt)."""
    try:
        import scipy.io  # noqa: F401  (SBD's masks are MATLAB files)
    except ImportError:
        raise ConfigError("\"sbd\": true needs scipy to read SBD's .mat masks: pip install scipy") from None
    root = Path(data_folder) / SBD_ROOT
    needed = [root / "img", root / "cls", root / "train.txt", root / "val.txt"]
    by_hand = (f"download {SBD_URL}, extract it and move benchmark_RELEASE/dataset/"
               f"{{img,cls,train.txt,val.txt}} into '{root}'")
    def fetch():
        from torchvision.datasets import SBDataset

        SBDataset(str(root), image_set="train", mode="segmentation", download=True)

    missing = _fetch_if_missing(needed, download, fetch, f"SBD into '{root}'", by_hand)
    if missing is not None:
        raise DataError(f"SBD not found: there is no '{missing}'; {by_hand}"
                        + ("" if download else ", or set \"data_mode\": \"download\"")
                        + ", or set \"sbd\": false to train on VOC 2012 train alone")
    return root


def _checked(files: list[tuple[str, str, str]], what: str) -> list[tuple[str, str, str]]:
    missing = [path for _, image, mask in files for path in (image, mask) if not Path(path).is_file()]
    if missing:
        raise DataError(f"{len(missing)} files of {what} are missing, e.g. '{missing[0]}'; re-extract the "
                        f"data set, or remove their names from the list")
    if not files:
        raise DataError(f"{what} lists no images")
    return files


def voc_files(data_folder: str, image_set: str, download: bool) -> list[tuple[str, str, str]]:
    """(name, image path, mask path) of VOC 2012's segmentation split "train" or "val"."""
    from torchvision.datasets import VOCSegmentation

    root = voc_root(data_folder, download)
    dataset = VOCSegmentation(data_folder, year="2012", image_set=image_set)
    names = [Path(path).stem for path in dataset.images]
    return _checked(list(zip(names, dataset.images, dataset.masks)),
                    f"VOC 2012 {image_set} ({root / 'ImageSets' / 'Segmentation' / image_set}.txt)")


def sbd_files(data_folder: str, download: bool) -> list[tuple[str, str, str]]:
    """(name, image path, mask path) of all 11,355 SBD images, its train and val lists together."""
    from torchvision.datasets import SBDataset

    root = sbd_root(data_folder, download)
    files = []
    for image_set in ("train", "val"):
        dataset = SBDataset(str(root), image_set=image_set, mode="segmentation")
        files += zip([Path(path).stem for path in dataset.images], dataset.images, dataset.masks)
    return _checked(files, f"SBD ({root}/train.txt, val.txt)")


def training_files(data_folder: str, sbd: bool, download: bool) -> list[tuple[str, str, str]]:
    """VOC 2012 train; with `sbd`, the usual "train_aug" set: VOC 2012 train and every SBD image
    that is not in VOC 2012 val (10,582 images; VOC's own mask where both annotate an image)."""
    files = voc_files(data_folder, "train", download)
    if not sbd:
        return files
    excluded = {name for name, _, _ in files} | {name for name, _, _ in voc_files(data_folder, "val", download)}
    extra = [entry for entry in sbd_files(data_folder, download) if entry[0] not in excluded]
    logger.info(f"training set: {len(files):,} VOC 2012 train + {len(extra):,} SBD images "
                f"(SBD images in VOC 2012 val left out)")
    return files + extra


def weights_cache_path(data_folder: str, sbd: bool) -> Path:
    """Where "class_weights": "auto" keeps the ENet weights of a training set, beside the data."""
    return Path(data_folder) / f"class_weights_enet_{'train_aug' if sbd else 'train'}.npy"


def train_transform(img_size: int, scale_range) -> v2.Compose:
    """Random scale (the shorter side becomes img_size x s, s uniform in scale_range), crop to
    img_size x img_size, horizontal flip; normalised image, uint8 mask."""
    low, high = scale_range
    return v2.Compose([
        v2.RandomResize(max(1, round(low * img_size)), round(high * img_size) + 1),
        v2.RandomCrop(img_size, pad_if_needed=True,
                      fill={tv_tensors.Image: MEAN_PIXEL, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),     # images only; masks keep their labels
        v2.Normalize(MEAN, STD),
    ])


def eval_transform(img_size: int) -> v2.Compose:
    """The image only: shorter side to img_size, normalised."""
    return v2.Compose([v2.Resize(img_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class SegmentationDataset(torch.utils.data.Dataset):
    """Samples of (name, image path, mask path) files.

    train=True: (image (3, S, S) float, mask (S, S) uint8) from train_transform.
    train=False: {"image": (3, h, w) float (shorter side img_size), "mask": (H, W) uint8 at the
    original size, "index": int}, batched by eval_collate."""

    def __init__(self, files: list[tuple[str, str, str]], transform, train: bool):
        # numpy string arrays: DataLoader workers share them instead of copying refcounted lists.
        self.names = np.array([name for name, _, _ in files])
        self.images = np.array([image for _, image, _ in files])
        self.masks = np.array([mask for _, _, mask in files])
        self.transform, self.train = transform, train

    def __len__(self):
        return len(self.names)

    def read(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The stored image (3, H, W) uint8 and mask (H, W) uint8."""
        path = str(self.images[index])
        try:
            with open_image(path) as picture:
                image = v2.functional.pil_to_tensor(picture.convert("RGB"))
        except OSError as e:
            raise DataError(f"could not read image '{path}' ({e}); replace that file") from None
        mask = torch.from_numpy(read_mask(self.masks[index]))
        if mask.shape != image.shape[-2:]:
            raise DataError(f"mask '{self.masks[index]}' is {tuple(mask.shape)} but its image is "
                            f"{tuple(image.shape[-2:])} (height, width); they must match")
        return tv_tensors.Image(image), tv_tensors.Mask(mask)

    def __getitem__(self, index: int):
        image, mask = self.read(index)
        if self.train:
            image, mask = self.transform(image, mask)
            return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        return {"image": self.transform(image).as_subclass(torch.Tensor),
                "mask": mask.as_subclass(torch.Tensor), "index": index}


class MaskFiles(torch.utils.data.Dataset):
    """The masks alone, (H, W) uint8 arrays, for counting class pixels."""

    def __init__(self, mask_paths):
        self.paths = np.array([str(path) for path in mask_paths])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return read_mask(self.paths[index])


def eval_collate(samples: list[dict]) -> dict:
    """Validation samples of different sizes as one batch:
      image      list of B (3, h', w') float: each image zero-padded (the mean colour) at the bottom
                 and right to multiples of 8 for the network, on its own, so that its prediction
                 does not depend on the other images of the batch
      mask       (B, H, W) uint8, padded with 255 to the largest mask
      size       (B, 2) the (h, w) of each resized image inside its padding
      mask_size  (B, 2) the (H, W) of each original mask
      index      (B,) positions in the data set"""
    sizes = torch.tensor([sample["image"].shape[-2:] for sample in samples])
    mask_sizes = torch.tensor([sample["mask"].shape for sample in samples])
    images = []
    for sample, (h, w) in zip(samples, sizes.tolist()):
        images.append(torch.nn.functional.pad(sample["image"], (0, -w % 8, 0, -h % 8)))
    masks = torch.full((len(samples), *mask_sizes.max(dim=0).values.tolist()), IGNORE_INDEX, dtype=torch.uint8)
    for i, sample in enumerate(samples):
        mask_h, mask_w = mask_sizes[i].tolist()
        masks[i, :mask_h, :mask_w] = sample["mask"]
    return {"image": images, "mask": masks, "size": sizes, "mask_size": mask_sizes,
            "index": torch.tensor([sample["index"] for sample in samples])}


class VOCDataLoader:
    """train_loader: (images (B, 3, S, S), masks (B, S, S) uint8) batches of the training set,
    shuffled by torch's seeded generator, every batch full; valid_loader (= test_loader): VOC 2012
    val as eval_collate batches. train=False builds the validation set alone.

    data_mode "download": torchvision fetches VOC 2012 (and SBD) into data_folder when they are not
    there yet; "local": they must be there (VOCdevkit/VOC2012, SBD)."""

    def __init__(self, *, data_folder: str, data_mode: str, sbd: bool, img_size: int, scale_range,
                 batch_size: int, test_batch_size: int, workers: int, pin_memory, device, train: bool = True):
        if data_mode not in DATA_MODES:
            raise ConfigError(f"data_mode '{data_mode}' is not one of {', '.join(DATA_MODES)}")
        download = data_mode == "download"
        self.valid_set = SegmentationDataset(voc_files(data_folder, "val", download), eval_transform(img_size),
                                             train=False)
        self.valid_loader = make_data_loader(self.valid_set, test_batch_size, shuffle=False, workers=workers,
                                             pin_memory=pin_memory, device=device, collate_fn=eval_collate)
        self.test_loader = self.valid_loader
        if train:
            files = training_files(data_folder, sbd, download)
            if len(files) < batch_size:
                raise DataError(f"the training set has {len(files)} images, fewer than batch_size "
                                f"{batch_size}: an epoch would have no full batch; lower batch_size")
            self.train_set = SegmentationDataset(files, train_transform(img_size, scale_range), train=True)
            self.train_loader = make_data_loader(self.train_set, batch_size, shuffle=True, workers=workers,
                                                 pin_memory=pin_memory, device=device, drop_last=True)
