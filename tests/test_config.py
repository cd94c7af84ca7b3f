"""The typed experiment config: loading, overrides and field-named validation errors."""

from __future__ import annotations

import pytest

from finegrain.platform.config import (
    CONFIG_DIR,
    ConfigError,
    load_config,
    parse_overrides,
)


def test_overrides_parse_as_yaml_into_nested_sections():
    tree = parse_overrides(["model.neurons=12", "optim.lr=0.01", "model.gamma=[0.1, 0.2]"])
    assert tree == {"model": {"neurons": 12, "gamma": [0.1, 0.2]}, "optim": {"lr": 0.01}}
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["neurons"])


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_named_config_validates(name):
    extra = [] if "synthetic" in name else ["data.dataset=ucf101", "data.root=/datasets/ucf101"]
    cfg = load_config(name, extra)
    assert cfg.model.method in {"onepass", "dsts", "u2s", "dfb", "classreg", "joint_attn"}


def test_method_options_are_flat_in_the_model_section_and_typed():
    cfg = load_config("synthetic", ["model.method=dsts", "model.neurons=12", "model.udl=false"])
    assert cfg.model.options()["neurons"] == 12 and cfg.model.options()["udl"] is False
    assert cfg.flat()["model.neurons"] == 12


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "optim.lr: Input should be greater than 0"),
        ("optim.foo=1", "optim.foo: unknown field; valid fields: optimizer, lr"),
        ("foo.bar=1", "foo: unknown field; valid fields: data, model"),
        ("optim.schedule=linear", "optim.schedule: Input should be 'cosine', 'step' or 'constant'"),
        ("scaling.workers=0", "scaling.workers: Input should be greater than or equal to 1"),
        ("model.neurons=3", "model.neurons: not an option of method 'onepass'; valid: dropout"),
        ("model.dropout=abc", "model.dropout: Input should be a valid number"),
        ("data.crop=100", "data.crop (100) must be <= data.short_side"),
        ("model.backbone=r3d_18", "model.width applies to the tiny backbone"),
        ("data.synthetic.classes=40", "data.synthetic.classes: Input should be less than or equal"),
        ("data.read_cpus=0", "data.read_cpus: Input should be greater than or equal to 0.05"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", [override])
    assert message in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", ["optim.lr=x", "scaling.workers=0"])
    lines = str(err.value).splitlines()
    assert any(line.startswith("optim.lr") for line in lines)
    assert any(line.startswith("scaling.workers") for line in lines)


def test_unknown_named_config_lists_the_known_ones():
    with pytest.raises(ConfigError, match="named configs: .*synthetic"):
        load_config("nope")


def test_real_dataset_needs_a_root_or_shards():
    with pytest.raises(ConfigError, match="data.root or data.shards"):
        load_config("synthetic", ["data.dataset=ucf101"])
