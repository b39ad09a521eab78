"""ENet class weights 1 / ln(1.02 + p_c) of the Pascal VOC 2012 training masks, computed and saved
without training (what "class_weights": "auto" does once, to the file it reads):

    python -m datasets.voc_class_weights --data-folder data/voc [--sbd] [--output weights.npy]
"""
import argparse
import logging
import sys
from pathlib import Path

import torch

from datasets.voc import CLASSES, MaskFiles, training_files, weights_cache_path
from graphs.losses.class_weights import count_pixels, enet_weights, save_class_weights
from utils.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.voc_class_weights",
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
