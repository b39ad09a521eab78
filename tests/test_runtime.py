import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from utils.errors import ConfigError
from utils.runtime import seed_everything, select_device


class RandomDraws(Dataset):
    """Each item is what python's, numpy's and torch's generators give in the worker."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.tensor([random.random(), np.random.rand(), torch.rand(()).item()])


def draws_with_workers(seed):
    seed_everything(seed)
    loader = DataLoader(RandomDraws(), batch_size=2, shuffle=True, num_workers=2)
    return torch.cat([batch.flatten() for batch in loader])


def test_seeding_reproduces_data_loader_workers():
    first, second = draws_with_workers(3), draws_with_workers(3)
    assert torch.equal(first, second)
    assert not torch.equal(first, draws_with_workers(4))


def test_seeding_covers_python_numpy_torch():
    seed_everything(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(5)
    assert a == (random.random(), np.random.rand(), torch.rand(1).item())


def test_device_selection():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto", cuda=False) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert select_device("auto") in (torch.device("cpu"), torch.device("mps"))
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            select_device("cuda:1")


def test_prepare_device_selects_and_sets_determinism(monkeypatch):
    from utils.runtime import prepare_device

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)   # restored after the test
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    try:
        assert prepare_device("cpu", True, 0, deterministic=True) == torch.device("cpu")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        torch.use_deterministic_algorithms(False)
        assert prepare_device("auto", False, 0, deterministic=False) == torch.device("cpu")
        assert not torch.are_deterministic_algorithms_enabled()    # left as it was
    finally:
        torch.use_deterministic_algorithms(False)
