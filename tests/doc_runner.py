"""Runs a Markdown page as written: every file it shows (a block after `<!-- file: PATH -->`) is
written and every command of its ```bash blocks is run, in order, in a fresh copy of the project.
tests/test_tutorials.py runs the tutorials with it, tests/test_docs.py the README and docs/.

Other blocks (```text, ```console, ```json without a file comment, ```python) are not run: that
is how a page shows a command that cannot run here (a download, a GPU, two machines)."""
import os
import re
import selectors
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, run_main_in_process
from tests.fixtures import write_cifar, write_image_folder, write_mnist, write_voc

BLOCK = re.compile(r"^(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)^```", re.S | re.M)
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "experiments", "data", "__pycache__", ".pytest_cache",
                                    ".ruff_cache")
# run.sh's own verbs; every other `./run.sh ARGS` is `python main.py ARGS`.
RUN_SH_VERBS = {"test", "tensorboard", "torchrun", "-h", "--help"}
SHELL_SYNTAX = re.compile(r"[|&;<>()$`*?\[\]{}~]")


def without_comment(line: str) -> str:
    """The line up to a `#` that starts a shell comment (outside quotes, after a space)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def page_steps(text: str) -> list[tuple]:
    """[("file", path, content) | ("run", command without its comment)] in the order of the text."""
    steps = []
    for block in BLOCK.finditer(text):
        if block["file"]:
            steps.append(("file", block["file"], block["body"]))
        elif block["lang"] == "bash":
            for line in block["body"].replace("\\\n", " ").splitlines():
                command = without_comment(line).strip()
                if command:
                    steps.append(("run", command))
    return steps


def copy_project(target: Path) -> Path:
    shutil.copytree(ROOT, target, ignore=NOT_COPIED)
    return target


def add_mnist_fixture(project: Path, train: int = 128):
    # Small: the pages check that the commands work, not what they reach. Pages that train
    # configs/mnist_exp_0.json need valid_size (5,000) more, which it holds out.
    write_mnist(project / "data" / "mnist", train=train, test=64)


def add_fixture_data(project: Path):
    """Every shipped example's data, small, in its config's data_folder (or, for DCGAN's image
    folder and CelebA, where the docs point it), where a download would have put it."""
    data = project / "data"
    add_mnist_fixture(project, train=5_000 + 128)
    write_cifar(data / "cifar10")
    write_voc(data / "voc")
    write_image_folder(data / "images")


def shell_env() -> dict:
    # run.sh uses this interpreter (a copy has no .venv); `python` is this interpreter too.
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PYTHON=sys.executable, PATH=bin_dir + os.pathsep + os.environ["PATH"],
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def main_args(command: str) -> list | None:
    """The arguments main.py gets from `./run.sh ARGS` or `python main.py ARGS`; None for any other
    command, a run.sh verb of its own, or a line that needs a shell (pipes, variables, globs, ...)."""
    unquoted = re.sub(r"'[^']*'|\"[^\"$`]*\"", "", command)
    if SHELL_SYNTAX.search(unquoted):
        return None
    words = shlex.split(command)
    if words[:1] == ["./run.sh"] and words[1:2] and words[1] not in RUN_SH_VERBS:
        return words[1:]
    if words[:2] in (["python", "main.py"], ["python3", "main.py"]):
        return words[2:]
    return None


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


def clone_project(command: str, cwd: Path, workdir: Path):
    """`git clone URL DIR`: clones a git repository made from this working tree (URL is a placeholder)."""
    origin = workdir / "origin"
    copy_project(origin)
    git = ["git", "-c", "user.name=tutorial", "-c", "user.email=tutorial@example.com"]
    subprocess.run(["git", "init", "-q", str(origin)], check=True)
    subprocess.run([*git, "-C", str(origin), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(origin), "commit", "-q", "-m", "tutorial"], check=True)
    target = command.split()[3]
    subprocess.run(["git", "clone", "-q", str(origin), target], cwd=cwd, check=True)
    add_mnist_fixture(cwd / target, train=5_000 + 128)


def run_command(command: str, cwd: Path, env: dict, in_process: bool, page: str = "") -> str:
    """Runs one command, asserts it exits 0; returns its stdout and stderr."""
    args = main_args(command) if in_process else None
    if args is not None:
        done = run_main_in_process(args, cwd)
    else:
        done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (f"{page}: `{command}` exited {done.returncode}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def run_page(page: Path, workdir: Path, main_in_process: bool = False, skip=()) -> tuple[Path, dict]:
    """Run page's steps from workdir; returns the folder its last command ran in and
    {command: its stdout and stderr}. main_in_process: main.py's runs go through main.main in this
    process (torch is imported once, not once per command) until the page changes the project's
    code (`new`, or a .py file it writes), after which they need an interpreter of their own."""
    env, cwd, outputs = shell_env(), workdir, {}
    for step in page_steps(page.read_text()):
        if step[0] == "file":
            path = cwd / step[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(step[2])
            main_in_process &= not step[1].endswith(".py")
            continue
        command, started = step[1], time.perf_counter()
        if command in skip:
            continue
        if command.startswith("cd "):
            cwd = (cwd / command[3:].strip()).resolve()
            continue
        if command.startswith("git clone "):
            clone_project(command, cwd, workdir)
        elif "tensorboard" in command:
            # --port 0: a free port, so that pages run side by side do not meet on 6006
            output = serve_briefly(f"{command} --port 0", cwd, env)
            assert "http://" in output, f"`{command}` did not start serving:\n{output[-3000:]}"
        else:
            if (main_args(command) or [None])[0] == "new":
                # in this process it would write into the project main.py was imported from
                main_in_process = False
            outputs[command] = run_command(command, cwd, env, main_in_process, page.name)
        print(f"{time.perf_counter() - started:6.1f}s  {command}")   # in a failing test's report
    return cwd, outputs
