"""The tutorials work as written: every file they show (a block after `<!-- file: PATH -->`) is
written and every command of their bash blocks is run, in order, in a fresh copy of the project.

`git clone URL DIR` clones a git repository made from this working tree (the tutorial's URL is
a placeholder); MNIST is a small fixture in torchvision's layout at data/mnist, where the
tutorials' download would put it; a TensorBoard server must come up (on a free port: `--port 0`
is added, so that runs side by side do not meet on 6006), then it is stopped."""
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.doc_runner import add_mnist_fixture, copy_project, page_steps, run_page

TUTORIALS = ROOT / "tutorials"


def run_tutorial(name: str, workdir: Path) -> tuple[Path, dict]:
    # main.py's runs in this process until the tutorial changes the code (`new`, a .py file);
    # run.sh itself still runs: its verbs (list, test, torchrun) and every run after `new`.
    return run_page(TUTORIALS / name, workdir, main_in_process=True)


def test_tutorial_steps_are_found():
    steps = page_steps((TUTORIALS / "mnist_tutorial.md").read_text())
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
    project = copy_project(tmp_path / "project")
    add_mnist_fixture(project)
    run_tutorial("mnist_tutorial.md", project)
    results = (project / "experiments" / "mnist_port_exp_0" / "results.json").read_text()
    assert '"epochs_done": 3' in results and '"test/accuracy"' in results
