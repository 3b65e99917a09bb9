"""Stage configs: dataclasses read from YAML and the command line with ``transformers.HfArgumentParser``.

A stage defines a dataclass config (every field with a default and a ``help`` in its metadata;
lists typed ``list[int]`` / ``list[str]`` so the parser knows their items) and a ``run(config,
resume) -> metrics`` function. :func:`parse_config` builds the config from ``--config file.yaml``
plus ``--field value`` overrides (lists as ``--field a b c``, mappings as YAML ``--field "{a: 1}"``,
booleans as ``--field true`` / ``--no-field``), so one stage runs as ``accelerate launch
training/<stage>.py --config ...`` or in-process through :func:`load_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import typing
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def config_field(default, help: str, **kwargs):
    """A dataclass field with a default and a one-line description (shown by ``--help``)."""
    if isinstance(default, (list, dict, tuple)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _coerce(value, annotation, name: str):
    """Convert a YAML/CLI value to the field's declared type; errors name the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "types.UnionType":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"config field {name!r}: {value!r} is not a boolean (expected true/false)")
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ValueError(f"config field {name!r}: {value!r} is not a valid {annotation.__name__}") from None
    if annotation in (list, tuple, dict):  # a bare annotation: same handling as list[...] etc.
        origin = annotation
    if origin in (list, tuple, dict):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple, dict)):
            raise ValueError(f"config field {name!r}: {value!r} is not a {origin.__name__}")
        if origin is not dict and args and args[0] in (int, float, str):
            return origin(_coerce(item, args[0], f"{name}[{i}]") for i, item in enumerate(value))
        return origin(value)
    return value


def _coerced_values(cls, values: dict) -> dict:
    """``values`` converted to ``cls``'s field types; unknown keys raise naming them and the valid ones."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return {k: _coerce(v, hints[k], k) for k, v in values.items()}


def config_from_dict(cls, values: dict):
    """Instantiate ``cls`` from a dict; unknown keys raise naming them and the valid ones."""
    return cls(**_coerced_values(cls, values))


def _read_yaml(path: str | os.PathLike) -> dict:
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value, got {type(loaded).__name__}")
    return loaded


def load_config(cls, path: str | os.PathLike | None = None, overrides: dict | None = None):
    """``cls`` from a YAML file (optional) updated with ``overrides`` (``None`` values are ignored)."""
    values = _read_yaml(path) if path is not None else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(cls, values)


def _yaml_mapping(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a mapping (write it as YAML, e.g. '{{item: 1.0}}')")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and every option's default."""


def config_parser(cls, description: str) -> HfArgumentParser:
    """``HfArgumentParser`` for ``cls`` plus ``--config FILE`` and ``--resume``."""
    parser = HfArgumentParser(cls, description=description, formatter_class=_HelpFormatter)
    for action in parser._actions:
        if action.type is dict or typing.get_origin(action.type) is dict:  # HfArgumentParser would call dict("{...}")
            action.type = _yaml_mapping
    parser.add_argument("--config", default=None, help="YAML file of field: value (command-line options override it)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in output_dir (same configuration)")
    return parser


def parse_config(cls, description: str, argv: list[str] | None = None):
    """Parse ``--config FILE`` plus one ``--field`` option per config field; returns ``(config, resume)``."""
    parser = config_parser(cls, description)
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**_coerced_values(cls, _read_yaml(known.config)))
    config, extra = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return config, extra.resume


def save_config(config, path: str | os.PathLike) -> None:
    write_json_atomic(path, dataclasses.asdict(config))


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, default=json_default)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_default(value):
    """``json.dumps(default=...)`` for numpy / torch scalars and arrays."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
