"""`python main.py list [PATTERN ...] [--sort KEY]`: one line per experiment, read from its
results.json; only those whose name (or sweep) matches a PATTERN (shell-style: 'mnist*'); the
test metric when a run has one; a sweep's runs grouped under their sweep. With --plot, their
curves from metrics.csv in one PNG."""
import fnmatch
import json
import math
import re
from pathlib import Path

from utils.config import EXPERIMENTS_ROOT
from utils.errors import UserError
from utils.files import atomic_write
from utils.lock import is_held
from utils.metrics_csv import read_metrics

HELP = "the experiments in experiments/ and how they went"
COLUMNS = ("experiment", "agent", "status", "epochs", "best", "wall time")


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _best(results: dict) -> str:
    best = results.get("best") or {}
    monitor = results.get("monitor")
    if not isinstance(best, dict) or isinstance(best.get("value"), (bool, str, list, dict)):
        raise ValueError(f"'best' is {json.dumps(best)[:40]}")  # edited by hand, or by another program
    if monitor is None or best.get("value") is None:
        return "-"
    return f"{monitor} {best['value']:.4g} (epoch {best.get('epoch')})"


def _status(status, folder: Path) -> str:
    """A run recorded as running that no live process holds was killed (SIGKILL, a lost node):
    it never wrote its final status. --resume continues it from its last checkpoint."""
    if status == "running" and not is_held(folder):
        return "killed"
    return status


def experiment_rows(root: Path) -> list[tuple]:
    rows = []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []:
        path = folder / "results.json"
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(results, dict):
                raise ValueError("not a JSON object")
            best = _best(results)
        except FileNotFoundError:
            if (folder / "config.json").is_file():  # started, but no epoch finished yet
                rows.append((folder.name, "-", "no results yet", "-", "-", "-"))
            continue
        except (OSError, ValueError):
            rows.append((folder.name, "-", "unreadable results.json", "-", "-", "-"))
            continue
        rows.append((folder.name, results.get("agent", "-"), _status(results.get("status", "-"), folder),
                     str(results.get("epochs_done", "-")), best, _duration(results.get("wall_time_s"))))
    return rows


SORTS = ("name", "status", "epochs", "best", "test", "wall_time", "date")


def _results(folder: Path) -> dict:
    try:
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        return results if isinstance(results, dict) else {}
    except (OSError, ValueError):
        return {}


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _test_metric(results: dict) -> tuple[str, float | None]:
    """(tag, value) of the test metric to show: the monitored one's test twin, else the first."""
    test = results.get("test")
    if not isinstance(test, dict) or not test:
        return "", None
    monitor = results.get("monitor") or ""
    tag = "test/" + monitor.split("/", 1)[-1]
    tag = tag if tag in test else next(iter(test))
    return tag, _number(test.get(tag))


def _sort_key(sort: str, row: tuple, folder: Path):
    results = _results(folder)
    sign = -1 if results.get("monitor_mode") == "max" else 1
    if sort in ("best", "test"):
        value = _number((results.get("best") or {}).get("value")) if sort == "best" else _test_metric(results)[1]
        return (value is None, sign * value if value is not None else 0)
    if sort == "epochs":
        return -(_number(results.get("epochs_done")) or 0)
    if sort == "wall_time":
        return -(_number(results.get("wall_time_s")) or 0)
    if sort == "date":
        stamps = [p.stat().st_mtime for p in (folder / "results.json", folder / "config.json") if p.is_file()]
        return -max(stamps, default=0)
    return row[2] if sort == "status" else row[0]


def _sweeps(root: Path) -> dict:
    """{sweep_name: its sweep.json} for the sweep folders under root (commands/sweep.py)."""
    found = {}
    for record in sorted(Path(root).glob("*.sweep/sweep.json")):
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        found[record.parent.name[:-len(".sweep")]] = data if isinstance(data, dict) else {}
    return found


def _sweep_of(name: str, sweeps: dict) -> str | None:
    match = re.fullmatch(r"(.+)\.t\d+\.s\d+", name)
    return match.group(1) if match and match.group(1) in sweeps else None


def _matching(rows: list, patterns, sweeps: dict) -> list:
    """The rows whose experiment, or whose sweep, matches one of the shell-style patterns."""
    return [row for row in rows if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns
                                       for name in (row[0], _sweep_of(row[0], sweeps) or row[0]))]


