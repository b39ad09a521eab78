"""Seeding and device selection: done once, in BaseAgent, before anything is built."""
import os
import random

import numpy as np
import torch

from utils.config import Key
from utils.errors import ConfigError

# The config keys of where and how the run computes (merged into BaseAgent.DEFAULTS).
RUNTIME_KEYS = {
    "seed": Key(1, minimum=0, maximum=2**32 - 1),   # np.random.seed's range; gymnasium refuses negatives
    "device": Key("auto", pattern=r"auto|cpu|mps|cuda(:\d+)?", pattern_hint='use "auto", "cpu", "cuda", "cuda:N" or "mps"'),
    "cuda": True,
    "gpu_device": Key(0, minimum=0),
    "amp": Key("off", choices=("off", "bf16", "fp16")),
    "compile": False,             # torch.compile the declared models
    "channels_last": False,       # NHWC memory format for models and 4-D input batches
    "deterministic": False,       # deterministic algorithms; otherwise cudnn.benchmark on GPU
    "distributed_timeout_s": Key(600, minimum=1),  # under torchrun: a collective waiting longer fails
}


def seed_everything(seed: int):
    """Seed python, numpy and torch (CPU and every CUDA device). A train_loader's order and
    augmentation are seeded per epoch and per sample (utils.batches); other DataLoaders' workers
    draw their base seed from torch's generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def select_device(device: str, cuda: bool = True, gpu_device: int = 0) -> torch.device:
    """'auto' picks cuda:<gpu_device> when there is a GPU and `cuda` is true, else mps, else cpu.
    An explicit device that is not there is an error, not a silent fallback to the CPU."""
    if device == "auto":
        if cuda and torch.cuda.is_available():
            return torch.device("cuda", gpu_device)
        if cuda and _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device \"{device}\" asked for, but this PyTorch sees no CUDA GPU; "
                              "use \"device\": \"auto\" or \"cpu\"")
        index = chosen.index if chosen.index is not None else gpu_device
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device \"{device}\": there are only {torch.cuda.device_count()} "
                              "CUDA device(s)")
        return torch.device("cuda", index)
    if chosen.type == "mps" and not _mps_available():
        raise ConfigError("device \"mps\" asked for, but MPS is not available on this machine")
    return chosen


def prepare_device(device: str, cuda: bool, gpu_device: int, deterministic: bool) -> torch.device:
    """The run's device (select_device), made the current CUDA device, with set_determinism."""
    chosen = select_device(device, cuda, gpu_device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    set_determinism(deterministic, chosen)
    return chosen


def set_determinism(deterministic: bool, device: torch.device):
    """Deterministic algorithms when asked; otherwise cudnn.benchmark on GPU (fastest kernels for
    fixed input shapes)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
