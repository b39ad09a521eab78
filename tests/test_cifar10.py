"""The CIFAR-10 data loader on small fixtures: the three data modes, the pixel layout of the python
batches, and the batched crop-and-flip augmentation against a plain per-image reference."""
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets import cifar10
from datasets.cifar10 import Cifar10DataLoader, crop_and_flip, write_cifar10_batches, write_cifar10_numpy
from utils.errors import ConfigError, DataError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


def fake_cifar(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 32, 32) uint8 noise images and (n,) labels 0..9."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    return images, torch.arange(n) % 10


@pytest.fixture(scope="module")
def fixture_images():
    return (*fake_cifar(100, seed=0), *fake_cifar(50, seed=1))


@pytest.fixture(scope="module")
def batches_folder(tmp_path_factory, fixture_images):
    folder = tmp_path_factory.mktemp("cifar10_batches")
    write_cifar10_batches(str(folder), *fixture_images)
    return folder


def reference_normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def reference_crop_and_flip(images, top, left, flip, padding=4):
    """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, one image at a time."""
    out = []
    for image, t, l, f in zip(images, top.tolist(), left.tolist(), flip.tolist()):
        padded = F.pad(image, (padding,) * 4)
        crop = padded[:, t:t + image.shape[1], l:l + image.shape[2]]
        out.append(crop.flip(2) if f else crop)
    return torch.stack(out)


def pass_over(loader):
    images, labels = zip(*loader)
    return torch.cat(images).cpu(), torch.cat(labels).cpu()


def loader(folder, mode="local", device="cpu", batch_size=32, test_batch_size=20):
    return Cifar10DataLoader(data_folder=str(folder), data_mode=mode, batch_size=batch_size,
                             test_batch_size=test_batch_size, device=torch.device(device))


@pytest.mark.parametrize("device", DEVICES)
def test_local_batches_load_as_float_batches_on_the_device(batches_folder, device):
    data = loader(batches_folder, device=device)
    assert data.valid_loader is data.test_loader
    assert len(data.train_loader) == 4 and len(data.test_loader) == 3       # 100 / 32, 50 / 20
    images, labels = next(iter(data.train_loader))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert images.device.type == device and labels.device.type == device
    assert labels.dtype == torch.int64
    assert [len(labels) for _, labels in data.test_loader] == [20, 20, 10]


def test_the_test_split_round_trips_in_cifar_pixel_order(batches_folder, fixture_images):
    *_, test_images, test_labels = fixture_images
    images, labels = pass_over(loader(batches_folder).test_loader)
    torch.testing.assert_close(images, reference_normalize(test_images))
    assert torch.equal(labels, test_labels)

    # The file rows hold the 1024 red bytes (row-major), then the green ones, then the blue ones.
    with open(batches_folder / "cifar-10-batches-py" / "test_batch", "rb") as f:
        row = pickle.load(f, encoding="latin1")["data"][7]
    image = test_images[7]
    assert bytes(row[:1024]) == bytes(image[0].flatten().tolist())
    assert row[2048 + 5 * 32 + 9] == image[2, 5, 9]


def test_a_hand_made_python2_style_batch_reads_as_red_green_blue_planes(tmp_path):
    """Built without the writer, with bytes keys as pickle.load(encoding="bytes") shows the
    official files: one image whose red plane is 10, green 20, blue 30, and one red marker pixel."""
    row = np.repeat(np.array([10, 20, 30], dtype=np.uint8), 1024)
    row[0 * 1024 + 3 * 32 + 17] = 255                                   # red, row 3, column 17
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": row[None], b"labels": [3]}, f, protocol=2)
    images, labels = cifar10.read_local_split(str(tmp_path), train=True)
    assert images.shape == (5, 3, 32, 32) and labels.tolist() == [3] * 5
    assert images[0, 0, 3, 17] == 255 and (images[0, 0] == 10).sum() == 1023
    assert (images[0, 1] == 20).all() and (images[0, 2] == 30).all()


def test_torchvision_reads_the_written_batches_as_it_reads_the_official_ones(batches_folder, fixture_images,
                                                                             monkeypatch):
    """torchvision's own reader (checksums skipped) is the reference for the layout; this is also
    the "download" mode's path when the files are already there."""
    from torchvision.datasets import CIFAR10, cifar
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)
    train_images, train_labels, _, _ = fixture_images
    reference = CIFAR10(str(batches_folder), train=True)
    assert np.array_equal(reference.data, train_images.permute(0, 2, 3, 1).numpy())   # (N, 32, 32, 3)
    assert reference.targets == train_labels.tolist() and reference.classes[0] == "airplane"

    images, labels = cifar10.download_split(str(batches_folder), train=True)
    assert torch.equal(images, train_images) and torch.equal(labels, train_labels)


def test_train_batches_change_between_epochs_and_test_batches_do_not(batches_folder):
    data = loader(batches_folder)
    torch.manual_seed(0)
    first, first_labels = pass_over(data.train_loader)
    second, second_labels = pass_over(data.train_loader)
    assert not torch.equal(first, second)
    assert sorted(first_labels.tolist()) == sorted(second_labels.tolist())  # every image once
    assert torch.equal(pass_over(data.test_loader)[0], pass_over(data.test_loader)[0])


def test_seeding_or_restoring_the_rng_state_reproduces_the_augmented_batches(batches_folder):
    data = loader(batches_folder)
    torch.manual_seed(3)
    first = pass_over(data.train_loader)
    state = torch.get_rng_state()
    second = pass_over(data.train_loader)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, pass_over(data.train_loader)))
    torch.set_rng_state(state)
    assert all(torch.equal(a, b) for a, b in zip(second, pass_over(data.train_loader)))


