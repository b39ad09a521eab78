"""ERFNet on Pascal VOC: the network's size and blocks, class weights, the VOC data (palette,
joint transforms, SBD's train_aug, missing files), and the example end to end on a tiny fixture in
VOC's own layout (tests/fixtures.py: JPEG images, palette PNG masks, ImageSets lists). The
confusion-matrix metrics are in tests/test_metrics.py."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datasets.voc import (CLASSES, IGNORE_INDEX, SegmentationDataset, VOCDataLoader, eval_collate, read_mask,
                          save_mask, train_transform, training_files, voc_palette, weights_cache_path)
from graphs.losses.class_weights import count_pixels, enet_weights
from graphs.models.custom_layers.erfnet_blocks import DownsamplerBlock, NonBottleneck1d
from graphs.models.erfnet import ERFNet
from tests.conftest import ROOT, run_main_in_process, set_args
from tests.fixtures import VOC_COLOURS, VOC_SIZES, write_voc
from tests.shipped import ERFNET as SMALL
from tests.shipped import checkpoint
from tests.test_distributed import torchrun
from utils.errors import CheckpointError, ConfigError, DataError

CONFIG = ROOT / "configs" / "erfnet_exp_0.json"


def params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- the network


def test_parameter_count_of_the_paper_network():
    assert params(ERFNet(21)) == 2_064_321
    assert params(ERFNet(21, encoder_head=True)) == 2_067_030       # the authors' Net(21)


def test_architecture_as_in_table_1():
    net = ERFNet(21).eval()
    layers = net.encoder.layers
    assert [type(layer).__name__ for layer in layers] == (["DownsamplerBlock"] + ["NonBottleneck1d"] * 5
                                                          + ["DownsamplerBlock"] + ["NonBottleneck1d"] * 8)
    assert [layer.conv3x1_2.dilation[0] for layer in layers[7:]] == [2, 4, 8, 16, 2, 4, 8, 16]
    assert [layer.dropout.p for layer in layers[1:6]] == [0.03] * 5
    assert all(layer.dropout.p == 0.3 for layer in layers[7:])
    images = torch.randn(2, 3, 64, 96)
    assert net.encoder(images).shape == (2, 128, 8, 12)
    assert net(images).shape == (2, 21, 64, 96)
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.randn(1, 3, 60, 64))


def test_blocks():
    down = DownsamplerBlock(16, 64)
    assert down.conv.out_channels == 48 and down(torch.randn(1, 16, 8, 8)).shape == (1, 64, 4, 4)
    block = NonBottleneck1d(8, dilation=4).eval()
    x = torch.randn(1, 8, 16, 16)
    assert block(x).shape == x.shape and (block(x) >= 0).all()       # ReLU after the residual sum


def authors_encoder_file(net: ERFNet, path):
    """A file laid out as the authors' ImageNet encoder: DataParallel(ERFNet_imagenet(1000)), saved
    by PyTorch 0.2 (no BN step counters), beside the classifier."""
    state = {f"module.features.encoder.{key}": value for key, value in net.encoder.state_dict().items()
             if not key.endswith("num_batches_tracked")}
    state["module.classifier.linear.weight"] = torch.zeros(1000, 128)
    torch.save({"epoch": 90, "arch": "erfnet", "best_prec1": 60.0, "state_dict": state}, path)


def test_encoder_loads_from_the_authors_layout_and_mismatches_are_errors(tmp_path):
    source, target = ERFNet(21), ERFNet(21)
    authors_encoder_file(source, tmp_path / "encoder.pth.tar")
    state = torch.load(tmp_path / "encoder.pth.tar", weights_only=True)["state_dict"]
    assert target.load_encoder(state) == ["module.classifier.linear.weight"]
    assert torch.equal(target.encoder.layers[9].conv1x3_2.weight, source.encoder.layers[9].conv1x3_2.weight)
    with pytest.raises(ValueError, match="missing"):
        target.load_encoder({"features.weight": torch.zeros(3)})
    del state["module.features.encoder.initial_block.conv.weight"]
    with pytest.raises(ValueError, match="1 of the encoder's"):
        target.load_encoder(state)


# ----------------------------------------------------------------------------- VOC data


def test_palette_and_palette_pngs(tmp_path):
    palette = np.array(voc_palette()).reshape(256, 3)
    assert palette[0].tolist() == [0, 0, 0] and palette[1].tolist() == [128, 0, 0]
    assert palette[15].tolist() == [192, 128, 128] and palette[255].tolist() == [224, 224, 192]
    mask = torch.tensor([[0, 1, 255], [15, 20, 0]])
    save_mask(mask, tmp_path / "mask.png")
    assert Image.open(tmp_path / "mask.png").mode == "P"
    assert read_mask(tmp_path / "mask.png").tolist() == mask.tolist()
    Image.fromarray(np.full((2, 2), 30, dtype=np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(DataError, match="has label 30"):
        read_mask(tmp_path / "bad.png")


def test_joint_transforms_keep_image_and_mask_aligned(voc_folder):
    torch.manual_seed(0)
    files = training_files(str(voc_folder), sbd=False, download=False)
    dataset = SegmentationDataset(files, train_transform(32, (0.5, 2.0)), train=True)
    saw_padding = False
    for _ in range(3):
        for index in range(len(dataset)):
            image, mask = dataset[index]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert mask.shape == (32, 32) and mask.dtype == torch.uint8
            assert set(mask.unique().tolist()) <= {0, 1, 12, 15, IGNORE_INDEX}     # nearest: no blended labels
            saw_padding |= bool((mask == IGNORE_INDEX).float().mean() > 0.3)
            for label, colour in VOC_COLOURS.items():     # the class's pixels have the class's colour
                inside = mask == label
                if inside.sum() > 20:                  # (edges blend when the image is scaled down)
                    channel = int(np.argmax(colour))
                    assert (image[channel][inside] > 1.0).float().mean() > 0.6
    assert saw_padding                                 # scaled below 32: padded with 255


def voc_loader(folder, scale_range=(0.5, 2.0)) -> VOCDataLoader:
    """The fixture at img_size 32, batches of 4 (training) and 3 (validation), on the CPU."""
    return VOCDataLoader(data_folder=str(folder), data_mode="local", sbd=False, img_size=32,
                         scale_range=list(scale_range), batch_size=4, test_batch_size=3, workers=0,
                         pin_memory=False, device="cpu")


def test_validation_batches_keep_original_masks(voc_folder):
    data = voc_loader(voc_folder)
    batch = next(iter(data.valid_loader))
    assert [tuple(image.shape) for image in batch["image"]] == [(3, 32, 48), (3, 40, 32), (3, 32, 32)]
    assert batch["size"].tolist() == [[32, 44], [37, 32], [32, 32]]      # shorter side img_size, unpadded
    first = data.valid_set.read(0)[1]
    height, width = batch["mask_size"][0].tolist()
    assert torch.equal(batch["mask"][0, :height, :width], first)           # untouched, original size
    assert (batch["mask"][0, height:] == IGNORE_INDEX).all()
    assert len(data.train_loader) == 2                                     # 8 images, full batches of 4
    assert eval_collate([data.valid_set[1]])["index"].tolist() == [1]


def test_the_network_fits_the_fixture_shapes(voc_folder):
    torch.manual_seed(0)
    data = voc_loader(voc_folder, scale_range=(1.0, 1.0))
    images, masks = next(iter(data.train_loader))
    net = ERFNet(21)
    optimizer = torch.optim.Adam(net.parameters(), 5e-3)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(net(images), masks.long(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 2


def test_missing_voc_is_a_clear_error(voc_folder, tmp_path):
    with pytest.raises(DataError, match="VOCdevkit/VOC2012/JPEGImages.*\"data_mode\": \"download\""):
        voc_loader(tmp_path)
    with pytest.raises(DataError, match="the folder holding VOCdevkit"):
        voc_loader(voc_folder / "VOCdevkit")


def test_sbd_joins_the_training_set_without_voc_val(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    names = write_voc(tmp_path, train=2, val=2)
    sbd = tmp_path / "SBD"
    (sbd / "img").mkdir(parents=True), (sbd / "cls").mkdir()
    sbd_names = {"train": [names["train"][0], names["val"][0], "2010_000001"], "val": ["2010_000002"]}
    for split, split_names in sbd_names.items():
        for name in split_names:
            Image.new("RGB", (24, 16)).save(sbd / "img" / f"{name}.jpg")
            segmentation = np.full((16, 24), 7, dtype=np.uint8)
            scipy_io.savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": segmentation}})
        (sbd / f"{split}.txt").write_text("\n".join(split_names) + "\n")
    files = training_files(str(tmp_path), sbd=True, download=False)
    assert [name for name, _, _ in files] == names["train"] + ["2010_000001", "2010_000002"]
    assert files[0][2].endswith(".png") and files[2][2].endswith(".mat")   # VOC's own mask first
    assert read_mask(files[2][2]).tolist() == np.full((16, 24), 7).tolist()


# ----------------------------------------------------------------------------- end to end
# The training run is the one of tests/test_shipped_configs.py (which also checks that it resumes
# bitwise), on the voc_folder fixture; the tests that read it are on the worker that trains it.
on_its_worker = pytest.mark.xdist_group("erfnet_exp_0")


def overrides(folder, **extra):
    return set_args(SMALL, data_folder=folder, **extra)


@pytest.fixture
def trained(shipped_runs):
    """configs/erfnet_exp_0.json for 2 epochs (read only: copy it to run more on it)."""
    return shipped_runs["erfnet_exp_0"]


@on_its_worker
def test_train_validate_and_write_masks(trained, voc_folder, tmp_path):
    exp = trained.straight
    assert weights_cache_path(str(voc_folder), False).is_file()           # "auto" weights, cached by the data

    results = json.loads((exp / "results.json").read_text())
    assert results["params"] == {"model": 2_064_321}
    assert results["epochs_done"] == 2 and results["iterations"] == 4      # 8 images, batches of 4
    assert results["monitor"] == "val/mIoU"
    assert set(results["last"]) == {"val/loss", "val/pixel_accuracy", "val/mean_class_accuracy", "val/mIoU"}
    assert all(0 <= results["last"][f"val/{name}"] <= 1 for name in ("pixel_accuracy", "mIoU"))
    assert {p.name for p in (exp / "checkpoints").iterdir()} == {"checkpoint.pth.tar", "model_best.pth.tar"}

    events = EventAccumulator(str(exp / "summaries"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/mIoU", "val/pixel_accuracy", "val_iou/background"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("val/mIoU")] == [1, 2]
    # Poly decay stepped once an iteration: 2 of the 4 iterations done at the start of epoch 2.
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([5e-4, 5e-4 * 0.5 ** 0.9])
    examples = sorted(tag for tag in tags["images"] if tag.startswith("val_examples/"))
    assert examples == ["val_examples/2009_000000", "val_examples/2009_000004"]
    strip = events.Images(examples[0])[-1]
    assert (strip.width, strip.height) == (3 * 56, 40)                    # image | truth | prediction

    exp = trained.copy_to(tmp_path)
    # One image a batch here, three in validation: a prediction does not depend on its batch.
    tested = run_main_in_process([CONFIG, *overrides(voc_folder, mode="test", test_batch_size=1)], tmp_path)
    assert tested.returncode == 0, tested.stderr
    assert "class weights: read from" in tested.stdout and "aeroplane" in tested.stdout
    report = json.loads((exp / "results.json").read_text())
    assert report["epochs_done"] == 2                                      # training's record stays
    assert set(report["test"]["test/iou"]) == set(CLASSES)
    assert report["test"]["test/mIoU"] == pytest.approx(report["best"]["value"])
    masks = sorted((exp / "out").glob("*.png"))
    assert [p.stem for p in masks] == [f"2009_{i:06d}" for i in range(5)]
    for index, path in enumerate(masks):
        with Image.open(path) as mask:
            assert mask.mode == "P" and mask.size[::-1] == VOC_SIZES[(index + 1) % len(VOC_SIZES)]
            assert set(np.unique(np.array(mask))) <= set(range(len(CLASSES)))

    # Two processes: 5 images in shares of 3 and 2 (DistributedSampler repeats one image to even
    # them; it is counted once), one confusion matrix summed over both, each writing its masks.
    written = {path.name: path.read_bytes() for path in masks}
    for path in masks:
        path.unlink()
    shared = torchrun([CONFIG, *overrides(voc_folder, mode="test")], tmp_path)
    assert shared.returncode == 0, shared.stderr
    assert {path.name: path.read_bytes() for path in (exp / "out").glob("*.png")} == written
    distributed = json.loads((exp / "results.json").read_text())["test"]
    assert distributed["test/iou"] == report["test"]["test/iou"]            # the same pixel counts
    for key in ("test/mIoU", "test/pixel_accuracy", "test/mean_class_accuracy", "test/loss"):
        assert distributed[key] == pytest.approx(report["test"][key]), key


@on_its_worker
def test_poly_decay_reaches_zero_at_the_last_iteration(trained):
    state = checkpoint(trained.straight)
    assert state["schedulers"]["scheduler"]["last_epoch"] == 4                # stepped every iteration
    assert state["optimizers"]["optimizer"]["param_groups"][0]["lr"] == 0


def test_a_missing_encoder_file_is_one_clear_line(voc_folder, tmp_path):
    result = run_main_in_process([CONFIG, *overrides(voc_folder, pretrained_encoder="nope.pth.tar")], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pretrained encoder 'nope.pth.tar' does not exist; "
                                                   "download"), result.stderr
    assert not (tmp_path / "experiments").exists()                # checked before anything is written


@pytest.mark.parametrize("case", ["encoder of another network", "short class weights"])
def test_files_that_do_not_fit_are_clear_errors(case, voc_folder, tmp_path, monkeypatch):
    from agents import make_config

    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "resnet.pth")
    np.save(tmp_path / "short.npy", np.ones(20, dtype=np.float32))
    extra, error, message = {
        "encoder of another network": ({"pretrained_encoder": "resnet.pth"}, CheckpointError,
                                       "does not fit ERFNet's encoder: .* tensors are missing"),
        "short class weights": ({"class_weights": "short.npy"}, ConfigError, "expected 21 numbers"),
    }[case]
    cls, config = make_config({"exp_name": "bad", "agent": "ERFNetAgent", **SMALL, "data_folder": str(voc_folder),
                               **extra})
    with pytest.raises(error, match=message):
        cls(config)


def test_class_weights_script(voc_folder, tmp_path, capsys):
    from datasets.voc_class_weights import main

    assert main(["--data-folder", str(voc_folder), "--output", str(tmp_path / "w.npy")]) == 0
    files = training_files(str(voc_folder), sbd=False, download=False)
    expected = enet_weights(count_pixels([read_mask(mask) for _, _, mask in files], len(CLASSES)))
    assert np.load(tmp_path / "w.npy") == pytest.approx(expected)
    assert "8 masks" in capsys.readouterr().out
    assert main(["--data-folder", str(tmp_path / "none")]) == 2


def test_poly_decay_per_epoch(voc_folder, tmp_path, monkeypatch):
    from agents import make_config

    monkeypatch.chdir(tmp_path)
    cls, config = make_config({"exp_name": "epochs", "agent": "ERFNetAgent", **SMALL, "data_folder": str(voc_folder),
                               "lr_step": "epoch", "max_epoch": 4})
    agent = cls(config)
    assert agent.parts.schedulers["scheduler"][1] == "epoch"
    assert [agent.poly_factor(epoch) for epoch in range(5)] == pytest.approx(
        [1, 0.75 ** 0.9, 0.5 ** 0.9, 0.25 ** 0.9, 0])


def test_checks_before_anything_runs():
    from agents import make_config

    base = {"exp_name": "x", "agent": "ERFNetAgent", **SMALL}
    with pytest.raises(ConfigError, match="multiple of 8"):
        make_config({**base, "img_size": 30})
    with pytest.raises(ConfigError, match="scale_range"):
        make_config({**base, "scale_range": [2.0, 0.5]})
    with pytest.raises(ConfigError, match="monitor"):
        make_config({**base, "monitor": "val/accuracy"})
    with pytest.raises(CheckpointError, match="does not exist"):
        make_config({**base, "pretrained_encoder": "missing.pth"})


def test_an_encoder_url_is_downloaded_once_into_torch_hub(voc_folder, tmp_path, monkeypatch):
    from agents import make_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    source = ERFNet(21)
    authors_encoder_file(source, tmp_path / "erfnet_encoder_pretrained.pth.tar")
    url = (tmp_path / "erfnet_encoder_pretrained.pth.tar").as_uri()   # file://: urllib's real download path
    cls, config = make_config({"exp_name": "url", "agent": "ERFNetAgent", **SMALL, "data_folder": str(voc_folder),
                               "pretrained_encoder": url})
    agent = cls(config)
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "erfnet_encoder_pretrained.pth.tar"
    assert cached.is_file()
    assert torch.equal(agent.raw_model.encoder.layers[9].conv1x3_2.weight, source.encoder.layers[9].conv1x3_2.weight)
    agent.finalize()

    cls, config = make_config({"exp_name": "offline", "agent": "ERFNetAgent", **SMALL, "data_folder": str(voc_folder),
                               "pretrained_encoder": (tmp_path / "absent.pth.tar").as_uri()})
    with pytest.raises(CheckpointError, match="could not download the pretrained encoder from file://.*absent"):
        cls(config)


def test_a_bad_mask_read_in_a_worker_process_is_one_clear_line(voc_folder, tmp_path):
    data = tmp_path / "voc"
    shutil.copytree(voc_folder, data)
    masks = sorted((data / "VOCdevkit" / "VOC2012" / "SegmentationClass").glob("*.png"))
    for mask in masks:
        Image.new("RGB", Image.open(mask).size).save(mask)   # every split's masks: whichever is read first
    result = run_main_in_process([CONFIG, *overrides(data, data_loader_workers=1, class_weights=None)], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: mask '") and "is an RGB image" in lines[0]
