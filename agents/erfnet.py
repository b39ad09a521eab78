"""ERFNet semantic segmentation on Pascal VOC 2012 (Romera et al., IEEE T-ITS 2018): Adam 5e-4
with polynomial decay, cross entropy weighted per class (ENet's 1 / ln(1.02 + p)) ignoring the
border label 255, mIoU from one confusion matrix over the whole validation set."""
import math
import urllib.parse
from pathlib import Path
from types import NoneType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn, optim
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import save_image

from agents.base import SupervisedAgent
from datasets.voc import (CLASSES, DATA_MODES, IGNORE_INDEX, MEAN, STD, MaskFiles, VOCDataLoader, colorize,
                          eval_collate, save_mask, training_files, weights_cache_path)
from graphs.losses.class_weights import cached_enet_weights, load_class_weights
from graphs.models.erfnet import ERFNet
from utils import checkpoint as ckpt
from utils.config import Key
from utils.data import DATA_LOADER_KEYS
from utils.distributed import all_reduce_sum
from utils.errors import CheckpointError, ConfigError
from utils.export import ExportTarget
from utils.metrics import ConfusionMatrix, segmentation_metrics
from utils.predict import (IMAGE_EXTENSIONS, TABLE_ROWS, SegmentationTransform, input_files, output_names, read_image,
                           write_csv)

ENCODER_URL = ("https://github.com/Eromera/erfnet_pytorch/raw/master/trained_models/"
               "erfnet_encoder_pretrained.pth.tar")


