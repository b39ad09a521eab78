"""The GAN image loader on tiny fixtures written with PIL: folders nested, flat and mixed, CelebA's
layout, MNIST's IDX files; shapes, range, labels, the centre crop, seeded order and the errors."""
import gc
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from datasets.images import EXTENSIONS, ImageDataLoader, ImageFolderDataset, to_gan_range
from utils.errors import ConfigError, DataError

CLASSES = ("cats", "dogs", "zebras")
SIZES = ((40, 30), (30, 40), (36, 36), (50, 24))      # (width, height), all smaller and larger than 32


def coloured_image(size: tuple[int, int], channel: int, generator: torch.Generator) -> Image.Image:
    """An RGB image of random pixels whose `channel` is bright (200-255) and the others dark (0-50)."""
    width, height = size
    pixels = torch.randint(0, 51, (height, width, 3), dtype=torch.uint8, generator=generator)
    pixels[..., channel] = torch.randint(200, 256, (height, width), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


def write_images(folder, count: int, channel: int = 0, seed: int = 0, suffix: str = ".png", start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(start, start + count):
        coloured_image(SIZES[index % len(SIZES)], channel, generator).save(folder / f"{index:06d}{suffix}")


@pytest.fixture(scope="module")
def nested_folder(tmp_path_factory):
    """12 images, 4 in each class subfolder; class k is bright in colour channel k; mixed formats."""
    folder = tmp_path_factory.mktemp("nested")
    for k, name in enumerate(CLASSES):
        write_images(folder / name, 4, channel=k, seed=k, suffix=(".png", ".jpg", ".bmp")[k])
    return folder


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flat")
    write_images(folder, 12, suffix=".jpg")
    return folder


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    """data_folder with CelebA's layout: celeba/img_align_celeba/000001.jpg ... 000010.jpg."""
    folder = tmp_path_factory.mktemp("celeba_data")
    write_images(folder / "celeba" / "img_align_celeba", 10, suffix=".jpg", start=1)
    return folder


def build(folder, dataset="folder", data_mode="local", image_size=32, input_channels=3, batch_size=5,
          workers=0) -> ImageDataLoader:
    return ImageDataLoader(data_folder=str(folder), dataset=dataset, data_mode=data_mode, image_size=image_size,
                           input_channels=input_channels, batch_size=batch_size, workers=workers,
                           pin_memory="auto", device=torch.device("cpu"))


def pass_over(loader):
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("input_channels", [1, 3])
def test_folder_batches_are_full_square_and_in_gan_range(nested_folder, image_size, input_channels):
    data = build(nested_folder, image_size=image_size, input_channels=input_channels)
    assert data.num_images == 12 and len(data.train_loader) == 2      # 12 // 5: the last 2 dropped
    torch.manual_seed(0)
    batches = list(data.train_loader)
    assert len(batches) == 2
    for images, labels in batches:
        assert images.shape == (5, input_channels, image_size, image_size)
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.min() >= -1 and images.max() <= 1
        assert images.min() < 0                                           # scaled, not left in [0, 1]


def test_labels_are_the_sorted_subfolders(nested_folder):
    dataset = ImageFolderDataset(nested_folder, 32, 3)
    assert dataset.classes == list(CLASSES)
    assert dataset.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    images, labels = pass_over(build(nested_folder, batch_size=4).train_loader)   # 12 / 4: nothing dropped
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # each class was written bright in its own colour channel, so the image says its label
    assert torch.equal(images.mean(dim=(2, 3)).argmax(dim=1), labels)


def test_flat_folder_has_label_zero(flat_folder):
    data = build(flat_folder, batch_size=4)
    assert data.num_images == 12 and data.train_loader.dataset.classes == ["."]
    images, labels = pass_over(data.train_loader)
    assert images.shape == (12, 3, 32, 32) and labels.tolist() == [0] * 12


def test_mixed_and_deeper_folders_are_collected_recursively(tmp_path):
    write_images(tmp_path, 2, suffix=".PNG")                                # directly in the folder
    write_images(tmp_path / "b" / "deeper" / "still", 2, suffix=".JPEG", start=2)
    write_images(tmp_path / "a", 1, suffix=".webp", start=4)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "._000004.webp").write_bytes(b"macOS resource fork, not an image")
    write_images(tmp_path / ".thumbnails", 3)                               # hidden: skipped
    dataset = ImageFolderDataset(tmp_path, 16, 1)
    assert dataset.files.tolist() == ["000000.PNG", "000001.PNG", "a/000004.webp",
                                      "b/deeper/still/000002.JPEG", "b/deeper/still/000003.JPEG"]
    assert dataset.classes == [".", "a", "b"] and dataset.labels.tolist() == [0, 0, 1, 2, 2]
    image, label = dataset[3]
    assert image.shape == (1, 16, 16) and label == 2


def test_resize_then_centre_crop_keeps_the_middle(tmp_path):
    """60x30 (wide): black left and right thirds-ish, white band x 10..50. Resize(32) makes it 64x32
    and the centre crop keeps x 16..48 of 64, all white; a squash to 32x32 or a crop from the left
    would bring black in."""
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, 10:50] = 255
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "band.png")
    for input_channels in (3, 1):
        image, _ = ImageFolderDataset(tmp_path / "images", 32, input_channels)[0]
        assert image.shape == (input_channels, 32, 32)
        assert image.min() > 0.95, "the crop reached the black border"

    # and a square one: white centre, black border, stays so after resizing
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[12:28, 12:28] = 255
    Image.fromarray(pixels).save(tmp_path / "images" / "band.png")
    image, _ = ImageFolderDataset(tmp_path / "images", 64, 3)[0]
    assert (image[:, 28:36, 28:36] == 1).all() and (image[:, :8, :8] == -1).all()


