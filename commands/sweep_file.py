"""The sweep file of `main.py sweep SWEEP.json`: its keys, checked as strictly as a config (an
unknown key gets a did-you-mean, every value its type and range), then against the agent that
its config names (every space key must be one the agent reads, every value one it accepts), all
before anything is written; and the search space as Optuna distributions, grid points and the
--set overrides of one run.

    {
      "sweep_name": "iris_baselines",          runs are experiments/iris_baselines.t0003.s1/ ...
      "config": "../iris_exp_0.json",          relative to the sweep file
      "set": {"max_epoch": 50},                fixed overrides, dotted keys
      "space": {"network": ["linear", "mlp"],                  choices
                "learning_rate": {"low": 1e-4, "high": 0.1, "log": true},   a range
                "hidden_size": {"low": 16, "high": 128, "step": 16}},
      "method": "grid",                        grid, random or tpe
      "trials": null,                          how many (null with grid: every point)
      "seeds": [1, 2, 3],                      each trial runs once per seed
      "pruner": "median",                      or null, or {"type": "median", "n_startup_trials": 5, ...}
      "storage": null                          null: experiments/<sweep_name>.sweep/study.db
    }
"""
import difflib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from utils.config import EXPERIMENTS_ROOT, MAX_EXP_NAME, _EXP_NAME, Key
from utils.errors import ConfigError, UserError

METHODS = ("grid", "random", "tpe")
PRUNERS = {"median": {"n_startup_trials": 5, "n_warmup_steps": 0}}
KEYS = ("sweep_name", "description", "config", "set", "space", "method", "trials", "seeds", "pruner", "storage")
RANGE_KEYS = ("low", "high", "log", "step")
# The sweep names its runs and seeds them; the objective is one metric, in one direction.
OWNED_KEYS = {"exp_name": "the sweep names each run <sweep_name>.t<trial>.s<seed>",
              "seed": "the sweep sets it: list the seeds in \"seeds\"",
              "monitor": "the objective is one metric: set it in \"set\", not in \"space\"",
              "monitor_mode": "the objective has one direction: set it in \"set\", not in \"space\""}
# Where and how a run is done, not what it learns: these may differ between the machines of a
# sweep and between its sessions.
MACHINE_KEYS = ("description", "device", "cuda", "gpu_device", "data_loader_workers", "progress_bar",
                "log_interval", "distributed_timeout_s", "checkpoint_file")
