"""Issue 13: nothing the user has is lost, and no file the user is handed runs code. Every mistake
below is one line on stderr starting "error: ", exit code 2, no traceback, and an experiment that
existed before is left byte for byte as it was. Most run main.main in-process; the few that need a
real process (outside the environment, a closed pipe, run.sh) run one."""
import errno
import gzip
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from datasets.cifar10 import BatchUnpickler, write_cifar10_batches
from datasets.mnist import write_raw_split
from tests import conftest
from tests.conftest import MAIN, ROOT, run_main, snapshot, synthetic_digits

TINY = {"exp_name": "tiny", "agent": "tests.tiny_agent:TinyAgent", "progress_bar": False, "max_epoch": 1}


@pytest.fixture(autouse=True)
def main_leaves_the_process_as_it_was():
    """main.main installs a SIGTERM handler and replaces the logging handlers."""
    with conftest.main_leaves_the_process_as_it_was():
        yield


def one_error_line(code: int, capsys_or_stderr) -> str:
    """The error line, after checking that it is the only line on stderr and the exit code is 2."""
    err = capsys_or_stderr if isinstance(capsys_or_stderr, str) else capsys_or_stderr.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert code == 2, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny experiment (a folder holding experiments/tiny), trained once per module."""
    folder = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    handler = signal.getsignal(signal.SIGTERM)
    os.chdir(folder)
    try:
        assert main.main([json.dumps(TINY)]) == 0
    finally:
        os.chdir(cwd)
        signal.signal(signal.SIGTERM, handler)
        main.setup_logging(None)
    return folder


@pytest.fixture
def project(trained, tmp_path, monkeypatch):
    """A copy of the trained experiment to aim mistakes at, as the current folder."""
    shutil.copytree(trained / "experiments", tmp_path / "experiments")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------- files that would run code


class RunsCode:
    """A pickle that, loaded by plain pickle.load, would create `marker`."""

    def __init__(self, how: str, marker: Path):
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        if self.how == "exec":
            return exec, (f"open({self.marker!r}, 'w').close()",)
        return open, (self.marker, "w")


@pytest.mark.parametrize("how, asks_for", [("os.system", "system"), ("exec", "builtins.exec"),
                                            ("open", "open")])
def test_a_crafted_cifar_batch_runs_nothing(how, asks_for, tmp_path, monkeypatch, capsys):
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    write_cifar10_batches(str(tmp_path / "data"), images, torch.arange(20) % 10, images[:10], torch.arange(10))
    marker = tmp_path / "marker"
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": RunsCode(how, marker), "labels": [0, 1]}))
    monkeypatch.chdir(tmp_path)
    config = {"exp_name": "c", "agent": "CondenseNetAgent", "stages": [2, 2], "growth": [4, 8], "pool_size": 16,
              "data_mode": "local", "data_folder": str(tmp_path / "data"), "device": "cpu"}
    line = one_error_line(main.main([json.dumps(config)]), capsys)
    assert f"'{batch}' is not a CIFAR-10 python batch (it asks to load" in line and asks_for in line
    assert not marker.exists()


def python2_batch(data: bytes, labels: list) -> bytes:
    """A batch as the official archive holds it: Python 2's cPickle, protocol 2, str keys, a numpy
    array reconstructed from numpy.core.multiarray with its bytes as a Python 2 str."""
    def string(text: bytes) -> bytes:                  # SHORT_BINSTRING / BINSTRING
        return (b"U" + bytes([len(text)]) if len(text) < 256 else b"T" + struct.pack("<i", len(text))) + text

    n = len(labels)
    out = b"\x80\x02}q\x00(" + string(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85" + string(b"b") + b"\x87R"
    out += b"(K\x01K" + bytes([n]) + b"M\x00\x0c\x86cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(data) + b"tb"
    out += string(b"labels") + b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"eu."
    return out


@pytest.mark.parametrize("protocol", ["python 2"] + list(range(pickle.HIGHEST_PROTOCOL + 1)))
def test_real_batches_still_load(protocol, tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    if protocol == "python 2":
        pickled = python2_batch(data.tobytes(), [3, 7, 9])
    else:
        pickled = pickle.dumps({"data": data, "labels": [3, 7, 9], "batch_label": "x"}, protocol=protocol)
    entry = BatchUnpickler(io.BytesIO(pickled), tmp_path).load()
    assert np.array_equal(entry["data"], data) and entry["labels"] == [3, 7, 9]


def test_files_the_framework_reads_are_read_without_running_code():
    """Every loader of a file: torch.load with weights_only=True, np.load with allow_pickle=False,
    pickle only through the CIFAR batch unpickler."""
    sources = [p for folder in ("agents", "datasets", "graphs", "utils", "commands") for p in (ROOT / folder).rglob("*.py")]
    for path in sources + [MAIN]:
        text = path.read_text()
        for call, safe in (("torch.load(", "weights_only=True"), ("np.load(", "allow_pickle=False")):
            for rest in text.split(call)[1:]:
                assert safe in rest.split(")\n")[0], f"{path}: {call}{rest[:80]}"
        assert "pickle.load(" not in text and "pickle.loads(" not in text, path


def test_an_npz_archive_where_an_npy_array_belongs(tmp_path):
    from datasets.cifar10 import read_numpy_split
    from graphs.losses.class_weights import load_class_weights
    from utils.errors import ConfigError, DataError

    for name in ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy", "weights.npy"):
        with open(tmp_path / name, "wb") as f:
            np.savez(f, a=np.zeros(3))
    with pytest.raises(DataError, match="x_train.npy' is an .npz archive, not one array"):
        read_numpy_split(str(tmp_path), train=True)
    with pytest.raises(ConfigError, match="weights.npy' is an .npz archive, not one array"):
        load_class_weights(tmp_path / "weights.npy", 21)


# ----------------------------------------------------------------------------- the config


@pytest.mark.parametrize("case", ["not utf-8", "nested beyond the parser", "nested deep", "nested by --set",
                                  "duplicate key", "duplicate nested key", "duplicate key in --set",
                                  "missing extends parent"])
def test_config_files(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path, extra = tmp_path / "my_config.json", []
    text = json.dumps(TINY)[:-1]
    expected = {
        "not utf-8": "config file '" + str(path) + "' is not UTF-8 text (byte 0xe9",
        "nested beyond the parser": "nests objects or lists more than 32 levels deep",
        "nested deep": "nests objects or lists more than 32 levels deep",
        "nested by --set": "nests objects or lists more than 32 levels deep",
        "duplicate key": f"config file '{path}' has key 'learning_rate' twice",
        "duplicate nested key": "has key 'b' twice",
        "duplicate key in --set": "--set description has key 'b' twice",
        "missing extends parent": "config file 'my_config.json' extends 'base/nope.json', which does not exist",
    }[case]
    if case == "not utf-8":
        path.write_bytes((text + ', "description": "caf\xe9"}').encode("latin-1"))
    elif case == "nested beyond the parser":
        path.write_text(text + ', "description": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif case == "nested deep":
        path.write_text(text + ', "description": ' + "[" * 40 + "]" * 40 + "}")
    elif case == "nested by --set":
        path.write_text(json.dumps(TINY))
        extra = ["--set", "crash_at_iteration." + ".".join(["a"] * 5000) + "=1"]
    elif case == "duplicate key":
        path.write_text(text + ', "learning_rate": 0.1, "learning_rate": 0.2}')
    elif case == "duplicate nested key":
        path.write_text(text + ', "description": {"b": 1, "b": 2}}')
    elif case == "duplicate key in --set":
        path.write_text(json.dumps(TINY))
        extra = ["--set", 'description={"b": 1, "b": 2}']
    else:
        path.write_text(json.dumps({**TINY, "extends": "base/nope.json"}))
    line = one_error_line(main.main(["my_config.json", *extra]), capsys)
    assert expected in line
    assert not (tmp_path / "experiments").exists()


def test_a_byte_order_mark_is_fine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(TINY).encode())
    assert main.main(["c.json", "--print-config"]) == 0


@pytest.mark.parametrize("case", ["300 characters", "a trailing newline", "an existing file",
                                  "experiments is a file"])
def test_exp_names(case, project, capsys):
    name = {"300 characters": "a" * 300, "a trailing newline": "tiny\n"}.get(case, "notes.txt")
    if case == "an existing file":
        (project / "experiments" / "notes.txt").write_text("my notes\n")
    if case == "experiments is a file":
        shutil.rmtree(project / "experiments")
        (project / "experiments").write_text("my notes\n")
    before = snapshot(project)
    line = one_error_line(main.main([json.dumps({**TINY, "exp_name": name})]), capsys)
    assert {"300 characters": "is 300 characters long; keep it to 100",
            "a trailing newline": 'exp_name "tiny\\n" must be a plain folder name',
            "an existing file": "'experiments/notes.txt' is a file, not a folder",
            "experiments is a file": "'experiments' is a file, not a folder"}[case] in line
    assert snapshot(project) == before


@pytest.mark.parametrize("agent, expected", [
    (".evil:X", 'agent ".evil:X": write a custom agent as "package.module:ClassName" (an absolute module name'),
    ("tests..tiny_agent:TinyAgent", "write a custom agent as"),
    ("tests.tiny_agent:", "write a custom agent as"),
    ("agents.base:BaseAgent", "is abstract: BaseAgent does not define build"),
    ("agents.base:SupervisedAgent", "does not define build, train_step, validate_step"),
    ("my_broken_agent:X", "module 'my_broken_agent' does not compile: invalid syntax"),
])
def test_agent_names(agent, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if "broken" in agent:
        (tmp_path / "my_broken_agent.py").write_text("def f(:\n")
        monkeypatch.syspath_prepend(str(tmp_path))
    line = one_error_line(main.main([json.dumps({**TINY, "agent": agent})]), capsys)
    assert expected in line
    assert not (tmp_path / "experiments").exists()


# ----------------------------------------------------------------------------- checkpoints and results


@pytest.mark.parametrize("kind", ["text", "numpy", "pickle", "passwd", "truncated"])
def test_checkpoint_file_that_is_not_a_checkpoint(kind, project, capsys):
    path = project / f"not_a_checkpoint.{kind}"
    if kind == "passwd" and Path("/etc/passwd").is_file():
        path = Path("/etc/passwd")
    elif kind == "numpy":
        np.save(open(path, "wb"), np.zeros(3))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"models": {}}))
    elif kind == "truncated":
        path.write_bytes((project / "experiments/tiny/checkpoints/model_best.pth.tar").read_bytes()[:300])
    else:
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    before = snapshot(project)
    line = one_error_line(main.main([json.dumps({**TINY, "mode": "test", "checkpoint_file": str(path)})]), capsys)
    if kind == "truncated":
        assert f"checkpoint '{path}' is unreadable (truncated or corrupt" in line
    else:
        assert f"checkpoint '{path}' is not a checkpoint (not a file torch.save wrote)" in line
    assert snapshot(project) == before


@pytest.mark.parametrize("content", ["[1, 2]", '"done"', "{not json", '{"status": "completed",'])
def test_a_results_json_that_is_not_a_record_is_refused_not_overwritten(content, project, capsys):
    (project / "experiments/tiny/results.json").write_text(content)
    before = snapshot(project)
    for argv in ([json.dumps({**TINY, "mode": "test"})], [json.dumps({**TINY, "max_epoch": 2}), "--resume"]):
        line = one_error_line(main.main(argv), capsys)
        assert "experiments/tiny/results.json' " in line and "never overwrites it" in line
        assert snapshot(project) == before


def test_list_shows_an_unreadable_results_json_and_goes_on(project, capsys):
    for name, content in (("a_list", [1, 2]), ("best_string", {"best": "0.9", "monitor": "val/accuracy"}),
                          ("best_number", {"best": 0.9, "monitor": "val/accuracy"}),
                          ("value_string", {"best": {"value": "0.9"}, "monitor": "val/accuracy"}),
                          ("wall_time_infinite", {"status": "completed", "wall_time_s": float("inf")})):
        (project / "experiments" / name).mkdir()
        (project / "experiments" / name / "results.json").write_text(json.dumps(content))
    assert main.main(["list"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    for name in ("a_list", "best_string", "best_number", "value_string"):
        assert "unreadable results.json" in rows[name], out
    assert "completed" in rows["wall_time_infinite"] and "completed" in rows["tiny"]
    assert err == ""


# ----------------------------------------------------------------------------- data files


def mnist_folder_with(tmp_path: Path, case: str) -> tuple[Path, Path]:
    """(data folder, the broken file) of a small MNIST with one thing wrong."""
    folder = tmp_path / "mnist"
    images, labels = synthetic_digits(64, seed=0)
    write_raw_split(str(folder), True, images, labels)
    write_raw_split(str(folder), False, *synthetic_digits(32, seed=1))
    raw = folder / "MNIST" / "raw"
    images_file, labels_file = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    if case == "wrong magic number":
        data = bytearray(images_file.read_bytes())
        data[2] = 0x0D                                  # float32 instead of unsigned bytes
        images_file.write_bytes(bytes(data))
        return folder, images_file
    if case == "gzip-compressed":
        images_file.write_bytes(gzip.compress(images_file.read_bytes()))
        return folder, images_file
    if case == "fewer labels than images":
        labels_file.write_bytes(bytes([0, 0, 8, 1]) + (60).to_bytes(4, "big") + labels[:60].to(torch.uint8).numpy().tobytes())
        return folder, labels_file
    if case == "a label of 200":
        bad = labels.clone()
        bad[5] = 200
        write_raw_split(str(folder), True, images, bad)
        return folder, labels_file
    if case == "empty file":
        labels_file.write_bytes(b"")
        return folder, labels_file
    if case == "truncated header":
        images_file.write_bytes(images_file.read_bytes()[:10])
        return folder, images_file
    images_file.write_bytes(images_file.read_bytes()[:5000])            # "truncated"
    return folder, images_file


@pytest.mark.parametrize("case, expected", [
    ("wrong magic number", "is not an MNIST IDX file of 3-dimensional unsigned bytes (magic number 00000803; "
                           "its magic number is 00000d03)"),
    ("gzip-compressed", "gzip-compressed: gunzip it"),
    ("fewer labels than images", "holds 64 images but"),
    ("a label of 200", "has a label 200; MNIST's labels are 0..9"),
    ("empty file", "is empty (0 bytes)"),
    ("truncated header", "is truncated (10 bytes, shorter than its header)"),
    ("truncated", "is truncated: its header says 64 x 28 x 28 = 50,176 bytes, it holds 4,984"),
])
def test_broken_mnist_files(case, expected, tmp_path, monkeypatch, capsys):
    folder, broken = mnist_folder_with(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    before = snapshot(folder)
    config = {"exp_name": "m", "agent": "MnistAgent", "data_mode": "local", "data_folder": str(folder),
              "device": "cpu", "progress_bar": False}
    line = one_error_line(main.main([json.dumps(config)]), capsys)
    assert expected in line and str(broken.parent) in line
    assert "not found" not in line
    assert snapshot(folder) == before


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width x height pixels (PIL checks the size when it opens the file)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [14000, 10000])   # PIL: an error above 179M pixels, a warning above 89M
def test_an_image_too_large_to_decode(side, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (images / f"huge_{i}.png").write_bytes(png_header(side, side))
    monkeypatch.chdir(tmp_path)
    config = {"exp_name": "g", "agent": "DCGANAgent", "dataset": "folder", "data_mode": "local",
              "data_folder": str(images), "image_size": 32, "num_filt_g": 8, "num_filt_d": 8, "batch_size": 2,
              "data_loader_workers": 0, "device": "cpu", "progress_bar": False, "max_epoch": 1}
    line = one_error_line(main.main([json.dumps(config)]), capsys)
    assert f"image '{images}/huge_" in line and f"is too large to decode safely (Image size ({side * side} pixels)" in line


# ----------------------------------------------------------------------------- the disk


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    saves = []
    real_save = torch.save

    def fills_up(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:   # the second epoch's checkpoint
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    line = one_error_line(main.main([json.dumps({**TINY, "max_epoch": 2})]), capsys)
    latest = tmp_path / "experiments/tiny/checkpoints/checkpoint.pth.tar"
    assert line.startswith(f"error: No space left on device: '{latest.relative_to(tmp_path)}'")
    assert torch.load(latest, weights_only=True)["epoch"] == 1
    assert not [p for p in tmp_path.rglob("*.tmp")]


@pytest.mark.parametrize("case", ["read-only", "full at config.json"])
def test_a_disk_that_cannot_be_written_at_start(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if case == "read-only":
        def read_only(path, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        monkeypatch.setattr(os, "mkdir", read_only)
    else:
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", full)
    line = one_error_line(main.main([json.dumps(TINY)]), capsys)
    if case == "read-only":
        assert "Read-only file system: 'experiments" in line and "writable" in line
    else:
        assert line.startswith("error: No space left on device: 'experiments/tiny/config.json'")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]     # no config.json, no .tmp left


# ----------------------------------------------------------------------------- `new`


def test_new_with_a_name_too_long(tmp_path, monkeypatch, capsys):
    import commands.new

    for folder in ("agents", "graphs/models", "datasets", "configs", "tests"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "agents" / "__init__.py").write_text('AGENTS = {\n    "IrisAgent": "agents.iris:IrisAgent",\n}\n')
    monkeypatch.setattr(commands.new, "ROOT", tmp_path)
    before = snapshot(tmp_path)
    line = one_error_line(main.main(["new", "A" * 250]), capsys)
    assert "is 250 characters long; a task's name may have at most 64" in line
    assert snapshot(tmp_path) == before


def test_the_generated_test_goes_through_the_config(tmp_path):
    """A task whose data set no longer has FakeData's train_size and valid_size keeps a passing test."""
    from tests.test_new import project_copy

    project = project_copy(tmp_path)
    assert run_main(["new", "Flowers"], cwd=tmp_path, script=project / "main.py").returncode == 0
    agent = project / "agents" / "flowers.py"
    text = agent.read_text()
    for key in ("train_size", "valid_size"):
        text = text.replace(f"        \"{key}\": Key(", f"        # \"{key}\": Key(")
    text = text.replace("train_size=cfg.train_size,", "train_size=48,").replace("valid_size=cfg.valid_size,",
                                                                                "valid_size=32,")
    agent.write_text(text)
    config = project / "configs" / "flowers_exp_0.json"
    settings = json.loads(config.read_text())
    del settings["train_size"], settings["valid_size"]
    config.write_text(json.dumps(settings, indent=2))
    check = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_flowers.py"],
                           cwd=project, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert check.returncode == 0, check.stdout[-3000:]
    assert "5 passed" in check.stdout


# ----------------------------------------------------------------------------- a real process


def test_outside_the_environment(tmp_path):
    # -S: no site-packages, as a system Python without the project's packages would be
    done = subprocess.run([sys.executable, "-S", str(MAIN), "configs/mnist_exp_0.json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    line = one_error_line(done.returncode, done.stderr)
    assert "easydict" in line and "./run.sh" in line and "source .venv/bin/activate" in line


@pytest.mark.parametrize("argv", [["configs/mnist_exp_0.json", "--print-config"], ["list"]])
def test_a_reader_that_leaves_early(argv):
    """`main.py ... | head -1`: the pipe closes before main.py writes."""
    reader = subprocess.Popen([sys.executable, str(MAIN), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    reader.stdout.close()
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=60) == 1
    assert err == ""


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_run_sh_help(flag):
    done = subprocess.run(["bash", str(ROOT / "run.sh"), flag], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == ""
    for command in ("./run.sh test", "./run.sh tensorboard", "./run.sh torchrun", "./run.sh new", "./run.sh list"):
        assert command in done.stdout
    assert "usage: main.py" not in done.stdout
