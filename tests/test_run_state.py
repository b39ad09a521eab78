"""agents.run_state alone: a run gathered into one checkpoint dict and restored from it, in memory
(no files; the files are test_checkpoint.py's)."""
import io

import pytest
import torch

from agents import run_state
from tests.tiny_agent import build, trained
from utils.errors import CheckpointError


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def through_a_file(state: dict) -> dict:
    """What torch.save then torch.load(weights_only=True) gives back: plain types and tensors only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_gathered_run_restores_into_a_fresh_agent_that_goes_on_as_the_first():
    first = trained(max_epoch=2, ema={"decay": 0.5})
    state = through_a_file(run_state.gather(first))
    assert (state["epoch"], state["iteration"], state["world_size"]) == (2, 12, 1)
    assert state["position"] is None and state["agent"] == "TinyAgent"
    second = build(max_epoch=2, ema={"decay": 0.5})
    run_state.restore(second, state, training=True)
    assert (second.current_epoch, second.current_iteration) == (2, 12)
    assert (second.best_value, second.best_epoch) == (first.best_value, first.best_epoch)
    assert second.last_metrics == first.last_metrics and second.learning_rates == first.learning_rates
    assert second.wall_time_before == pytest.approx(state["wall_time_s"])
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(second.ema.averaged.module.weight, first.ema.averaged.module.weight)
    # The RNG states are restored last (building an agent seeds them afresh): the same draws follow.
    draws = torch.rand(3)
    run_state.restore(build(max_epoch=2, ema={"decay": 0.5}), state, training=True)
    assert torch.equal(torch.rand(3), draws)


def test_restoring_for_evaluation_loads_the_ema_weights_and_no_training_state():
    first = trained(max_epoch=2, ema={"decay": 0.5})
    state = through_a_file(run_state.gather(first))
    evaluated = build(max_epoch=2, ema={"decay": 0.5})
    run_state.restore(evaluated, state, training=False)
    assert torch.equal(evaluated.model.weight, first.ema.averaged.module.weight)
    assert not torch.equal(evaluated.model.weight, first.model.weight)
    assert evaluated.current_iteration == 0 and evaluated.best_value is None
    assert evaluated.optimizer.state_dict()["state"] == {}


def test_a_run_gathered_inside_an_epoch_resumes_only_with_as_many_processes():
    agent = build(max_epoch=1)
    agent.in_epoch.position = 3   # three batches of the epoch done
    agent.in_epoch.batches = agent.train_batches(agent.data_loader.train_loader)
    state = through_a_file(run_state.gather(agent))
    assert state["position"]["epoch_position"] == 3
    state["world_size"] = 2
    with pytest.raises(CheckpointError, match="inside epoch 1 by 2 process"):
        run_state.restore(build(max_epoch=1), state, training=True)
    state["position"] = None      # at an epoch's end the number of processes may change
    run_state.restore(build(max_epoch=1), state, training=True)
