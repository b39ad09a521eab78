import subprocess
import sys

import pytest

from agents import AGENTS, get_agent_class
from tests.conftest import ROOT
from utils.errors import ConfigError


def test_registered_agent_resolves():
    assert get_agent_class("MnistAgent").__name__ == "MnistAgent"


def test_unknown_agent_lists_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        get_agent_class("MnistAgnet")
    message = str(error.value)
    assert "did you mean \"MnistAgent\"" in message
    for name in AGENTS:
        assert name in message


def test_user_agent_by_module_and_class():
    assert get_agent_class("tests.tiny_agent:TinyAgent").__name__ == "TinyAgent"
    with pytest.raises(ConfigError, match="no module 'tests.nope'"):
        get_agent_class("tests.nope:X")
    with pytest.raises(ConfigError, match="has no class 'Nope'"):
        get_agent_class("tests.tiny_agent:Nope")
    with pytest.raises(ConfigError, match="not a subclass of agents.base.BaseAgent"):
        get_agent_class("tests.tiny_agent:SimpleNamespace")


def test_missing_dependency_is_named(tmp_path, monkeypatch):
    (tmp_path / "needs_dep.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="needs the package 'a_package_that_is_not_installed'"):
        get_agent_class("needs_dep:Agent")


def test_resolving_one_agent_imports_no_other_agent():
    code = ("import sys; from agents import get_agent_class; get_agent_class('MnistAgent'); "
            "print(sorted(m for m in sys.modules if m.startswith('agents.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    # agents.run_state and agents.trained are no agents: BaseAgent's checkpoint contents, and what
    # the image classifiers share for predict and export
    assert out.stdout.strip() == "['agents.base', 'agents.mnist', 'agents.run_state', 'agents.trained']"


def test_an_agent_of_rows_starts_without_torchvision():
    """Iris reads CSV rows: torchvision (1.6 s to import) is for agents of images."""
    code = ("import sys; from agents import get_agent_class; get_agent_class('IrisAgent'); "
            "print('torchvision' in sys.modules, 'gymnasium' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("config_file", sorted((ROOT / "configs").glob("*.json")), ids=lambda path: path.name)
def test_every_shipped_config_resolves_against_its_agent(config_file):
    """Every key of every shipped config is one its agent declares, with a valid value (the
    end-to-end tests run each config on fixture data with a few keys overridden)."""
    from agents import make_config

    agent_class, config = make_config(str(config_file))
    assert agent_class.__name__ == config.agent and config.exp_name == config_file.stem
