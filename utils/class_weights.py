"""Class weights for a segmentation loss, as ENet (Paszke et al. 2016, section 5.2) weighs them:
w_c = 1 / ln(c + p_c), p_c the share of class c among the labelled pixels of the training masks
(c = 1.02 bounds the weights to [1 / ln(2.02), 1 / ln(1.02)] = [1.42, 50.5]).

Run alone to compute and save them for Pascal VOC 2012 (what "class_weights": "auto" does once):

    python -m utils.class_weights --data-folder data/voc [--sbd] [--output weights.npy]
"""
import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from utils.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

ENET_C = 1.02


def count_pixels(masks, num_classes: int) -> np.ndarray:
    """(num_classes,) int64 pixel counts of each class over an iterable of (H, W) integer masks
    (arrays or tensors); other values (the ignore label 255) are not counted."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for mask in masks:
        mask = torch.as_tensor(mask).reshape(-1).long()
        counts += torch.bincount(mask[(mask >= 0) & (mask < num_classes)], minlength=num_classes)
    return counts.numpy()


def enet_weights(counts, c: float = ENET_C) -> np.ndarray:
    """(num_classes,) float32 weights 1 / ln(c + p) from per-class pixel counts."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise UserError("the training masks hold no labelled pixel: cannot compute class weights")
    return (1.0 / np.log(c + counts / counts.sum())).astype(np.float32)


def load_class_weights(path: str | Path, num_classes: int) -> np.ndarray:
    """Weights saved with numpy.save: a (num_classes,) array of positive finite numbers."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"class weights file '{path}' does not exist; set \"class_weights\" to a .npy "
                          f"of {num_classes} numbers, to \"auto\" (computed from the training masks) or null")
    try:
        weights = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"could not read class weights '{path}' ({e}); save them with numpy.save") from None
    if weights.shape != (num_classes,) or not np.issubdtype(weights.dtype, np.number):
        raise ConfigError(f"class weights '{path}' hold a {weights.dtype} array of shape {weights.shape}; "
                          f"expected {num_classes} numbers, one per class")
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise ConfigError(f"class weights '{path}' must be finite and not negative")
    return weights.astype(np.float32)


def save_class_weights(weights: np.ndarray, path: str | Path):
    """numpy.save to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(weights, dtype=np.float32))
    os.replace(tmp, path)


def cached_enet_weights(cache: Path, read_masks: Callable[[], Iterable], num_classes: int,
                        write: bool = True) -> np.ndarray:
    """ENet weights from `cache` if it holds them, else counted from the masks read_masks() gives
    (called only then) and saved there when `write`. Delete the file to count again."""
    cache = Path(cache)
    if cache.is_file():
        weights = load_class_weights(cache, num_classes)
        logger.info(f"class weights: read from {cache}")
        return weights
    logger.info(f"class weights: counting the pixels of each class in the training masks (once; cached in "
                f"{cache})")
    weights = enet_weights(count_pixels(read_masks(), num_classes))
    if write:
        try:
            save_class_weights(weights, cache)
        except OSError as e:
            logger.warning(f"class weights: could not write {cache} ({e.strerror}); they are counted again "
                           "next run")
    return weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.class_weights",
        description="ENet class weights 1 / ln(1.02 + p_c) of the Pascal VOC 2012 training masks, saved with "
                    "numpy.save.")
    parser.add_argument("--data-folder", default="data/voc",
                        help="the folder holding VOCdevkit/VOC2012 (and SBD)")
    parser.add_argument("--sbd", action="store_true", help="count the train_aug set: VOC 2012 train + SBD")
    parser.add_argument("--download", action="store_true", help="fetch VOC 2012 (and SBD) first if missing")
    parser.add_argument("--output", help="the .npy to write (default: the one \"class_weights\": \"auto\" "
                                         "reads, in the data folder)")
    parser.add_argument("--workers", type=int, default=0, help="processes reading masks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from datasets.voc import CLASSES, MaskFiles, training_files, weights_cache_path

    try:
        files = training_files(args.data_folder, args.sbd, args.download)
        masks = torch.utils.data.DataLoader(MaskFiles([mask for _, _, mask in files]), batch_size=None,
                                            num_workers=args.workers)
        weights = enet_weights(count_pixels(masks, len(CLASSES)))
        output = Path(args.output) if args.output else weights_cache_path(args.data_folder, args.sbd)
        save_class_weights(weights, output)
    except UserError as e:
        # The data errors speak of the config key; here the switch is --download.
        message = str(e).replace('set "data_mode": "download"', "pass --download")
        print(f"error: {message}", file=sys.stderr)
        return 2
    width = max(len(name) for name in CLASSES)
    print("\n".join(f"  {name:<{width}}  {weight:.4f}" for name, weight in zip(CLASSES, weights)))
    print(f"{len(files):,} masks; weights saved to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
