"""Issue 16: using a trained model. mode=predict on new files (images of any size and mode, CSV
rows) writes out/ and results.json's "predict" entry and nothing else of the experiment, with the
classes an eager forward of load_trained's model gives; load_trained touches no file and no random
generator; inputs are converted as the training data were; every bad input is one line and
changes nothing. The shipped configs' trained runs come from the session fixture shipped_runs."""
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from agents.trained import load_trained
from tests import conftest
from tests.conftest import group, one_error_line, run_main_in_process, set_args, snapshot, synthetic_digits
from utils.errors import CheckpointError

NOWHERE = {"data_folder": "no/data/here"}   # predicting needs no data set: a copied experiment is enough


def changed_files(before: dict, after: dict) -> set:
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


# ----------------------------------------------------------------------------- inputs


def digit_files(folder):
    """Fixture digits as files a user might have: 28 x 28 grayscale, RGB at 56 x 56, RGBA, a JPEG,
    a 16-bit PNG, one in a subfolder; beside them a text file and a hidden PNG that a folder
    input leaves out."""
    images, _ = synthetic_digits(6, seed=5)
    pictures = [Image.fromarray(image.numpy()) for image in images]
    (folder / "more").mkdir(parents=True)
    pictures[0].save(folder / "gray.png")
    pictures[1].convert("RGB").resize((56, 56)).save(folder / "rgb_56.png")
    pictures[2].convert("RGBA").save(folder / "rgba.png")
    pictures[3].save(folder / "digit.jpg", quality=95)
    Image.fromarray(images[4].numpy().astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    pictures[5].save(folder / "more" / "nested.png")
    (folder / "notes.txt").write_text("not an image")
    pictures[0].save(folder / ".hidden.png")
    return folder, 6


def cifar_files(folder):
    """Three 32 x 32 RGB noise images and a 20 x 24 grayscale one."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(3)
    for index in range(3):
        pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(folder / f"noise_{index}.png")
    Image.fromarray(torch.randint(0, 256, (20, 24), dtype=torch.uint8, generator=generator).numpy()).save(
        folder / "gray.png")
    return folder, 4


def voc_files(folder, voc_folder):
    """Two VOC validation JPEGs, and one of them again as a 1-band grayscale PNG."""
    folder.mkdir(parents=True)
    jpegs = sorted((voc_folder / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("2009_*.jpg"))[:2]
    for jpeg in jpegs:
        shutil.copy(jpeg, folder / jpeg.name)
    Image.open(jpegs[0]).convert("L").save(folder / "gray.png")
    return folder, 3


def iris_rows(folder):
    """A CSV with a header and five flowers of the data set (rows 0, 1, 50, 100, 149)."""
    from datasets.iris import load_iris_tensors

    folder.mkdir(parents=True)
    features, _ = load_iris_tensors()
    lines = ["sepal_length,sepal_width,petal_length,petal_width"]
    lines += [",".join(f"{value:.1f}" for value in features[i].tolist()) for i in (0, 1, 50, 100, 149)]
    (folder / "flowers.csv").write_text("\n".join(lines) + "\n")
    return folder / "flowers.csv", 5


def inputs_for(name, folder, request):
    if name == "mnist_exp_0":
        return digit_files(folder)
    if name == "condensenet_exp_0":
        return cifar_files(folder)
    if name == "erfnet_exp_0":
        return voc_files(folder, request.getfixturevalue("voc_folder"))
    return iris_rows(folder)


# ----------------------------------------------------------------------------- predict


def predict(run, cwd, predict_input, **settings):
    nowhere = NOWHERE if any(str(arg).startswith("data_folder=") for arg in run.args) else {}
    return run_main_in_process([*run.args, *set_args(nowhere, mode="predict", predict_input=predict_input,
                                                     **settings)], cwd)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def eager_probabilities(exp, inputs: list) -> tuple[torch.Tensor, list]:
    """(N, classes) softmax of load_trained's model on the inputs, and its class names."""
    model, preprocess = load_trained(exp)
    with torch.no_grad():
        return model(preprocess(inputs)).softmax(dim=1), preprocess.class_names


def check_classes(exp, rows: list, inputs: list):
    probabilities, class_names = eager_probabilities(exp, inputs)
    assert [row["prediction"] for row in rows] == [class_names[i] for i in probabilities.argmax(dim=1).tolist()]
    written = torch.tensor([[float(row[name]) for name in class_names] for row in rows])
    assert torch.allclose(written, probabilities, atol=2e-6)


def check_masks(exp, rows: list):
    """Each mask file is the argmax of an eager forward at the image's own size; the overlay is as large."""
    model, preprocess = load_trained(exp)
    for row in rows:
        image = Image.open(row["input"])
        with torch.no_grad():
            logits = preprocess.to_image_size(model(preprocess(image)), image.convert("RGB"))
        mask = Image.open(exp / "out" / row["mask"])
        assert mask.mode == "P" and mask.size == image.size
        assert torch.equal(torch.from_numpy(np.array(mask)).long(), logits[0].argmax(dim=0))
        assert Image.open(exp / "out" / row["overlay"]).size == image.size
        assert math.isclose(sum(float(row[name]) for name in preprocess.class_names), 1.0, abs_tol=1e-4)


@pytest.mark.parametrize("name", [group(name) for name in
                                  ("mnist_exp_0", "condensenet_exp_0", "erfnet_exp_0", "iris_exp_0")])
def test_predict_writes_out_and_its_entry_only(name, shipped_runs, tmp_path, request):
    run = shipped_runs[name]
    exp = run.copy_to(tmp_path)
    predict_input, count = inputs_for(name, tmp_path / "inputs", request)
    before = snapshot(exp)
    done = predict(run, tmp_path, predict_input.relative_to(tmp_path))
    assert done.returncode == 0, done.stderr
    after = snapshot(exp)
    assert changed_files(before, after) - {"results.json"} == {"out/predictions.csv"} | (
        {path for path in after if path.startswith(("out/masks/", "out/overlays/"))})
    recorded, now = json.loads(before["results.json"]), json.loads(after["results.json"])
    assert {key: value for key, value in now.items() if key != "predict"} == recorded
    assert now["predict"]["inputs"] == count and now["predict"]["epoch"] == recorded["best"]["epoch"]

    rows = read_csv(exp / "out" / "predictions.csv")
    assert len(rows) == count and str(rows[0]["input"]) in done.stdout    # the printed table
    if name == "erfnet_exp_0":
        os.chdir(tmp_path)   # the rows name the inputs as predict_input gave them: relative to the run
        try:
            check_masks(exp, rows)
        finally:
            os.chdir(conftest.ROOT)
    elif name == "iris_exp_0":
        check_classes(exp, rows, [[float(v) for v in line.split(",")]
                                  for line in predict_input.read_text().splitlines()[1:]])
    else:
        check_classes(exp, rows, [tmp_path / row["input"] for row in rows])


@pytest.mark.xdist_group("mnist_exp_0")
def test_load_trained_touches_nothing(shipped_runs, tmp_path):
    """No file of the experiment changes (nor is any added), nor does torch's random state; the
    model is in eval mode with the best checkpoint's weights."""
    exp = shipped_runs["mnist_exp_0"].copy_to(tmp_path)
    before, rng = snapshot(exp), torch.get_rng_state()
    model, preprocess = load_trained(exp)
    assert snapshot(exp) == before and torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    best = torch.load(exp / "checkpoints" / "model_best.pth.tar", weights_only=True)
    assert all(torch.equal(value, best["models"]["model"][key]) for key, value in model.state_dict().items())
    latest, _ = load_trained(exp, "checkpoint")
    last = torch.load(exp / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert all(torch.equal(value, last["models"]["model"][key]) for key, value in latest.state_dict().items())
    assert preprocess.class_names == [str(digit) for digit in range(10)]


@pytest.mark.xdist_group("mnist_exp_0")
def test_load_trained_uses_the_ema_weights(shipped_runs, tmp_path):
    """A run that averaged its weights is used with the averaged ones, as its validation was."""
    run = shipped_runs["mnist_exp_0"]
    cwd = tmp_path / "ema"
    done = run_main_in_process([*run.args, *set_args({"ema": {"decay": 0.5}, "max_epoch": 1})], cwd)
    assert done.returncode == 0, done.stderr
    exp = cwd / "experiments" / "mnist_exp_0"
    state = torch.load(exp / "checkpoints" / "model_best.pth.tar", weights_only=True)
    model, _ = load_trained(exp)
    averaged = {key[len("module."):]: value for key, value in state["ema"].items() if key.startswith("module.")}
    assert all(torch.equal(value, averaged[key]) for key, value in model.state_dict().items())
    assert not all(torch.equal(value, state["models"]["model"][key]) for key, value in model.state_dict().items())


def test_images_are_converted_as_the_training_images_were(tmp_path):
    """A 28 x 28 digit saved as a PNG (8 or 16 bits) becomes the tensor MNIST's loader makes of it;
    a CIFAR-sized RGB image the tensor CIFAR-10's makes; a VOC image what validation feeds ERFNet."""
    from datasets import cifar10, mnist, voc
    from utils.predict import ImageTransform, SegmentationTransform, image_inference

    digits, _ = synthetic_digits(2, seed=7)
    inference = image_inference(1, (28, 28), range(10), (mnist.MEAN,), (mnist.STD,))
    transform = ImageTransform(inference["channels"], inference["size"], inference["mean"], inference["std"])
    assert torch.allclose(transform(Image.fromarray(digits[0].numpy())), mnist.normalize(digits[:1]), atol=1e-6)
    Image.fromarray(digits[1].numpy().astype(np.uint16) * 257).save(tmp_path / "sixteen_bit.png")
    assert torch.allclose(transform(tmp_path / "sixteen_bit.png"), mnist.normalize(digits[1:]), atol=1e-6)

    pixels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rgb = ImageTransform(3, (32, 32), cifar10.MEAN, cifar10.STD)
    picture = Image.fromarray(pixels[0].permute(1, 2, 0).numpy())
    assert torch.allclose(rgb(picture), cifar10.normalize(pixels), atol=1e-6)

    image = Image.fromarray(torch.randint(0, 256, (45, 70, 3), dtype=torch.uint8).numpy())
    segmentation = SegmentationTransform(32, voc.MEAN, voc.STD, 8)
    validation = voc.eval_collate([{"image": voc.eval_transform(32)(voc.tv_tensors.Image(
        torch.from_numpy(np.array(image)).permute(2, 0, 1))).as_subclass(torch.Tensor),
        "mask": torch.zeros(45, 70, dtype=torch.uint8), "index": 0}])
    assert torch.allclose(segmentation(image)[0], validation["image"][0], atol=1e-6)
    h, w = validation["size"][0].tolist()
    logits = torch.randn(1, 2, *segmentation(image).shape[-2:])
    assert torch.equal(segmentation.to_image_size(logits, image),
                       F.interpolate(logits[:, :, :h, :w], size=(45, 70), mode="bilinear", align_corners=False))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.xdist_group("mnist_exp_0")
def test_bad_inputs_are_one_line_and_change_nothing(shipped_runs, tmp_path):
    run = shipped_runs["mnist_exp_0"]
    exp = run.copy_to(tmp_path)
    (tmp_path / "notes.txt").write_text("a text file")
    (tmp_path / "fake.png").write_bytes(b"not a png at all")
    (tmp_path / "empty").mkdir()
    before = snapshot(exp)
    cases = {
        "missing.png": "'missing.png' does not exist",
        "notes.txt": "'notes.txt' is not an image",
        "fake.png": "'fake.png' is not an image",
        "empty": "no images in 'empty'",
        "nothing/*.png": "matches no file",
        "": "needs the inputs: --set predict_input=PATH",
    }
    for predict_input, message in cases.items():
        line = one_error_line(predict(run, tmp_path, predict_input))
        assert message in line, (predict_input, line)
    # A folder with one broken image among good ones: refused before anything is written.
    (tmp_path / "mixed").mkdir()
    Image.fromarray(synthetic_digits(1, seed=0)[0][0].numpy()).save(tmp_path / "mixed" / "good.png")
    shutil.copy(tmp_path / "fake.png", tmp_path / "mixed" / "zzz.png")
    assert "'mixed/zzz.png' is not an image" in one_error_line(predict(run, tmp_path, "mixed"))
    assert snapshot(exp) == before


@pytest.mark.xdist_group("iris_exp_0")
def test_bad_csv_rows_are_refused(shipped_runs, tmp_path):
    run = shipped_runs["iris_exp_0"]
    exp = run.copy_to(tmp_path)
    before = snapshot(exp)
    for text, message in (("5.1,3.5,1.4\n", "line 1 has 3 values; expected 4 numbers a row"),
                          ("a,b,c,d\n5.1,3.5,1.4,x\n", "line 2 is not numbers"),
                          ("a,b,c,d\n", "has no rows of data"),
                          ("5.1,3.5,nan,0.2\n", "not finite")):
        (tmp_path / "flowers.csv").write_text(text)
        assert message in one_error_line(predict(run, tmp_path, "flowers.csv")), text
    assert snapshot(exp) == before


def test_predict_before_training_and_where_it_is_no_mode(tmp_path, mnist_folder):
    settings = set_args(conftest.MNIST_SMALL, data_folder=mnist_folder, mode="predict", predict_input="x.png")
    done = run_main_in_process(["configs/mnist_exp_0.json", *settings], conftest.ROOT)   # cwd: where configs are
    assert "needs a trained model, but there is no" in one_error_line(done)
    line = one_error_line(run_main_in_process([conftest.ROOT / "configs" / "dqn_exp_0.json",
                                               *set_args(mode="predict")], tmp_path))
    assert "'mode' is \"predict\"; it must be one of \"train\", \"test\", \"export\"" in line
    assert not (tmp_path / "experiments").exists()


@pytest.mark.parametrize("mode", ["predict", "export"])
def test_predict_and_export_under_torchrun_are_refused_before_anything(mode, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")   # as torchrun sets it: every process would write the same files
    done = run_main_in_process([conftest.ROOT / "configs" / "iris_exp_0.json",
                                *set_args(mode=mode, predict_input="flowers.csv")], tmp_path)
    assert f'mode "{mode}" runs in one process: start it without torchrun' in one_error_line(done)
    assert not (tmp_path / "experiments").exists()


@pytest.mark.xdist_group("mnist_exp_0")
def test_load_trained_errors(shipped_runs, tmp_path):
    exp = shipped_runs["mnist_exp_0"].copy_to(tmp_path)
    with pytest.raises(CheckpointError, match="no experiment folder"):
        load_trained(tmp_path / "experiments" / "nope")
    with pytest.raises(CheckpointError, match=r"no checkpoint 'epoch_0009' in .*\(it has: checkpoint, model_best\)"):
        load_trained(exp, "epoch_0009")
    old = torch.load(exp / "checkpoints" / "model_best.pth.tar", weights_only=True)
    del old["inference"]        # a checkpoint saved before they carried it
    torch.save(old, exp / "checkpoints" / "old.pth.tar")
    with pytest.raises(CheckpointError, match="no \"inference\" entry"):
        load_trained(exp, "old")
