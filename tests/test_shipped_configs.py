"""Every shipped config runs: through main.py on tiny fixture data on CPU it trains, leaves its
config, results and checkpoints, and a run stopped by Ctrl+C and continued with --resume ends
bitwise where the uninterrupted run ends, even stopped inside an epoch (tests/shipped.py runs both; the examples' own tests
check what only their example does, on the same runs)."""
import json
import math

import numpy as np
import pytest
import torch

from tests.shipped import SHIPPED, checkpoint, shipped_configs

# What a checkpoint holds that the continued run must reproduce (not its wall time or config).
REPRODUCED = ("epoch", "iteration", "models", "optimizers", "schedulers", "scaler", "extra", "rng", "position",
              "ema", "best", "early_stopping")


def differences(a, b, where: str = "") -> list[str]:
    """Where two checkpoint values differ: tensors and arrays bitwise, the rest by ==."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}/{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [where]
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [where]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} != {b!r}"]


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xdist_group(name))
                                  for name in shipped_configs()])
def test_a_shipped_config_trains_and_resumes_where_it_stopped(name, shipped_runs):
    assert name in SHIPPED, f"configs/{name}.json has no tiny settings: give it an entry in tests/shipped.py"
    tiny = SHIPPED[name]
    if tiny.needs:
        pytest.importorskip(tiny.needs, reason=f"{name} needs {tiny.needs}, which is not installed")
    run = shipped_runs[name]

    straight = run.straight
    config = json.loads((straight / "config.json").read_text())
    assert config["exp_name"] == straight.name
    assert {key: config[key] for key in tiny.settings} == tiny.settings           # the resolved config, saved
    results = json.loads((straight / "results.json").read_text())
    state = checkpoint(straight)                                                 # plain: weights_only
    assert results["status"] == "completed" and results["agent"] == state["agent"] == config["agent"]
    assert results["epochs_done"] == state["epoch"] >= 2
    assert results["iterations"] == state["iteration"] > run.interrupt_at
    assert state["position"] is None                                             # it ended at an epoch's end
    saved = {p.name for p in (straight / "checkpoints").iterdir()}
    assert "checkpoint.pth.tar" in saved and ("model_best.pth.tar" in saved) == (results["monitor"] is not None)
    assert run.straight_output.stderr == ""

    # SIGINT after step k, inside an epoch: the run stops at the next safe point (at once; DQN at
    # the episode's end), saves where it is, exits with 130.
    stopped = run.interrupted_checkpoint
    assert run.interrupted_results["status"] == "interrupted"
    assert "Traceback" not in run.interrupted_output.stderr
    assert f"interrupted: checkpoint saved at epoch {stopped['epoch']}, iteration {stopped['iteration']} (" \
        in run.interrupted_output.stdout
    assert stopped["position"]["epoch_position"] > 0 and stopped["position"]["train_metrics"] is None
    if name.startswith("dqn"):
        assert stopped["iteration"] >= run.interrupt_at
    else:
        assert stopped["iteration"] == run.interrupt_at              # the step it was in, no further
        per_epoch = results["iterations"] // results["epochs_done"]
        assert stopped["epoch"] * per_epoch + stopped["position"]["epoch_position"] == run.interrupt_at
    assert f"resumed from epoch {stopped['epoch']}, iteration {stopped['iteration']}, " in run.resumed_output.stdout

    resumed = json.loads((run.split / "results.json").read_text())
    assert resumed["status"] == "completed"
    if not tiny.resumes_bitwise:
        return
    for key in ("epochs_done", "iterations", "best", "last"):
        assert resumed[key] == results[key], key
    continued = checkpoint(run.split)
    assert differences(state["models"], stopped["models"])    # training went on after it
    assert differences({key: state[key] for key in REPRODUCED}, {key: continued[key] for key in REPRODUCED}) == []
    # Each training value once at each step, the same steps as the straight run's.
    assert training_curves(run.split) == training_curves(straight)


def training_curves(exp) -> dict:
    """{tag: [steps]} of the train/ scalars in the experiment's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for events in sorted((exp / "summaries").glob("events.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.startswith("train/"):
                curves.setdefault(tag, []).extend(event.step for event in accumulator.Scalars(tag))
    return {tag: sorted(steps) for tag, steps in curves.items()}
