"""The tutorials work as written: every file they show (a block after `<!-- file: PATH -->`) is
written and every command of their bash blocks is run, in order, in a fresh copy of the project.

`git clone URL DIR` clones a git repository made from this working tree (the tutorial's URL is
a placeholder); MNIST is a small fixture in torchvision's layout at data/mnist, where the
tutorials' download would put it; a TensorBoard server must come up (on a free port: `--port 0`
is added, so that runs side by side do not meet on 6006), then it is stopped."""
import os
import re
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.fixtures import write_mnist

TUTORIALS = ROOT / "tutorials"
BLOCK = re.compile(r"^(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)^```", re.S | re.M)
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "experiments", "data", "__pycache__", ".pytest_cache",
                                    ".ruff_cache")


def tutorial_steps(text: str) -> list[tuple]:
    """[("file", path, content) | ("run", command)] in the order of the text."""
    steps = []
    for block in BLOCK.finditer(text):
        if block["file"]:
            steps.append(("file", block["file"], block["body"]))
        elif block["lang"] == "bash":
            for line in block["body"].replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    steps.append(("run", line.strip()))
    return steps


def add_mnist_fixture(project: Path, train: int = 128):
    # Small: the tutorials check that the commands work, not what they reach. getting_started
    # trains configs/mnist_exp_0.json, which holds out valid_size (5,000) more.
    write_mnist(project / "data" / "mnist", train=train, test=64)


def shell_env() -> dict:
    # run.sh uses this interpreter (a copy has no .venv); `python` is this interpreter too.
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PYTHON=sys.executable, PATH=bin_dir + os.pathsep + os.environ["PATH"],
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def serve_briefly(command: str, cwd: Path, env: dict, timeout: float = 120) -> str:
    """Start a server command, wait until it prints its address, stop it; returns its output."""
    server = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    output, deadline = b"", time.monotonic() + timeout
    waiting = selectors.DefaultSelector()
    waiting.register(server.stdout, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline and b"http://" not in output:
            if waiting.select(timeout=1):
                chunk = os.read(server.stdout.fileno(), 65536)   # unbuffered: select sees all of it
                if not chunk:  # it exited
                    break
                output += chunk
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    return output.decode(errors="replace")


def run_tutorial(name: str, workdir: Path) -> tuple[Path, dict]:
    """Run tutorials/<name> from workdir; returns the folder its last command ran in and
    {command: its stdout and stderr}."""
    env, cwd, outputs = shell_env(), workdir, {}
    for step in tutorial_steps((TUTORIALS / name).read_text()):
        if step[0] == "file":
            path = cwd / step[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(step[2])
            continue
        command, started = step[1], time.perf_counter()
        if command.startswith("cd "):
            cwd = (cwd / command[3:].strip()).resolve()
            continue
        if command.startswith("git clone "):
            origin = workdir / "origin"
            shutil.copytree(ROOT, origin, ignore=NOT_COPIED)
            git = ["git", "-c", "user.name=tutorial", "-c", "user.email=tutorial@example.com"]
            subprocess.run(["git", "init", "-q", str(origin)], check=True)
            subprocess.run([*git, "-C", str(origin), "add", "-A"], check=True)
            subprocess.run([*git, "-C", str(origin), "commit", "-q", "-m", "tutorial"], check=True)
            target = command.split()[3]
            subprocess.run(["git", "clone", "-q", str(origin), target], cwd=cwd, check=True)
            add_mnist_fixture(cwd / target, train=5_000 + 128)
        elif "tensorboard" in command:
            output = serve_briefly(f"{command} --port 0", cwd, env)
            assert "http://" in output, f"`{command}` did not start serving:\n{output[-3000:]}"
        else:
            done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, (f"{name}: `{command}` exited {done.returncode}\n"
                                          f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            outputs[command] = done.stdout + done.stderr
        print(f"{time.perf_counter() - started:6.1f}s  {command}")   # in a failing test's report
    return cwd, outputs


def test_tutorial_steps_are_found():
    steps = tutorial_steps((TUTORIALS / "mnist_tutorial.md").read_text())
    files = [step[1] for step in steps if step[0] == "file"]
    assert files == ["mnist_plain.py", "graphs/models/mnist_port.py", "datasets/mnist_port.py",
                     "agents/mnist_port.py", "configs/mnist_port_exp_0.json", "tests/test_mnist_port.py"]
    assert ("run", "./run.sh new MnistPort") in steps


@pytest.mark.skipif(shutil.which("git") is None, reason="the tutorial starts with git clone")
def test_getting_started(tmp_path):
    project, outputs = run_tutorial("getting_started.md", tmp_path)
    assert project == tmp_path / "my_project"
    experiments = project / "experiments"
    assert {p.name for p in experiments.iterdir()} >= {"mnist_exp_0", "flowers_exp_0", "flowers_mlp", "flowers_ddp"}
    assert '"test"' in (experiments / "mnist_exp_0" / "results.json").read_text()
    assert '"FlowersAgent": "agents.flowers:FlowersAgent"' in (project / "agents" / "__init__.py").read_text()
    # The generated test ran whole: its run through main.py and each network choice's step.
    summary = outputs["./run.sh test tests/test_flowers.py"].strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    assert counts.get("passed", 0) >= 5 and set(counts) <= {"passed", "warning", "warnings"}, summary


def test_mnist_tutorial(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=NOT_COPIED)
    add_mnist_fixture(project)
    run_tutorial("mnist_tutorial.md", project)
    results = (project / "experiments" / "mnist_port_exp_0" / "results.json").read_text()
    assert '"epochs_done": 3' in results and '"test/accuracy"' in results
