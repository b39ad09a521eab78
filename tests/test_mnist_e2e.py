"""The MNIST example end to end through main.py, on a small IDX fixture, on CPU. Its training run
is the one of tests/test_shipped_configs.py (which also checks that it resumes bitwise)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datasets.mnist import MnistDataLoader
from graphs.models.mnist import NETWORKS

from tests.conftest import MAIN, ROOT, mnist_overrides, run_main, run_main_in_process, set_args, snapshot

CONFIG = ROOT / "configs" / "mnist_exp_0.json"
# The tests that read the shipped run of this config run on the worker that trains it.
on_its_worker = pytest.mark.xdist_group("mnist_exp_0")


@pytest.fixture
def trained(shipped_runs):
    """The 2-epoch run of configs/mnist_exp_0.json (read only: copy it to run more on it)."""
    return shipped_runs["mnist_exp_0"]


@on_its_worker
def test_a_run_leaves_config_results_summaries_checkpoints_and_logs(trained):
    exp, result = trained.straight, trained.straight_output
    assert sorted(p.name for p in exp.iterdir()) == ["checkpoints", "config.json", "logs", "metrics.csv", "out",
                                                     "results.json", "summaries"]
    config = json.loads((exp / "config.json").read_text())
    assert config["max_epoch"] == 2 and config["seed"] == 1 and config["early_stopping_patience"] is None

    results = json.loads((exp / "results.json").read_text())
    assert results["agent"] == "MnistAgent" and results["exp_name"] == "mnist_exp_0"
    assert results["status"] == "completed"
    assert results["epochs_done"] == 2 and results["iterations"] == 16     # (320 - 64 held out) / 32
    assert results["monitor"] == "val/accuracy" and results["wall_time_s"] > 0
    assert results["params"] == {"model": 29_178}                       # MnistFastNet
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
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2, 17, 2))  # log_interval 2
    assert [e.step for e in events.Scalars("val/accuracy")] == [1, 2]
    assert tags["images"] == ["train/samples"]
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")


@on_its_worker
def test_an_existing_experiment_is_never_overwritten_without_force(trained, tmp_path):
    trained.copy_to(tmp_path)
    before = snapshot(tmp_path / "experiments")
    again = run_main_in_process(trained.args, tmp_path)
    assert again.returncode == 2
    assert "--resume" in again.stderr and "--force" in again.stderr
    assert snapshot(tmp_path / "experiments") == before

    forced = run_main_in_process([*trained.args, *set_args(max_epoch=1), "--force"], tmp_path)
    assert forced.returncode == 0, forced.stderr
    results = json.loads((tmp_path / "experiments" / "mnist_exp_0" / "results.json").read_text())
    assert results["epochs_done"] == 1


def best_model_metrics(exp) -> dict:
    """{"test": ..., "valid": ...}: the loss and accuracy of exp's model_best on the test and the
    validation split of its config, computed here."""
    config = json.loads((exp / "config.json").read_text())
    data = MnistDataLoader(data_folder=config["data_folder"], data_mode="local", batch_size=32, test_batch_size=1000,
                           valid_size=config["valid_size"], split_seed=config["split_seed"], device=torch.device("cpu"))
    model = NETWORKS[config["network"]]()
    model.load_state_dict(torch.load(exp / "checkpoints" / "model_best.pth.tar", weights_only=True)["models"]["model"])
    model.eval()
    metrics = {}
    with torch.no_grad():
        for split, loader in (("test", data.test_loader), ("valid", data.valid_loader)):
            images, labels = next(iter(loader))          # one batch: the fixture's splits are smaller
            logits = model(images)
            metrics[split] = {"test/loss": F.cross_entropy(logits, labels).item(),
                              "test/accuracy": (logits.argmax(1) == labels).float().mean().item()}
    return metrics


@on_its_worker
def test_test_mode_evaluates_the_best_model_and_keeps_training_results(trained, tmp_path):
    exp = trained.copy_to(tmp_path)
    config_before = (exp / "config.json").read_bytes()
    checkpoints_before = snapshot(exp / "checkpoints")
    result = run_main_in_process([*trained.args, *set_args(mode="test")], tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((exp / "results.json").read_text())
    assert results["epochs_done"] == 2                               # training's record stays
    assert set(results["test"]) == {"test/loss", "test/accuracy"}
    computed = best_model_metrics(exp)
    assert results["test"] == pytest.approx(computed["test"], abs=1e-5)          # of the test split's digits,
    assert results["test"]["test/loss"] != pytest.approx(computed["valid"]["test/loss"])   # not validation's
    assert "test/accuracy" in result.stdout
    assert (exp / "config.json").read_bytes() == config_before
    assert json.loads((exp / "config_test.json").read_text())["mode"] == "test"
    assert snapshot(exp / "checkpoints") == checkpoints_before


def test_inline_json_config(mnist_folder, tmp_path):
    inline = json.dumps({"exp_name": "inline", "agent": "MnistAgent", "max_epoch": 1})
    result = run_main_in_process([inline, *mnist_overrides(mnist_folder, max_epoch=1)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "experiments" / "inline" / "checkpoints" / "model_best.pth.tar").is_file()


@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["at-epoch-end", "mid-epoch"])
def test_ctrl_c_saves_and_resume_continues(delay, mnist_folder, tmp_path):
    """A real process and a real SIGINT: exit status 130, no traceback."""
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

    resumed = run_main_in_process([CONFIG, *mnist_overrides(mnist_folder, max_epoch=done + 1), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    results = json.loads((exp / "results.json").read_text())
    assert results["status"] == "completed" and results["epochs_done"] == done + 1


def test_progress_bars_stay_off_the_log_lines(mnist_folder, tmp_path):
    result = run_main_in_process([CONFIG, *mnist_overrides(mnist_folder, max_epoch=1, progress_bar=True)], tmp_path)
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
    "misspelt key": ([CONFIG, *set_args(learnig_rate=0.1)], "did you mean 'learning_rate'"),
    "wrong type": ([CONFIG, *set_args(max_epoch="2")], "'max_epoch' must be an integer, got a string"),
    "escaping exp_name": ([CONFIG, *set_args(exp_name="../x")], "exp_name \"../x\" must be a plain folder name"),
    "truncated checkpoint": ([CONFIG, "--resume"], "is unreadable (truncated or corrupt"),
    "no checkpoint to resume": ([CONFIG, "--resume", *set_args(exp_name="fresh")], "nothing to resume"),
    "no checkpoint to test": ([CONFIG, *set_args(mode="test", exp_name="fresh")], "train first"),
    "valid_size too large": ([CONFIG, *set_args(data_mode="local", exp_name="fresh")],   # the config's 5000
                             "valid_size 5000 is not smaller than the 320 training images"),
}


def bad_input(case, trained, mnist_folder, tmp_path) -> tuple[list, str]:
    """(arguments, the message they must give) for the case, in tmp_path: a copy of the trained
    experiment and a broken config file beside it."""
    args, message = BAD_INPUTS[case]
    trained.copy_to(tmp_path)
    (tmp_path / "broken.json").write_text('{"exp_name": "x", "agent": ')
    if case == "truncated checkpoint":
        latest = tmp_path / "experiments" / "mnist_exp_0" / "checkpoints" / "checkpoint.pth.tar"
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    return ([*args, *set_args(data_folder=mnist_folder)] if args[0] == CONFIG else args), message


def assert_one_clear_line(returncode, stderr, message):
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0]


@on_its_worker
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_touches_nothing(case, trained, mnist_folder, tmp_path):
    args, message = bad_input(case, trained, mnist_folder, tmp_path)
    before = snapshot(tmp_path)
    result = run_main_in_process(args, tmp_path)
    assert_one_clear_line(result.returncode, result.stderr, message)
    assert snapshot(tmp_path) == before


@on_its_worker
def test_bad_input_in_a_process_of_its_own_exits_2_without_a_traceback(trained, mnist_folder, tmp_path):
    """The real process path of the cases above (exit status, stderr), on the one that fails last."""
    args, message = bad_input("truncated checkpoint", trained, mnist_folder, tmp_path)
    before = snapshot(tmp_path)
    result = run_main(args, tmp_path)
    assert_one_clear_line(result.returncode, result.stderr, message)
    assert snapshot(tmp_path) == before
