"""Class weights for a segmentation loss, as ENet (Paszke et al. 2016, section 5.2) weighs them:
w_c = 1 / ln(c + p_c), p_c the share of class c among the labelled pixels of the training masks
(c = 1.02 bounds the weights to [1 / ln(2.02), 1 / ln(1.02)] = [1.42, 50.5]).

For Pascal VOC 2012, `python -m datasets.voc_class_weights` computes and saves them alone (what
"class_weights": "auto" does once).
"""
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from utils.errors import ConfigError, UserError
from utils.files import atomic_write

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
    if not isinstance(weights, np.ndarray):   # an .npz archive loads as a dict of arrays
        raise ConfigError(f"class weights '{path}' is an .npz archive, not one array; save them with numpy.save")
    if weights.shape != (num_classes,) or not np.issubdtype(weights.dtype, np.number):
        raise ConfigError(f"class weights '{path}' hold a {weights.dtype} array of shape {weights.shape}; "
                          f"expected {num_classes} numbers, one per class")
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise ConfigError(f"class weights '{path}' must be finite and not negative")
    return weights.astype(np.float32)


def save_class_weights(weights: np.ndarray, path: str | Path):
    """numpy.save, atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.save(f, np.asarray(weights, dtype=np.float32))


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
