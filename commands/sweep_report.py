"""What a sweep reports, read from its study (so any machine of the sweep can report it): the
table of trials (params, mean +- std over seeds, state, epochs) best first; and in the sweep's
folder trials.csv, best_config.json (a complete config that ./run.sh trains as is) and plots
(optimisation history, parameter importances, slice) from Optuna's matplotlib visualisation."""
import csv
import io
import json
import logging
import warnings
from dataclasses import dataclass

from optuna.trial import TrialState

from commands.sweep_file import Sweep
from utils import study as studies
from utils.files import atomic_write, write_json_atomic

logger = logging.getLogger("sweep")
STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "queued"}
ORDER = ("complete", "pruned", "running", "queued", "failed")
PLOTS = ("optimization_history", "param_importances", "slice")


@dataclass
class Row:
    trial: int
    number: int               # Optuna's trial number (a re-run trial has a new one)
    state: str
    params: dict              # config values
    mean: float | None
    std: float | None
    seeds: dict               # seed -> {"experiment", "status", "value", "epochs"}
    seconds: float | None
    reason: str


def row_of(sweep: Sweep, trial) -> Row:
    by_key = {param.key: param for param in sweep.space}
    params = {key: by_key[key].decode(value) if key in by_key else value for key, value in trial.params.items()}
    seeds = {str(seed): info for seed, info in (trial.user_attrs.get("seeds") or {}).items()}
    return Row(studies.sweep_trial(trial), trial.number, STATES.get(trial.state, trial.state.name.lower()),
               params, trial.user_attrs.get("mean"), trial.user_attrs.get("std"), seeds,
               trial.user_attrs.get("seconds"), trial.user_attrs.get(studies.REASON_ATTR, ""))


def rows(sweep: Sweep, study) -> list[Row]:
    """One row per sweep trial, best first: complete by mean, then pruned, running, queued, failed."""
    found = [row_of(sweep, trial) for trial in studies.current(study.get_trials(deepcopy=False))]
    sign = -1 if sweep.direction == "maximize" else 1

    def rank(row):
        value = row.mean if row.state in ("complete", "pruned") and row.mean is not None else None
        return (ORDER.index(row.state) if row.state in ORDER else len(ORDER),
                value is None, sign * value if value is not None else 0, row.trial)
    return sorted(found, key=rank)


