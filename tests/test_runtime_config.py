"""larp_mllm.runtime.config: dataclasses <- flat YAML <- command-line flags, unknown keys refused with hints."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from larp_mllm.runtime.config import parse_config_and_flags, valid_keys


@dataclass
class Model:
    width: int = field(default=8, metadata={"help": "model width"})
    name: Optional[str] = field(default=None, metadata={"help": "a name"})


@dataclass
class Train:
    learning_rate: float = field(default=1e-3, metadata={"help": "peak lr"})
    flip: bool = field(default=True, metadata={"help": "random flips"})
    layers: list[str] = field(default_factory=lambda: ["q"], metadata={"help": "target layers"})


TYPES = (Model, Train)


def test_precedence_defaults_yaml_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("width: 16\nlearning_rate: 2.0e-4\nlayers: [q, v]\nflip: false\n")
    model, train = parse_config_and_flags(TYPES, ["--config", str(config), "--width", "32"],
                                          defaults={"name": "script", "width": 4})
    assert (model.width, model.name) == (32, "script")  # flag > YAML > script default > dataclass default
    assert (train.learning_rate, train.flip, train.layers) == (2e-4, False, ["q", "v"])
    model, train = parse_config_and_flags(TYPES, [])
    assert (model.width, train.learning_rate, train.flip) == (8, 1e-3, True)
    assert parse_config_and_flags(TYPES, ["--learning-rate", "0.5"])[1].learning_rate == 0.5  # dashed alias
    assert valid_keys(TYPES) == ["flip", "layers", "learning_rate", "name", "width"]


def test_unknown_keys_are_refused_with_hints(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("widht: 3\nlearnig_rate: 1\nzzz: 0\n")
    with pytest.raises(ValueError, match=r"in .*bad.yaml: 'learnig_rate' \(did you mean 'learning_rate'\?\), "
                                         r"'widht' \(did you mean 'width'\?\), 'zzz'\. Valid keys: flip, layers, "
                                         r"learning_rate"):
        parse_config_and_flags(TYPES, ["--config", str(bad)])
    with pytest.raises(ValueError, match=r"on the command line: 'widht' \(did you mean 'width'\?\)"):
        parse_config_and_flags(TYPES, ["--widht", "3"])
    with pytest.raises(ValueError, match=r"on the command line: 'learn'"):  # no abbreviations
        parse_config_and_flags(TYPES, ["--learn", "3"])
    with pytest.raises(ValueError, match=r"on the command line: 'stray'"):
        parse_config_and_flags(TYPES, ["stray"])
    with pytest.raises(ValueError, match=r"script's defaults: 'depth'"):
        parse_config_and_flags(TYPES, [], defaults={"depth": 2})
    (tmp_path / "list.yaml").write_text("- width\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_config_and_flags(TYPES, ["--config", str(tmp_path / "list.yaml")])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_config_and_flags(TYPES, ["--config", str(tmp_path / "missing.yaml")])


def test_bad_values_become_one_value_error_and_help_exits(capsys):
    with pytest.raises(ValueError, match="could not parse the arguments"):
        parse_config_and_flags(TYPES, ["--width", "wide"])
    with pytest.raises(SystemExit) as exit_info:
        parse_config_and_flags(TYPES, ["--help"], description="Train.\n\n    trainer --config run.yaml")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "    trainer --config run.yaml" in out and "--config YAML" in out and "(default: 8)" in out


def test_builders_make_their_class_from_the_values():
    seen = {}

    def build(values: dict) -> Train:
        seen.update(values)
        return Train(**{**values, "flip": False})

    model, train = parse_config_and_flags(TYPES, ["--learning_rate", "0.1"], builders={Train: build})
    assert seen == {"learning_rate": 0.1, "flip": True, "layers": ["q"]} and train.flip is False
    assert isinstance(model, Model)
