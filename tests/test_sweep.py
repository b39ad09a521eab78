"""`main.py sweep` (commands/sweep*.py, utils/study.py) with real Optuna on real SQLite and journal
files: a grid over two seeds, pruning, failures of every kind, a sweep killed with SIGKILL and
resumed, two sweep processes on one study, and every bad input refused before anything is written."""
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import optuna
import pytest

from tests.conftest import MAIN, MNIST_SMALL, ROOT, run_main_in_process, snapshot
from utils import study as studies

IRIS = str(ROOT / "configs" / "iris_exp_0.json")


def write_sweep(folder, name="s", **keys):
    """A sweep file in folder over the Iris example (1 epoch, seed 1) unless keys say otherwise."""
    sweep = {"sweep_name": name, "config": IRIS, "set": {"max_epoch": 1},
             "space": {"learning_rate": [0.01, 0.1]}, "method": "grid", "seeds": [1], **keys}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(sweep))
    return path


def read_json(path):
    return json.loads(path.read_text())


def load_study(folder, name="s", journal=None):
    if journal is not None:
        from optuna.storages.journal import JournalFileBackend
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    else:
        storage = f"sqlite:///{folder / 'experiments' / f'{name}.sweep' / 'study.db'}"
    return optuna.load_study(study_name=name, storage=storage)