MAX_SEED = 2**32 - 1


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unknown(what: str, key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return ConfigError(f"{what} has an unknown key '{key}'; {hint}")


@dataclass(frozen=True)
class Param:
    """One searched config key: choices, or a numeric range (low, high; log; step)."""
    key: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @property
    def encoded(self) -> bool:
        """Choices that are lists or objects reach Optuna as JSON text (its choices are scalars)."""
        return self.choices is not None and any(isinstance(c, (list, dict)) for c in self.choices)

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution([json.dumps(c) if self.encoded else c for c in self.choices])
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list:
        """The values a grid search runs (choices, or low, low + step, ... high)."""
        if self.choices is not None:
            return [json.dumps(c) if self.encoded else c for c in self.choices]
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        if self.integer:
            return [int(self.low + i * self.step) for i in range(count)]
        return [float(f"{self.low + i * self.step:.12g}") for i in range(count)]

    def decode(self, value):
        """The config value of an Optuna param value."""
        return json.loads(value) if self.encoded else value

    def candidates(self) -> list:
        """Values checked against the agent before the sweep starts: every choice, both ends."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def describe(self) -> str:
        if self.choices is not None:
            return json.dumps(list(self.choices))
        parts = [f"{self.low:g}..{self.high:g}"] + (["log"] if self.log else []) + \
                ([f"step {self.step:g}"] if self.step else [])
        return " ".join(parts)


@dataclass(frozen=True)
class Sweep:
    file: Path
    name: str
    config: Path
    set: dict
    space: tuple
    method: str
    trials: int | None
    seeds: tuple | None          # None: the config's own seed
    pruner: dict | None          # {"type": "median", ...} with every option filled in
    storage: str | None
    description: str = ""
    # Filled in by check_against_agent:
    agent: str = ""
    monitor: str = ""
    direction: str = ""
    base_config: dict = field(default_factory=dict)   # the resolved config of the fixed part
    epochs_per_seed: int = 0     # the step stride of reported values: the most epochs a run can have

    @property
    def folder(self) -> Path:
        return EXPERIMENTS_ROOT / f"{self.name}.sweep"

    def exp_name(self, trial: int, seed: int) -> str:
        return f"{self.name}.t{trial:04d}.s{seed}"

    def overrides(self, params: dict | None = None, seed: int | None = None, trial: int | None = None) -> list:
        """--set assignments of one run (params as config values, not Optuna's)."""
        assignments = [f"{key}={json.dumps(value)}" for key, value in self.set.items()]
        assignments += [f"{key}={json.dumps(value)}" for key, value in (params or {}).items()]
        if seed is not None:
            assignments.append(f"seed={seed}")
        if trial is not None:
            assignments.append(f"exp_name={json.dumps(self.exp_name(trial, seed))}")
        return assignments

    def grid_points(self) -> list[dict]:
        """Every point of the grid, as Optuna params, in the order of the space's keys."""
        names = [param.key for param in self.space]
        return [dict(zip(names, values)) for values in itertools.product(*(p.grid() for p in self.space))]

    def trial_count(self) -> int:
        return self.trials if self.trials is not None else len(self.grid_points())

    def identity(self) -> dict:
        """What may not change while the study goes on: the fixed config, the space, the seeds."""
        return {"fixed": {key: value for key, value in self.base_config.items()
                          if key not in MACHINE_KEYS and key not in ("exp_name", "seed")
                          and key not in {param.key.split(".")[0] for param in self.space}},
                "space": {param.key: param.describe() for param in self.space},
                "seeds": list(self.seeds) if self.seeds is not None else None}

    def seed_list(self) -> list:
        return list(self.seeds) if self.seeds is not None else [self.base_config["seed"]]


# ----------------------------------------------------------------------------- reading the file


def load(path) -> Sweep:
    """The sweep file checked on its own (keys, types, ranges); nothing is imported or written."""
    from utils.config import _read_json_file

    file = Path(path)
    what = f"sweep file '{path}'"
    if file.is_dir():
        raise ConfigError(f"{what} is a folder; give the sweep's JSON file")
    if not file.is_file():
        raise ConfigError(f"{what} does not exist")
    try:
        raw = _read_json_file(file.resolve(), shown=str(path))
    except ConfigError as e:      # its messages say "config file": this is the sweep file
        raise ConfigError(str(e).replace("config file", "sweep file", 1)) from None
    for key in raw:
        if key not in KEYS:
            raise _unknown(what, key, KEYS)
    for key in ("sweep_name", "config", "space"):
        if key not in raw:
            raise ConfigError(f"{what} has no \"{key}\"; add it (see docs/sweeps.md)")

    name = raw["sweep_name"]
    if not isinstance(name, str) or not _EXP_NAME.fullmatch(name) or name in (".", "..") \
            or name.endswith(".sweep"):
        raise ConfigError(f"{what}: sweep_name {json.dumps(name)[:60]} must be a plain folder name under "
                          "experiments/ (letters, digits, '_', '-', '.'; no '/' and no '..'; not ending "
                          "in .sweep)")
    config = raw["config"]
    if not isinstance(config, str) or not config:
        raise ConfigError(f"{what}: \"config\" must be the path of a config file (relative to the sweep "
                          f"file), got {_kind(config)}")
    config_path = (file.resolve().parent / config)
    if not config_path.is_file():
        raise ConfigError(f"{what}: its config '{config}' does not exist (the path is relative to the "
                          f"sweep file: '{config_path}')")
    fixed = raw.get("set", {})
    if not isinstance(fixed, dict):
        raise ConfigError(f"{what}: \"set\" must be an object of config keys (dotted) and values, got "
                          f"{_kind(fixed)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{what}: \"description\" must be a string, got {_kind(description)}")

    space = _space(raw["space"], what)
    method = raw.get("method", "tpe")
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        raise ConfigError(f"{what}: method {json.dumps(method)} is not one of {', '.join(METHODS)}"
                          + (f"; did you mean \"{close[0]}\"?" if close else ""))
    seeds = _seeds(raw.get("seeds"), what)
    for key, why in OWNED_KEYS.items():
        for where, keys in (("space", [p.key for p in space]), ("set", list(fixed))):
            if key in keys and not (key == "seed" and where == "set" and seeds is None):
                raise ConfigError(f"{what}: \"{key}\" cannot be in \"{where}\": {why}")
    trials = raw.get("trials")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        raise ConfigError(f"{what}: \"trials\" must be a positive integer (or null with method grid: every "
                          f"point), got {json.dumps(trials)}")
    sweep = Sweep(file=file, name=name, config=config_path, set=dict(fixed), space=space, method=method,
                  trials=trials, seeds=seeds, pruner=_pruner(raw.get("pruner"), what),
                  storage=_storage(raw.get("storage"), what), description=description)
    if method == "grid":
        for param in space:
            if param.choices is None and param.step is None:
                raise ConfigError(f"{what}: space \"{param.key}\" is a range without a step; a grid needs "
                                  "the points: add \"step\", or list the choices")
        size = len(sweep.grid_points())
        if trials is not None and trials > size:
            raise ConfigError(f"{what}: \"trials\" is {trials} but the grid has {size} points; set it to at "
                              f"most {size}, or to null (every point)")
    elif trials is None:
        raise ConfigError(f"{what}: method {method} needs \"trials\" (how many to run)")
    longest = len(sweep.exp_name(sweep.trial_count() - 1, max(seeds or [MAX_SEED])))
    if longest > MAX_EXP_NAME:
        raise ConfigError(f"{what}: sweep_name \"{name}\" is too long for its runs' names ({longest} of at "
                          f"most {MAX_EXP_NAME} characters); shorten it")
    return sweep


def _space(space, what: str) -> tuple:
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{what}: \"space\" must be an object of config keys to search (dotted), each a "
                          "list of choices or {\"low\": ..., \"high\": ...}" + ("" if isinstance(space, dict)
                                                                            else f", got {_kind(space)}"))
    return tuple(_param(key, spec, f"{what}: space \"{key}\"") for key, spec in space.items())


def _param(key: str, spec, what: str) -> Param:
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{what}: not a config key (dotted keys like \"optimizer.lr\")")
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{what} has no choices; list at least one value")
        seen = []
        for choice in spec:
            if choice in seen and type(choice) is type(seen[seen.index(choice)]):
                raise ConfigError(f"{what} lists {json.dumps(choice)} twice")
            seen.append(choice)
        return Param(key, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"{what} must be a list of choices or an object {{\"low\", \"high\", \"log\", "
                          f"\"step\"}}, got {_kind(spec)}")
    for name in spec:
        if name not in RANGE_KEYS:
            raise _unknown(what, name, RANGE_KEYS)
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(f"{what} has no \"{name}\"; a range needs low and high")
        if not _is_number(spec[name]):
            raise ConfigError(f"{what}: \"{name}\" must be a number, got {json.dumps(spec[name])}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{what}: \"log\" must be true or false, got {json.dumps(log)}")
    if low > high:
        raise ConfigError(f"{what}: low {low} is greater than high {high}")
    if log and low <= 0:
        raise ConfigError(f"{what}: a log range needs low > 0, got low {low}")
    if step is not None:
        if not _is_number(step) or step <= 0:
            raise ConfigError(f"{what}: \"step\" must be a positive number, got {json.dumps(step)}")
        if log:
            raise ConfigError(f"{what}: a range takes \"log\" or \"step\", not both")
        spans = (high - low) / step
        if abs(spans - round(spans)) > 1e-9 * max(1.0, spans):
            raise ConfigError(f"{what}: high - low ({high - low:g}) is not a multiple of step {step:g}")
    integer = all(isinstance(v, int) for v in (low, high, step if step is not None else 1))
    return Param(key, low=low, high=high, log=log, step=step, integer=integer)


def _seeds(seeds, what: str):
    if seeds is None:
        return None
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"{what}: \"seeds\" must be a non-empty list of integers (or null: the config's "
                          f"seed), got {json.dumps(seeds)}")
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{what}: seed {json.dumps(seed)} must be an integer from 0 to {MAX_SEED}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{what}: \"seeds\" lists a seed twice: {json.dumps(seeds)}")
    return tuple(seeds)


