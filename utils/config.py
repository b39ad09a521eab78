"""Config loading: JSON file or inline JSON -> "extends" -> --set overrides -> declared defaults ->
validation -> EasyDict; plus the experiment folders and logging of one run."""
import dataclasses
import difflib
import json
import logging
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from easydict import EasyDict
from tqdm import tqdm

from utils.errors import ConfigError, UserError

EXPERIMENTS_ROOT = Path("experiments")
REQUIRED_KEYS = ("exp_name", "agent")
_EXP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
MAX_EXP_NAME = 100          # a folder name; file systems allow 255 bytes
MAX_DEPTH = 32              # objects and lists nested in a config; real ones nest 2 or 3


@dataclass(frozen=True)
class Key:
    """A declared config key whose type or allowed values the default alone does not tell.

    types: accepted Python types (default: the default value's type; an int is accepted for float).
    choices: allowed values. pattern: a regex a string value must match (with `pattern_hint` for
    the error message). minimum, maximum: inclusive bounds of a number (None: unbounded); a key
    with either also refuses NaN and Infinity, which Python's JSON parser accepts.

    A subclass that declares a plain value for a key its parent declared as a Key changes only the
    default and keeps the parent's types, choices and range (see `inherit`).
    """
    default: Any
    types: tuple = ()
    choices: tuple = ()
    pattern: str = ""
    pattern_hint: str = ""
    minimum: float | None = None
    maximum: float | None = None


def inherit(parent, declared):
    """A subclass's DEFAULTS entry over its parent's: a Key replaces the parent's declaration, a
    plain value is a new default under the parent's constraints (so "max_epoch": 14 in an agent
    still has to be at least 1)."""
    if isinstance(declared, Key) or not isinstance(parent, Key):
        return declared
    return dataclasses.replace(parent, default=declared)


def _spec(value):
    return value if isinstance(value, Key) else Key(value)


def _type_name(types):
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "an object", type(None): "null"}
    if float in types:
        types = tuple(t for t in types if t is not int)  # "a number" covers integers
    return " or ".join(names.get(t, t.__name__) for t in types)


def _json_kind(value):
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _accepted_types(spec: Key):
    if spec.types:
        types = spec.types
    elif spec.default is None:
        return None  # anything JSON can hold
    else:
        types = (type(spec.default),)
    if float in types and int not in types:
        types = types + (int,)
    return types


def _check_type(path, value, spec: Key):
    types = _accepted_types(spec)
    if types is not None:
        # bool is a subclass of int in Python; JSON true is not a number.
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise ConfigError(f"config key '{path}' must be {_type_name(types)}, "
                              f"got {_json_kind(value)} {json.dumps(value)}")
    if spec.choices and value not in spec.choices:
        options = ", ".join(json.dumps(c) for c in spec.choices)
        raise ConfigError(f"config key '{path}' is {json.dumps(value)}; it must be one of {options}")
    if spec.pattern and isinstance(value, str) and not re.fullmatch(spec.pattern, value):
        raise ConfigError(f"config key '{path}' is {json.dumps(value)}; {spec.pattern_hint}")
    _check_range(path, value, spec)


def _check_range(path, value, spec: Key):
    low, high = spec.minimum, spec.maximum
    if (low is None and high is None) or isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # null (where the types allow it) and lists are not ranged
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{path}' must be a finite number, got {json.dumps(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            bound = f"at least {low}"
        elif low is None:
            bound = f"at most {high}"
        else:
            bound = f"between {low} and {high}"
        raise ConfigError(f"config key '{path}' must be {bound}, got {json.dumps(value)}")


def _unknown_key_error(path, key, known, owner):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "known keys: " + ", ".join(sorted(known))
    return ConfigError(f"unknown config key '{path}' ({owner} does not read it); {hint}")


def validate(raw: Mapping, spec: Mapping, owner: str, prefix: str = "") -> dict:
    """Merge `raw` over the declared defaults in `spec`, rejecting unknown keys and wrong types."""
    resolved = {}
    for key, value in raw.items():
        path = prefix + key
        if key not in spec:
            raise _unknown_key_error(path, key, list(spec), owner)
        key_spec = _spec(spec[key])
        if isinstance(key_spec.default, dict) and key_spec.default and isinstance(value, dict):
            # A declared sub-object: its keys are checked as strictly as the top level.
            value = validate(value, key_spec.default, owner, prefix=path + ".")
        _check_type(path, value, key_spec)
        resolved[key] = value
    for key, default in spec.items():
        if key not in resolved:
            default = _spec(default).default
            if isinstance(default, dict) and default:
                default = validate({}, default, owner, prefix=prefix + key + ".")
            resolved[key] = default
    return resolved


