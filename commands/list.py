"""`python main.py list`: one line per experiment, read from its results.json."""
import json
from pathlib import Path

from utils.config import EXPERIMENTS_ROOT

HELP = "the experiments in experiments/ and how they went"
COLUMNS = ("experiment", "agent", "status", "epochs", "best", "wall time")


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _best(results: dict) -> str:
    best = results.get("best") or {}
    monitor = results.get("monitor")
    if monitor is None or best.get("value") is None:
        return "-"
    return f"{monitor} {best['value']:.4g} (epoch {best.get('epoch')})"


def experiment_rows(root: Path) -> list[tuple]:
    rows = []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []:
        path = folder / "results.json"
        try:
            results = json.loads(path.read_text())
        except FileNotFoundError:
            if (folder / "config.json").is_file():  # started, but no epoch finished yet
                rows.append((folder.name, "-", "no results yet", "-", "-", "-"))
            continue
        except (OSError, ValueError):
            rows.append((folder.name, "-", "unreadable results.json", "-", "-", "-"))
            continue
        rows.append((folder.name, results.get("agent", "-"), results.get("status", "-"),
                     str(results.get("epochs_done", "-")), _best(results), _duration(results.get("wall_time_s"))))
    return rows


def experiment_table(root: Path) -> str:
    rows = experiment_rows(root)
    if not rows:
        return f"no experiments in '{root}' yet: train one with ./run.sh CONFIG"
    widths = [max(len(str(row[i])) for row in (COLUMNS, *rows)) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in (COLUMNS, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def add_arguments(parser):
    pass


def run(args) -> int:
    print(experiment_table(EXPERIMENTS_ROOT))
    return 0