def _pruner(pruner, what: str):
    if pruner is None:
        return None
    if isinstance(pruner, str):
        pruner = {"type": pruner}
    if not isinstance(pruner, dict) or "type" not in pruner:
        raise ConfigError(f"{what}: \"pruner\" must be \"median\", null, or {{\"type\": \"median\", "
                          f"\"n_startup_trials\": 5, \"n_warmup_steps\": 0}}, got {json.dumps(pruner)}")
    kind = pruner["type"]
    if kind not in PRUNERS:
        close = difflib.get_close_matches(str(kind), PRUNERS, n=1)
        raise ConfigError(f"{what}: pruner {json.dumps(kind)} is not one of {', '.join(PRUNERS)}"
                          + (f"; did you mean \"{close[0]}\"?" if close else " (or null: no pruning)"))
    options = dict(PRUNERS[kind])
    for name, value in pruner.items():
        if name == "type":
            continue
        if name not in options:
            raise _unknown(f"{what}: pruner", name, ["type", *options])
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{what}: pruner \"{name}\" must be a non-negative integer, got {json.dumps(value)}")
        options[name] = value
    return {"type": kind, **options}


def _storage(storage, what: str):
    if storage is not None and (not isinstance(storage, str) or not storage.strip()):
        raise ConfigError(f"{what}: \"storage\" must be a storage URL (sqlite:///..., postgresql://...), a "
                          f"journal file path, or null, got {json.dumps(storage)}")
    return storage


