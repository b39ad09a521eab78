"""Inference speed of CondenseNet-86 before and after condensation: images per second of the
trained form (learned group convolutions: dense 1x1 convolutions with masked weights) against the
condensed form (index select + group convolutions), CPU, batch 64, eval mode, one process.

    .venv/bin/python bench/condensenet_infer.py [--batches N] [--threads N]

condensed/trained > 1 means the condensed network is faster. Random weights do not change the
speed; the network is pruned to the end of condensation first, as after training.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from graphs.models.condensenet import CondenseNet, condense, count_macs

BATCH_SIZE = 64


def images_per_second(model, images, batches: int) -> float:
    with torch.inference_mode():
        model(images)                                   # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            model(images)
        return batches * len(images) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="timed batches per repeat (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    trained = CondenseNet().eval()
    trained.condense_to(1.0)
    condensed = condense(trained).eval()
    images = torch.randn(BATCH_SIZE, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(trained(images), condensed(images), atol=1e-4)

    speeds = {"trained": [], "condensed": []}
    for _ in range(args.repeats):
        for name, model in (("trained", trained), ("condensed", condensed)):
            speeds[name].append(images_per_second(model, images, args.batches))
    print(f"CondenseNet-86 inference, CPU, batch {BATCH_SIZE}, {args.threads} threads, "
          f"median of {args.repeats} repeats of {args.batches} batches")
    for name, model in (("trained", trained), ("condensed", condensed)):
        params = sum(p.numel() for p in model.parameters())
        print(f"  {name:<10} {statistics.median(speeds[name]):8.0f} images/s   {params:>9,} parameters   "
              f"{count_macs(model) / 1e6:6.1f}M multiply-adds")
    ratio = statistics.median(speeds["condensed"]) / statistics.median(speeds["trained"])
    print(f"condensed/trained speed: {ratio:.2f}")


if __name__ == "__main__":
    main()
