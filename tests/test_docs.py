"""The README and every page of docs/ work as written: each page's files are written and the
commands of its ```bash blocks run, in order, in a fresh copy of the project that has every
example's data set, small, where its config (or the page) looks for it (tests/doc_runner.py).
A new page in docs/ is picked up by itself. main.py's runs go through main.main in this process,
so that torch is imported once per page, not once per command (run.sh itself is run by the
tutorials' test). Besides, every relative link of every page resolves, the README links every
page, and the pages name every key the agents declare."""
import re

import pytest

from tests.conftest import ROOT
from tests.doc_runner import add_fixture_data, copy_project, page_steps, run_page

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `./run.sh test` is the whole suite, this test included: it would run itself again.
NOT_RUN = {"README.md": {"./run.sh test"}}
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
# The page that documents each shipped agent's own keys.
AGENT_PAGES = {"MnistAgent": "mnist.md", "CondenseNetAgent": "condensenet.md", "DCGANAgent": "dcgan.md",
               "ERFNetAgent": "erfnet.md", "DQNAgent": "dqn.md", "IrisAgent": "iris.md"}


def page_id(page) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_runs_as_written(page, tmp_path):
    if not page_steps(page.read_text()):
        pytest.skip("no bash block: its commands need GPUs, a second machine, or minutes")
    project = copy_project(tmp_path / "project")
    add_fixture_data(project)
    run_page(page, project, main_in_process=True, skip=NOT_RUN.get(page.name, ()))


def test_the_readme_test_command_is_the_one_skipped():
    commands = [step[1] for step in page_steps((ROOT / "README.md").read_text()) if step[0] == "run"]
    assert "./run.sh test" in commands
    assert "./run.sh test" in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_resolve(page):
    for link in LINK.finditer(page.read_text()):
        target = link["target"].split("#")[0]
        if target and "://" not in target and not target.startswith("mailto:"):
            assert (page.parent / target).exists(), f"{page_id(page)} links to {link['target']}, which does not exist"


def test_the_readme_links_every_page():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, f"README.md has no link to docs/{page.name}"


def test_every_key_is_documented():
    from agents import get_agent_class
    from agents.base import BaseAgent

    # A key of every agent is named in config.md or on the page of the part that reads it
    # (trackers.md, predict-export.md, ...); the keys that may change on --resume, in one list.
    docs = "\n".join(page.read_text() for page in PAGES[1:])
    missing = [key for key in BaseAgent.DEFAULTS if f"`{key}`" not in docs]
    resume_section = (ROOT / "docs" / "config.md").read_text().split("## What may change on --resume")[1]
    missing += [f"{key} (config.md, resumable)" for key in BaseAgent.resumable_keys if f"`{key}`" not in resume_section]
    for agent, page in AGENT_PAGES.items():
        text = (ROOT / "docs" / page).read_text()
        keys = get_agent_class(agent).config_spec().keys() - BaseAgent.DEFAULTS.keys()
        missing += [f"{key} ({page})" for key in sorted(keys) if f"`{key}`" not in text]
    assert not missing, f"keys the docs do not name: {', '.join(missing)}"
