"""Run one experiment from a JSON config; start a new task; list the experiments.

    python main.py CONFIG [--set KEY=VALUE ...] [--resume] [--force] [--print-config]
    python main.py new NAME      agents/, graphs/models/, datasets/ files, a config and a test for
                                 task NAME, registered and runnable on FakeData
    python main.py list [PATTERN ...] [--sort KEY] [--plot]
                                 the experiments in experiments/: agent, status, epochs, best, time;
                                 --plot: their curves (metrics.csv) in one PNG
    python main.py compare EXP [EXP ...]
                                 the config keys that differ between experiments, metrics side by side
    python main.py sweep SWEEP.json [--workers N] [--status]
                                 a hyperparameter search with Optuna (docs/sweeps.md)

CONFIG is a JSON file or an inline JSON object. --set takes dotted keys and JSON values
(--set max_epoch=3 --set optimizer.lr=0.1); a value that is not JSON is taken as a string.
"""
import argparse
import errno
import importlib
import importlib.util
import json
import logging
import logging.handlers
import signal
import os
import sys
from pathlib import Path


def _require_environment():
    """Outside the project's environment (a bare `python main.py`) the imports below would die
    with ModuleNotFoundError: say where the packages are instead."""
    missing = [name for name in ("easydict", "tqdm", "numpy", "torch", "torchvision")
               if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: this Python ({sys.executable}) lacks the project's packages ({', '.join(missing)}); "
              "run it as ./run.sh ARGS (which sets up .venv), or activate the environment first: "
              "source .venv/bin/activate", file=sys.stderr)
        sys.exit(2)


_require_environment()

from agents import make_config  # noqa: E402 (after the environment check)
from utils.config import (add_log_files, check_experiment_folder, clear_experiment, create_experiment_dirs,
                          experiment_paths, has_checkpoints, parse_override, setup_logging)
from utils.files import write_json_atomic
from utils.errors import CheckpointError, ConfigError, UserError

logger = logging.getLogger("main")


# verb -> its module in commands/, imported only when that verb runs (`new` and `list` need no torch)
COMMANDS = {"new": "commands.new", "list": "commands.list", "compare": "commands.compare", "sweep": "commands.sweep"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train or evaluate an agent from a JSON config.",
        epilog="other commands: `main.py new NAME` starts a new task, `main.py list` lists the experiments, "
               "`main.py compare EXP EXP` compares them, `main.py sweep SWEEP.json` searches hyperparameters")
    parser.add_argument("config", help="path to a JSON config, or an inline JSON object")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key: dotted KEY, JSON VALUE (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the experiment's checkpoints/checkpoint.pth.tar")
    parser.add_argument("--force", action="store_true",
                        help="start over, deleting the experiment's checkpoints, summaries, out and logs")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults included) and exit")
    return parser.parse_args(argv)


def _checkpoint_path(paths, file_name: str | None, default: str) -> Path:
    if not file_name:
        return paths.checkpoints / default
    path = Path(file_name)
    return path if len(path.parts) > 1 else paths.checkpoints / path


def prepare(args):
    """Everything that can fail on the user's input, before any file of theirs is touched."""
    from agents.base import LATEST  # torch: imported to run an experiment, not for `new` or `list`
    from utils import checkpoint as ckpt
    from utils import distributed
    from utils.lock import refuse_if_held
    from utils.trackers import recorded_results

    if args.resume and args.force:
        raise UserError("--resume continues the experiment and --force deletes it: give one of them")
    agent_class, config = make_config(args.config, args.set)
    paths = experiment_paths(config.exp_name)
    check_experiment_folder(paths)
    if distributed.is_main():   # the writer; under torchrun the others would find rank 0's own lock
        refuse_if_held(paths.root)
    if not (config.mode == "train" and args.force):   # --force deletes it
        recorded_results(paths.root / "results.json")  # one that is not a JSON object is refused, never overwritten
    checkpoint = None
    if config.mode == "train":
        if args.resume:
            path = _checkpoint_path(paths, config.checkpoint_file, LATEST)
            if not path.is_file():
                raise CheckpointError(f"nothing to resume: no checkpoint at '{path}'; "
                                      "run without --resume to start this experiment")
            checkpoint = ckpt.load(path)
            agent_class, config = resume_config(agent_class, config, args, paths, checkpoint.get("world_size"))
        elif has_checkpoints(paths) and not args.force and not config.fast_dev_run:
            raise UserError(f"'{paths.root}' already has checkpoints; continue it with --resume, "
                            "or start over with --force (deletes them), or pick another exp_name")
    else:
        path = _checkpoint_path(paths, config.checkpoint_file, agent_class.checkpoint_for_mode(config))
        if not path.is_file():
            raise CheckpointError(f"mode \"{config.mode}\" needs a trained model, but there is no "
                                  f"'{path}'; train first, or set checkpoint_file")
        checkpoint = ckpt.load(path)
    return agent_class, config, paths, checkpoint


