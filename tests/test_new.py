"""`main.py new NAME` (commands/new.py): what it writes and refuses to write. The generated files
are run for real by tests/test_tutorials.py, which trains, resumes and tests one through main.py
and runs its generated test (a training step of every network choice)."""
import json
import shutil

import pytest

from commands.new import names_for, new_project
from tests.conftest import ROOT, run_main, snapshot
from tests.test_list import imports_torch
from utils.errors import UserError


def project_copy(tmp_path):
    """The folders `new` writes into, and the registry, copied from this project."""
    project = tmp_path / "project"
    for folder in ("agents", "commands", "graphs", "datasets", "configs", "tests", "utils"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "main.py", project / "main.py")
    return project


@pytest.mark.parametrize("name, module, title", [
    ("Iris", "iris", "Iris"), ("iris", "iris", "Iris"), ("MyTask", "my_task", "MyTask"),
    ("my_task", "my_task", "MyTask"), ("FlowersAgent", "flowers", "Flowers"), ("ERFNet2", "erf_net2", "ERFNet2"),
])
def test_names(name, module, title):
    assert names_for(name) == (module, title)


@pytest.mark.parametrize("name", ["3d", "my-task", "class", "_private", "my task", "émigré", ""])
def test_names_that_are_not_identifiers_are_refused(name):
    with pytest.raises(UserError, match="Python identifier"):
        names_for(name)


def test_new_writes_and_registers(tmp_path):
    project = project_copy(tmp_path)
    done = run_main(["new", "Flowers"], cwd=tmp_path, script=project / "main.py")
    assert done.returncode == 0, done.stderr
    written = ["agents/flowers.py", "graphs/models/flowers.py", "datasets/flowers.py",
               "configs/flowers_exp_0.json", "tests/test_flowers.py"]
    for path in written:
        assert (project / path).is_file(), path
        assert f"wrote {path}" in done.stdout
    registry = (project / "agents" / "__init__.py").read_text()
    assert '    "FlowersAgent": "agents.flowers:FlowersAgent",\n' in registry
    entries = [line.strip() for line in registry.split("AGENTS = {\n")[1].split("}")[0].splitlines()]
    assert entries == sorted(entries, key=str.lower)
    config = json.loads((project / "configs" / "flowers_exp_0.json").read_text())
    assert config["agent"] == "FlowersAgent" and config["exp_name"] == "flowers_exp_0"
    # That the generated files run (the generated test, whole: a run through main.py, and each
    # network choice building and taking a step) is checked by test_tutorials.py::test_getting_started,
    # which runs `./run.sh new Flowers` and `./run.sh test tests/test_flowers.py` as the tutorial says.


def test_new_refuses_to_overwrite_anything(tmp_path):
    project = project_copy(tmp_path)
    (project / "datasets" / "flowers.py").write_text("# the user's own file\n")
    before = snapshot(project)
    done = run_main(["new", "Flowers"], cwd=tmp_path, script=project / "main.py")
    assert done.returncode == 2
    assert done.stderr.strip() == ('error: "Flowers" would overwrite datasets/flowers.py; pick another name '
                                   "(nothing was written)")
    assert snapshot(project) == before

    bad = run_main(["new", "my-task"], cwd=tmp_path, script=project / "main.py")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "identifier" in bad.stderr
    assert snapshot(project) == before


def test_new_refuses_a_registered_name(tmp_path):
    project = project_copy(tmp_path)
    registry = project / "agents" / "__init__.py"
    ghost = 'AGENTS = {\n    "GhostAgent": "elsewhere:GhostAgent",\n'
    registry.write_text(registry.read_text().replace("AGENTS = {\n", ghost))
    before = snapshot(project)
    with pytest.raises(UserError, match="GhostAgent is already registered"):
        new_project("Ghost", project)
    assert snapshot(project) == before


def test_new_starts_without_torch():
    assert imports_torch(["new", "--help"]) is False