# ----------------------------------------------------------------------------- loading


def _read_json_file(path: Path, shown: str | None = None, extended_by: str | None = None) -> dict:
    """shown: the path as the user wrote it, for messages; extended_by: the config whose
    "extends" names this file."""
    if not path.is_file():
        if extended_by:
            raise ConfigError(f"{extended_by} extends '{shown or path}', which does not exist; "
                              f"fix its \"extends\" (a path relative to that file)")
        raise ConfigError(f"config file '{shown or path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")   # -sig: a byte-order mark, as Notepad writes, is fine
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                          f"position {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
    return _parse_json(text, f"config file '{path}'")


def _unique_keys(what: str):
    """json's object_pairs_hook: a key given twice in one object is an error, not last-one-wins."""
    def build(pairs):
        data = {}
        for key, value in pairs:
            if key in data:
                raise ConfigError(f"{what} has key '{key}' twice; keep one of them")
            data[key] = value
        return data
    return build


def check_depth(data, what: str, limit: int = MAX_DEPTH):
    """Refuse objects and lists nested deeper than `limit`: code that walks a config (merging,
    validating, EasyDict) recurses once per level, and Python's stack ends near 1000."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise ConfigError(f"{what} nests objects or lists more than {limit} levels deep; flatten it")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _parse_json(text: str, what: str) -> dict:
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys(what))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # json's parser recurses once per nested [ or {
        raise ConfigError(f"{what} nests objects or lists more than {MAX_DEPTH} levels deep; "
                          "flatten it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must hold a JSON object {{...}}, not {_json_kind(data)}")
    check_depth(data, what)
    return data


def deep_merge(base: dict, override: Mapping) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_extends(data: dict, base_dir: Path, chain: tuple, what: str) -> dict:
    """what: the config `data` came from, for messages ("config file 'a.json'", "inline config")."""
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"\"extends\" in {what} must be a path to a JSON file, got {_json_kind(parent)}")
    parent_path = (base_dir / parent).resolve()
    if parent_path in chain:
        raise ConfigError(f"config files extend each other in a loop: '{parent_path}'")
    parent_data = _resolve_extends(_read_json_file(parent_path, shown=parent, extended_by=what),
                                   parent_path.parent, chain + (parent_path,), f"config file '{parent_path}'")
    return deep_merge(parent_data, data)


def load_source(source: str) -> dict:
    """A config from a JSON file path, or from an inline JSON object string."""
    if source.lstrip().startswith("{"):
        return _resolve_extends(_parse_json(source, "inline config"), Path.cwd(), (), "the inline config")
    path = Path(source).resolve()
    return _resolve_extends(_read_json_file(path, shown=source), path.parent, (path,),
                            f"config file '{source}'")


def parse_override(assignment: str):
    """'a.b=VALUE' -> (['a', 'b'], value); VALUE is JSON, or a plain string when it is not JSON."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. --set max_epoch=3), got '{assignment}'")
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys(f"--set {key.strip()}"))
    except json.JSONDecodeError:
        value = text
    except RecursionError:
        raise ConfigError(f"--set {key.strip()}: the value nests objects or lists more than {MAX_DEPTH} "
                          "levels deep; flatten it") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, assignments) -> dict:
    data = dict(data)
    for assignment in assignments:
        keys, value = parse_override(assignment)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                dotted = ".".join(keys[:depth + 1])
                raise ConfigError(f"--set {assignment}: '{dotted}' is {_json_kind(child)}, not an object")
            else:
                child = node[key] = dict(child)
            node = child
        node[keys[-1]] = value
    return data


def check_required(data: Mapping):
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ConfigError(f"the config has no \"{key}\"; add it, e.g. "
                              + ('"exp_name": "my_experiment"' if key == "exp_name"
                                 else '"agent": "MnistAgent"'))
    name = data["exp_name"]
    if not isinstance(name, str) or not _EXP_NAME.fullmatch(name) or name in (".", ".."):
        shown = json.dumps(name) if len(json.dumps(name)) <= 60 else json.dumps(name)[:50] + '..."'
        raise ConfigError(f"exp_name {shown} must be a plain folder name under experiments/ "
                          "(letters, digits, '_', '-', '.'; no '/' and no '..')")
    if len(name) > MAX_EXP_NAME:
        raise ConfigError(f"exp_name \"{name[:40]}...\" is {len(name)} characters long; "
                          f"keep it to {MAX_EXP_NAME}")
    if not isinstance(data["agent"], str):
        raise ConfigError(f"agent must be a string naming an agent, got {_json_kind(data['agent'])}")