def resume_config(agent_class, requested, args, paths, saved_world_size=None):
    """A resumed run continues with its own saved config.json. --set may change only the keys the
    agent lists in resumable_keys (how long to train, logging, workers, the machine), and
    batch_size where it keeps the global batch on another number of processes; a change to any
    other key is refused, and edits made to the config file since are ignored, with a warning."""
    saved_path = paths.root / "config.json"
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"cannot resume: '{saved_path}' (the run's own config) is missing; "
                              "restore it, or start a new run") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot resume: '{saved_path}' is unreadable ({e}); restore it, or "
                              "start a new run") from None
    if not isinstance(saved, dict) or saved.get("agent") != requested.agent:
        raise CheckpointError(f"cannot resume: '{saved_path}' is not a config of {requested.agent}; "
                              "restore it, or start a new run")
    saved["exp_name"] = requested.exp_name       # a copied experiment folder resumes under its new name
    set_keys = {parse_override(assignment)[0][0] for assignment in args.set}
    changed = sorted(key for key in set_keys if requested.get(key) != saved.get(key))
    refused = [key for key in changed if key not in agent_class.resumable_keys
               and not (key == "batch_size" and _same_global_batch(requested, saved, saved_world_size))]
    if refused:
        key = refused[0]
        raise ConfigError(f"--set {key} cannot change when resuming (the run has {json.dumps(saved.get(key))}); "
                          f"on --resume --set may change only: {', '.join(agent_class.resumable_keys)}. "
                          "To train with another value, start a new run (another exp_name, or --force)")
    edited = sorted(key for key in requested if key not in set_keys and requested[key] != saved.get(key))
    if edited:
        logger.warning(f"resuming with the run's own config ({saved_path}); what the config file now says "
                       f"differently is not used: {', '.join(edited)}")
    return make_config(saved, [a for a in args.set if parse_override(a)[0][0] in changed])


def _same_global_batch(requested, saved, saved_world_size) -> bool:
    """batch_size is per process: 2 processes x 16 resume as 1 process x 32, the same run."""
    from utils import distributed

    return (saved_world_size is not None and isinstance(requested.get("batch_size"), int)
            and requested.batch_size * distributed.world_size() == saved.get("batch_size", 0) * saved_world_size)


def open_experiment(args, config, paths, earlier_records):
    """Every check passed: only now is the experiment written. --force clears it first. Using a
    trained model (predict, export) never rewrites its experiment: no config, no log files."""
    from agents.base import USING_MODES

    if config.mode in USING_MODES:
        return
    if config.mode == "train" and args.force:
        deleted = clear_experiment(paths)
        if deleted:
            logger.warning(f"--force: deleted {', '.join(deleted)} in {paths.root}")
    create_experiment_dirs(paths)
    write_json_atomic(paths.root / ("config.json" if config.mode == "train" else f"config_{config.mode}.json"),
                      config)
    add_log_files(paths.logs, earlier_records)


