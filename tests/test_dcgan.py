"""DCGAN: parameter counts, image sizes, and the example end to end on an image-folder fixture."""
import json

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from graphs.models.dcgan_discriminator import Discriminator
from graphs.models.dcgan_generator import Generator
from tests.conftest import ROOT, run_main

CONFIG = ROOT / "configs" / "dcgan_exp_0.json"


def params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_of_the_paper_network():
    assert params(Generator(100, 64, 3, 64)) == 3_576_704
    assert params(Discriminator(64, 3, 64)) == 2_765_568


@pytest.mark.parametrize("size", [32, 64, 128])
def test_image_sizes_from_the_config(size):
    generator, discriminator = Generator(image_size=size, channels=1), Discriminator(image_size=size, channels=1)
    images = generator(torch.randn(2, 100, 1, 1))
    assert images.shape == (2, 1, size, size) and images.abs().max() <= 1
    assert discriminator(images).shape == (2,)
    with pytest.raises(ValueError, match="power of two"):
        Generator(image_size=48)


def test_initialisation_as_in_the_paper():
    generator = Generator()
    conv, norm = generator.main[0].weight.detach(), generator.main[1]
    assert abs(float(conv.std()) - 0.02) < 0.002 and abs(float(conv.mean())) < 0.002
    assert abs(float(norm.weight.detach().mean()) - 1.0) < 0.01 and float(norm.bias.detach().abs().max()) == 0.0


@pytest.fixture(scope="module")
def face_folder(tmp_path_factory):
    """24 small images in two class folders, of mixed sizes (the loader resizes and crops)."""
    folder = tmp_path_factory.mktemp("faces")
    generator = torch.Generator().manual_seed(0)
    for index in range(24):
        subfolder = folder / ("a" if index % 2 else "b")
        subfolder.mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, (40 + index % 3, 36, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(subfolder / f"{index:03d}.png")
    return folder


def overrides(folder, **extra):
    settings = {"dataset": "folder", "data_folder": str(folder), "data_mode": "local", "image_size": 32,
                "num_filt_g": 8, "num_filt_d": 8, "batch_size": 8, "max_epoch": 2, "log_interval": 1,
                "num_samples": 16, "data_loader_workers": 0, **extra}
    args = []
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def test_train_resume_and_generate(face_folder, tmp_path):
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight_dir.mkdir(), split_dir.mkdir()
    straight = run_main([CONFIG, *overrides(face_folder)], straight_dir)
    assert straight.returncode == 0, straight.stderr
    exp = straight_dir / "experiments" / "dcgan_exp_0"
    assert sorted(p.name for p in (exp / "out").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    assert Image.open(exp / "out" / "epoch_002.png").size == (8 * 34 + 2, 2 * 34 + 2)   # 16 images, 8 a row
    results = json.loads((exp / "results.json").read_text())
    assert results["params"] == {"netG": params(Generator(100, 8, 3, 32)), "netD": params(Discriminator(8, 3, 32))}
    assert results["epochs_done"] == 2 and results["iterations"] == 6                   # 24 images, batches of 8

    events = EventAccumulator(str(exp / "summaries"))
    events.Reload()
    assert {"train/loss_d", "train/loss_g", "train/d_x", "train/d_g_z", "train/lr_optimizerG"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss_g")] == list(range(1, 7))
    assert events.Tags()["images"] == ["samples"]

    assert run_main([CONFIG, *overrides(face_folder, max_epoch=1)], split_dir).returncode == 0
    resumed = run_main([CONFIG, *overrides(face_folder), "--resume"], split_dir)
    assert resumed.returncode == 0, resumed.stderr
    first = torch.load(exp / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    second = torch.load(split_dir / "experiments" / "dcgan_exp_0" / "checkpoints" / "checkpoint.pth.tar",
                        weights_only=True)
    for net in ("netG", "netD"):
        for name, value in first["models"][net].items():
            assert torch.equal(value, second["models"][net][name]), (net, name)
    assert torch.equal(first["extra"]["fixed_noise"], second["extra"]["fixed_noise"])
    assert first["optimizers"].keys() == {"optimizerG", "optimizerD"}

    generated = run_main([CONFIG, *overrides(face_folder, mode="generate", interpolation_steps=5,
                                             interpolations=3)], straight_dir)
    assert generated.returncode == 0, generated.stderr
    assert Image.open(exp / "out" / "generated.png").size == (8 * 34 + 2, 2 * 34 + 2)
    assert Image.open(exp / "out" / "interpolation.png").size == (5 * 34 + 2, 3 * 34 + 2)
    assert json.loads((exp / "results.json").read_text())["generate"]["epoch"] == 2
