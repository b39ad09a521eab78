"""The MNIST example end to end through main.py, on a small IDX fixture, on CPU."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import MAIN, ROOT, mnist_overrides, run_main, snapshot

CONFIG = ROOT / "configs" / "mnist_exp_0.json"


def weights(exp_dir, name="checkpoint.pth.tar"):
    return torch.load(exp_dir / "checkpoints" / name, weights_only=True)["models"]["model"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_folder):
    """One 2-epoch run, shared by the tests that only read what it left behind."""
    cwd = tmp_path_factory.mktemp("trained")
    result = run_main([CONFIG, *mnist_overrides(mnist_folder)], cwd)
    assert result.returncode == 0, result.stderr
    return cwd, result


def test_a_run_leaves_config_results_summaries_checkpoints_and_logs(trained_run):
    cwd, result = trained_run
    exp = cwd / "experiments" / "mnist_exp_0"
    assert sorted(p.name for p in exp.iterdir()) == ["checkpoints", "config.json", "logs", "out",
                                                     "results.json", "summaries"]
    config = json.loads((exp / "config.json").read_text())
    assert config["max_epoch"] == 2 and config["seed"] == 1 and config["early_stopping_patience"] is None

    results = json.loads((exp / "results.json").read_text())
    assert results["agent"] == "MnistAgent" and results["exp_name"] == "mnist_exp_0"
    assert results["status"] == "completed"
    assert results["epochs_done"] == 2 and results["iterations"] == 20     # 320 digits / 32
    assert results["monitor"] == "val/accuracy" and results["wall_time_s"] > 0
    assert results["params"] == {"model": 1_199_882}
    assert set(results["last"]) == {"val/loss", "val/accuracy"}
    assert results["best"]["epoch"] in (1, 2)
    assert results["best"]["value"] >= results["last"]["val/accuracy"]
    assert results["last"]["val/accuracy"] > 0.5          # the fixture's digits are learnable

    assert {p.name for p in (exp / "checkpoints").iterdir()} == {"checkpoint.pth.tar", "model_best.pth.tar"}
    assert "epoch 2/2" in (exp / "logs" / "exp_debug.log").read_text()
    assert "epoch 2/2" in result.stdout and result.stderr == ""

    events = EventAccumulator(str(exp / "summaries"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/loss", "val/accuracy"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2, 21, 2))  # log_interval 2
    assert [e.step for e in events.Scalars("val/accuracy")] == [1, 2]
    assert tags["images"] == ["train/samples"]
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")


def test_resume_gives_the_weights_of_the_straight_run(trained_run, mnist_folder, tmp_path):
    straight = weights(trained_run[0] / "experiments" / "mnist_exp_0")
    first = run_main([CONFIG, *mnist_overrides(mnist_folder, max_epoch=1)], tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_main([CONFIG, *mnist_overrides(mnist_folder, max_epoch=2), "--resume"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resumed from epoch 1" in second.stdout
    resumed = weights(tmp_path / "experiments" / "mnist_exp_0")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    results = json.loads((tmp_path / "experiments" / "mnist_exp_0" / "results.json").read_text())
    assert results["epochs_done"] == 2 and results["iterations"] == 20


def test_an_existing_experiment_is_never_overwritten_without_force(trained_run, mnist_folder, tmp_path):
    shutil.copytree(trained_run[0] / "experiments", tmp_path / "experiments")
    before = snapshot(tmp_path / "experiments")
    again = run_main([CONFIG, *mnist_overrides(mnist_folder)], tmp_path)
    assert again.returncode != 0
    assert "--resume" in again.stderr and "--force" in again.stderr
    assert snapshot(tmp_path / "experiments") == before

    forced = run_main([CONFIG, *mnist_overrides(mnist_folder, max_epoch=1), "--force"], tmp_path)
    assert forced.returncode == 0, forced.stderr
    results = json.loads((tmp_path / "experiments" / "mnist_exp_0" / "results.json").read_text())
    assert results["epochs_done"] == 1


def test_test_mode_evaluates_the_best_model_and_keeps_training_results(trained_run, mnist_folder, tmp_path):
    shutil.copytree(trained_run[0] / "experiments", tmp_path / "experiments")
    exp = tmp_path / "experiments" / "mnist_exp_0"
    config_before = (exp / "config.json").read_bytes()
    checkpoints_before = snapshot(exp / "checkpoints")
    result = run_main([CONFIG, *mnist_overrides(mnist_folder, mode="test")], tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((exp / "results.json").read_text())
    assert results["epochs_done"] == 2                               # training's record stays
    assert set(results["test"]) == {"test/loss", "test/accuracy"}
    assert results["test"]["test/accuracy"] == pytest.approx(results["best"]["value"])
    assert "test/accuracy" in result.stdout
    assert (exp / "config.json").read_bytes() == config_before
    assert json.loads((exp / "config_test.json").read_text())["mode"] == "test"
    assert snapshot(exp / "checkpoints") == checkpoints_before


def test_inline_json_config(mnist_folder, tmp_path):
    inline = json.dumps({"exp_name": "inline", "agent": "MnistAgent", "max_epoch": 1})
    result = run_main([inline, *mnist_overrides(mnist_folder, max_epoch=1)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "experiments" / "inline" / "checkpoints" / "model_best.pth.tar").is_file()


@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["at-epoch-end", "mid-epoch"])
def test_ctrl_c_saves_and_resume_continues(delay, mnist_folder, tmp_path):
    args = [sys.executable, str(MAIN), CONFIG, *mnist_overrides(mnist_folder, max_epoch=1000)]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        for line in process.stdout:
            if line.startswith("epoch 2/"):
                break
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    exp = tmp_path / "experiments" / "mnist_exp_0"
    results = json.loads((exp / "results.json").read_text())
    assert results["status"] == "interrupted"
    done = results["epochs_done"]
    assert done >= 2 and (exp / "checkpoints" / "checkpoint.pth.tar").is_file()

    resumed = run_main([CONFIG, *mnist_overrides(mnist_folder, max_epoch=done + 1), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    results = json.loads((exp / "results.json").read_text())
    assert results["status"] == "completed" and results["epochs_done"] == done + 1


def test_progress_bars_stay_off_the_log_lines(mnist_folder, tmp_path):
    result = run_main([CONFIG, *mnist_overrides(mnist_folder, max_epoch=1, progress_bar="true")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epochs: 100%" in result.stderr                   # the bars go to stderr
    log_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch 1/1")]
    assert len(log_lines) == 1 and "%|" not in log_lines[0]  # the log lines go to stdout, whole


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = {
    "missing file": (["configs/no_such_config.json"], "config file 'configs/no_such_config.json' does not exist"),
    "invalid JSON": (["broken.json"], "is not valid JSON"),
    "no agent": (['{"exp_name": "mnist_exp_0"}'], "no \"agent\""),
    "unknown agent": (['{"exp_name": "mnist_exp_0", "agent": "MnistAgnet"}'], "unknown agent \"MnistAgnet\""),
    "misspelt key": ([CONFIG, "--set", "learnig_rate=0.1"], "did you mean 'learning_rate'"),
    "wrong type": ([CONFIG, "--set", 'max_epoch="2"'], "'max_epoch' must be an integer, got a string"),
    "escaping exp_name": ([CONFIG, "--set", "exp_name=../x"], "exp_name \"../x\" must be a plain folder name"),
    "truncated checkpoint": ([CONFIG, "--resume"], "is unreadable (truncated or corrupt"),
    "no checkpoint to resume": ([CONFIG, "--resume", "--set", "exp_name=fresh"], "nothing to resume"),
    "no checkpoint to test": ([CONFIG, "--set", "mode=test", "--set", "exp_name=fresh"], "train first"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_touches_nothing(case, trained_run, mnist_folder, tmp_path):
    args, message = BAD_INPUTS[case]
    shutil.copytree(trained_run[0] / "experiments", tmp_path / "experiments")
    (tmp_path / "broken.json").write_text('{"exp_name": "x", "agent": ')
    if case == "truncated checkpoint":
        latest = tmp_path / "experiments" / "mnist_exp_0" / "checkpoints" / "checkpoint.pth.tar"
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    before = snapshot(tmp_path)
    result = run_main([*args, "--set", f"data_folder={mnist_folder}"] if args[0] == CONFIG else args, tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert snapshot(tmp_path) == before
