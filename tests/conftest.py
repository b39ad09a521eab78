import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "main.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory) -> Path:
    """A small MNIST in torchvision's raw IDX layout: 320 training and 160 test digits."""
    from datasets.mnist import write_raw_split

    folder = tmp_path_factory.mktemp("mnist_data")
    write_raw_split(str(folder), True, *synthetic_digits(320, seed=0))
    write_raw_split(str(folder), False, *synthetic_digits(160, seed=1))
    return folder


def mnist_overrides(data_folder, **extra) -> list:
    settings = {"data_folder": str(data_folder), "data_mode": "local", "batch_size": 32,
                "test_batch_size": 64, "max_epoch": 2, "log_interval": 2}
    settings.update(extra)
    args = []
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def run_main(args, cwd, timeout=300, script=MAIN, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
