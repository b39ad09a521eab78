"""Run one experiment from a JSON config; start a new task; list the experiments.

    python main.py CONFIG [--set KEY=VALUE ...] [--resume] [--force] [--print-config]
    python main.py new NAME      agents/, graphs/models/, datasets/ files, a config and a test for
                                 task NAME, registered and runnable on FakeData
    python main.py list          the experiments in experiments/: agent, status, epochs, best, time

CONFIG is a JSON file or an inline JSON object. --set takes dotted keys and JSON values
(--set max_epoch=3 --set optimizer.lr=0.1); a value that is not JSON is taken as a string.
"""
import argparse
import importlib
import json
import logging
import signal
import sys
from pathlib import Path

from agents import make_config
from utils.config import clear_experiment, create_experiment_dirs, experiment_paths, has_checkpoints, setup_logging
from utils.files import write_json_atomic
from utils.errors import CheckpointError, UserError

logger = logging.getLogger("main")


# verb -> its module in commands/, imported only when that verb runs (`new` and `list` need no torch)
COMMANDS = {"new": "commands.new", "list": "commands.list"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train or evaluate an agent from a JSON config.",
        epilog="other commands: `main.py new NAME` starts a new task, `main.py list` lists the experiments")
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

    agent_class, config = make_config(args.config, args.set)
    if args.resume and args.force:
        raise UserError("--resume continues the experiment and --force deletes it: give one of them")
    paths = experiment_paths(config.exp_name)
    checkpoint = None
    if config.mode == "train":
        if args.resume:
            path = _checkpoint_path(paths, config.checkpoint_file, LATEST)
            if not path.is_file():
                raise CheckpointError(f"nothing to resume: no checkpoint at '{path}'; "
                                      "run without --resume to start this experiment")
            checkpoint = ckpt.load(path)
        elif has_checkpoints(paths) and not args.force:
            raise UserError(f"'{paths.root}' already has checkpoints; continue it with --resume, "
                            "or start over with --force (deletes them), or pick another exp_name")
    else:
        path = _checkpoint_path(paths, config.checkpoint_file, agent_class.checkpoint_for_mode(config))
        if not path.is_file():
            raise CheckpointError(f"mode \"{config.mode}\" needs a trained model, but there is no "
                                  f"'{path}'; train first, or set checkpoint_file")
        checkpoint = ckpt.load(path)
    return agent_class, config, paths, checkpoint


def run(args) -> int:
    if args.print_config:  # whatever state the experiment is in
        print(json.dumps(make_config(args.config, args.set)[1], indent=2))
        return 0
    agent_class, config, paths, checkpoint = prepare(args)
    from utils import distributed
    if distributed.is_main():
        # Under torchrun only rank 0 writes; the others log warnings and errors to the console.
        if config.mode == "train" and args.force and not args.resume:
            clear_experiment(paths)
        create_experiment_dirs(paths)
        write_json_atomic(paths.root / ("config.json" if config.mode == "train"
                                        else f"config_{config.mode}.json"), config)
        setup_logging(paths.logs)
    else:
        setup_logging(None, console_level=logging.WARNING)
    logger.info(f"{config.exp_name}: {agent_class.__name__}, mode {config.mode} -> {paths.root}")
    try:
        agent = agent_class(config, checkpoint)
        del checkpoint
        try:
            agent.run()
        finally:
            agent.finalize()
    finally:
        distributed.shutdown()
    return 130 if agent.status == "interrupted" else 0


def _one_line(error: UserError) -> str:
    """The message of a user's mistake. One raised in a DataLoader worker process arrives wrapped
    in "Caught DataError in DataLoader worker process 0. Original Traceback ..." with the
    original exception as the last line."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


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
    except Exception:
        logger.exception("the run crashed", extra={"console": False})
        raise


if __name__ == "__main__":
    sys.exit(main())
