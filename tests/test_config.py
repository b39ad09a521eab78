import json

import pytest

from agents import make_config
from agents.base import BaseAgent
from utils.config import Key, apply_overrides, load_source, parse_override, validate
from utils.errors import ConfigError

MNIST = {"exp_name": "t", "agent": "MnistAgent"}


def test_inline_json_and_defaults():
    cls, config = make_config(json.dumps(MNIST))
    assert cls.__name__ == "MnistAgent"
    assert config.max_epoch == 14 and config.learning_rate == 1.0   # MnistAgent's defaults
    assert config.seed == 1 and config.device == "auto"             # BaseAgent's defaults
    assert config.monitor == "val/accuracy" and config.monitor_mode == "max"


def test_file_with_extends_relative_to_itself(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "parent.json").write_text(json.dumps(
        {**MNIST, "learning_rate": 0.5, "max_epoch": 3}))
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"extends": "base/parent.json", "max_epoch": 7, "exp_name": "child"}))
    _, config = make_config(str(child))
    assert (config.exp_name, config.learning_rate, config.max_epoch) == ("child", 0.5, 7)
    assert "extends" not in config


def test_extends_loop_and_missing_parent(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"extends": "b.json"}))
    b.write_text(json.dumps({"extends": "a.json"}))
    with pytest.raises(ConfigError, match="loop"):
        load_source(str(a))
    a.write_text(json.dumps({"extends": "nope.json"}))
    with pytest.raises(ConfigError, match="nope.json.*does not exist"):
        load_source(str(a))


def test_extends_merges_nested_objects(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"opt": {"lr": 1, "name": "sgd"}}))
    (tmp_path / "c.json").write_text(json.dumps({"extends": "p.json", "opt": {"lr": 2}}))
    assert load_source(str(tmp_path / "c.json")) == {"opt": {"lr": 2, "name": "sgd"}}


def test_overrides_take_dotted_keys_and_json_values():
    data = apply_overrides({"a": 1, "opt": {"lr": 0.1, "name": "sgd"}},
                           ["a=3", "opt.lr=0.5", "opt.name=adam", "flag=true", "new.deep=[1, 2]"])
    assert data == {"a": 3, "opt": {"lr": 0.5, "name": "adam"}, "flag": True, "new": {"deep": [1, 2]}}
    assert parse_override("monitor=val/accuracy") == (["monitor"], "val/accuracy")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("max_epoch")
    with pytest.raises(ConfigError, match="'a' is an integer, not an object"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_overrides_apply_before_validation():
    _, config = make_config(MNIST, ["max_epoch=3", "learning_rate=0.1", "mode=test"])
    assert (config.max_epoch, config.learning_rate, config.mode) == (3, 0.1, "test")
    with pytest.raises(ConfigError, match="must be an integer, got a string"):
        make_config(MNIST, ["max_epoch=three"])


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="unknown config key 'learnig_rate'.*did you mean 'learning_rate'"):
        make_config({**MNIST, "learnig_rate": 0.1})


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="'learning_rate' must be a number, got a string \"0.1\""):
        make_config({**MNIST, "learning_rate": "0.1"})
    with pytest.raises(ConfigError, match="'max_epoch' must be an integer, got a number 2.5"):
        make_config({**MNIST, "max_epoch": 2.5})
    with pytest.raises(ConfigError, match="'seed' must be an integer, got a boolean"):
        make_config({**MNIST, "seed": True})
    _, config = make_config({**MNIST, "learning_rate": 1})   # an int is a fine float
    assert config.learning_rate == 1


def test_choices_and_patterns():
    with pytest.raises(ConfigError, match="'optimizer' is \"adamw\"; it must be one of"):
        make_config({**MNIST, "optimizer": "adamw"})
    with pytest.raises(ConfigError, match="'mode' is \"train2\"; it must be one of \"train\", \"test\""):
        make_config({**MNIST, "mode": "train2"})
    with pytest.raises(ConfigError, match="'device' is \"gpu\""):
        make_config({**MNIST, "device": "gpu"})
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert make_config({**MNIST, "device": device})[1].device == device


def test_monitor_must_be_a_reported_metric():
    with pytest.raises(ConfigError, match="monitor \"val/acc\" is not a metric of MnistAgent; use one of"):
        make_config({**MNIST, "monitor": "val/acc"})


def test_required_keys_and_exp_name():
    with pytest.raises(ConfigError, match="no \"agent\""):
        make_config({"exp_name": "t"})
    with pytest.raises(ConfigError, match="no \"exp_name\""):
        make_config({"agent": "MnistAgent"})
    for bad in ("../x", "a/b", "..", "", ".hidden", 3):
        with pytest.raises(ConfigError, match="exp_name"):
            make_config({"exp_name": bad, "agent": "MnistAgent"})


def test_invalid_json_and_non_object(tmp_path):
    with pytest.raises(ConfigError, match="inline config is not valid JSON"):
        load_source("{oops")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_source(str(tmp_path / "list.json"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_source("no/such/config.json")


def test_nested_declared_objects_are_checked_key_by_key():
    spec = {"optimizer": {"name": "sgd", "lr": 0.1}, "free": Key({}, types=(dict,))}
    resolved = validate({"optimizer": {"lr": 0.5}, "free": {"anything": 1}}, spec, "X")
    assert resolved == {"optimizer": {"name": "sgd", "lr": 0.5}, "free": {"anything": 1}}
    assert validate({}, spec, "X")["optimizer"] == {"name": "sgd", "lr": 0.1}
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.lrr'.*did you mean 'lr'"):
        validate({"optimizer": {"lrr": 0.5}}, spec, "X")


def test_every_base_key_has_a_usable_default():
    spec = BaseAgent.config_spec()
    for key in ("exp_name", "agent", "mode", "seed", "cuda", "gpu_device", "max_epoch", "log_interval",
                "validate_every", "checkpoint_file", "device", "monitor", "monitor_mode",
                "early_stopping_patience", "amp", "keep_last_checkpoints"):
        assert key in spec, key
