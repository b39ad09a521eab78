"""MNIST: seconds per epoch of MnistAgent against pytorch/examples' loop, and time to accuracy of
the two shipped recipes, on the same real digits.

Data: the real MNIST test digits from /work/shared/data/mnist (the 60,000 training digits are not
there), shuffled with a fixed seed and split 8,000 train / 2,000 held out, written as IDX files in
torchvision's raw layout in a temporary folder (random digits, with a note, when those are missing).
Both agents run with valid_size 0: they train on all 8,000 and validate on the 2,000.

epoch:    configs/mnist_exp_1.json (pytorch/examples' MnistNet, Adadelta lr 1.0, batch 64) timed
          around agent.train_one_epoch() (no validation, no checkpoint), against the same network
          and optimizer fed by torchvision.datasets.MNIST with ToTensor + Normalize through a torch
          DataLoader (num_workers=0 unless --num-workers says otherwise), in the loop of
          pytorch/examples' train(), its log line every 10 batches written to /dev/null. One
          untimed warm-up epoch each, then --epochs timed epochs, alternating plain and agent;
          each figure is the median. agent/plain < 1 means the agent is faster.
accuracy: each config trained as shipped (its max_epoch) by agent.run(), once per --seeds value:
          the wall time of the whole run (every epoch's training, validation and checkpoint), and
          the held-out accuracy of its last epoch's weights; medians over the seeds. new/recipe < 1
          means the new default is faster.

The held-out accuracy is that of an 8,000-digit training set, a proxy: on the full 60,000 both
recipes score higher.

    .venv/bin/python bench/mnist_epoch.py [--part epoch|accuracy|both] [--epochs N] [--seeds N [N ...]]
                                          [--threads N] [--num-workers N [N ...]]
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
SPLIT_SEED = 0
BATCH_SIZE = 64
LOG_INTERVAL = 10
RECIPE, NEW = "mnist_exp_1", "mnist_exp_0"


def read_idx_gz(path: Path) -> torch.Tensor:
    """A gzipped IDX file: bytes 0-1 zero, byte 2 the type (0x08: uint8), byte 3 the number of
    dimensions, then each dimension as a big-endian int32, then the data."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def load_digits() -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images uint8 (N, 28, 28), labels (N,), where they came from), N = TRAIN_SIZE + TEST_SIZE,
    in a fixed random order: the test file's first 5,000 digits are the easier half."""
    images_file = SHARED_MNIST / "t10k-images-idx3-ubyte.gz"
    labels_file = SHARED_MNIST / "t10k-labels-idx1-ubyte.gz"
    n = TRAIN_SIZE + TEST_SIZE
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    if images_file.is_file() and labels_file.is_file():
        images, labels = read_idx_gz(images_file), read_idx_gz(labels_file)
        order = torch.randperm(len(images), generator=generator)[:n]
        return images[order], labels[order], "real MNIST test digits"
    print(f"note: no MNIST files in {SHARED_MNIST}; timing on random digits instead (accuracy ~10%)")
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


def build_agent(name: str, data_folder: str, *overrides: str):
    agent_class, config = make_config(str(REPO / "configs" / f"{name}.json"), [
        "data_mode=local", f"data_folder={data_folder}", "valid_size=0", "progress_bar=false", *overrides])
    return agent_class(config)


def seconds_per_epoch(data_folder: str, epochs: int, num_workers: list[int], source: str):
    with open(os.devnull, "w") as devnull:
        agent = build_agent(RECIPE, data_folder, f"max_epoch={epochs + 1}", "exp_name=bench_epoch")
        config, device = agent.config, agent.device  # the plain side runs wherever the agent does
        # One plain side per worker count: (run one epoch, seconds of each timed epoch).
        plain_sides = {}
        for workers in num_workers:
            torch.manual_seed(config.seed)  # the agent's seed: the same initial weights
            model = MnistNet().to(device)
            optimizer = optim.Adadelta(model.parameters(), lr=config.learning_rate)
            loader = plain_loader(data_folder, workers, device)

            def run_epoch(epoch, model=model, optimizer=optimizer, loader=loader):
                plain_train(model, device, loader, optimizer, epoch, devnull)

            plain_sides[workers] = (run_epoch, [])
        agent_times = []
        for epoch in range(epochs + 1):  # epoch 0 is the warm-up
            for run_epoch, times in plain_sides.values():
                times.append(timed(lambda: run_epoch(epoch + 1), device))
            agent_times.append(timed(agent.train_one_epoch, device))
        agent.finalize()

    print(f"MNIST epoch ({RECIPE}, pytorch/examples' recipe): {TRAIN_SIZE:,} training {source}, batch "
          f"{BATCH_SIZE}, {device}, {torch.get_num_threads()} thread(s), median of {epochs} timed epoch(s) "
          "after 1 warm-up")
    agent_s = statistics.median(agent_times[1:])
    rows = [(f"plain, DataLoader num_workers={workers}", statistics.median(times[1:]))
            for workers, (_, times) in plain_sides.items()]
    rows.append(("agent, MnistDataLoader (tensor slicing)", agent_s))
    for label, value in rows:
        print(f"  {label:<42}{value:>8.2f} s/epoch")
    for workers, (_, times) in plain_sides.items():
        ratio = agent_s / statistics.median(times[1:])
        print(f"agent/plain (num_workers={workers}): {ratio:.2f}  (< 1: the agent is faster)")