def _number(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else f"{value:.4g}"


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _epochs(row: Row) -> str:
    epochs = [info.get("epochs") for info in row.seeds.values() if info.get("epochs") is not None]
    if not epochs:
        return "-"
    return str(epochs[0]) if len(set(epochs)) == 1 else ",".join(map(str, epochs))


def mean_std(row: Row) -> str:
    if row.mean is None:
        return "-"
    return _number(row.mean) + (f" +- {_number(row.std)}" if row.std is not None else "")


def summary(sweep: Sweep, found: list[Row]) -> str:
    total = sweep.trial_count()
    counts = {state: sum(row.state == state for row in found) for state in ORDER}
    finished = counts["complete"] + counts["pruned"] + counts["failed"]
    parts = [f"{counts[state]} {state}" for state in ORDER if counts[state]]
    goal = "maximised" if sweep.direction == "maximize" else "minimised"
    seeds = sweep.seed_list()
    return (f"sweep {sweep.name}: {finished} of {total} trials finished ({', '.join(parts) or 'none yet'}); "
            f"{sweep.monitor} {goal}, the mean over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
            f"({', '.join(map(str, seeds))}) of each run's best")


def table(sweep: Sweep, found: list[Row]) -> str:
    keys = [param.key for param in sweep.space]
    n_seeds = len(sweep.seed_list())
    header = ["trial", "state", *keys, f"{sweep.monitor} (mean +- std)", "seeds", "epochs", "note"]
    lines = [[str(row.trial), row.state, *(_value(row.params[k]) if k in row.params else "-" for k in keys),
              mean_std(row), f"{sum(1 for s in row.seeds.values() if s.get('value') is not None)}/{n_seeds}",
              _epochs(row), row.reason if row.state == "failed" else ""] for row in found]
    widths = [max(len(cells[i]) for cells in (header, *lines)) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
            for cells in (header, ["-" * w for w in widths], *lines)]
    return "\n".join([summary(sweep, found), *text])


def best_row(found: list[Row]) -> Row | None:
    return next((row for row in found if row.state == "complete" and row.mean is not None), None)


def best_config(sweep: Sweep, row: Row) -> dict:
    """The best trial's resolved config, named <sweep_name>.best, seeded with the first seed."""
    from agents import make_config

    seeds = sweep.seed_list()
    overrides = sweep.overrides(row.params, seeds[0]) + [f"exp_name={json.dumps(sweep.name + '.best')}"]
    config = json.loads(json.dumps(make_config(str(sweep.config), overrides)[1]))
    spread = f" +- {_number(row.std)}" if row.std is not None else ""
    config["description"] = (f"the best trial ({row.trial}) of sweep {sweep.name}: {sweep.monitor} "
                             f"{_number(row.mean)}{spread} over seeds {', '.join(map(str, seeds))}")
    return config


def write_csv(sweep: Sweep, found: list[Row]):
    keys = [param.key for param in sweep.space]
    seeds = [str(seed) for seed in sweep.seed_list()]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "optuna_trial", "state", *keys, "mean", "std", *(f"seed_{s}" for s in seeds),
                     "epochs", "seconds", "reason", "experiments"])
    for row in found:
        writer.writerow([row.trial, row.number, row.state, *(_value(row.params.get(k)) for k in keys),
                         "" if row.mean is None else repr(row.mean), "" if row.std is None else repr(row.std),
                         *("" if (row.seeds.get(s) or {}).get("value") is None else repr(row.seeds[s]["value"])
                           for s in seeds),
                         _epochs(row), "" if row.seconds is None else row.seconds, row.reason,
                         " ".join(info.get("experiment") or "" for info in row.seeds.values())])
    with atomic_write(sweep.folder / "trials.csv", "w") as f:
        f.write(out.getvalue())


def write_plots(sweep: Sweep, study) -> list[str]:
    """The PNGs Optuna's matplotlib visualisation draws; one it cannot draw yet (importances need
    two finished trials that differ) is skipped with the reason."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    folder = sweep.folder / "plots"
    paths = [folder / f"{name}.png" for name in PLOTS]
    latest = max((t.datetime_complete.timestamp() for t in complete if t.datetime_complete), default=0)
    if not complete:
        return []
    if all(path.is_file() and path.stat().st_mtime > latest + 1 for path in paths):
        return list(PLOTS)           # drawn since the last trial finished: matplotlib takes seconds
    folder.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as vis

    drawn = []
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = getattr(vis, f"plot_{name}")(study, target_name=sweep.monitor)
            figure = np.atleast_1d(axes).flat[0].figure
            with atomic_write(folder / f"{name}.png") as f:
                figure.savefig(f, format="png", dpi=100, bbox_inches="tight")
            drawn.append(name)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            logger.info(f"plot {name} skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        finally:
            plt.close("all")
    return drawn


def write_files(sweep: Sweep, study, found: list[Row]) -> list[str]:
    """trials.csv, best_config.json and the plots in the sweep's folder; returns what was written."""
    sweep.folder.mkdir(parents=True, exist_ok=True)
    write_csv(sweep, found)
    written = ["trials.csv"]
    best = best_row(found)
    if best is not None:
        write_json_atomic(sweep.folder / "best_config.json", best_config(sweep, best))
        written.append("best_config.json")
    written += [f"plots/{name}.png" for name in write_plots(sweep, study)]
    return written


def trial_line(sweep: Sweep, trial) -> str:
    """One line for a trial that just finished."""
    row = row_of(sweep, trial)
    params = " ".join(f"{key}={_value(value)}" for key, value in row.params.items())
    if row.state == "complete":
        return f"trial {row.trial} complete: {sweep.monitor} {mean_std(row)}  ({params})"
    if row.state == "pruned" and row.seeds:
        seed, info = list(row.seeds.items())[-1]
        return f"trial {row.trial} pruned at epoch {info.get('epochs')} of seed {seed}  ({params})"
    return f"trial {row.trial} {row.state}: {row.reason}  ({params})"