def table_rows(stdout: str) -> list[list[str]]:
    """The rows of the trials table that `sweep` prints (after its header and dashes)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("trial  state"))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("in experiments"):
            break
        rows.append(line.split())
    return rows


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def test_grid_over_two_seeds_makes_every_run_an_experiment_and_a_mean_std_table(tmp_path):
    sweep = write_sweep(tmp_path, space={"network": ["linear", "mlp"], "learning_rate": [0.01, 0.1]},
                        seeds=[1, 2], set={"max_epoch": 2})
    done = run_main_in_process(["sweep", sweep], tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    experiments = tmp_path / "experiments"
    grid = [("linear", 0.01), ("linear", 0.1), ("mlp", 0.01), ("mlp", 0.1)]
    runs = sorted(p.name for p in experiments.iterdir() if not p.name.endswith(".sweep"))
    assert runs == [f"s.t{trial:04d}.s{seed}" for trial in range(4) for seed in (1, 2)]
    best = {}
    for trial, (network, learning_rate) in enumerate(grid):
        for seed in (1, 2):
            run = experiments / f"s.t{trial:04d}.s{seed}"
            config, results = read_json(run / "config.json"), read_json(run / "results.json")
            assert (config["network"], config["learning_rate"], config["seed"], config["max_epoch"]) == \
                (network, learning_rate, seed, 2)
            assert results["status"] == "completed" and results["epochs_done"] == 2
            assert (run / "checkpoints" / "model_best.pth.tar").is_file() and any((run / "summaries").iterdir())
            best.setdefault(trial, []).append(results["best"]["value"])
    expected = {trial: (statistics.fmean(v), statistics.stdev(v)) for trial, v in best.items()}
    order = sorted(expected, key=lambda trial: (-expected[trial][0], trial))

    rows = table_rows(done.stdout)           # trial state network learning_rate mean +- std seeds epochs
    assert [int(row[0]) for row in rows] == order
    for row in rows:
        mean, std = expected[int(row[0])]
        assert row[1] == "complete" and row[4] == f"{mean:.4g}" and row[6] == f"{std:.4g}" and row[7:9] == ["2/2", "2"]
    folder = experiments / "s.sweep"
    with open(folder / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(row["trial"]) for row in table] == order
    for row in table:
        mean, std = expected[int(row["trial"])]
        assert float(row["mean"]) == pytest.approx(mean) and float(row["std"]) == pytest.approx(std)
        assert row["state"] == "complete" and row["experiments"].split() == \
            [f"s.t{int(row['trial']):04d}.s{seed}" for seed in (1, 2)]
    for plot in ("optimization_history", "param_importances", "slice"):
        assert (folder / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"

    # best_config.json is a whole config of the best trial, and trains as it is
    best_config = read_json(folder / "best_config.json")
    assert (best_config["network"], best_config["learning_rate"]) == grid[order[0]]
    assert best_config["exp_name"] == "s.best" and best_config["seed"] == 1
    trained = run_main_in_process([folder / "best_config.json"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert read_json(experiments / "s.best" / "results.json")["status"] == "completed"

    # Again: the study is finished, nothing runs; --status prints the same table
    before = {p: p.stat().st_mtime_ns for p in experiments.glob("s.t*/results.json")}
    again = run_main_in_process(["sweep", sweep], tmp_path)
    assert again.returncode == 0 and "0 to run" in again.stdout and table_rows(again.stdout) == rows
    assert {p: p.stat().st_mtime_ns for p in experiments.glob("s.t*/results.json")} == before
    status = run_main_in_process(["sweep", sweep, "--status"], tmp_path)
    assert status.returncode == 0 and table_rows(status.stdout) == rows

    # Each run is an ordinary experiment: mode=test on its own config.json, listed under its sweep
    one = experiments / "s.t0003.s2"
    tested = run_main_in_process([one / "config.json", "--set", "mode=test"], tmp_path)
    assert tested.returncode == 0, tested.stderr
    assert "test/accuracy" in read_json(one / "results.json")["test"]
    listed = run_main_in_process(["list"], tmp_path).stdout.splitlines()
    heading = next(i for i, line in enumerate(listed) if line.startswith("sweep s ("))
    assert "8 runs, 4 trials x 2 seeds" in listed[heading]
    assert [line.split()[0] for line in listed[heading + 1:]] == runs
    assert listed[2].split()[0] == "s.best"                       # its own run, outside the sweep's runs
    assert listed[0].split()[5] == "test" and "test/accuracy" in listed[heading + 8]   # a test column, as one was tested


def test_pruning_stops_a_trial_that_falls_behind(tmp_path):
    # Trial 0 learns (accuracy ~0.9 after one epoch); trial 1, learning rate 0, stays at chance.
    sweep = write_sweep(tmp_path, space={"learning_rate": [0.05, 0.0]}, seeds=[1, 2], set={"max_epoch": 3},
                        pruner={"type": "median", "n_startup_trials": 1})
    done = run_main_in_process(["sweep", sweep], tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    trials = {studies.sweep_trial(t): t for t in load_study(tmp_path).trials}
    assert trials[0].state.name == "COMPLETE" and trials[1].state.name == "PRUNED"
    assert trials[0].intermediate_values.keys() == {0, 1, 2, 3, 4, 5}     # seed 1's epochs, then seed 2's
    pruned = tmp_path / "experiments" / "s.t0001.s1"
    results = read_json(pruned / "results.json")
    assert results["status"] == "pruned" and results["epochs_done"] == 1
    assert (pruned / "checkpoints" / "checkpoint.pth.tar").is_file()
    assert not (tmp_path / "experiments" / "s.t0001.s2").exists()      # a pruned trial runs no more seeds
    assert [row[:2] for row in table_rows(done.stdout)] == [["0", "complete"], ["1", "pruned"]]
    assert "trial 1 pruned at epoch 1 of seed 1" in done.stdout


def test_a_failing_run_fails_its_trial_with_the_reason_and_the_sweep_goes_on(tmp_path):
    config = tmp_path / "failing.json"
    config.write_text(json.dumps({"exp_name": "failing", "agent": "tests.sweep_agent:FailingAgent", "max_epoch": 1}))
    sweep = write_sweep(tmp_path, config=str(config), set={}, space={"failure": ["raise", "diverge", "none"]})
    done = run_main_in_process(["sweep", sweep], tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    trials = {studies.sweep_trial(t): t for t in load_study(tmp_path).trials}
    assert [trials[n].state.name for n in range(3)] == ["FAIL", "FAIL", "COMPLETE"]
    assert trials[0].user_attrs["reason"] == "seed 1: RuntimeError: simulated bug in train_step"
    assert trials[1].user_attrs["reason"].startswith("seed 1: training diverged: the loss is nan")
    rows = table_rows(done.stdout)
    assert [row[:2] for row in rows] == [["2", "complete"], ["0", "failed"], ["1", "failed"]]
    assert read_json(tmp_path / "experiments" / "s.t0001.s1" / "results.json")["status"] == "failed"


def test_workers_run_in_processes_of_their_own_and_a_segfault_fails_only_its_trial(tmp_path):
    config = tmp_path / "failing.json"
    config.write_text(json.dumps({"exp_name": "failing", "agent": "tests.sweep_agent:FailingAgent", "max_epoch": 1}))
    # The segfault comes last, when nothing is left to run: no fresh worker has to start (seconds).
    sweep = write_sweep(tmp_path, config=str(config), set={}, space={"failure": ["none", "diverge", "segfault"]},
                        seeds=[3])
    done = run_main_in_process(["sweep", sweep, "--workers", "2"], tmp_path)    # the workers: processes of their own
    assert done.returncode == 0, done.stderr + done.stdout
    trials = {studies.sweep_trial(t): t for t in load_study(tmp_path).trials}
    assert sorted(trials) == [0, 1, 2]
    assert [trials[n].state.name for n in range(3)] == ["COMPLETE", "FAIL", "FAIL"]
    assert "training diverged" in trials[1].user_attrs["reason"]
    assert trials[2].user_attrs["reason"].startswith("its worker process died (killed by SIGSEGV)")
    assert [row[:2] for row in table_rows(done.stdout)] == [["0", "complete"], ["1", "failed"], ["2", "failed"]]
    assert "died (killed by SIGSEGV) running trial 2: the trial is recorded as failed" in done.stdout
    pids = {t.system_attrs[studies.WORKER_ATTR]["pid"] for t in trials.values()}
    assert os.getpid() not in pids and len(pids) == 2         # two worker processes, not this one
    logs = sorted(p.name for p in (tmp_path / "experiments" / "s.sweep" / "logs").iterdir())
    assert logs == [f"{studies.HOST}.worker0.log", f"{studies.HOST}.worker1.log"]


def test_a_sweep_killed_mid_trial_resumes_and_runs_exactly_its_trials(tmp_path):
    journal = tmp_path / "study.journal"                  # the journal storage, as on a shared file system
    sweep = write_sweep(tmp_path, space={"learning_rate": [0.01, 0.02, 0.05]}, set={"max_epoch": 8},
                        storage="study.journal")
    killed = tmp_path / "experiments" / "s.t0001.s1"
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(MAIN), "sweep", str(sweep)], cwd=tmp_path, env=env(),
                                   stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not (killed / "results.json").is_file():      # its first epoch is done and checkpointed
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert read_json(killed / "results.json")["status"] == "running"      # killed in the middle of its run
    assert [t.state.name for t in load_study(tmp_path, journal=journal).trials] == ["COMPLETE", "RUNNING", "WAITING"]

    done = run_main_in_process(["sweep", sweep], tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "trial 1 was left running by a killed sweep: queued again" in done.stdout
    trials = load_study(tmp_path, journal=journal).trials
    complete = [studies.sweep_trial(t) for t in trials if t.state.name == "COMPLETE"]
    assert sorted(complete) == [0, 1, 2]                 # exactly `trials`, none twice
    rerun = next(t for t in trials if t.state.name == "FAIL")
    assert studies.sweep_trial(rerun) == 1 and "killed" in rerun.user_attrs["reason"]
    assert len(studies.counted(trials)) == 3
    results = read_json(killed / "results.json")
    assert results["status"] == "completed" and results["epochs_done"] == 8
    assert "resumed from epoch" in (killed / "logs" / "exp_debug.log").read_text()    # --resume, not a restart
    assert sorted(p.name for p in (tmp_path / "experiments").iterdir()) == \
        ["s.sweep", "s.t0000.s1", "s.t0001.s1", "s.t0002.s1"]


def test_two_sweep_processes_on_one_study_run_its_trials_once_each(tmp_path):
    """One sweep process on its own, and a second (this one, in-process) joining once the first
    has claimed a trial: they share the study, as two machines with one storage would."""
    sweep = write_sweep(tmp_path, method="random", trials=8, set={"max_epoch": 3},
                        space={"learning_rate": {"low": 0.001, "high": 0.1, "log": True}, "hidden_size": [8, 16]})
    with open(tmp_path / "other.log", "w") as log:
        other = subprocess.Popen([sys.executable, str(MAIN), "sweep", str(sweep)], cwd=tmp_path, env=env(),
                                 stdout=log, stderr=subprocess.STDOUT)
        first = tmp_path / "experiments" / "s.t0000.s1" / "config.json"     # its first trial has begun
        deadline = time.monotonic() + 180
        while not first.is_file():
            assert other.poll() is None and time.monotonic() < deadline, (tmp_path / "other.log").read_text()
            time.sleep(0.05)
        this = run_main_in_process(["sweep", sweep], tmp_path)
        assert other.wait(timeout=240) == 0, (tmp_path / "other.log").read_text()[-3000:]
    assert this.returncode == 0, this.stderr + this.stdout
    trials = load_study(tmp_path).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(studies.sweep_trial(t) for t in complete) == list(range(8))      # each once
    assert all(t.state.name == "COMPLETE" or studies.is_duplicate(t) for t in trials)
    workers = {t.system_attrs[studies.WORKER_ATTR]["pid"] for t in complete}
    assert workers == {other.pid, os.getpid()}             # both did a part
    runs = sorted(p.name for p in (tmp_path / "experiments").iterdir() if not p.name.endswith(".sweep"))
    assert runs == [f"s.t{trial:04d}.s1" for trial in range(8)]
    for trial in complete:
        config = read_json(tmp_path / "experiments" / f"s.t{studies.sweep_trial(trial):04d}.s1" / "config.json")
        assert config["learning_rate"] == trial.params["learning_rate"] and config["hidden_size"] == trial.params["hidden_size"]


BAD_INPUTS = {
    "unknown space key": ({"space": {"learning_ratee": [0.1]}}, "did you mean 'learning_rate'?"),
    "low > high": ({"space": {"learning_rate": {"low": 0.1, "high": 0.01}}, "method": "random", "trials": 2},
                   "low 0.1 is greater than high 0.01"),
    "log with low <= 0": ({"space": {"learning_rate": {"low": 0, "high": 0.1, "log": True}}, "method": "tpe",
                           "trials": 2}, "a log range needs low > 0"),
    "empty choices": ({"space": {"network": []}}, "space \"network\" has no choices"),
    "grid over a range without step": ({"space": {"learning_rate": {"low": 0.01, "high": 0.1}}},
                                       "space \"learning_rate\" is a range without a step"),
    "value the agent refuses": ({"space": {"learning_rate": [0.1, -1]}}, "'learning_rate' must be at least 0"),
    "unreachable sqlite storage": ({"storage": "sqlite:////no_such_folder_for_the_sweep/study.db"},
                                   "cannot open the storage 'sqlite:////no_such_folder_for_the_sweep/study.db'"),
    "unreachable database server": ({"storage": "postgresql://me:secret@127.0.0.1:9/optuna"},
                                    "storage 'postgresql://me:***@127.0.0.1:9/optuna'"),
    "journal in a missing folder": ({"storage": "no_such_folder/study.journal"}, "does not exist"),
    "sweep_name escaping experiments/": ({"sweep_name": "../escape"}, "must be a plain folder name under experiments/"),
    "sweep_name with a slash": ({"sweep_name": "a/b"}, "must be a plain folder name under experiments/"),
    "unknown sweep key": ({"spcae": {}}, "unknown key 'spcae'; did you mean 'space'?"),
    "unknown method": ({"method": "gird"}, "did you mean \"grid\"?"),
    "seed in the space": ({"space": {"seed": [1, 2]}}, "\"seed\" cannot be in \"space\""),
    "more trials than grid points": ({"trials": 3}, "the grid has 2 points"),
}


@pytest.mark.parametrize("keys, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, keys, message):
    sweep = tmp_path / "bad.json"
    sweep.write_text(json.dumps({"sweep_name": "s", "config": IRIS, "space": {"learning_rate": [0.01, 0.1]},
                                 "method": "grid", "seeds": [1], **keys}))
    before = snapshot(tmp_path)
    done = run_main_in_process(["sweep", sweep], tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert "secret" not in done.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "experiments").exists()


def test_a_changed_sweep_is_refused_on_resume_and_status_needs_a_started_sweep(tmp_path):
    sweep = write_sweep(tmp_path)
    status = run_main_in_process(["sweep", sweep, "--status"], tmp_path)
    assert status.returncode == 2 and "has not started" in status.stderr
    assert run_main_in_process(["sweep", sweep], tmp_path).returncode == 0
    write_sweep(tmp_path, set={"max_epoch": 2})
    changed = run_main_in_process(["sweep", sweep], tmp_path)
    assert changed.returncode == 2 and "max_epoch: 1 -> 2" in changed.stderr, changed.stderr
    # a study that is gone while its runs are not: refused, not mixed
    (tmp_path / "experiments" / "s.sweep" / "study.db").unlink()
    leftover = run_main_in_process(["sweep", sweep], tmp_path)
    assert leftover.returncode == 2 and "holds runs of an earlier sweep named 's'" in leftover.stderr


# Each shipped sweep file, made tiny (2 trials, 1 epoch, 1 seed; MNIST on the fixture digits).
SHIPPED_SWEEPS = {"iris_baselines": {"max_epoch": 1},
                  "mnist_lr_batch": {**{k: v for k, v in MNIST_SMALL.items() if k != "batch_size"}, "max_epoch": 1}}


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "sweeps").glob("*.json")))
def test_every_shipped_sweep_runs_tiny(name, tmp_path, mnist_folder):
    from commands import sweep_file

    assert name in SHIPPED_SWEEPS, f"configs/sweeps/{name}.json has no tiny settings here"
    path = ROOT / "configs" / "sweeps" / f"{name}.json"
    shipped = sweep_file.check_against_agent(sweep_file.load(path))
    assert shipped.name == name and shipped.seeds is not None
    raw = read_json(path)
    tiny = {**raw, "config": str(shipped.config), "trials": 2, "seeds": raw["seeds"][:1],
            "set": {**raw["set"], **SHIPPED_SWEEPS[name], "data_folder": str(mnist_folder)}}
    if "data_folder" not in shipped.base_config:
        del tiny["set"]["data_folder"]
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    done = run_main_in_process(["sweep", tmp_path / "tiny.json"], tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout[-3000:]
    assert [row[1] for row in table_rows(done.stdout)] in (["complete", "complete"], ["complete", "pruned"])
    assert (tmp_path / "experiments" / f"{name}.sweep" / "best_config.json").is_file()
