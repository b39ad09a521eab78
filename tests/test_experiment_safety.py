"""Nothing under an experiment changes until every check has passed; a resumed run is the run
that was started; one writer per experiment; a killed run is shown as killed."""
import json
import os
import subprocess
import sys
import time

import pytest

import main
from tests.conftest import MAIN, ROOT, main_leaves_the_process_as_it_was, snapshot

TINY = {"exp_name": "tiny", "agent": "tests.tiny_agent:TinyAgent", "progress_bar": False, "max_epoch": 2}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run main.main in-process in tmp_path, restoring what it changes (SIGTERM, logging)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    with main_leaves_the_process_as_it_was():
        yield tmp_path


def run(*args) -> int:
    return main.main(["tiny.json", *args])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_checks_that_fail_late_still_change_nothing(in_tmp, capsys):
    assert run() == 0
    before = snapshot(in_tmp / "experiments")
    capsys.readouterr()
    cases = {
        "--force with a batch size that cannot work": (["--force", "--set", "batch_size=0"], "at least 1"),
        "--resume with a batch size that cannot work": (["--resume", "--set", "batch_size=0"], "at least 1"),
        "--resume changing the learning rate": (["--resume", "--set", "learning_rate=0.5"],
                                                "learning_rate cannot change when resuming"),
    }
    for name, (args, message) in cases.items():
        assert run(*args) == 2, name
        assert message in one_error_line(capsys), name
        assert snapshot(in_tmp / "experiments") == before, name
    # A checkpoint of another agent: read and fitted into the built model before anything is written.
    (in_tmp / "other.json").write_text(json.dumps({**TINY, "exp_name": "other", "n_samples": 32}))
    assert main.main(["other.json"]) == 0
    os.replace(in_tmp / "experiments/other/checkpoints/checkpoint.pth.tar",
               in_tmp / "experiments/tiny/checkpoints/checkpoint.pth.tar")
    import torch
    state = torch.load(in_tmp / "experiments/tiny/checkpoints/checkpoint.pth.tar", weights_only=True)
    state["models"]["model"]["weight"] = torch.zeros(3, 8)          # another architecture
    torch.save(state, in_tmp / "experiments/tiny/checkpoints/checkpoint.pth.tar")
    before = snapshot(in_tmp / "experiments/tiny")
    capsys.readouterr()
    assert run("--resume", "--set", "max_epoch=4") == 2
    assert "do not fit model 'model'" in one_error_line(capsys)
    assert snapshot(in_tmp / "experiments/tiny") == before


def test_building_an_agent_writes_nothing(in_tmp):
    from agents import make_config

    assert run() == 0
    before = snapshot(in_tmp / "experiments")
    from utils import checkpoint as ckpt
    agent_class, config = make_config(str(in_tmp / "tiny.json"), ["mode=test"])
    agent = agent_class(config, ckpt.load(in_tmp / "experiments/tiny/checkpoints/model_best.pth.tar"))
    agent.finalize()
    assert snapshot(in_tmp / "experiments") == before


def test_a_resumed_run_keeps_its_own_config(in_tmp, capsys):
    assert run("--set", "max_epoch=1") == 0
    # The file says max_epoch 2 and another learning rate now: the run keeps its own values.
    (in_tmp / "tiny.json").write_text(json.dumps({**TINY, "learning_rate": 0.5}))
    assert run("--resume") == 0
    saved = json.loads((in_tmp / "experiments/tiny/config.json").read_text())
    assert (saved["max_epoch"], saved["learning_rate"]) == (1, 0.1)
    assert "not used: learning_rate, max_epoch" in capsys.readouterr().out
    assert run("--resume", "--set", "max_epoch=3", "--set", "log_interval=2") == 0   # what may change
    saved = json.loads((in_tmp / "experiments/tiny/config.json").read_text())
    results = json.loads((in_tmp / "experiments/tiny/results.json").read_text())
    assert (saved["max_epoch"], saved["log_interval"], saved["learning_rate"]) == (3, 2, 0.1)
    assert results["epochs_done"] == 3 and results["status"] == "completed"


def test_a_nested_config_key_trains_resumes_and_tests(in_tmp):
    assert run("--set", "sgd.nesterov=true", "--set", "momentum=0.5") == 0
    assert run("--resume", "--set", "max_epoch=3") == 0
    assert run("--set", "mode=test") == 0
    results = json.loads((in_tmp / "experiments/tiny/results.json").read_text())
    assert results["epochs_done"] == 3 and results["test"]["test/accuracy"] > 0.5
    assert json.loads((in_tmp / "experiments/tiny/config.json").read_text())["sgd"] == {
        "nesterov": True, "dampening": 0.0}


def test_force_says_what_it_deleted(in_tmp, capsys):
    assert run() == 0
    capsys.readouterr()
    assert run("--force") == 0
    out = capsys.readouterr().out
    assert "--force: deleted checkpoints/ (2 files)" in out and "results.json in experiments/tiny" in out


def test_one_writer_per_experiment_and_a_killed_run_is_shown_killed(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    config = json.dumps({**TINY, "max_epoch": 3, "crash_at_iteration": 8, "crash_rank": 0,
                         "crash_by_hanging": True})     # hangs in epoch 2, holding the experiment
    first = subprocess.Popen([sys.executable, str(MAIN), config], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        results = tmp_path / "experiments/tiny/results.json"
        for _ in range(600):
            if results.is_file():
                break
            time.sleep(0.1)
        time.sleep(0.5)
        before = snapshot(tmp_path / "experiments")
        second = subprocess.run([sys.executable, str(MAIN), config, "--resume"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"in use by process {first.pid} on " in second.stderr.strip()
        assert len(second.stderr.strip().splitlines()) == 1
        assert snapshot(tmp_path / "experiments") == before
        listing = subprocess.run([sys.executable, str(MAIN), "list"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=60).stdout
        assert "running" in listing
    finally:
        first.kill()
        first.wait()
    listing = subprocess.run([sys.executable, str(MAIN), "list"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60).stdout
    assert "killed" in listing and "running" not in listing
    # The kernel released the killed run's lock: --resume takes the experiment over and finishes.
    resumed = subprocess.run([sys.executable, str(MAIN), config, "--resume", "--set", "crash_at_iteration=null"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(results.read_text())["status"] == "completed"


def test_under_torchrun_only_rank_0_asks_whether_the_experiment_is_in_use(in_tmp, monkeypatch):
    """Rank 0 takes the experiment's lock once its agent is built; a slower rank that checked the
    lock after that found rank 0's own lock and failed the run ("in use by another process")."""
    from utils.lock import ExperimentLock

    assert run() == 0
    args = main.parse_args(["tiny.json", "--resume", "--set", "max_epoch=3"])
    with ExperimentLock(in_tmp / "experiments" / "tiny"):      # as rank 0 holds it while it runs
        monkeypatch.setenv("RANK", "1")
        assert main.prepare(args)[0].__name__ == "TinyAgent"
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(main.UserError, match="is in use by process"):
            main.prepare(args)