def experiment_table(root: Path, patterns=(), sort: str = "name") -> str:
    rows = experiment_rows(root)
    if not rows:
        return f"no experiments in '{root}' yet: train one with ./run.sh CONFIG"
    sweeps = _sweeps(root)
    if patterns:
        rows = _matching(rows, patterns, sweeps)
        if not rows:
            return f"no experiments in '{root}' match {' '.join(repr(p) for p in patterns)}"
    rows.sort(key=lambda row: _sort_key(sort, row, Path(root) / row[0]))
    columns = COLUMNS
    tests = {row[0]: _test_metric(_results(Path(root) / row[0])) for row in rows}
    if any(tag for tag, _ in tests.values()):      # a test column only when some run was tested
        columns = (*COLUMNS[:5], "test", *COLUMNS[5:])
        rows = [(*row[:5], f"{tests[row[0]][0]} {tests[row[0]][1]:.4g}" if tests[row[0]][1] is not None else "-",
                 *row[5:]) for row in rows]
    groups = {None: []}
    for row in rows:
        groups.setdefault(_sweep_of(row[0], sweeps), []).append(row)
    widths = [max(len(str(row[i])) for row in (columns, *rows)) for i in range(len(columns))]

    def line(row):
        return "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
    lines = [line(columns), "  ".join("-" * width for width in widths), *map(line, groups.pop(None))]
    for name, members in groups.items():
        record = sweeps[name]
        lines += ["" if len(lines) > 2 else None, f"sweep {name} ({len(members)} runs, {record.get('trials', '?')} trials x "
                      f"{len(record.get('seeds') or [])} seeds; its table: ./run.sh sweep "
                      f"{record.get('sweep_file', '?')} --status)", *map(line, members)]
    return "\n".join(text for text in lines if text is not None)


def add_arguments(parser):
    parser.add_argument("patterns", nargs="*", metavar="PATTERN",
                        help="only the experiments (or sweeps) whose name matches, shell-style: 'mnist*'")
    parser.add_argument("--sort", choices=SORTS, default="name",
                        help="order of the rows: best and test put the best value first, epochs, "
                             "wall_time and date the largest / newest")
    parser.add_argument("--plot", action="store_true",
                        help="also draw each listed run's monitored metric over epochs (from its metrics.csv) "
                             "into one PNG")
    parser.add_argument("--metric", metavar="TAG", help="with --plot: draw this metrics.csv column instead "
                                                        "(e.g. train/epoch_loss)")
    parser.add_argument("--plot-file", metavar="PNG", type=Path, default=EXPERIMENTS_ROOT / "curves.png",
                        help=f"with --plot: the image to write (default {EXPERIMENTS_ROOT / 'curves.png'})")


def run(args) -> int:
    print(experiment_table(EXPERIMENTS_ROOT, args.patterns, args.sort))
    if args.plot:
        print(plot_curves(EXPERIMENTS_ROOT, args.patterns, args.metric, args.plot_file))
    return 0


# ----------------------------------------------------------------------------- --plot


def _monitor(folder: Path) -> str | None:
    """The metric a run monitors: results.json says it, or config.json while no epoch has ended."""
    for name in ("results.json", "config.json"):
        try:
            record = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("monitor"), str):
            return record["monitor"]
    return None


def curves(root: Path, patterns=(), metric: str | None = None) -> tuple[dict, list]:
    """({metric: [(experiment, epochs, values)]}, [experiments without such a curve]) from the
    metrics.csv of each listed experiment."""
    rows = experiment_rows(root)
    names = [row[0] for row in (_matching(rows, patterns, _sweeps(root)) if patterns else rows)]
    found, missing = {}, []
    for name in names:
        tag = metric or _monitor(Path(root) / name)
        points = [(row["epoch"], row[tag]) for row in read_metrics(Path(root) / name / "metrics.csv")
                  if isinstance(row.get(tag), (int, float))]
        if points:
            found.setdefault(tag, []).append((name, *zip(*points)))
        else:
            missing.append(name)
    return found, missing


def plot_curves(root: Path, patterns, metric: str | None, path: Path) -> str:
    """One PNG: a panel per metric, a line per experiment. Returns the line that says what it drew."""
    found, missing = curves(root, patterns, metric)
    what = f"'{metric}'" if metric else "its monitored metric"
    if not found:
        raise UserError(f"no listed experiment has {what} in a metrics.csv (the \"csv\" tracker, on by "
                        "default, writes one per run; --metric TAG names another column)")
    from matplotlib.figure import Figure   # only for --plot; Figure needs no GUI backend
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4 * len(found), 4.4))
    for axes, (tag, lines) in zip(figure.subplots(1, len(found), squeeze=False)[0], found.items()):
        for name, epochs, values in lines:
            axes.plot(epochs, values, marker="." if len(epochs) <= 50 else None, label=name)
        axes.set(xlabel="epoch", ylabel=tag, title=tag)
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))    # epochs
        if len(lines) <= 20:
            axes.legend(fontsize="small")
    figure.tight_layout()
    image_format = Path(path).suffix.lstrip(".").lower() or "png"
    if image_format not in figure.canvas.get_supported_filetypes():
        raise UserError(f"--plot-file '{path}': matplotlib cannot write .{image_format}; "
                        "use a .png (or .pdf, .svg) name")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        figure.savefig(f, format=image_format, dpi=120)
    drawn = sum(len(lines) for lines in found.values())
    skipped = f"; without that curve: {', '.join(missing)}" if missing else ""
    return f"wrote {path}: {', '.join(found)} over epochs, {drawn} experiment{'s' if drawn != 1 else ''}{skipped}"
