"""Training images for a GAN (the DCGAN example): any folder of images, CelebA's aligned faces, or
MNIST, resized and centre-cropped to image_size and scaled to [-1, 1], the range of the generator's
tanh. Only a train loader: a GAN has no validation split."""
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms

from datasets.mnist import load_split
from utils.data import TensorBatchLoader, make_data_loader, open_image
from utils.errors import ConfigError, DataError
from utils.files import quiet_output

DATASETS = ("folder", "celeba", "mnist")
DATA_MODES = ("download", "local")
CHANNELS = (1, 3)           # images are read as grayscale ("L") or RGB
# What torchvision's ImageFolder reads, compared in lower case.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
ROOT_CLASS = "."            # the class of images lying directly in the folder, beside class subfolders
CELEBA_IMAGES = Path("celeba") / "img_align_celeba"   # under data_folder, where torchvision extracts them


def find_images(folder: Path) -> list[str]:
    """Paths, relative to folder and sorted, of every image file under it at any depth. Hidden files
    and folders are skipped: macOS leaves '._name.jpg' resource files that are not images."""
    found = []
    for parent, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        relative = Path(parent).relative_to(folder)
        found += [(relative / name).as_posix() for name in files
                  if not name.startswith(".") and name.lower().endswith(EXTENSIONS)]
    return sorted(found)


class ImageFolderDataset(torch.utils.data.Dataset):
    """(image (C, S, S) float in [-1, 1], label) for every image file under folder, found recursively.

    Labels: the index of the image's first-level subfolder among the sorted names (as ImageFolder
    numbers classes); images lying directly in the folder form the class '.', so a flat folder is
    all 0s. Each image is converted to "RGB" (3 channels) or "L" (1), resized so that its shorter
    side is image_size, centre-cropped to a square and normalised with mean 0.5 and std 0.5."""

    def __init__(self, folder: str | Path, image_size: int, input_channels: int):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"image folder '{self.folder}' does not exist; set data_folder to a folder "
                            f"of images (flat, or one subfolder per class)")
        files = find_images(self.folder)
        if not files:
            raise DataError(f"no images in '{self.folder}' (looked in it and its subfolders for "
                            f"{', '.join(EXTENSIONS)} files, in any case)")
        first_parts = [path.split("/", 1)[0] if "/" in path else ROOT_CLASS for path in files]
        self.classes = sorted(set(first_parts))
        index = {name: i for i, name in enumerate(self.classes)}
        # One fixed-width numpy buffer instead of a list of str: DataLoader workers forked from this
        # process read it without touching reference counts, so they share it instead of copying it.
        self.files = np.array(files)
        self.labels = np.array([index[name] for name in first_parts], dtype=np.int64)
        self.mode = "L" if input_channels == 1 else "RGB"
        self.transform = transforms.Compose([
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),                                            # (C, S, S) in [0, 1]
            transforms.Normalize((0.5,) * input_channels, (0.5,) * input_channels),  # -> [-1, 1]
        ])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.folder / str(self.files[index])
        try:
            with open_image(path) as image:
                image = image.convert(self.mode)   # decodes the whole file: a truncated one fails here
        except OSError as e:                      # UnidentifiedImageError is an OSError too
            raise DataError(f"could not read image '{path}' ({e}); delete or replace that file") from None
        return self.transform(image), int(self.labels[index])