class ERFNetAgent(SupervisedAgent):
    DEFAULTS = {
        **DATA_LOADER_KEYS,
        "data_folder": "data/voc",
        "data_mode": Key("download", choices=DATA_MODES),
        "sbd": False,                 # train on VOC 2012 train + SBD ("train_aug", 10,582 images)
        # training crops are img_size^2; validation images get this shorter side; a multiple of 8.
        # The key keeps the original template's ERFNet name (its DCGAN config says image_size).
        "img_size": Key(256, minimum=8),
        "scale_range": [0.5, 2.0],    # random scale of the training images, relative to img_size
        "batch_size": 16,
        "test_batch_size": 16,
        "max_epoch": 150,
        "learning_rate": Key(5e-4, minimum=0),
        "betas": [0.9, 0.999],
        "eps": Key(1e-8, minimum=0),
        "weight_decay": Key(1e-4, minimum=0),
        "lr_power": Key(0.9, minimum=0),   # learning_rate * (1 - step / steps) ** lr_power
        "lr_step": Key("iteration", choices=("iteration", "epoch")),   # what a step of that decay is
        "class_weights": Key("auto", types=(str, NoneType)),   # "auto" (ENet), a .npy path, or null
        "pretrained_encoder": Key(None, types=(str, NoneType)),  # encoder weights to start from
        "val_examples": Key(4, minimum=0),   # validation images shown in TensorBoard: image | truth | prediction
        "monitor": "val/mIoU",
        "monitor_mode": "max",
    }
    metrics = ("loss", "pixel_accuracy", "mean_class_accuracy", "mIoU")
    modes = ("train", "test", "predict", "export")
    size_multiple = 8             # ERFNet downsamples 3 times: inputs are padded to multiples of 8
    unsupported_keys = {"overfit_batches": "its validation batches are whole images at their own size, "
                                           "not training crops (try limit_train_batches and limit_val_batches)"}

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if config.img_size % 8:
            raise ConfigError(f"img_size is {config.img_size}; ERFNet downsamples 3 times, so it must be a "
                              f"multiple of 8 (e.g. 256)")
        numbers = [value for key in ("scale_range", "betas") for value in config[key]]
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in numbers):
            raise ConfigError(f"scale_range {config.scale_range} and betas {config.betas} must hold numbers")
        if len(config.scale_range) != 2 or not 0 < config.scale_range[0] <= config.scale_range[1]:
            raise ConfigError(f"config key 'scale_range' is {config.scale_range}; it must be [low, high] with "
                              "0 < low <= high (e.g. [0.5, 2.0])")
        if len(config.betas) != 2 or not all(0 <= beta < 1 for beta in config.betas):
            raise ConfigError(f"config key 'betas' is {config.betas}; Adam's betas are two numbers in [0, 1)")
        weights = config.class_weights
        if weights not in (None, "auto") and not Path(weights).is_file():
            raise ConfigError(f"class weights file '{weights}' does not exist; set \"class_weights\" to a "
                              f".npy of {len(CLASSES)} numbers, to \"auto\" (ENet weights of the training masks) "
                              "or null")
        encoder = config.pretrained_encoder
        if config.mode == "train" and encoder and "://" not in encoder and not Path(encoder).is_file():
            raise CheckpointError(f"pretrained encoder '{encoder}' does not exist; download the authors' "
                                  f"ImageNet encoder ({ENCODER_URL}) there, or set \"pretrained_encoder\": null "
                                  "to train from scratch")

    def build(self):
        cfg = self.config
        training = cfg.mode == "train"
        self.raw_model = self.networks(cfg, {})["model"]
        if training and cfg.pretrained_encoder:
            self.load_pretrained_encoder(self.local_copy(cfg.pretrained_encoder))
        self.model = self.add_model("model", self.raw_model)   # raw_model wrapped (DDP, compile) for training
        optimizer = self.add_optimizer("optimizer", optim.Adam(
            self.model.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.betas), eps=cfg.eps,
            weight_decay=cfg.weight_decay))
        self.data_loader = VOCDataLoader(
            data_folder=cfg.data_folder, data_mode=cfg.data_mode, sbd=cfg.sbd, img_size=cfg.img_size,
            scale_range=cfg.scale_range, batch_size=cfg.batch_size, test_batch_size=cfg.test_batch_size,
            workers=cfg.data_loader_workers, pin_memory=cfg.pin_memory, device=self.device, train=training)
        if training:
            # A lambda (not a bound method): LambdaLR leaves plain functions out of its state_dict.
            poly = optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.poly_factor(step))
            self.add_scheduler("scheduler", poly, interval=cfg.lr_step)
            self.logger.info(f"{len(self.data_loader.train_set):,} training images "
                             f"({len(self.data_loader.train_loader):,} iterations an epoch), "
                             f"{len(self.data_loader.valid_set):,} validation images")
        weights = self.class_weights()
        self.loss_weights = None if weights is None else torch.tensor(weights, device=self.device)
        self.criterion = nn.CrossEntropyLoss(weight=self.loss_weights, ignore_index=IGNORE_INDEX)
        # The same validation images every time, spread over the set.
        last = len(self.data_loader.valid_set) - 1
        self.examples = sorted({int(i) for i in np.linspace(0, last, min(cfg.val_examples, last + 1)).round()})

    @classmethod
    def networks(cls, config, inference):
        return {"model": ERFNet(len(CLASSES))}

    def inference_info(self):
        # as validation images are read (datasets/voc.py eval_transform, eval_collate)
        return {"input": "image", "channels": 3, "img_size": self.config.img_size, "size_multiple": self.size_multiple,
                "mean": list(MEAN), "std": list(STD), "class_names": list(CLASSES)}

    @classmethod
    def input_transform(cls, inference, device="cpu"):
        return SegmentationTransform(inference["img_size"], inference["mean"], inference["std"],
                                     inference["size_multiple"], device, inference["class_names"])

    def poly_factor(self, step: int) -> float:
        """The learning rate's share at `step` (an iteration or an epoch, as lr_step says). The step
        count is read when called: under torchrun each process has its share of the iterations."""
        cfg = self.config
        steps = self.max_epoch * (self.steps_per_epoch() if cfg.lr_step == "iteration" else 1)
        return (1 - min(step, steps) / steps) ** cfg.lr_power

    def class_weights(self) -> np.ndarray | None:
        cfg = self.config
        if cfg.class_weights is None:
            return None
        if cfg.class_weights != "auto":
            return load_class_weights(cfg.class_weights, len(CLASSES))

        def read_masks():
            files = training_files(cfg.data_folder, cfg.sbd, cfg.data_mode == "download")
            # Its own generator: whether the weights are cached must not change the seeded run.
            return torch.utils.data.DataLoader(MaskFiles([mask for _, _, mask in files]), batch_size=None,
                                               num_workers=cfg.data_loader_workers, generator=torch.Generator())

        return cached_enet_weights(weights_cache_path(cfg.data_folder, cfg.sbd), read_masks, len(CLASSES),
                                   write=self.is_main)

    def local_copy(self, source: str) -> str:
        """A path as it is; a URL downloaded once into torch's hub cache (TORCH_HOME/hub/checkpoints,
        ~/.cache/torch/hub/checkpoints by default), where torchvision keeps its weights too."""
        if "://" not in source:
            return source
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(source).path).name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.logger.info(f"downloading the pretrained encoder from {source} to {path}")
            try:  # to a temporary file, renamed when complete
                torch.hub.download_url_to_file(source, str(path), progress=self.is_main)
            except (OSError, ValueError) as e:   # urllib's URLError and HTTPError are OSErrors
                raise CheckpointError(f"could not download the pretrained encoder from {source} ({e}); "
                                      f"download it by hand and set \"pretrained_encoder\" to its path, or "
                                      "set it to null to train from scratch") from None
        return str(path)

    def load_pretrained_encoder(self, path: str):
        """Encoder weights from the authors' ImageNet checkpoint, or from any file holding an ERFNet
        (this framework's checkpoints, a state_dict); the decoder keeps its random start."""
        state = ckpt.torch_load(path, "pretrained encoder", f"download it again ({ENCODER_URL}) or set "
                                "\"pretrained_encoder\": null")
        if isinstance(state, dict) and "state_dict" in state:          # the authors' files
            state = state["state_dict"]
        elif isinstance(state, dict) and isinstance(state.get("models"), dict):   # this framework's checkpoints
            state = state["models"].get("model", {})
        if not isinstance(state, dict):
            raise CheckpointError(f"pretrained encoder '{path}' holds no state_dict")
        try:
            unused = self.raw_model.load_encoder(state)
        except ValueError as e:
            raise CheckpointError(f"pretrained encoder '{path}' does not fit ERFNet's encoder: {e}") from None
        self.logger.info(f"encoder weights loaded from {path}"
                         + (f" ({len(unused)} other tensors in the file left out)" if unused else ""))

    def train_step(self, batch):
        images, masks = batch                            # (B, 3, S, S), (B, S, S) uint8
        return self.criterion(self.model(images), masks.long())

    def validate_step(self, batch) -> dict:
        """An eval_collate batch -> for each image: its prediction (H, W) at its mask's original size,
        and the summed weighted loss and summed weight of its labelled pixels, so that the loss is
        averaged over the data set's pixels as cross entropy averages them over a batch's."""
        # Images of one padded size go through the network together.
        logits, shapes = [None] * len(batch["image"]), {}
        for i, image in enumerate(batch["image"]):
            shapes.setdefault(tuple(image.shape), []).append(i)
        for members in shapes.values():
            out = self.raw_model(self.to_device(torch.stack([batch["image"][i] for i in members])))   # (n, C, h', w')
            for j, i in enumerate(members):
                logits[i] = out[j:j + 1]
        predictions, loss_sums, weight_sums = [], [], []
        sizes = zip(batch["size"].tolist(), batch["mask_size"].tolist())
        for i, ((h, w), (mask_h, mask_w)) in enumerate(sizes):
            logit = F.interpolate(logits[i][:, :, :h, :w].float(), size=(mask_h, mask_w), mode="bilinear",
                                  align_corners=False)    # (1, C, H, W)
            target = batch["mask"][i:i + 1, :mask_h, :mask_w].long()
            loss_sums.append(F.cross_entropy(logit, target, weight=self.loss_weights, ignore_index=IGNORE_INDEX,
                                             reduction="sum"))
            labelled = target != IGNORE_INDEX
            pixel_weights = (labelled.float() if self.loss_weights is None
                             else self.loss_weights[target.masked_fill(~labelled, 0)] * labelled)
            weight_sums.append(pixel_weights.sum())
            predictions.append(logit[0].argmax(dim=0))
        return {"predictions": predictions, "loss_sums": loss_sums, "weight_sums": weight_sums}

    @torch.no_grad()
    def score(self, loader, prefix: str, on_prediction=None) -> tuple[dict, list]:
        """({prefix/loss, pixel_accuracy, mean_class_accuracy, mIoU}, per-class IoU) over the whole
        loader, summed over all processes; on_prediction(index, prediction) sees every image."""
        self.train_mode(False)
        confusion = ConfusionMatrix(len(CLASSES), self.device)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)     # weighted loss, weight
        seen, size = 0, len(loader.dataset)
        batches = self.val_batches(loader)
        for batch in self.progress(batches, desc=prefix, leave=False, total=len(batches)):
            batch["mask"] = self.to_device(batch["mask"])
            with self.autocast():
                out = self.validate_step(batch)
            for i, prediction in enumerate(out["predictions"]):
                # Under torchrun, DistributedSampler pads the last round with images seen already:
                # this process's k-th image is at rank + k * world_size of the padded order.
                if self.rank + (seen + i) * self.world_size >= size:
                    continue
                mask_h, mask_w = batch["mask_size"][i].tolist()
                confusion.update(prediction, batch["mask"][i, :mask_h, :mask_w])
                sums += torch.stack([out["loss_sums"][i], out["weight_sums"][i]]).double()
                if on_prediction is not None:
                    on_prediction(int(batch["index"][i]), prediction)
            seen += len(out["predictions"])
        confusion.all_reduce()
        loss_sum, weight_sum = all_reduce_sum(sums).tolist()
        scores = segmentation_metrics(confusion.counts)
        metrics = {f"{prefix}/loss": loss_sum / weight_sum if weight_sum else math.nan}
        for name in ("pixel_accuracy", "mean_class_accuracy", "mIoU"):
            metrics[f"{prefix}/{name}"] = scores[name]
        return metrics, scores["iou"]

    def validate(self):
        metrics, iou = self.score(self.data_loader.valid_loader, "val")
        # NaN: the class is in neither the masks nor the predictions
        self.log_scalars({f"val_iou/{name}": value for name, value in zip(CLASSES, iou) if not math.isnan(value)},
                         self.current_epoch)
        self.write_examples()
        return metrics

    @torch.no_grad()
    def write_examples(self):
        """For each fixed validation image, image | ground truth | prediction side by side, at the
        image's original size, in the VOC colours (the 255 border cream)."""
        if not self.is_main:
            return
        self.train_mode(False)
        dataset = self.data_loader.valid_set
        for index in self.examples:
            batch = eval_collate([dataset[index]])
            batch["mask"] = self.to_device(batch["mask"])
            with self.autocast():
                prediction = self.validate_step(batch)["predictions"][0]
            image, mask = dataset.read(index)                          # (3, H, W) uint8, (H, W) uint8
            strip = torch.cat([image.float() / 255, colorize(mask), colorize(prediction).cpu()], dim=2)
            self.log_images(f"val_examples/{dataset.names[index]}", strip, self.current_epoch)

    def test(self):
        """Evaluate the validation set (VOC 2012 test has no public masks), write every prediction as
        a palette PNG named like its image to out/, and print the metrics table."""
        names, out = self.data_loader.valid_set.names, self.paths.out
        out.mkdir(parents=True, exist_ok=True)

        def write_mask(index, prediction):
            save_mask(prediction, out / f"{names[index]}.png")

        metrics, iou = self.score(self.data_loader.valid_loader, "test", on_prediction=write_mask)
        self.log_scalars(metrics, self.current_epoch)
        self.mode_results = {**metrics, "test/iou": dict(zip(CLASSES, iou)), "epoch": self.current_epoch,
                             "masks": str(out)}
        width = max(len(name) for name in (*CLASSES, "mean class acc."))
        lines = [f"  {name:<{width}}  {value * 100:6.2f}" for name, value in zip(CLASSES, iou)]
        lines += [f"  {'mIoU':<{width}}  {metrics['test/mIoU'] * 100:6.2f}",
                  f"  {'pixel accuracy':<{width}}  {metrics['test/pixel_accuracy'] * 100:6.2f}",
                  f"  {'mean class acc.':<{width}}  {metrics['test/mean_class_accuracy'] * 100:6.2f}",
                  f"  {'loss':<{width}}  {metrics['test/loss']:8.4f}"]
        self.logger.info(f"test of the model from epoch {self.current_epoch} on {len(names):,} validation "
                         f"images (IoU %; nan: a class in neither truth nor prediction); masks in {out}:\n"
                         + "\n".join(lines))

    @torch.no_grad()
    def predict(self):
        """For every image predict_input names, at the image's own size: its palette mask in out/masks/,
        the mask over the image in out/overlays/, and in out/predictions.csv the share of its pixels
        each class covers."""
        files = input_files(self.config.predict_input, IMAGE_EXTENSIONS, "images")
        for file in files:          # every file read before any is written
            read_image(file, "RGB")
        transform = self.input_transform(self.inference, self.device)
        out, rows = self.paths.out, []
        self.train_mode(False)
        for file, name in zip(files, output_names(files)):
            image = transform.rgb(file)
            logits = transform.to_image_size(self.model(transform(image)), image)      # (1, C, H, W)
            mask = logits[0].argmax(dim=0).cpu()                                       # (H, W)
            for folder in ("masks", "overlays"):
                (out / folder / name).parent.mkdir(parents=True, exist_ok=True)
            save_mask(mask, out / "masks" / f"{name}.png")
            save_image(overlay(TF.pil_to_tensor(image), mask), out / "overlays" / f"{name}.png")
            shares = torch.bincount(mask.flatten(), minlength=len(CLASSES)).double() / mask.numel()
            rows.append([str(file), f"masks/{name}.png", f"overlays/{name}.png",
                         *(f"{share:.6f}" for share in shares.tolist())])
        write_csv(out / "predictions.csv", ["input", "mask", "overlay", *CLASSES], rows)
        self.mode_results = {"inputs": len(files), "masks": str(out / "masks"), "overlays": str(out / "overlays"),
                             "predictions": str(out / "predictions.csv"), "epoch": self.current_epoch}
        self.logger.info(f"{len(files):,} images segmented by the model of epoch {self.current_epoch}: masks in "
                         f"{out / 'masks'}, overlays in {out / 'overlays'}:\n" + coverage_table(rows, CLASSES))

    def export_target(self):
        """The network on 2 images of img_size x img_size; batch, height and width stay free (any
        multiple of 8), checked on 3 images of another size."""
        size, multiple = self.inference["img_size"], self.size_multiple
        transform = self.input_transform(self.inference, self.device)
        example = transform.normalize(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)))
        check = transform.normalize(torch.rand(3, 3, size + multiple, size + 2 * multiple,
                                               generator=torch.Generator().manual_seed(1)))
        batch = torch.export.Dim("batch")
        height, width = torch.export.Dim("height_8ths", min=1), torch.export.Dim("width_8ths", min=1)
        shapes = ({0: batch, 2: multiple * height, 3: multiple * width},)
        return ExportTarget(self.model, (example,), shapes, (check,))


def overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 image, (H, W) mask -> (3, H, W) float in [0, 1]: half image, half class colour
    where a class other than background is predicted, the image elsewhere."""
    picture = image.float() / 255
    labelled = (mask != 0).unsqueeze(0)
    return torch.where(labelled, 0.5 * picture + 0.5 * colorize(mask), picture)


def coverage_table(rows: list, class_names) -> str:
    """input, and the classes that cover most of it (background left out), for the first rows."""
    lines = []
    for row in rows[:TABLE_ROWS]:
        shares = sorted(((float(s), name) for name, s in zip(class_names, row[3:]) if name != "background"),
                        reverse=True)
        shown = ", ".join(f"{name} {share:.0%}" for share, name in shares[:3] if share > 0) or "background only"
        lines.append(f"  {row[0]}  {shown}")
    if len(rows) > TABLE_ROWS:
        lines.append(f"  ... and {len(rows) - TABLE_ROWS:,} more")
    return "\n".join(lines)
