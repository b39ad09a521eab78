import json
from types import NoneType

import pytest

from agents import make_config
from agents.base import BaseAgent
from utils.config import Key, apply_overrides, inherit, load_source, parse_override, validate
from utils.errors import ConfigError

MNIST = {"exp_name": "t", "agent": "MnistAgent"}


def test_inline_json_and_defaults():
    cls, config = make_config(json.dumps(MNIST))
    assert cls.__name__ == "MnistAgent"
    assert config.max_epoch == 3 and config.learning_rate == 0.2    # MnistAgent's defaults
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


RANGED = {"batch_size": Key(64, minimum=1), "dropout": Key(0.0, minimum=0, maximum=1),
          "grad_clip": Key(10.0, types=(float, NoneType), maximum=100), "free": 0.5}


def test_ranges_are_inclusive_and_null_passes_where_allowed():
    resolved = validate({"batch_size": 1, "dropout": 1, "grad_clip": None, "free": -1e9}, RANGED, "X")
    assert resolved == {"batch_size": 1, "dropout": 1, "grad_clip": None, "free": -1e9}
    assert validate({"dropout": 0, "grad_clip": 100}, RANGED, "X")["grad_clip"] == 100


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 0, "config key 'batch_size' must be at least 1, got 0"),
    ("batch_size", -3, "config key 'batch_size' must be at least 1, got -3"),
    ("dropout", 1.5, "config key 'dropout' must be between 0 and 1, got 1.5"),
    ("dropout", -0.1, "config key 'dropout' must be between 0 and 1, got -0.1"),
    ("grad_clip", 100.5, "config key 'grad_clip' must be at most 100, got 100.5"),
])
def test_a_number_out_of_range_is_one_clear_line(key, value, message):
    with pytest.raises(ConfigError) as error:
        validate({key: value}, RANGED, "X")
    assert str(error.value) == message


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_where_a_range_is_declared(text):
    value = json.loads(text)     # Python's JSON parser accepts these
    for key in ("dropout", "grad_clip"):
        with pytest.raises(ConfigError, match=f"^config key '{key}' must be a finite number, got {text}$"):
            validate({key: value}, RANGED, "X")
    assert validate({"free": value}, RANGED, "X")["free"] is value     # no range declared: not checked
    with pytest.raises(ConfigError, match=f"'learning_rate' must be a finite number, got {text}"):
        make_config(MNIST, [f"learning_rate={text}"])


def test_a_plain_default_in_a_subclass_keeps_the_parents_range():
    assert inherit(Key(10, minimum=1), 14) == Key(14, minimum=1)
    assert inherit(Key(10, minimum=1), Key(3)) == Key(3)          # a Key replaces the declaration
    assert inherit(None, 5) == 5 and inherit(7, 5) == 5
    # MnistAgent declares "max_epoch": 3 and "batch_size" comes from SupervisedAgent.
    for override, message in (("max_epoch=0", "config key 'max_epoch' must be at least 1, got 0"),
                              ("batch_size=0", "config key 'batch_size' must be at least 1, got 0"),
                              ("keep_last_checkpoints=-1", "'keep_last_checkpoints' must be at least 0, got -1"),
                              ("early_stopping_patience=0", "'early_stopping_patience' must be at least 1, got 0"),
                              ("seed=-1", "'seed' must be between 0 and 4294967295, got -1"),
                              ("seed=4294967296", "'seed' must be between 0 and 4294967295, got 4294967296"),
                              ("momentum=1.5", "'momentum' must be between 0 and 1, got 1.5")):
        with pytest.raises(ConfigError, match=message):
            make_config(MNIST, [override])
    _, config = make_config(MNIST, ["seed=4294967295", "early_stopping_patience=null", "learning_rate=0"])
    assert (config.seed, config.early_stopping_patience, config.learning_rate) == (4294967295, None, 0)
