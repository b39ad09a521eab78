"""`main.py compare` (commands/compare.py), and what `main.py list` gained with sweeps: a filter,
a sort, the test metric, a sweep's runs grouped under it."""
import json

from tests.conftest import run_main_in_process
from tests.test_list import imports_torch


def make_run(experiments, name, best, config=None, test=None, epochs=3):
    folder = experiments / name
    folder.mkdir(parents=True)
    config = {"exp_name": name, "agent": "MnistAgent", "learning_rate": 0.1, "optimizer": {"name": "sgd"}, **(config or {})}
    (folder / "config.json").write_text(json.dumps(config))
    results = {"agent": "MnistAgent", "exp_name": name, "status": "completed", "epochs_done": epochs,
               "wall_time_s": 61.0, "monitor": "val/accuracy", "monitor_mode": "max",
               "best": {"value": best, "epoch": epochs}, "last": {"val/loss": 0.5, "val/accuracy": best}}
    if test is not None:
        results["test"] = test
    (folder / "results.json").write_text(json.dumps(results))


def experiments_with_a_sweep(tmp_path):
    experiments = tmp_path / "experiments"
    make_run(experiments, "mnist_a", 0.98, test={"test/loss": 0.1, "test/accuracy": 0.975})
    make_run(experiments, "mnist_b", 0.99, config={"learning_rate": 0.05, "optimizer": {"name": "adam"}}, epochs=5)
    make_run(experiments, "iris_x", 0.9, config={"agent": "IrisAgent"})
    (experiments / "sw.sweep").mkdir()
    (experiments / "sw.sweep" / "sweep.json").write_text(json.dumps(
        {"sweep_name": "sw", "sweep_file": "configs/sweeps/sw.json", "trials": 2, "seeds": [1]}))
    make_run(experiments, "sw.t0000.s1", 0.5)
    make_run(experiments, "sw.t0001.s1", 0.7)
    return experiments


def names(stdout: str) -> list[str]:
    """The experiment names of `list`'s rows (after the header and dashes; not group headings)."""
    return [line.split()[0] for line in stdout.splitlines()[2:] if line and not line.startswith("sweep ")]


def test_list_filters_sorts_shows_test_metrics_and_groups_a_sweep(tmp_path):
    experiments_with_a_sweep(tmp_path)
    done = run_main_in_process(["list"], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["experiment", "agent", "status", "epochs", "best", "test", "wall", "time"]
    assert names(done.stdout) == ["iris_x", "mnist_a", "mnist_b", "sw.t0000.s1", "sw.t0001.s1"]
    assert "test/accuracy 0.975" in lines[3] and lines[4].split()[-2] == "-"      # mnist_b: not tested
    assert lines[6] == "sweep sw (2 runs, 2 trials x 1 seeds; its table: ./run.sh sweep configs/sweeps/sw.json --status)"

    assert names(run_main_in_process(["list", "mnist*"], tmp_path).stdout) == ["mnist_a", "mnist_b"]
    assert names(run_main_in_process(["list", "--sort", "best"], tmp_path).stdout) == \
        ["mnist_b", "mnist_a", "iris_x", "sw.t0001.s1", "sw.t0000.s1"]       # best first, within each group
    assert names(run_main_in_process(["list", "--sort", "epochs", "mnist*"], tmp_path).stdout) == ["mnist_b", "mnist_a"]
    only_sweep = run_main_in_process(["list", "sw"], tmp_path).stdout     # a sweep's name matches its runs
    assert names(only_sweep) == ["sw.t0000.s1", "sw.t0001.s1"] and "test" not in only_sweep.splitlines()[0]
    none = run_main_in_process(["list", "cifar*"], tmp_path)
    assert none.returncode == 0 and "match 'cifar*'" in none.stdout
    bad = run_main_in_process(["list", "--sort", "speed"], tmp_path)
    assert bad.returncode == 2 and "invalid choice: 'speed'" in bad.stderr


def test_compare_prints_the_keys_that_differ_and_the_metrics_side_by_side(tmp_path):
    experiments_with_a_sweep(tmp_path)
    done = run_main_in_process(["compare", "mnist_a", "experiments/mnist_b"], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["config", "(differs)", "mnist_a", "mnist_b"]
    assert [line.split() for line in lines[2:4]] == [["learning_rate", "0.1", "0.05"], ["optimizer.name", "sgd", "adam"]]
    assert lines[4] == "(1 other config key the same)"           # agent; exp_name is the column itself
    metrics = {line.split("  ")[0].strip(): line.split()[-2:] for line in lines[6:]}
    assert metrics["epochs"] == ["3", "5"]
    assert lines[6].split() == ["metrics", "mnist_a", "mnist_b"]
    rows = {line[:20].strip(): line[20:].split() for line in lines[8:]}
    assert rows["best val/accuracy"] == ["0.98", "(epoch", "3)", "0.99", "(epoch", "5)"]
    assert rows["test/accuracy"] == ["0.975", "(absent)"] and rows["wall time (s)"] == ["61", "61"]

    pattern = run_main_in_process(["compare", "sw.*"], tmp_path)
    assert pattern.returncode == 0 and pattern.stdout.startswith("the configs are the same")

    missing = run_main_in_process(["compare", "mnist_a", "mnist_c"], tmp_path)
    assert missing.returncode == 2 and "no experiment 'mnist_c'" in missing.stderr and "did you mean" in missing.stderr
    one = run_main_in_process(["compare", "mnist_a"], tmp_path)
    assert one.returncode == 2 and "two or more experiments" in one.stderr


def test_compare_and_list_start_without_torch():
    assert imports_torch(["compare", "a", "b"]) is False
    assert imports_torch(["list", "mnist*", "--sort", "best"]) is False
