"""utils/batches.py alone: an epoch's order from (seed, epoch), sharded and started at a position;
augmentation seeded per sample whichever process loads it; loaders rebuilt or left alone."""
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from utils.batches import (Accumulation, EpochBatches, EpochProgress, EpochSampler, SeededSamples,
                           can_resume_inside_epoch, resumable_loader)
from utils.data import TensorBatchLoader


def test_the_order_depends_on_seed_and_epoch_only_and_a_pass_can_start_anywhere():
    sampler = EpochSampler(10, shuffle=True, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    torch.manual_seed(123)                        # the global generator plays no part
    again = EpochSampler(10, shuffle=True, seed=3)
    again.set_epoch(2)
    assert list(again) == first and sorted(index for _, index in first) == list(range(10))
    assert all(epoch == 2 for epoch, _ in first)
    again.set_epoch(3)
    assert list(again) != first
    sampler.start_at(4)
    assert list(sampler) == first[4:] and list(sampler) == first          # the start holds for one pass


def test_shards_are_disjoint_equal_and_cover_the_data_set():
    shards = []
    for rank in range(3):
        sampler = EpochSampler(10, shuffle=True, seed=0)
        sampler.shard(rank, 3)
        shards.append([index for _, index in sampler])
    assert [len(shard) for shard in shards] == [4, 4, 4]                 # padded to 12
    assert set().union(*shards) == set(range(10))
    cut = EpochSampler(10, shuffle=False, seed=0, drop_last=True)
    cut.shard(1, 3)
    assert [index for _, index in cut] == [1, 4, 7]


class Augmented(torch.utils.data.Dataset):
    """A sample's value plus draws from python's, numpy's and torch's generators."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return torch.tensor([index, random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def test_augmentation_is_the_same_in_any_worker_and_leaves_the_callers_generators_alone():
    dataset = Augmented()
    base = DataLoader(dataset, batch_size=2, shuffle=True)
    in_process = resumable_loader(base, seed=5)
    in_workers = resumable_loader(DataLoader(dataset, batch_size=2, shuffle=True, num_workers=2), seed=5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    one = torch.cat(list(in_process))
    assert torch.equal(torch.get_rng_state(), state)                    # training's generator untouched
    assert torch.equal(one, torch.cat(list(in_workers)))
    in_process.sampler.set_epoch(1)
    assert not torch.equal(one, torch.cat(list(in_process)))            # another epoch, other draws
    assert isinstance(in_process.dataset, SeededSamples) and len(in_process.dataset) == 6


def test_loaders_whose_order_cannot_be_saved_are_left_as_they_are():
    dataset = TensorDataset(torch.arange(8.0))
    weighted = DataLoader(dataset, sampler=WeightedRandomSampler([1.0] * 8, 8))
    assert resumable_loader(weighted, seed=0) is weighted and not can_resume_inside_epoch(weighted)
    tensors = TensorBatchLoader(torch.arange(8.0), torch.arange(8), 2, shuffle=True)
    assert resumable_loader(tensors, seed=0) is tensors and can_resume_inside_epoch(tensors)
    rebuilt = resumable_loader(DataLoader(dataset, batch_size=2), seed=0)
    assert resumable_loader(rebuilt, seed=0) is rebuilt and can_resume_inside_epoch(rebuilt)


@pytest.mark.parametrize("kind", ["tensor", "torch", "list"])
def test_epoch_batches_continue_where_a_pass_stopped(kind):
    inputs, targets = torch.arange(10.0), torch.arange(10)
    if kind == "tensor":
        source = TensorBatchLoader(inputs, targets, 3, shuffle=True)
    elif kind == "torch":
        source = resumable_loader(DataLoader(TensorDataset(inputs, targets), batch_size=3, shuffle=True), seed=1)
    else:
        source = [(inputs[i:i + 3], targets[i:i + 3]) for i in range(0, 10, 3)]
    seen = []
    whole = [batch[0] for batch in EpochBatches(source, 4, before_batch=seen.append)]
    assert seen == [0, 1, 2, 3, 4]                   # before each batch, and once at the end
    order = getattr(source, "order", None)
    rest = [batch[0] for batch in EpochBatches(source, 4, start=2, order=order)]
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, whole[2:]))


def test_accumulation_groups_and_a_short_last_group():
    group, steps = Accumulation(3), []
    for left in range(7, 0, -1):                     # 7 batches: groups of 3, 3, 1
        group.batches_left = left
        if group.between_groups:
            group.start_group()
        steps.append((group.group_size, group.passed()))
    assert steps == [(3, False), (3, False), (3, True), (3, False), (3, False), (3, True), (1, True)]


def test_epoch_progress_holds_a_position_and_hands_it_to_the_epoch_it_resumes():
    progress = EpochProgress()
    assert progress.at_epoch_start and progress.state(dict) is None            # nothing to hold
    source = TensorBatchLoader(torch.arange(8.0), torch.arange(8), 2, shuffle=True)
    progress.batches = EpochBatches(source, 4)
    list(zip(range(1), progress.batches))                                      # the order is drawn
    progress.position = 3
    entry = progress.state(lambda: {"loss_sum": 1.5})
    assert entry["epoch_position"] == 3 and torch.equal(entry["order"], source.order)
    assert entry["epoch_state"] == {"loss_sum": 1.5} and entry["train_metrics"] is None
    assert progress.describe("batches", 4) == " (3 batches into epoch 5)"

    resumed = EpochProgress()
    resumed.resumed = entry
    assert resumed.start_epoch() is entry and resumed.resumed is None
    start, order = resumed.take_start()
    assert start == 3 and torch.equal(order, source.order) and resumed.take_start() == (0, None)

    progress.training_done({"train/epoch_loss": 0.5}, {"torch": torch.zeros(1)})
    validating = progress.state(dict)
    assert validating["train_metrics"] == {"train/epoch_loss": 0.5} and validating["epoch_position"] is None
    progress.end_epoch()
    assert progress.at_epoch_start and progress.state(dict) is None


def test_an_order_that_cannot_be_saved_is_no_position():
    weighted = DataLoader(TensorDataset(torch.arange(8.0)), sampler=WeightedRandomSampler([1.0] * 8, 8))
    progress = EpochProgress()
    progress.batches, progress.position = EpochBatches(weighted, 8), 2
    assert progress.state(dict) is None                    # the resumed run starts the epoch again


def test_an_agents_train_loader_is_made_resumable_or_refused_in_one_line():
    from types import SimpleNamespace

    from utils.batches import make_train_loader_resumable
    from utils.errors import ConfigError

    data = TensorDataset(torch.arange(8.0))
    shuffled = SimpleNamespace(train_loader=DataLoader(data, batch_size=2, shuffle=True))
    make_train_loader_resumable(shuffled, seed=1, inside_epochs=True, owner="Agent")
    assert isinstance(shuffled.train_loader.sampler, EpochSampler)
    weighted = SimpleNamespace(train_loader=DataLoader(data, batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8)))
    make_train_loader_resumable(weighted, seed=1, inside_epochs=False, owner="Agent")    # resumes at epoch starts
    assert isinstance(weighted.train_loader.sampler, WeightedRandomSampler)
    with pytest.raises(ConfigError, match="Agent's train_loader \\(DataLoader with its own sampler\\) cannot restart"):
        make_train_loader_resumable(weighted, seed=1, inside_epochs=True, owner="Agent")
    make_train_loader_resumable(SimpleNamespace(), seed=1, inside_epochs=True, owner="Agent")   # no train_loader
