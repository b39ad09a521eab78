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
