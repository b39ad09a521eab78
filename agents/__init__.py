"""Agent registry: a name in the config -> the agent class, importing only that agent's module.

Shipped agents are listed in AGENTS. A user's own agent needs no registration:
"agent": "my_package.my_module:MyAgent" imports it from the project root (or anywhere on sys.path).
"""
import difflib
import importlib
import inspect

from utils.errors import ConfigError

AGENTS = {
    "CondenseNetAgent": "agents.condensenet:CondenseNetAgent",
    "DCGANAgent": "agents.dcgan:DCGANAgent",
    "DQNAgent": "agents.dqn:DQNAgent",
    "ERFNetAgent": "agents.erfnet:ERFNetAgent",
    "IrisAgent": "agents.iris:IrisAgent",
    "MnistAgent": "agents.mnist:MnistAgent",
}


def _import(target: str, name: str):
    module_name, _, class_name = target.partition(":")
    # Dotted identifiers only: ".evil" would be a relative import, "a/b" or "" no module at all.
    if not all(part.isidentifier() for part in module_name.split(".")) or not class_name.isidentifier():
        raise ConfigError(f"agent \"{name}\": write a custom agent as \"package.module:ClassName\" "
                          "(an absolute module name, dotted, as you would import it)")
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as e:    # the user's own module (importing it runs it)
        raise ConfigError(f"agent \"{name}\": module '{module_name}' does not compile: {e.msg} "
                          f"({e.filename}, line {e.lineno})") from None
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"agent \"{name}\": there is no module '{module_name}' "
                              "(is the path right and run from the project root?)") from None
        raise ConfigError(f"agent \"{name}\" needs the package '{e.name}', which is not installed; "
                          f"install it (pip install {e.name}) or run ./run.sh, which installs "
                          "requirements.txt") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(f"agent \"{name}\": module '{module_name}' has no class '{class_name}'") from None


def get_agent_class(name: str):
    from agents.base import BaseAgent

    if ":" in name:
        cls = _import(name, name)
    elif name in AGENTS:
        cls = _import(AGENTS[name], name)
    else:
        close = difflib.get_close_matches(name, AGENTS, n=1)
        hint = f"did you mean \"{close[0]}\"? " if close else ""
        raise ConfigError(f"unknown agent \"{name}\"; {hint}valid agents: {', '.join(sorted(AGENTS))} "
                          "(or your own as \"package.module:ClassName\")")
    if not (isinstance(cls, type) and issubclass(cls, BaseAgent)):
        raise ConfigError(f"agent \"{name}\" is not a subclass of agents.base.BaseAgent")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ConfigError(f"agent \"{name}\" is abstract: {cls.__name__} does not define {missing}; "
                          "name a subclass that does, or write those methods")
    return cls


def make_config(source, overrides=()):
    """(agent class, resolved config) from a JSON path, an inline JSON string or a dict, with
    --set style overrides ("key.sub=VALUE"). Raises ConfigError on anything wrong."""
    from utils.config import apply_overrides, check_required, load_source, resolve

    raw = load_source(source) if isinstance(source, str) else dict(source)
    raw = apply_overrides(raw, overrides)
    check_required(raw)
    agent_class = get_agent_class(raw["agent"])
    config = resolve(raw, agent_class.config_spec(), agent_class.__name__)
    agent_class.check_config(config)
    return agent_class, config