# ----------------------------------------------------------------------------- against the agent


def _declared_integer(spec: dict, dotted: str) -> bool | None:
    """Whether the agent declares the key as an integer (True), a number that may be fractional
    (False), or neither / unknown (None)."""
    node = spec
    parts = dotted.split(".")
    for part in parts[:-1]:
        entry = node.get(part)
        default = entry.default if isinstance(entry, Key) else entry
        if not isinstance(default, dict):
            return None
        node = default
    entry = node.get(parts[-1])
    if entry is None:
        return None
    types = entry.types if isinstance(entry, Key) and entry.types else \
        (type(entry.default if isinstance(entry, Key) else entry),)
    if float in types:
        return False
    if int in types and bool not in types:
        return True
    return None


def check_against_agent(sweep: Sweep) -> Sweep:
    """Every run the sweep can make, checked as main.py would check it, before any is made: the
    fixed part, then each space key with each of its choices (each end of a range) through the
    agent's config validation (unknown keys with a did-you-mean, types, ranges, cross-key checks)."""
    from dataclasses import replace

    from agents import make_config

    what = f"sweep file '{sweep.file}'"
    try:
        agent_class, base = make_config(str(sweep.config), sweep.overrides())
    except UserError as e:
        raise ConfigError(f"{what}: its config with \"set\": {e}") from None
    if base.monitor is None:
        raise ConfigError(f"{what}: the config has \"monitor\": null; a sweep optimises the monitored value, "
                          "so set one (e.g. \"set\": {\"monitor\": \"val/accuracy\", \"monitor_mode\": \"max\"})")
    spec = agent_class.config_spec()
    space = []
    for param in sweep.space:
        declared = _declared_integer(spec, param.key)
        if param.choices is None:
            if declared is True and not param.integer:
                raise ConfigError(f"{what}: space \"{param.key}\" is an integer key of {agent_class.__name__}; "
                                  "give low, high and step as integers")
            if declared is False and param.integer:
                param = replace(param, low=float(param.low), high=float(param.high), integer=False,
                                step=None if param.step is None else float(param.step))
        for value in param.candidates():
            try:
                make_config(str(sweep.config), sweep.overrides({param.key: value}))
            except UserError as e:
                raise ConfigError(f"{what}: space \"{param.key}\" = {json.dumps(value)}: {e}") from None
        space.append(param)
    epochs = base.get("max_epoch") or 1
    for param in space:
        if param.key == "max_epoch":
            epochs = max(int(c) for c in param.candidates())
    return replace(sweep, space=tuple(space), agent=agent_class.__name__, monitor=base.monitor,
                   direction="maximize" if base.monitor_mode == "max" else "minimize",
                   base_config=json.loads(json.dumps(base)), epochs_per_seed=int(epochs))
