"""`main.py list` (commands/list.py): one line per experiment, read from its results.json."""
import json
import subprocess
import sys

from tests.conftest import ROOT, run_main


def imports_torch(argv: list) -> bool:
    """Whether `main.py ARGV` imports torch (a verb that needs none should start fast)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import main\n"
            f"try:\n    main.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1] == "True"


def test_list_shows_each_experiment(tmp_path):
    experiments = tmp_path / "experiments"
    (experiments / "a_run").mkdir(parents=True)
    (experiments / "a_run" / "results.json").write_text(json.dumps({
        "agent": "MnistAgent", "status": "completed", "epochs_done": 14, "wall_time_s": 3725.2,
        "monitor": "val/accuracy", "best": {"value": 0.99125, "epoch": 12}}))
    (experiments / "broken").mkdir()
    (experiments / "broken" / "results.json").write_text("{not json")
    (experiments / "starting").mkdir()
    (experiments / "starting" / "config.json").write_text("{}")
    (experiments / "not_an_experiment.txt").write_text("")

    done = run_main(["list"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["experiment", "agent", "status", "epochs", "best", "wall", "time"]
    assert lines[2].split() == ["a_run", "MnistAgent", "completed", "14", "val/accuracy", "0.9912", "(epoch",
                                "12)", "1:02:05"]
    assert "unreadable results.json" in lines[3] and "no results yet" in lines[4] and len(lines) == 5

    empty = run_main(["list"], cwd=tmp_path / "experiments")
    assert empty.returncode == 0 and "no experiments" in empty.stdout


def test_list_starts_without_torch():
    assert imports_torch(["list"]) is False


def test_list_plot_draws_the_monitored_metric_of_the_listed_runs_into_one_png(tmp_path):
    from PIL import Image

    from tests.conftest import run_main_in_process
    from utils.metrics_csv import MetricsCSV

    experiments = tmp_path / "experiments"
    for name, monitor, values in (("mnist_a", "val/accuracy", [0.5, 0.7, 0.8]), ("mnist_b", "val/accuracy", [0.4, 0.6]),
                                  ("iris", "val/loss", [1.0, 0.5]), ("mnist_no_csv", "val/accuracy", [])):
        (experiments / name).mkdir(parents=True)
        (experiments / name / "results.json").write_text(json.dumps({"agent": "A", "status": "completed",
                                                                    "monitor": monitor}))
        metrics = MetricsCSV(experiments / name / "metrics.csv")
        for epoch, value in enumerate(values, 1):
            metrics.add_row(epoch, 10 * epoch, float(epoch), {"train/epoch_loss": 1 / epoch, monitor: value})

    done = run_main_in_process(["list", "mnist*", "--plot"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == ("wrote experiments/curves.png: val/accuracy over epochs, 2 experiments; "
                                            "without that curve: mnist_no_csv")
    with Image.open(experiments / "curves.png") as image:
        assert image.size == (768, 528)                     # one panel: 6.4 x 4.4 inches at 120 dpi
    done = run_main_in_process(["list", "--plot", "--plot-file", "all.png"], tmp_path)
    assert done.stdout.splitlines()[-1].startswith("wrote all.png: val/loss, val/accuracy over epochs, 3 experiments")
    with Image.open(tmp_path / "all.png") as image:
        assert image.size == (2 * 768, 528)                 # a panel per monitored metric
    done = run_main_in_process(["list", "iris", "--plot", "--metric", "train/epoch_loss"], tmp_path)
    assert "train/epoch_loss over epochs, 1 experiment" in done.stdout

    done = run_main_in_process(["list", "--plot", "--metric", "val/nope", "--plot-file", "none.png"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: no listed experiment has 'val/nope' in a metrics.csv")
    assert not (tmp_path / "none.png").exists()
