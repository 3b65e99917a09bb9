"""What every training stage shares: config files, seeding, accelerate state, atomic checkpoints.

A stage defines a dataclass config (every field with a default and a ``help`` in its
metadata) and a ``run(config) -> metrics`` function. :func:`parse_config` builds the config
from ``--config file.yaml`` plus ``--field value`` overrides, so the same stage runs as
``accelerate launch training/<stage>.py --config ...`` or in-process from the quickstart.

Checkpoints: ``<output_dir>/checkpoints/step_<N>/`` written by ``Accelerator.save_state``
into a temporary sibling and renamed into place, so a kill during a write never leaves a
checkpoint that loads wrong; :func:`latest_checkpoint` only sees complete ones. A
:class:`TrainingProgress` (step, epoch, best metric, history) travels inside the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path

import yaml

CHECKPOINT_PREFIX = "step_"


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
        return origin(value)
    return value


def config_from_dict(cls, values: dict):
    """Instantiate ``cls`` from a dict; unknown keys raise naming them and the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], k) for k, v in values.items()})


def load_config(cls, path: str | os.PathLike | None = None, overrides: dict | None = None):
    """``cls`` from a YAML file (optional) updated with ``overrides``."""
    values = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(cls, values)


def parse_config(cls, description: str, argv: list[str] | None = None):
    """Parse ``--config FILE`` plus one ``--field`` option per config field; returns ``(config, resume)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML file of field: value (CLI options override it)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                            help=f"{f.metadata.get('help', '')} (default: {default!r})")
    args = vars(parser.parse_args(argv))
    config_path, resume = args.pop("config"), args.pop("resume")
    return load_config(cls, config_path, args), resume


def save_config(config, path: str | os.PathLike) -> None:
    write_json_atomic(path, dataclasses.asdict(config))


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, default=_json_default)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class TrainingProgress:
    """Step/epoch counters, best validation metric and a metric history; checkpointable.

    Register it with ``accelerator.register_for_checkpointing`` so ``save_state`` /
    ``load_state`` carry it.
    """

    def __init__(self):
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"json": json.dumps(self.__dict__, default=_json_default)}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(json.loads(state["json"]))

    def record(self, metrics: dict, key: str | None = None, higher_is_better: bool = True) -> bool:
        """Append ``metrics`` to the history; returns True when ``metrics[key]`` is a new best."""
        self.history.append({"step": self.step, "epoch": self.epoch, **metrics})
        if key is None or metrics.get(key) is None:
            return False
        value = float(metrics[key])
        better = self.best_metric is None or (value > self.best_metric if higher_is_better else value < self.best_metric)
        if better:
            self.best_metric, self.best_step, self.evals_without_improvement = value, self.step, 0
        else:
            self.evals_without_improvement += 1
        return better


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (``step_<N>`` folders only; temporaries are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.exists():
        return None
    steps = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return max(steps)[1] if steps else None


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, keep: int = 2) -> Path | None:
    """``accelerator.save_state`` into a temporary folder, renamed to ``step_<step>`` when complete.

    All processes must call it (accelerate gathers); only the main process renames and prunes
    older checkpoints, keeping the newest ``keep``.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp_{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        complete = sorted((int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in root.iterdir()
                          if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))
        for _, old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_if_requested(accelerator, output_dir: str | os.PathLike, resume: bool) -> Path | None:
    """Load the newest complete checkpoint when ``resume``; error if asked but none exists."""
    if not resume:
        return None
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {checkpoint_dir(output_dir)}")
    accelerator.load_state(str(checkpoint))
    return checkpoint