def resolve(data: Mapping, spec: Mapping, owner: str) -> EasyDict:
    check_depth(data, "the config")   # --set a.b.c... nests too
    return EasyDict(validate(data, spec, owner))


# ----------------------------------------------------------------------------- experiment folders


def experiment_paths(exp_name: str, root: Path = EXPERIMENTS_ROOT) -> EasyDict:
    exp_dir = Path(root) / exp_name
    return EasyDict(root=exp_dir, summaries=exp_dir / "summaries", checkpoints=exp_dir / "checkpoints",
                    out=exp_dir / "out", logs=exp_dir / "logs", export=exp_dir / "export")


def has_checkpoints(paths) -> bool:
    return paths.checkpoints.is_dir() and any(paths.checkpoints.glob("*.pth.tar"))


def clear_experiment(paths) -> list[str]:
    """--force: start the experiment over. Returns what it deleted (names under the experiment),
    for the log line that says so."""
    deleted = []
    for folder in (paths.checkpoints, paths.summaries, paths.out, paths.logs, paths.export):
        if folder.is_dir() and any(folder.iterdir()):
            deleted.append(f"{folder.name}/ ({sum(1 for p in folder.rglob('*') if p.is_file())} files)")
        shutil.rmtree(folder, ignore_errors=True)
    for record in ("metrics.csv", "results.json"):
        if (paths.root / record).is_file():
            deleted.append(record)
        (paths.root / record).unlink(missing_ok=True)
    return deleted


def check_experiment_folder(paths):
    """Before anything is built: experiments/ and experiments/<exp_name> must be folders, or not
    exist yet; a file of that name is the user's and stays."""
    for path in (paths.root.parent, paths.root):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"'{path}' is a file, not a folder, so the experiment cannot go there; "
                              "move that file, or pick another exp_name")


def create_experiment_dirs(paths):
    """The experiment's folders; a path that cannot be one (a file of that name, a read-only or
    full disk) is a UserError naming it."""
    check_experiment_folder(paths)
    for folder in (paths.summaries, paths.checkpoints, paths.out, paths.logs):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the experiment folder '{e.filename or folder}': "
                              f"{e.strerror or e}") from None


class TqdmHandler(logging.StreamHandler):
    """Console log lines that print above the progress bars instead of through them."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()  # a piped stdout (tee, a log collector) sees each line as it happens
        except Exception:  # logging must never take the run down
            self.handleError(record)


class _LogFileHandler(logging.FileHandler):
    """A log file that cannot be written (the disk filled up) is left unwritten: logging's default
    would print a "--- Logging error ---" traceback to the console for every record."""

    def handleError(self, record):
        pass


class _ConsoleFormatter(logging.Formatter):
    def format(self, record):
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"[{record.levelname}] {message}"


def setup_logging(log_dir: Path | None, console_level=logging.INFO):
    """Console (tqdm-safe) at INFO; logs/exp_debug.log gets everything, logs/exp_error.log warnings."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    console = TqdmHandler(sys.stdout)
    console.setLevel(console_level)
    # Records logged with extra={"console": False} go to the log files only.
    console.addFilter(lambda record: getattr(record, "console", True))
    console.setFormatter(_ConsoleFormatter("%(message)s"))
    root.addHandler(console)
    if log_dir is not None:
        add_log_files(log_dir)
    # Third-party chatter stays out of the console.
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_log_files(log_dir: Path, earlier_records=()):
    """logs/exp_debug.log (everything) and logs/exp_error.log (warnings), beside the console;
    earlier_records (logged before the experiment folder could be written) go into them first."""
    root = logging.getLogger()
    file_format = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, level in (("exp_debug.log", logging.DEBUG), ("exp_error.log", logging.WARNING)):
        handler = _LogFileHandler(Path(log_dir) / name)
        handler.setLevel(level)
        handler.setFormatter(file_format)
        for record in earlier_records:
            if record.levelno >= level:
                handler.handle(record)
        root.addHandler(handler)
