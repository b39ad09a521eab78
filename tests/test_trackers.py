"""utils/trackers.py: the tracker interface, TensorBoard's event files, results.json."""
import json
import math

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from utils.trackers import TensorBoardTracker, Trackers, flatten, hparams_of, write_results


class ListTracker:
    def __init__(self):
        self.calls = []

    def log_scalars(self, values, step):
        self.calls.append(("scalars", dict(values), step))

    def log_images(self, tag, images, step):
        self.calls.append(("images", tag, tuple(images.shape), step))

    def log_hparams(self, hparams, metrics):
        self.calls.append(("hparams", hparams, metrics))

    def flush(self):
        pass

    def close(self):
        self.calls.append(("close",))


def test_tensorboard_tracker_writes_scalars_and_images_and_nothing_until_asked(tmp_path):
    tracker = TensorBoardTracker(tmp_path / "summaries")
    tracker.flush()
    tracker.close()
    assert not (tmp_path / "summaries").exists()          # nothing logged: no file
    tracker = TensorBoardTracker(tmp_path / "summaries")
    tracker.log_scalars({"train/loss": 0.5, "val/accuracy": torch.tensor(0.75)}, 3)
    tracker.log_images("one", torch.rand(3, 8, 8), 3)
    tracker.log_images("grid", torch.rand(4, 1, 8, 8), 3)
    tracker.close()
    events = EventAccumulator(str(tmp_path / "summaries")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 0.5)]
    assert events.Scalars("val/accuracy")[0].value == 0.75
    assert set(events.Tags()["images"]) == {"one", "grid"}


def test_trackers_fan_out_to_every_tracker():
    first, second = ListTracker(), ListTracker()
    trackers = Trackers([first, second])
    trackers.log_scalars({"a": 1.0}, 2)
    trackers.log_images("x", torch.zeros(3, 2, 2), 2)
    trackers.close()
    assert first.calls == second.calls == [("scalars", {"a": 1.0}, 2), ("images", "x", (3, 2, 2), 2), ("close",)]
    Trackers([]).log_scalars({"a": 1.0}, 0)               # a non-writing rank: no tracker, no error


def test_hparams_are_flat_and_plain():
    hparams = hparams_of({"exp_name": "x", "agent": "A", "lr": 0.1, "adam": {"betas": [0.9, 0.99]},
                          "monitor": None})
    assert hparams == {"lr": 0.1, "adam.betas": "[0.9, 0.99]", "monitor": "null"}
    assert flatten({"a": {"b": {"c": 1}}}) == {"a.b.c": 1}


def test_results_of_another_mode_are_added_to_what_training_recorded(tmp_path):
    path = tmp_path / "results.json"
    write_results(path, {"agent": "A", "exp_name": "x", "status": "completed", "best": {"value": math.nan}})
    assert json.loads(path.read_text())["best"] == {"value": None}    # JSON has no NaN
    write_results(path, {"agent": "A", "exp_name": "x", "status": "running"}, mode="test",
                  mode_results={"test/accuracy": 0.9})
    assert json.loads(path.read_text()) == {"agent": "A", "exp_name": "x", "status": "completed",
                                            "best": {"value": None}, "test": {"test/accuracy": 0.9}}
