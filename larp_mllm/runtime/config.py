"""One way to configure a trainer: argument dataclasses, a flat YAML (`--config FILE`), then command-line flags.

    model, train = parse_config_and_flags((ModelArguments, TrainArguments), argv, description=__doc__)
    trainer --config configs/run.yaml --lr 3e-4          # flags override the YAML, the YAML overrides the defaults

The YAML is flat: every key is the name of one field of one of the dataclasses (the YAML maps 1:1 onto them).
Unknown keys, in the YAML or on the command line, are refused with "did you mean" hints and the list of valid keys;
argparse's own errors (a value of the wrong type, a choice not offered) become one ValueError. Both trainers
(`tokenizer_training.arguments`, `llm_adapters.train`) parse through `parse_config_and_flags`. `transformers`
(for `HfArgumentParser`) is imported when a parser is built, not when this module is.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["parse_config_and_flags", "valid_keys", "load_yaml", "unknown_keys_error"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's line breaks (a script's docstring) and shows every default."""


def valid_keys(dataclass_types: Sequence[type]) -> list[str]:
    """Every key a YAML config or a flag may set: the init fields of `dataclass_types`, sorted."""
    return sorted({f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init})


def unknown_keys_error(unknown: Sequence[str], valid: Sequence[str], where: str) -> ValueError:
    """A ValueError naming the unknown keys (each with its closest valid key, if any) and listing the valid ones."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3)
        hints.append(repr(key) + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    return ValueError(f"unknown config key(s) {where}: {', '.join(hints)}. Valid keys: {', '.join(valid)}")


def load_yaml(path: str | Path, valid: Sequence[str]) -> dict[str, Any]:
    """Read a flat YAML mapping of field names to values; every key must be one of `valid`.

    Raises FileNotFoundError for a missing file and ValueError for a non-mapping or an unknown key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path} (expected a flat YAML of argument names -> values)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(data).__name__}")
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise unknown_keys_error(unknown, valid, f"in {path}")
    return data


def parse_config_and_flags(
    dataclass_types: Sequence[type],
    argv: Optional[Sequence[str]] = None,
    *,
    defaults: Optional[Mapping[str, Any]] = None,
    builders: Optional[Mapping[type, Callable[[dict[str, Any]], Any]]] = None,
    description: Optional[str] = None,
) -> tuple[Any, ...]:
    """``--config YAML`` (optional) then ``--field value`` flags -> one instance per class of `dataclass_types`.

    Precedence, lowest first: the dataclasses' defaults, `defaults` (a script's own defaults), the YAML, the flags.
    `builders` maps a class to a function that builds it from its keyword values (a script's checks or set-up that
    must run before the instance exists); other classes are called with their values. `argv` defaults to
    ``sys.argv[1:]``; ``--help`` prints the fields with their help and defaults and exits.
    Raises ValueError for unknown keys (YAML or flags) and for values argparse cannot parse.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(list(dataclass_types), allow_abbrev=False, description=description,
                              formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="flat YAML of the fields below (one key per field; flags override it)")
    valid = valid_keys(dataclass_types)
    foreign = sorted(set(defaults or {}) - set(valid))
    if foreign:
        raise unknown_keys_error(foreign, valid, "in the script's defaults")
    parser.set_defaults(**dict(defaults or {}))
    if known.config:
        parser.set_defaults(**load_yaml(known.config, valid))
    try:
        namespace, remaining = parser.parse_known_args(rest)
    except SystemExit as exc:  # argparse reports a bad value on stderr and exits; one ValueError instead
        if exc.code in (0, None):
            raise
        raise ValueError(f"could not parse the arguments {rest}; see the message above") from None
    if remaining:
        flags = [a.split("=")[0].lstrip("-") for a in remaining if a.startswith("-")]
        raise unknown_keys_error(flags or remaining, valid, "on the command line")
    values = vars(namespace)
    out = []
    for cls in dataclass_types:
        kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.init}
        build = (builders or {}).get(cls)
        out.append(build(kwargs) if build is not None else cls(**kwargs))
    return tuple(out)