def celeba_folder(data_folder: str, download: bool) -> Path:
    """<data_folder>/celeba/img_align_celeba/, the 202,599 aligned faces, fetched there first by
    torchvision if asked. Read as a plain folder: no checksums, no attribute files needed."""
    folder = Path(data_folder) / CELEBA_IMAGES
    by_hand = (f"download img_align_celeba.zip from the CelebA page "
               f"(mmlab.ie.cuhk.edu.hk/projects/CelebA.html), extract it so that the faces are "
               f"{folder}/000001.jpg ...")
    if download:
        from torchvision.datasets import CelebA  # only this mode needs it

        try:
            with quiet_output():   # torchvision and gdown (its Google Drive fetcher) print progress
                CelebA(data_folder, split="all", download=True)
        except Exception as e:  # no network, no gdown, Google Drive's daily quota, a bad archive: all one fix
            reason = (str(e).splitlines() or [""])[0] or type(e).__name__
            raise DataError(f"could not download CelebA into '{Path(data_folder) / 'celeba'}' ({reason}); "
                            f"{by_hand}, and set \"data_mode\": \"local\"") from e
    if not folder.is_dir():
        one_up = Path(data_folder) / CELEBA_IMAGES.name     # data_folder set to the celeba folder itself
        hint = f" (found '{one_up}': set data_folder to the folder above it)" if one_up.is_dir() else ""
        raise DataError(f"CelebA images not found: '{folder}' does not exist{hint}; {by_hand}, "
                        f"or set \"data_mode\": \"download\" to fetch them")
    return folder


def to_gan_range(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, S, S) float in [-1, 1], resized bilinearly where the images are."""
    images = images.unsqueeze(1).float().div_(255.0)                       # (B, 1, H, W) in [0, 1]
    if images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=False)
    return images.mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)   # clamp: interpolation may round past 1


class ImageDataLoader:
    """train_loader: (images (B, input_channels, image_size, image_size) float in [-1, 1], labels (B,))
    batches, reshuffled each epoch from torch's seeded generator, every batch full (drop_last) so
    that the discriminator always sees batch_size real and batch_size fake images. num_images: how
    many images one epoch goes through.

    dataset:
      "folder": every image under data_folder, flat or in class subfolders at any depth (see
          ImageFolderDataset; labels are the subfolder's index), decoded with PIL in a DataLoader
          with `workers` processes. data_mode does not matter: the folder is read as it is.
      "celeba": <data_folder>/celeba/img_align_celeba/*.jpg read as a flat folder (labels 0);
          data_mode "download" has torchvision fetch them there first (from Google Drive, with gdown).
      "mnist": the 60,000 training digits from <data_folder>/MNIST/raw (downloaded there when
          data_mode is "download"), held as one uint8 tensor on `device` and resized and scaled a
          whole batch at a time there (bilinear, as pytorch/examples' dcgan resizes MNIST);
          input_channels must be 1; workers and pin_memory are not used."""

    def __init__(self, *, data_folder: str, dataset: str, data_mode: str, image_size: int, input_channels: int,
                 batch_size: int, workers: int, pin_memory, device):
        if dataset not in DATASETS:
            raise ConfigError(f"dataset '{dataset}' is not one of {', '.join(DATASETS)}")
        if data_mode not in DATA_MODES:
            raise ConfigError(f"data_mode '{data_mode}' is not one of {', '.join(DATA_MODES)}")
        if input_channels not in CHANNELS:
            raise ConfigError(f"input_channels is {input_channels}; images are read as 1 (grayscale) "
                              f"or 3 (RGB) channels")
        if dataset == "mnist" and input_channels != 1:
            raise ConfigError(f"MNIST digits are grayscale: set input_channels to 1 (it is {input_channels})")
        if image_size < 1 or batch_size < 1:
            raise ConfigError(f"image_size ({image_size}) and batch_size ({batch_size}) must be positive")

        download = data_mode == "download"
        if dataset == "mnist":
            images, labels = load_split(data_folder, train=True, download=download)   # (N, 28, 28) uint8
            self.num_images = len(images)
        else:
            folder = celeba_folder(data_folder, download) if dataset == "celeba" else Path(data_folder)
            images = ImageFolderDataset(folder, image_size, input_channels)
            self.num_images = len(images)
        if self.num_images < batch_size:
            raise DataError(f"{dataset} has {self.num_images} images, fewer than batch_size {batch_size}: "
                            f"an epoch would have no full batch; lower batch_size or add images")

        if dataset == "mnist":
            self.train_loader = TensorBatchLoader(images.to(device), labels.to(device), batch_size,
                                                  shuffle=True, drop_last=True,
                                                  transform=partial(to_gan_range, image_size=image_size))
        else:
            self.train_loader = make_data_loader(images, batch_size, shuffle=True, workers=workers,
                                                 pin_memory=pin_memory, device=device, drop_last=True)
