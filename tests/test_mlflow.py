"""The mlflow tracker against a real MLflow store (SQLite files in temporary folders), read back
with MLflow's own client: params, metric histories and their steps, artifacts, tags, one MLflow
run through an interruption and --resume, a test of the trained model in the same run, nothing
from a process that is not rank 0, and a tracking server that is down."""
import importlib.util
import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
from easydict import EasyDict
from PIL import Image

import main
from tests.conftest import main_leaves_the_process_as_it_was

# SQLAlchemy 2.1 on MLflow 3's models (a DeprecationWarning: Python shows users none of these)
pytestmark = [pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
              pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                 reason="mlflow-skinny (requirements.txt) is not installed")]
TINY = {"exp_name": "tiny", "agent": "tests.tiny_agent:TinyAgent", "progress_bar": False, "max_epoch": 3,
        "loggers": ["csv", "mlflow"]}
STEPS_PER_EPOCH = 6     # TinyAgent: 96 samples, batches of 16, a train/loss value every step


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the tests that name it (creating MLflow's tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """main.main in-process in tmp_path; the environment and what main changes are restored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")    # a server that is down fails at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY, "description": "a tiny run"}))
    with main_leaves_the_process_as_it_was():
        yield tmp_path


def interrupt_after_iteration(monkeypatch, at: int):
    """SIGINT (what Ctrl+C sends) to this process right after optimizer step `at`."""
    from agents.base import BaseAgent

    original = BaseAgent._end_iteration

    def end_iteration(agent):
        original(agent)
        if agent.current_iteration == at:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(BaseAgent, "_end_iteration", end_iteration)


def mlflow_client(uri: str):
    """MLflow's own client; imported by the tests that use it, not by every worker collecting the suite."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def steps(client, run_id, tag) -> list:
    return [metric.step for metric in client.get_metric_history(run_id, tag)]


def test_an_interrupted_and_resumed_run_is_one_mlflow_run_in_the_default_store(in_tmp, capsys):
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_iteration(patch, STEPS_PER_EPOCH + 3)           # inside epoch 2
        assert main.main(["tiny.json"]) == 130
    client = mlflow_client(f"sqlite:///{in_tmp / 'experiments' / 'mlflow.db'}")   # the default: no server
    checkpoint = torch.load(in_tmp / "experiments/tiny/checkpoints/checkpoint.pth.tar", weights_only=True)
    run_id = checkpoint["trackers"]["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["status"]) == ("KILLED", "interrupted")
    assert steps(client, run_id, "train/loss") == list(range(1, STEPS_PER_EPOCH + 4))

    assert main.main(["tiny.json", "--resume"]) == 0
    experiment = client.get_experiment_by_name("TinyAgent")              # named after the agent
    assert experiment.artifact_location == (in_tmp / "experiments" / "mlruns" / "TinyAgent").as_uri()
    (run,) = client.search_runs([experiment.experiment_id])               # the same run, continued
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert {key: run.data.tags[key] for key in ("agent", "exp_name", "status", "mlflow.note.content")} == {
        "agent": "TinyAgent", "exp_name": "tiny", "status": "completed", "mlflow.note.content": "a tiny run"}
    params = run.data.params
    assert {key: params[key] for key in ("learning_rate", "sgd.nesterov", "loggers", "monitor", "max_epoch")} == {
        "learning_rate": "0.1", "sgd.nesterov": "false", "loggers": '["csv", "mlflow"]',
        "monitor": "val/accuracy", "max_epoch": "3"}
    assert params["exp_name"] == "tiny" and params["mlflow_tracking_uri"] == "null"
    # Every step once: the interrupted run logged up to step 9, the resumed one from step 10.
    assert steps(client, run_id, "train/loss") == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert steps(client, run_id, "val/accuracy") == [1, 2, 3] and steps(client, run_id, "train/lr") == [0, 1, 2]
    results = json.loads((in_tmp / "experiments/tiny/results.json").read_text())
    assert client.get_metric_history(run_id, "val/accuracy")[-1].value == results["last"]["val/accuracy"]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.json", "results.json"]

    # A test of the trained model goes into the training's run and leaves its status as it was.
    assert main.main(["tiny.json", "--set", "mode=test"]) == 0
    run = client.get_run(run_id)
    assert run.data.metrics["test/accuracy"] == json.loads(
        (in_tmp / "experiments/tiny/results.json").read_text())["test"]["test/accuracy"]
    assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "completed")
    assert "config_test.json" in [a.path for a in client.list_artifacts(run_id)]
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert "[WARNING] the mlflow tracker" not in capsys.readouterr().out


def test_images_are_artifacts_and_scalars_keep_their_steps(tmp_path, store, monkeypatch):
    from utils.trackers import MLflowTracker

    monkeypatch.chdir(tmp_path)
    config = EasyDict(exp_name="grid", agent="X", mode="train", description="", mlflow_experiment="images",
                      mlflow_tracking_uri=store, optimizer={"name": "sgd", "betas": [0.9, 0.99]})
    tracker = MLflowTracker(config, "XAgent", tmp_path / "experiments")
    tracker.log_images("train/samples", torch.rand(16, 1, 8, 8), 0)    # 8 a row: a 2 x 8 grid
    for step in (10, 20):
        tracker.log_scalars({"train/loss": 1.0 / step, "train/grad_norm": torch.tensor(2.0)}, step)
    tracker.log_scalars({"val/f1@0.5": 0.5}, 20)      # a name MLflow refuses as it is
    tracker.set_status("early_stopped")
    tracker.close()
    client = mlflow_client(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "early_stopped"
    assert run.data.params["optimizer.betas"] == "[0.9, 0.99]" and run.data.params["optimizer.name"] == "sgd"
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.05)]
    assert run.data.metrics["val/f1_0.5"] == 0.5 and run.data.metrics["train/grad_norm"] == 2.0
    (grid,) = client.list_artifacts(tracker.run_id, "images/train/samples")
    assert grid.path == "images/train/samples/step_0000000.png"
    (tmp_path / "downloaded").mkdir()
    with Image.open(client.download_artifacts(tracker.run_id, grid.path, str(tmp_path / "downloaded"))) as image:
        assert image.size == (8 * 10 + 2, 2 * 10 + 2)    # torchvision's grid: 2 pixels between images
    # An SQLite store named by URI keeps the artifacts beside its file: nothing in experiments/ or ./mlruns.
    folder = Path(store[len("sqlite:///"):]).parent
    assert client.get_experiment_by_name("images").artifact_location == (folder / "mlruns" / "images").as_uri()
    assert [p.name for p in tmp_path.iterdir()] == ["downloaded"] and (folder / "mlruns" / "images").is_dir()


def test_a_process_that_is_not_rank_0_logs_nothing(tmp_path, store, monkeypatch):
    from agents import make_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")         # as torchrun sets it for the second process
    agent_class, config = make_config({**TINY, "loggers": ["tensorboard", "csv", "mlflow"],
                                       "mlflow_tracking_uri": store, "mlflow_experiment": "rank1"})
    agent = agent_class(config)
    agent.run()
    agent.finalize()
    assert agent.status == "completed" and agent.current_epoch == 3
    assert agent.trackers.trackers == [] and not any(tmp_path.iterdir())
    assert mlflow_client(store).get_experiment_by_name("rank1") is None


def test_a_tracking_server_that_is_down_is_one_warning_and_training_goes_on(in_tmp, capsys):
    with socket.socket() as probe:          # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main.main(["tiny.json", "--set", f"mlflow_tracking_uri=http://127.0.0.1:{port}"]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("[WARNING]")]
    assert warnings == [f"[WARNING] the mlflow tracker (http://127.0.0.1:{port}) failed: ConnectionRefusedError: "
                        "[Errno 111] Connection refused; the run goes on without it"]
    assert "Traceback" not in out
    results = json.loads((in_tmp / "experiments/tiny/results.json").read_text())
    assert results["status"] == "completed" and results["epochs_done"] == 3
    assert (in_tmp / "experiments/tiny/metrics.csv").read_text().count("\n") == 4     # the header, 3 epochs


def test_runs_started_together_share_a_new_sqlite_store(tmp_path):
    """Runs started at once (a sweep's workers, a shell loop with &) on the default store: the first
    use creates its tables, which each would do at the same time (alembic migrations racing: every
    tracker failed); one at a time, every run is in the store with its whole history."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from tests.conftest import MAIN, ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    env.pop("MLFLOW_TRACKING_URI", None)
    runs = [subprocess.Popen([sys.executable, str(MAIN), json.dumps({**TINY, "exp_name": f"run{i}", "max_epoch": 1})],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    for run in runs:
        assert run.wait(timeout=240) == 0
        assert "tracker" not in run.stderr.read()          # no "the mlflow tracker ... failed" warning
    client = MlflowClient(f"sqlite:///{tmp_path / 'experiments' / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("TinyAgent").experiment_id])
    assert sorted(run.info.run_name for run in found) == ["run0", "run1"]
    assert all(len(client.get_metric_history(run.info.run_id, "train/loss")) == STEPS_PER_EPOCH for run in found)
