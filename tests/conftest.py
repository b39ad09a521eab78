import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "main.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# synthetic_digits: other tests import it from here
from tests.fixtures import synthetic_digits, write_cifar, write_image_folder, write_mnist, write_voc  # noqa: E402,F401

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- running main.py


def set_args(settings: dict | None = None, /, **more) -> list:
    """["--set", "key=VALUE", ...] with every VALUE written as JSON (what main.py parses), from a
    dict (for dotted keys) and keywords."""
    args = []
    for key, value in {**(settings or {}), **more}.items():
        args += ["--set", f"{key}={json.dumps(str(value) if isinstance(value, Path) else value)}"]
    return args


# valid_size 64: the default (5000) is more than the fixture's 320 training digits
MNIST_SMALL = {"data_mode": "local", "batch_size": 32, "test_batch_size": 64, "max_epoch": 2, "log_interval": 2,
               "valid_size": 64}


def mnist_overrides(data_folder, **extra) -> list:
    return set_args(MNIST_SMALL, data_folder=data_folder, **extra)


def run_main(args, cwd, timeout=300, script=MAIN, **kwargs) -> subprocess.CompletedProcess:
    """`python main.py ARGS` in cwd, a process of its own."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def main_leaves_the_process_as_it_was():
    """main.main installs a SIGTERM handler and replaces the root logger's handlers (the console,
    the experiment's log files): put them back, and close the ones it opened."""
    handler = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)
        for extra in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(extra)
            extra.close()
        for kept in handlers:
            if kept not in root.handlers:
                root.addHandler(kept)
        root.setLevel(level)


def run_main_in_process(args, cwd: Path) -> Ran:
    """main.main(ARGS) in cwd, in this process: what `python main.py ARGS` does, without a new
    interpreter importing torch again (seconds each time). Its stdout and stderr are captured; an
    exception main does not turn into an exit code fails the test with its traceback."""
    import main

    cwd.mkdir(parents=True, exist_ok=True)
    stdout, stderr, before = io.StringIO(), io.StringIO(), os.getcwd()
    with main_leaves_the_process_as_it_was(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        os.chdir(cwd)
        try:
            code = main.main([str(arg) for arg in args])
        except SystemExit as e:          # argparse's usage errors, --help
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            os.chdir(before)
    return Ran(code, stdout.getvalue(), stderr.getvalue())


def one_error_line(done: Ran) -> str:
    """The one "error: ..." line a run that refused its input printed (exit code 2, no traceback)."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def group(name: str):
    """A parameter that runs on the xdist worker of the tests of the shipped run `name`."""
    return pytest.param(name, marks=pytest.mark.xdist_group(name))


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- fixture data


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory) -> Path:
    """A small MNIST in torchvision's raw IDX layout: 320 training and 160 test digits."""
    folder = tmp_path_factory.mktemp("mnist_data")
    write_mnist(folder, 320, 160)
    return folder


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """CIFAR-10's python batches: 128 training and 64 test images of noise."""
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar(folder, 128, 64)
    return folder


@pytest.fixture(scope="session")
def voc_folder(tmp_path_factory) -> Path:
    """Pascal VOC 2012's layout: 8 training and 5 validation images with masks."""
    folder = tmp_path_factory.mktemp("voc")
    write_voc(folder)
    return folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """24 small images in two class folders (DCGAN's "folder" data set)."""
    folder = tmp_path_factory.mktemp("faces")
    write_image_folder(folder, 24)
    return folder


@pytest.fixture(scope="session")
def shipped_runs(request, tmp_path_factory):
    """shipped_runs[name]: configs/<name>.json trained tiny, straight and interrupted + resumed,
    once per session (tests/shipped.py). A test that reads one is marked
    pytest.mark.xdist_group(name), so that `--dist loadgroup` runs it on the worker that trains it."""
    from tests.shipped import SHIPPED, run_shipped

    class Runs(dict):
        def __missing__(self, name):
            data = SHIPPED[name].data
            folder = request.getfixturevalue(data) if data else None
            self[name] = run_shipped(name, folder, tmp_path_factory.mktemp(name))
            return self[name]

    return Runs()


# ----------------------------------------------------------------------------- order under xdist

# Longest first: `-n auto` hands tests out in collection order, so the slowest start at once, on
# different workers, and the short ones fill in around them (the workers finish together).
SLOWEST = ["test_tutorials.py::test_getting_started", "test_tutorials.py::test_mnist_tutorial",
           "test_distributed.py", "test_user_errors.py::test_the_generated_test",
           "test_experiment_safety.py::test_one_writer", "test_iris.py::test_baseline_experiments_script",
           "test_shipped_configs.py", "test_export.py::test_export_writes_files_that_agree_with_eager[erfnet",
           "test_interrupts.py::test_sigkill", "test_docs.py::test_page_runs_as_written[docs/predict-export",
           "test_docs.py::test_page_runs_as_written[README", "test_erfnet.py::test_train_validate",
           "test_mnist_e2e.py::test_ctrl_c", "test_mlflow.py::test_runs_started_together"]


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): run on the worker of the tests with the same name")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        test = f"{item.path.name}::{item.name}"
        return next((i for i, prefix in enumerate(SLOWEST) if test.startswith(prefix)), len(SLOWEST))

    items.sort(key=rank)