def run(args, validation_callbacks=()) -> int:
    """validation_callbacks: added to the agent's (a sweep's pruning reporter, commands/sweep_worker.py)."""
    if args.print_config:  # whatever state the experiment is in
        print(json.dumps(make_config(args.config, args.set)[1], indent=2))
        return 0
    from utils import distributed
    from utils.lock import ExperimentLock

    # What is logged before the experiment may be written goes into its log files afterwards.
    earlier = logging.handlers.BufferingHandler(capacity=1_000_000)
    logging.getLogger().addHandler(earlier)
    lock = agent = None
    try:
        try:
            agent_class, config, paths, checkpoint = prepare(args)
            if not distributed.is_main():  # under torchrun only rank 0 writes and logs INFO
                setup_logging(None, console_level=logging.WARNING)
            logger.info(f"{config.exp_name}: {agent_class.__name__}, mode {config.mode} -> {paths.root}")
            agent = agent_class(config, checkpoint)   # finds the data, fits the checkpoint: the last checks
            agent.validation_callbacks.extend(validation_callbacks)
            del checkpoint
        finally:
            logging.getLogger().removeHandler(earlier)
        if distributed.is_main() and not config.fast_dev_run:   # a fast_dev_run writes nothing
            lock = ExperimentLock(paths.root).acquire()
            open_experiment(args, config, paths, earlier.buffer)
        try:
            agent.run()
        finally:
            agent.finalize()
    finally:
        if lock is not None:
            lock.release()
        # Every process ran to the same end (completed, stopped early): they leave together.
        finished = agent is not None and agent.status not in ("built", "running", "failed", "interrupted")
        distributed.shutdown(all_finished=finished)
        setup_logging(None)      # the log files are closed with the run
    return 130 if agent.status == "interrupted" else 0


def _one_line(error: UserError) -> str:
    """The message of a user's mistake. One raised in a DataLoader worker process arrives wrapped
    in "Caught DataError in DataLoader worker process 0. Original Traceback ..." with the
    original exception as the last line."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


# OSErrors of the disk, not of the code (full, read-only, not allowed, a path that cannot be): one
# line, as for a user's mistake, with what to do. Files are written atomically, so what was there
# before (the last checkpoint) is intact.
_DISK_FULL = "free some space and run again (--resume continues from the last checkpoint written)"
_READ_ONLY = "make it writable, or run from a folder you can write to"
_NOT_ALLOWED = "check its permissions (or run from a folder you can write to)"
STORAGE_ERRORS = {errno.ENOSPC: _DISK_FULL, errno.EDQUOT: _DISK_FULL, errno.EFBIG: _DISK_FULL,
                  errno.EROFS: _READ_ONLY, errno.EACCES: _NOT_ALLOWED, errno.EPERM: _NOT_ALLOWED,
                  errno.ENOTDIR: "a part of that path is a file, not a folder",
                  errno.ENAMETOOLONG: "shorten it"}


def _storage_error(error: OSError) -> str | None:
    """"<strerror>: '<file>'; <what to do>" for an OSError in STORAGE_ERRORS, None for any other."""
    if error.errno not in STORAGE_ERRORS:
        return None
    where = f": '{error.filename}'" if error.filename else ""
    return f"{error.strerror or os.strerror(error.errno)}{where}; {STORAGE_ERRORS[error.errno]}"


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_command(argv: list) -> int:
    """`main.py VERB ...`: the verb's module parses the rest and runs."""
    verb, *rest = argv
    command = importlib.import_module(COMMANDS[verb])
    parser = argparse.ArgumentParser(prog=f"main.py {verb}", description=command.HELP)
    command.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return command.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if _storage_error(e) is None:
            raise
        print(f"error: {_storage_error(e)}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS and not Path(argv[0]).is_file():
        return run_command(argv)
    args = parse_args(argv)
    setup_logging(None)
    # A scheduler's SIGTERM (preemption, timeout) is handled like Ctrl+C: save, then stop.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return run(args)
    except UserError as e:
        message = _one_line(e)
        logger.error(message, extra={"console": False})
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        message = _storage_error(e)
        if message is None:
            logger.exception("the run crashed", extra={"console": False})
            raise
        logger.exception(message, extra={"console": False})
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception:
        logger.exception("the run crashed", extra={"console": False})
        raise


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of our output left (`main.py CONFIG --print-config | head -1`). As the Python
        # docs advise: point stdout at devnull, so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)