@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_numpy_mode_loads_the_same_images(tmp_path, batches_folder, fixture_images, layout):
    write_cifar10_numpy(str(tmp_path), *fixture_images)
    if layout == "chw":
        for split in ("train", "test"):
            path = tmp_path / f"x_{split}.npy"
            np.save(path, np.load(path).transpose(0, 3, 1, 2))
    assert np.load(tmp_path / "x_train.npy").shape == ((100, 32, 32, 3) if layout == "hwc" else (100, 3, 32, 32))
    from_numpy, from_batches = loader(tmp_path, mode="numpy"), loader(batches_folder)
    for split in ("train", "test"):
        torch.manual_seed(0)
        a = pass_over(getattr(from_numpy, f"{split}_loader"))
        torch.manual_seed(0)
        b = pass_over(getattr(from_batches, f"{split}_loader"))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), split


@pytest.mark.parametrize("top, left", [(4, 4), (0, 0), (8, 8), (1, 7)])
@pytest.mark.parametrize("flip", [False, True])
def test_a_crop_moves_a_bright_pixel_by_its_offset_and_a_flip_mirrors_it(top, left, flip):
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[0, 1, 10, 20] = 255
    out = crop_and_flip(image, torch.tensor([top]), torch.tensor([left]), torch.tensor([flip]))
    row, column = 10 + 4 - top, 20 + 4 - left              # the crop starts at (top, left) of the padded image
    if flip:
        column = 31 - column
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.uint8
    assert out[0, 1, row, column] == 255 and out.sum() == 255


def test_a_pixel_shifted_past_the_border_leaves_only_zero_padding():
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[0, 0, 0, 0] = 255
    out = crop_and_flip(image, torch.tensor([8]), torch.tensor([0]), torch.tensor([False]))
    assert out.sum() == 0                                  # shifted up by 4 rows: off the crop


@pytest.mark.parametrize("device", DEVICES)
def test_the_batched_crop_matches_a_per_image_loop(device):
    images, _ = fake_cifar(64, seed=2)
    generator = torch.Generator().manual_seed(0)
    top, left = torch.randint(0, 9, (2, 64), generator=generator)
    flip = torch.rand(64, generator=generator) < 0.5
    expected = reference_crop_and_flip(images, top, left, flip)
    out = crop_and_flip(images.to(device), top.to(device), left.to(device), flip.to(device))
    assert torch.equal(out.cpu(), expected)


def test_train_transform_gives_each_image_one_of_its_crops_and_flips():
    images, _ = fake_cifar(64, seed=3)
    torch.manual_seed(0)
    out = cifar10.train_transform(images)                  # (64, 3, 32, 32) float
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    pixels = ((out * std + mean) * 255).round().to(torch.uint8)   # undo the normalisation
    found = set()
    for b in range(64):
        matches = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                   if torch.equal(pixels[b], reference_crop_and_flip(images[b:b + 1], torch.tensor([t]),
                                                                     torch.tensor([l]),
                                                                     torch.tensor([f]))[0])]
        assert len(matches) == 1, b
        found.add(matches[0])
    assert len({(t, l) for t, l, _ in found}) > 20        # each image draws its own offset
    assert {f for *_, f in found} == {False, True}        # and its own flip


def test_missing_python_batches_name_the_folder_and_the_files(tmp_path, fixture_images):
    write_cifar10_batches(str(tmp_path), *fixture_images)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()  # optional: not asked for
    with pytest.raises(DataError) as error:
        loader(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "data_batch_3" in message
    assert "data_batch_1" not in message.split(";")[0]     # only what is missing before the hint
    assert "\"download\"" in message and "\n" not in message


def test_a_corrupt_batch_is_a_data_error(tmp_path, fixture_images):
    write_cifar10_batches(str(tmp_path), *fixture_images)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch' is not a CIFAR-10 python batch"):
        loader(tmp_path)


def test_missing_or_malformed_numpy_files_are_data_errors(tmp_path, fixture_images):
    write_cifar10_numpy(str(tmp_path), *fixture_images)
    (tmp_path / "y_test.npy").unlink()
    with pytest.raises(DataError, match=r"missing in .*: y_test\.npy; save them with numpy\.save"):
        loader(tmp_path, mode="numpy")

    write_cifar10_numpy(str(tmp_path), *fixture_images)
    np.save(tmp_path / "x_train.npy", np.zeros((100, 32, 32, 3), dtype=np.float32))
    with pytest.raises(DataError, match=r"float32 images of shape \(100, 32, 32, 3\); expected uint8"):
        loader(tmp_path, mode="numpy")

    write_cifar10_numpy(str(tmp_path), *fixture_images)
    np.save(tmp_path / "y_train.npy", np.full(100, 10))
    with pytest.raises(DataError, match=r"range 10\.\.10; CIFAR-10 has 0\.\.9"):
        loader(tmp_path, mode="numpy")


def test_a_failed_download_says_where_to_put_which_files(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import cifar

    def offline(*args, **kwargs):
        print("Downloading https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as error:
        loader(tmp_path, mode="download")
    message = str(error.value)
    assert "Name or service not known" in message and "cifar-10-python.tar.gz" in message
    assert str(tmp_path / "cifar-10-batches-py") in message and "data_batch_1..5 and test_batch" in message
    assert "\"local\"" in message and "\n" not in message
    assert capsys.readouterr().out == ""                    # torchvision's prints are kept quiet


def test_an_unknown_data_mode_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="one of download, local, numpy"):
        loader(tmp_path, mode="lmdb")
