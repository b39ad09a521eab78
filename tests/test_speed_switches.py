"""The config's speed switches on CPU: compile, channels_last, deterministic (amp: test_checkpoint)."""
import pytest
import torch

from agents import make_config
from tests.conftest import mnist_overrides

TINY = {"exp_name": "tiny", "agent": "tests.tiny_agent:TinyAgent", "progress_bar": False}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run(raw, overrides=()):
    cls, cfg = make_config(raw, overrides)
    agent = cls(cfg)
    agent.run()
    agent.finalize()
    return agent


def test_compile_trains_and_checkpoints_plain_weights():
    eager = run({**TINY, "exp_name": "eager", "max_epoch": 2})
    compiled = run({**TINY, "exp_name": "compiled", "max_epoch": 2, "compile": True})
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    state = torch.load("experiments/compiled/checkpoints/checkpoint.pth.tar", weights_only=True)
    assert set(state["models"]["model"]) == {"weight", "bias"}       # no "_orig_mod." prefix
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_channels_last_model_and_batches(mnist_folder):
    overrides = [arg for arg in mnist_overrides(mnist_folder, max_epoch=1) if arg != "--set"]
    raw = {"exp_name": "cl", "agent": "MnistAgent", "channels_last": True, "progress_bar": False}
    agent = run(raw, overrides)
    conv = agent.model.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    images, labels = agent.to_device(next(iter(agent.data_loader.valid_loader)))
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.dim() == 1
    assert agent.status == "completed" and agent.last_metrics["val/accuracy"] > 0.5


def test_deterministic_switch():
    try:
        agent = run({**TINY, "deterministic": True, "max_epoch": 1})
        assert torch.are_deterministic_algorithms_enabled() and agent.status == "completed"
    finally:
        torch.use_deterministic_algorithms(False)
