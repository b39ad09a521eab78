"""Small data sets in the layouts the shipped examples read, written by the suite's fixtures
(tests/conftest.py) and by the tutorials' test: every example trains on them in seconds, on CPU."""
from pathlib import Path

import torch
from PIL import Image

# The VOC fixture's classes and image sizes: tests/test_erfnet.py checks pixels and masks against them.
VOC_COLOURS = {1: (220, 40, 40), 12: (40, 200, 40), 15: (40, 40, 220)}    # aeroplane, dog, person
VOC_SIZES = ((48, 40), (40, 56), (56, 48), (40, 40))                      # (height, width)


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 28, 28) uint8 images and (n,) labels: each class is a bright bar at its own place, plus
    noise, so a network can learn it in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=generator)]
    images = torch.randint(0, 60, (n, 28, 28), generator=generator, dtype=torch.uint8)
    for k in range(10):
        rows = slice(2 + 2 * k, 4 + 2 * k)
        images[labels == k, rows, 4:24] = 255
    return images, labels


def write_mnist(folder: Path, train: int = 320, test: int = 160):
    """MNIST in torchvision's raw IDX layout under folder: `train` training and `test` test digits."""
    from datasets.mnist import write_raw_split

    write_raw_split(str(folder), True, *synthetic_digits(train, seed=0))
    write_raw_split(str(folder), False, *synthetic_digits(test, seed=1))


def write_cifar(folder: Path, train: int = 128, test: int = 64):
    """CIFAR-10's python batches (cifar-10-batches-py/) of noise images with random labels."""
    from datasets.cifar10 import write_cifar10_batches

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (train + test, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (train + test,), generator=generator)
    write_cifar10_batches(str(folder), images[:train], labels[:train], images[train:], labels[train:])


def write_image_folder(folder: Path, count: int = 24):
    """`count` noise images in two class folders, of mixed sizes (the DCGAN loader resizes and crops)."""
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        subfolder = folder / ("a" if index % 2 else "b")
        subfolder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (40 + index % 3, 36, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(subfolder / f"{index:03d}.png")


def write_voc_sample(folder: Path, name: str, index: int, generator: torch.Generator):
    """A dark noisy image with one bright rectangle of a class's colour; its palette PNG mask has
    the class inside, background outside and a 2-pixel ring of 255 on the edge, as VOC draws them."""
    from datasets.voc import IGNORE_INDEX, save_mask

    height, width = VOC_SIZES[index % len(VOC_SIZES)]
    label = list(VOC_COLOURS)[index % len(VOC_COLOURS)]
    pixels = torch.randint(0, 40, (height, width, 3), dtype=torch.uint8, generator=generator)
    mask = torch.zeros(height, width, dtype=torch.uint8)
    top = int(torch.randint(0, height // 2, (), generator=generator))
    left = int(torch.randint(0, width // 2, (), generator=generator))
    bottom, right = top + height // 2, left + width // 2
    pixels[top:bottom, left:right] = torch.tensor(VOC_COLOURS[label], dtype=torch.uint8)
    mask[top - 2 if top >= 2 else 0:bottom + 2, left - 2 if left >= 2 else 0:right + 2] = IGNORE_INDEX
    mask[top:bottom, left:right] = label
    Image.fromarray(pixels.numpy()).save(folder / "JPEGImages" / f"{name}.jpg", quality=95)
    save_mask(mask, folder / "SegmentationClass" / f"{name}.png")


def write_voc(root: Path, train: int = 8, val: int = 5) -> dict:
    """Pascal VOC 2012's own layout under root (VOCdevkit/VOC2012: JPEG images, palette PNG masks,
    ImageSets lists); returns {split: [image names]}."""
    folder = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    names = {"train": [f"2008_{i:06d}" for i in range(train)], "val": [f"2009_{i:06d}" for i in range(val)]}
    for split, split_names in names.items():
        for index, name in enumerate(split_names):
            write_voc_sample(folder, name, index + (split == "val"), generator)
        (folder / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(split_names) + "\n")
    return names
