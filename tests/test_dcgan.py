"""DCGAN: parameter counts, image sizes, and the example end to end on an image-folder fixture."""
import json

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from graphs.models.dcgan_discriminator import Discriminator
from graphs.models.dcgan_generator import Generator
from tests.conftest import run_main_in_process, set_args
from tests.shipped import checkpoint


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


# ----------------------------------------------------------------------------- end to end
# The training run is the one of tests/test_shipped_configs.py (which also checks that it resumes
# bitwise: both networks, both optimizers, the fixed noise), on the image_folder fixture.


@pytest.mark.xdist_group("dcgan_exp_0")
def test_train_and_generate(shipped_runs, tmp_path):
    trained = shipped_runs["dcgan_exp_0"]
    exp = trained.straight
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
    state = checkpoint(exp)
    assert state["models"].keys() == {"netG", "netD"} and state["optimizers"].keys() == {"optimizerG", "optimizerD"}
    assert state["extra"]["fixed_noise"].shape == (16, 100, 1, 1)

    exp = trained.copy_to(tmp_path)
    generated = run_main_in_process([*trained.args, *set_args(mode="generate", interpolation_steps=5,
                                                               interpolations=3)], tmp_path)
    assert generated.returncode == 0, generated.stderr
    assert Image.open(exp / "out" / "generated.png").size == (8 * 34 + 2, 2 * 34 + 2)
    assert Image.open(exp / "out" / "interpolation.png").size == (5 * 34 + 2, 3 * 34 + 2)
    assert json.loads((exp / "results.json").read_text())["generate"]["epoch"] == 2
