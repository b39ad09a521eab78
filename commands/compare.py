"""`python main.py compare EXP [EXP ...]`: the config keys whose values differ between the
experiments, then their metrics side by side (status, epochs, best, last validation, test, wall
time). EXP is an experiment's name, its folder, or a shell-style pattern ('iris_baselines.t0003.*')."""
import difflib
import fnmatch
import json
import math
from pathlib import Path

from utils.config import EXPERIMENTS_ROOT
from utils.errors import UserError

HELP = "the config keys that differ between experiments, and their metrics side by side"
IGNORED = ("exp_name",)     # the column headers


def add_arguments(parser):
    parser.add_argument("experiments", nargs="+", metavar="EXP",
                        help="experiment names (or folders, or patterns such as 'mnist*'); two or more")


def _folders(names) -> list[Path]:
    folders = []
    known = sorted(p.parent.name for p in EXPERIMENTS_ROOT.glob("*/config.json"))
    for name in names:
        path = Path(name)
        if any(ch in name for ch in "*?["):
            matches = [EXPERIMENTS_ROOT / found for found in fnmatch.filter(known, name)]
            if not matches:
                raise UserError(f"no experiment in '{EXPERIMENTS_ROOT}' matches '{name}'")
        elif (path / "config.json").is_file() and len(path.parts) > 1:
            matches = [path]
        elif (EXPERIMENTS_ROOT / name / "config.json").is_file():
            matches = [EXPERIMENTS_ROOT / name]
        else:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"no experiment '{name}' in '{EXPERIMENTS_ROOT}' (no {EXPERIMENTS_ROOT / name}/config.json)"
                            + hint)
        folders += [m for m in matches if m.resolve() not in {f.resolve() for f in folders}]
    if len(folders) < 2:
        raise UserError(f"compare needs two or more experiments; {' '.join(names)} gives {len(folders)}")
    return folders


def _read(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} '{path}': {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is not a JSON object")
    return data


def flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _cell(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return value if isinstance(value, str) else json.dumps(value)


_ABSENT = object()


def _metrics(results: dict) -> dict:
    """The rows of the metrics part: name -> value, in a fixed order."""
    rows = {"status": results.get("status", _ABSENT), "epochs": results.get("epochs_done", _ABSENT)}
    best = results.get("best") if isinstance(results.get("best"), dict) else {}
    if results.get("monitor") and best.get("value") is not None:
        rows[f"best {results['monitor']}"] = f"{_cell(best['value'])} (epoch {best.get('epoch')})"
    for section in ("last", "test"):
        values = results.get(section)
        if isinstance(values, dict):
            rows.update({f"{tag}{' (last)' if section == 'last' else ''}": value for tag, value in values.items()})
    if isinstance(results.get("wall_time_s"), (int, float)):
        rows["wall time (s)"] = round(results["wall_time_s"], 1)
    return rows


def _table(title: str, names: list, rows: dict) -> list[str]:
    header = [title, *names]
    lines = [[key, *(_cell(v) for v in values)] for key, values in rows.items()]
    widths = [max(len(cells[i]) for cells in (header, *lines)) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
            for cells in (header, ["-" * w for w in widths], *lines)]


def run(args) -> int:
    folders = _folders(args.experiments)
    names = [folder.name for folder in folders]
    configs = [flatten(_read(folder / "config.json", "config")) for folder in folders]
    keys = sorted({key for config in configs for key in config} - set(IGNORED))
    differ = {key: [config.get(key, _ABSENT) for config in configs] for key in keys
              if len({json.dumps(config.get(key, "__absent__"), sort_keys=True) for config in configs}) > 1}
    same = len(keys) - len(differ)
    if differ:
        print("\n".join(_table("config (differs)", names, differ)))
    else:
        print("the configs are the same" + (" (but for exp_name)" if keys else ""))
    print(f"({same} other config key{'s' if same != 1 else ''} the same)\n")
    metrics = [_metrics(_read(folder / "results.json", "results")) for folder in folders]
    order = list(dict.fromkeys(key for rows in metrics for key in rows))
    print("\n".join(_table("metrics", names, {key: [rows.get(key, _ABSENT) for rows in metrics] for key in order})))
    return 0