def time_to_accuracy(data_folder: str, seeds: list[int], source: str):
    """Each config trained as shipped, once per seed, alternating; (seconds, accuracy, ...) per run."""
    runs = {RECIPE: [], NEW: []}
    device = None
    for seed in seeds:
        for name in runs:
            agent = build_agent(name, data_folder, f"exp_name=bench_{name}_{seed}", f"seed={seed}")
            device = agent.device
            seconds = timed(agent.run, device)
            agent.finalize()
            runs[name].append((seconds, agent.last_metrics["val/accuracy"], agent.current_epoch, agent.config))

    print(f"\nMNIST time to accuracy: {TRAIN_SIZE:,} training / {TEST_SIZE:,} held-out {source} (a proxy for "
          f"the 60,000 / 10,000 split), {device}, {torch.get_num_threads()} thread(s), "
          f"seed(s) {', '.join(map(str, seeds))}, medians; held-out accuracy of the last epoch's weights")
    medians = {}
    for name, results in runs.items():
        config = results[0][3]
        seconds = statistics.median(r[0] for r in results)
        accuracy = statistics.median(r[1] for r in results)
        medians[name] = seconds, accuracy
        recipe = (f"{config.network} net, {config.optimizer} lr {config.learning_rate}, {config.schedule} "
                  f"schedule, batch {config.batch_size}")
        print(f"  {name}  {results[0][2]:>2} epochs  {seconds:7.1f} s  held-out accuracy {accuracy:.2%}  ({recipe})")
        if len(results) > 1:
            print(f"    each seed: {', '.join(f'{r[0]:.1f} s {r[1]:.2%}' for r in results)}")
    (new_s, new_acc), (recipe_s, recipe_acc) = medians[NEW], medians[RECIPE]
    verdict = "meets" if new_s <= 0.5 * recipe_s and new_acc >= recipe_acc else "misses"
    print(f"new/recipe wall time: {new_s / recipe_s:.2f}, accuracy {new_acc - recipe_acc:+.2%} "
          f"({verdict} the goal: <= 0.5x at >= the recipe's accuracy)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("epoch", "accuracy", "both"), default="both",
                        help="seconds per epoch against the plain loop, time to accuracy, or both (default)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="epoch: timed epochs per side, after one warm-up (default 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1],
                        help="accuracy: one run of each config per seed, alternating (default 1, the configs')")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for every part (default: torch's choice)")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0],
                        help="epoch: DataLoader workers of the plain side; several values time one plain "
                             "side each (default 0)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels, source = load_digits()

    previous_dir = os.getcwd()
    with tempfile.TemporaryDirectory() as workdir:
        os.chdir(workdir)  # experiments/ and the IDX files go here, not into the repository
        try:
            data_folder = os.path.join(workdir, "data")
            write_raw_split(data_folder, True, images[:TRAIN_SIZE], labels[:TRAIN_SIZE])
            write_raw_split(data_folder, False, images[TRAIN_SIZE:], labels[TRAIN_SIZE:])
            if args.part in ("epoch", "both"):
                seconds_per_epoch(data_folder, args.epochs, args.num_workers, source)
            if args.part in ("accuracy", "both"):
                time_to_accuracy(data_folder, args.seeds, source)
        finally:
            os.chdir(previous_dir)  # leave the folder before it is deleted


if __name__ == "__main__":
    main()