def test_same_seed_same_batches(nested_folder):
    def first_batch(seed):
        loader = build(nested_folder).train_loader
        torch.manual_seed(seed)
        return next(iter(loader))

    (images_a, labels_a), (images_b, labels_b) = first_batch(0), first_batch(0)
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    orders = {tuple(first_batch(seed)[0].mean(dim=(1, 2, 3)).tolist()) for seed in range(5)}
    assert len(orders) > 1, "the loader does not shuffle"


def test_grayscale_images_load_as_rgb_and_rgb_as_grayscale(tmp_path):
    generator = torch.Generator().manual_seed(0)
    (tmp_path / "gray").mkdir()
    for index in range(4):
        pixels = torch.randint(0, 256, (30, 40), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy(), mode="L").save(tmp_path / "gray" / f"{index}.png")
    images, _ = next(iter(build(tmp_path / "gray", batch_size=4).train_loader))
    assert images.shape == (4, 3, 32, 32)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])

    write_images(tmp_path / "rgb", 4)
    images, _ = next(iter(build(tmp_path / "rgb", input_channels=1, batch_size=4).train_loader))
    assert images.shape == (4, 1, 32, 32) and images.min() >= -1 and images.max() <= 1


def test_empty_and_missing_folders_say_where_and_what(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images in .*empty") as error:
        build(tmp_path / "empty")
    assert all(extension in str(error.value) for extension in EXTENSIONS)
    with pytest.raises(DataError, match="does not exist"):
        build(tmp_path / "missing")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_names_the_file(tmp_path, workers, monkeypatch):
    write_images(tmp_path, 3)
    (tmp_path / "000001.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="000001.png") as error:   # from a worker too: same type
        pass_over(build(tmp_path, batch_size=3, workers=workers).train_loader)
    # After a worker's error, torch waits out its 5 s status interval before it stops the worker;
    # stop it now, in a fraction of that, as torch would after the wait.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    del error
    gc.collect()


def test_a_truncated_image_names_the_file(tmp_path):
    write_images(tmp_path, 2, suffix=".jpg")
    path = tmp_path / "000000.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="000000.jpg"):
        pass_over(build(tmp_path, batch_size=2).train_loader)


@pytest.mark.parametrize("settings, message", [
    ({"dataset": "imagenet"}, "dataset 'imagenet' is not one of folder, celeba, mnist"),
    ({"data_mode": "numpy"}, "data_mode 'numpy' is not one of download, local"),
    ({"input_channels": 4}, "input_channels is 4"),
    ({"dataset": "mnist", "input_channels": 3}, "grayscale: set input_channels to 1"),
])
def test_unknown_settings_are_config_errors(flat_folder, settings, message):
    with pytest.raises(ConfigError, match=message):
        build(flat_folder, **settings)


def test_fewer_images_than_a_batch_is_an_error(flat_folder):
    with pytest.raises(DataError, match="12 images, fewer than batch_size 16"):
        build(flat_folder, batch_size=16)


def test_celeba_local_reads_the_aligned_faces_folder(celeba_root):
    data = build(celeba_root, "celeba", image_size=64, batch_size=4)
    assert data.num_images == 10 and len(data.train_loader) == 2
    images, labels = pass_over(data.train_loader)
    assert images.shape == (8, 3, 64, 64) and labels.tolist() == [0] * 8


def test_celeba_local_missing_says_where_the_files_go(tmp_path, celeba_root):
    with pytest.raises(DataError, match=r"celeba/img_align_celeba.*000001\.jpg.*data_mode.*download"):
        build(tmp_path, "celeba")
    # data_folder pointing at celeba/ itself: say to go one folder up
    with pytest.raises(DataError, match="set data_folder to the folder above it"):
        build(celeba_root / "celeba", "celeba")


def test_celeba_download_offline_is_one_clear_error(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        print("Downloading...")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.celeba, "download_file_from_google_drive", offline)
    with pytest.raises(DataError) as error:
        build(tmp_path, "celeba", data_mode="download")
    message = str(error.value)
    assert "\n" not in message and "name resolution" in message
    assert f"{tmp_path}/celeba/img_align_celeba/000001.jpg" in message and '"data_mode": "local"' in message
    assert capsys.readouterr().out == ""                              # torchvision's prints kept quiet


def test_celeba_download_then_reads_the_folder(celeba_root, monkeypatch, capsys):
    calls = []

    class FakeCelebA:       # already downloaded: torchvision would check and return
        def __init__(self, root, split, download):
            print("Files already downloaded and verified")
            calls.append((root, split, download))

    monkeypatch.setattr(torchvision.datasets, "CelebA", FakeCelebA)
    data = build(celeba_root, "celeba", data_mode="download")
    assert calls == [(str(celeba_root), "all", True)] and data.num_images == 10
    assert capsys.readouterr().out == ""


def test_mnist_batches_resized_on_the_tensor_path(mnist_folder):
    data = build(mnist_folder, "mnist", input_channels=1, batch_size=64)
    assert data.num_images == 320 and len(data.train_loader) == 5
    images, labels = next(iter(data.train_loader))
    assert images.shape == (64, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.min() == -1 and images.max() > 0.9
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9

    images, _ = next(iter(build(mnist_folder, "mnist", image_size=64, input_channels=1).train_loader))
    assert images.shape == (5, 1, 64, 64)


def test_mnist_at_its_own_size_is_just_rescaled(mnist_folder):
    from datasets.mnist import load_split

    digits, labels = load_split(str(mnist_folder), train=True, download=False)
    data = build(mnist_folder, "mnist", image_size=28, input_channels=1, batch_size=320)
    torch.manual_seed(0)
    images, batch_labels = next(iter(data.train_loader))
    torch.manual_seed(0)
    order = torch.randperm(320)
    torch.testing.assert_close(images, digits[order].unsqueeze(1).float() / 255 * 2 - 1)
    assert torch.equal(batch_labels, labels[order])


def test_to_gan_range_matches_torchvision_on_upsampling():
    """Bilinear upsampling without antialias, as torchvision's Resize does on tensors (antialias only
    matters when shrinking)."""
    digits = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    resized = torchvision.transforms.functional.resize(digits.unsqueeze(1).float() / 255, [32, 32])
    torch.testing.assert_close(to_gan_range(digits, 32), resized * 2 - 1)


def test_mnist_missing_files_are_a_data_error(tmp_path):
    with pytest.raises(DataError, match="MNIST files not found"):
        build(tmp_path, "mnist", input_channels=1)
