"""utils/trackers.py: the tracker interface, TensorBoard's event files, metrics.csv (a resumed
run never repeats an epoch), a failing tracker, the "loggers" checks, results.json. MLflow:
tests/test_mlflow.py."""
import csv
import json
import math
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from tests.conftest import main_leaves_the_process_as_it_was
from tests.shipped import SHIPPED, shipped_configs
from utils.metrics_csv import MetricsCSV, read_metrics
from utils.trackers import TensorBoardTracker, Tracker, Trackers, flatten, hparams_of, write_results

TINY = {"exp_name": "tiny", "agent": "tests.tiny_agent:TinyAgent", "progress_bar": False, "max_epoch": 3}


class ListTracker(Tracker):
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


def test_queued_scalars_reach_the_event_file_in_order_at_a_flush_a_full_queue_and_close(tmp_path):
    from utils import summary

    def scalars(tag):
        return [(e.step, e.value) for e in EventAccumulator(str(tmp_path)).Reload().Scalars(tag)]

    writer = summary.SummaryWriter(tmp_path)
    writer.add_scalar("loss", 1.0, 1)
    writer.add_text("note", "between", 1)             # any other event writes the queue first
    writer.add_scalar("loss", 2.0, 2)
    writer.flush()
    assert scalars("loss") == [(1, 1.0), (2, 2.0)]
    for step in range(3, 3 + summary.MAX_QUEUED):     # a full queue is written without a flush
        writer.add_scalar("loss", float(step), step)
    writer._events.flush()                            # the file's buffer only, not the queue
    assert scalars("loss")[-1] == (2 + summary.MAX_QUEUED, 2.0 + summary.MAX_QUEUED)
    writer.add_scalar("loss", -1.0, 1000)
    writer.close()
    assert scalars("loss")[-1] == (1000, -1.0) and len(scalars("loss")) == 3 + summary.MAX_QUEUED


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


# ----------------------------------------------------------------------------- metrics.csv


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_adds_a_column_without_losing_rows_and_a_resumed_run_never_repeats_an_epoch(tmp_path):
    path = tmp_path / "metrics.csv"
    run = MetricsCSV(path)
    run.add_row(1, 10, 1.5, {"train/epoch_loss": 0.5, "train/lr": 0.1})
    run.add_row(2, 20, 3.0, {"train/epoch_loss": 0.25, "val/loss": math.nan, "train/lr": 0.1})  # first seen now
    run.add_row(3, 30, 4.5, {"train/epoch_loss": 0.125, "val/loss": 0.5, "train/lr": 0.01})
    # Killed after epoch 3's row, before its checkpoint: the resumed run (a new process) does epoch 3 again.
    resumed = MetricsCSV(path)
    resumed.add_row(3, 30, 4.75, {"train/epoch_loss": 0.0625, "val/loss": 0.25, "train/lr": 0.01})
    resumed.add_row(4, 40, 6.0, {"train/epoch_loss": 0.03125, "val/loss": 0.125, "train/lr": 0.01})
    assert path.read_text().splitlines()[0] == "epoch,iteration,wall_time_s,train/epoch_loss,train/lr,val/loss"
    rows = read_csv(path)
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    assert rows[0]["val/loss"] == "" and rows[1]["val/loss"] == "nan" and rows[2]["train/epoch_loss"] == "0.0625"
    assert read_metrics(path)[2] == {"epoch": 3, "iteration": 30, "wall_time_s": 4.75, "train/epoch_loss": 0.0625,
                                     "train/lr": 0.01, "val/loss": 0.25}
    assert "val/loss" not in read_metrics(path)[0]       # not measured that epoch


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xdist_group(name))
                                  for name in shipped_configs()])
def test_a_run_interrupted_inside_an_epoch_and_resumed_has_each_epoch_once_in_metrics_csv(name, shipped_runs):
    tiny = SHIPPED[name]
    if tiny.needs:
        pytest.importorskip(tiny.needs, reason=f"{name} needs {tiny.needs}, which is not installed")
    run = shipped_runs[name]
    straight, split = read_csv(run.straight / "metrics.csv"), read_csv(run.split / "metrics.csv")
    assert [int(row["epoch"]) for row in split] == list(range(1, len(straight) + 1)) and len(straight) >= 2
    assert list(split[0]) == list(straight[0]) and {"epoch", "iteration", "wall_time_s"} < set(straight[0])
    if tiny.resumes_bitwise:        # the same numbers, but for the wall time
        assert [{**row, "wall_time_s": None} for row in split] == [{**row, "wall_time_s": None} for row in straight]


# ----------------------------------------------------------------------------- runs with their trackers


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """main.main in-process in tmp_path, restoring what it changes (SIGTERM, logging)."""
    monkeypatch.chdir(tmp_path)
    with main_leaves_the_process_as_it_was():
        yield tmp_path


def run_tiny(**settings) -> int:
    return main.main([json.dumps({**TINY, **settings})])


def test_a_failing_tracker_is_one_warning_and_the_run_goes_on_with_the_others(in_tmp, capsys):
    experiment = in_tmp / "experiments" / "tiny"
    experiment.mkdir(parents=True)
    (experiment / "metrics.csv").write_text("step,loss\n1,0.5\n")     # the user's own file
    assert run_tiny() == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("[WARNING]")]
    assert len(warnings) == 1 and "Traceback" not in out
    assert warnings[0].startswith("[WARNING] the csv tracker (experiments/tiny/metrics.csv) failed: ValueError: ")
    assert warnings[0].endswith("; the run goes on without it")
    assert (experiment / "metrics.csv").read_text() == "step,loss\n1,0.5\n"          # left as it was
    assert json.loads((experiment / "results.json").read_text())["epochs_done"] == 3
    assert EventAccumulator(str(experiment / "summaries")).Reload().Scalars("val/accuracy")[-1].step == 3


def test_loggers_are_checked_before_anything_is_written(in_tmp, capsys, monkeypatch):
    cases = {'did you mean "tensorboard"?': {"loggers": ["tensorbord"]},
             '"loggers" names "csv" twice': {"loggers": ["csv", "tensorboard", "csv"]},
             "config key 'loggers' must be a list": {"loggers": "csv"},
             'mlflow_tracking_uri is set, but "loggers" does not name "mlflow"': {"mlflow_tracking_uri": "http://x"}}
    for message, settings in cases.items():
        assert run_tiny(**settings) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    monkeypatch.setitem(sys.modules, "mlflow", None)     # what Python does for a package that is not installed
    assert run_tiny(loggers=["mlflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: "loggers" names "mlflow", but mlflow is not installed: pip install mlflow-skinny '
                   '(or ./run.sh, which installs requirements.txt), or leave "mlflow" out of "loggers"']
    assert not (in_tmp / "experiments").exists()
    # A run that does not name mlflow never imports it: the default loggers train without it.
    assert run_tiny() == 0
    assert "[WARNING]" not in capsys.readouterr().out
    assert [row["epoch"] for row in read_csv(in_tmp / "experiments/tiny/metrics.csv")] == ["1", "2", "3"]
