"""Seconds per MNIST training epoch: MnistAgent against pytorch/examples' loop, on the same digits.

agent: configs/mnist_exp_0.json (MnistNet, Adadelta lr 1.0, batch 64). Its MnistDataLoader holds
       the digits as one uint8 tensor and normalises each batch as it is sliced out; timed around
       agent.train_one_epoch() (no validation, no checkpoint).
plain: the same network and optimizer, fed by torchvision.datasets.MNIST with ToTensor + Normalize
       through a torch DataLoader (num_workers=0 unless --num-workers says otherwise), in the loop
       of pytorch/examples' train(), its log line every 10 batches written to /dev/null.
Data: the real MNIST test digits from /work/shared/data/mnist, split 8,000 train / 2,000 test and
written as IDX files that both sides read (random digits, with a note, when those are missing).
Each side gets one untimed warm-up epoch, then --epochs timed epochs, alternating plain and agent;
each figure is the median. agent/plain < 1 means the agent is faster.

    .venv/bin/python bench/mnist_epoch.py [--epochs N] [--threads N] [--num-workers N [N ...]]
"""
import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np
import torch
import torch.nn.functional as F
from torch import optim
from torchvision import datasets, transforms

from agents import make_config
from datasets.mnist import MEAN, STD, write_raw_split
from graphs.models.mnist import MnistNet

SHARED_MNIST = Path("/work/shared/data/mnist")
TRAIN_SIZE, TEST_SIZE = 8_000, 2_000
BATCH_SIZE = 64
LOG_INTERVAL = 10


def read_idx_gz(path: Path) -> torch.Tensor:
    """A gzipped IDX file: bytes 0-1 zero, byte 2 the type (0x08: uint8), byte 3 the number of
    dimensions, then each dimension as a big-endian int32, then the data."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def load_digits() -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images uint8 (N, 28, 28), labels (N,), where they came from), N = TRAIN_SIZE + TEST_SIZE."""
    images_file = SHARED_MNIST / "t10k-images-idx3-ubyte.gz"
    labels_file = SHARED_MNIST / "t10k-labels-idx1-ubyte.gz"
    n = TRAIN_SIZE + TEST_SIZE
    if images_file.is_file() and labels_file.is_file():
        return read_idx_gz(images_file)[:n], read_idx_gz(labels_file)[:n], "real MNIST test digits"
    print(f"note: no MNIST files in {SHARED_MNIST}; timing on random digits instead")
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (n,), generator=generator), "random digits")


def plain_loader(data_folder: str, num_workers: int, device: torch.device):
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    dataset = datasets.MNIST(data_folder, train=True, download=False, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True,
                                       num_workers=num_workers, pin_memory=device.type == "cuda")


def plain_train(model, device, loader, optimizer, epoch: int, log):
    """pytorch/examples' train(), with cross-entropy on logits as MnistNet returns them."""
    model.train()
    for batch_idx, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        if batch_idx % LOG_INTERVAL == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(images)}/{len(loader.dataset)}]"
                  f"\tLoss: {loss.item():.6f}", file=log)


def timed(fn, device: torch.device) -> float:
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the epoch is not over until the queued kernels are
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per side, after one warm-up (default 2)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0],
                        help="DataLoader workers of the plain side; several values time one plain "
                             "side each (default 0)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels, source = load_digits()

    previous_dir = os.getcwd()
    with tempfile.TemporaryDirectory() as workdir, open(os.devnull, "w") as devnull:
        os.chdir(workdir)  # experiments/ and the IDX files go here, not into the repository
        data_folder = os.path.join(workdir, "data")
        write_raw_split(data_folder, True, images[:TRAIN_SIZE], labels[:TRAIN_SIZE])
        write_raw_split(data_folder, False, images[TRAIN_SIZE:], labels[TRAIN_SIZE:])

        agent_class, config = make_config(str(REPO / "configs" / "mnist_exp_0.json"), [
            "data_mode=local", f"data_folder={data_folder}", f"max_epoch={args.epochs + 1}",
            "progress_bar=false", "exp_name=bench_mnist"])
        agent = agent_class(config)
        device = agent.device  # the plain side runs wherever the agent does
        # One plain side per worker count: (run one epoch, seconds of each timed epoch).
        plain_sides = {}
        for workers in args.num_workers:
            torch.manual_seed(config.seed)  # the agent's seed: the same initial weights
            model = MnistNet().to(device)
            optimizer = optim.Adadelta(model.parameters(), lr=config.learning_rate)
            loader = plain_loader(data_folder, workers, device)

            def run_epoch(epoch, model=model, optimizer=optimizer, loader=loader):
                plain_train(model, device, loader, optimizer, epoch, devnull)

            plain_sides[workers] = (run_epoch, [])
        agent_times = []

        for epoch in range(args.epochs + 1):  # epoch 0 is the warm-up
            for run_epoch, times in plain_sides.values():
                times.append(timed(lambda: run_epoch(epoch + 1), device))
            agent_times.append(timed(agent.train_one_epoch, device))
        agent.finalize()
        os.chdir(previous_dir)  # leave the folder before it is deleted

    print(f"MNIST epoch: {TRAIN_SIZE:,} training {source}, batch {BATCH_SIZE}, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.epochs} timed epoch(s) after 1 warm-up")
    agent_s = statistics.median(agent_times[1:])
    rows = [(f"plain, DataLoader num_workers={workers}", statistics.median(times[1:]))
            for workers, (_, times) in plain_sides.items()]
    rows.append(("agent, MnistDataLoader (tensor slicing)", agent_s))
    for label, value in rows:
        print(f"  {label:<42}{value:>8.2f} s/epoch")
    for workers, (_, times) in plain_sides.items():
        ratio = agent_s / statistics.median(times[1:])
        print(f"agent/plain (num_workers={workers}): {ratio:.2f}  (< 1: the agent is faster)")


if __name__ == "__main__":
    main()
