"""What every training stage shares: config files, seeding, progress state, atomic checkpoints.

A stage defines a dataclass config (every field with a default and a ``help`` in its
metadata) and a ``run(config) -> metrics`` function. :func:`parse_config` builds the config
from ``--config file.yaml`` plus ``--field value`` overrides, so the same stage runs as
``accelerate launch training/<stage>.py --config ...`` or in-process from the quickstart.

Checkpoints
-----------
A stage names what must survive a crash in one mapping, e.g. ``{"model": model, "optimizer":
optimizer, "scheduler": scheduler, "progress": progress}`` (anything with ``state_dict`` /
``load_state_dict``), and calls :func:`save_checkpoint` every N steps and
:func:`resume_if_requested` once before training. ``<output_dir>/checkpoints/step_<N>/`` holds:

* ``<entry>.safetensors`` per entry (``<entry>_<rank>.safetensors`` for entries that differ
  between processes, e.g. C-SFT's negative queues): the entry's ``state_dict()`` tensors, and
  its non-tensor part (optimizer hyper-parameters, scheduler counters, progress history) as
  JSON in the safetensors metadata. Dict key types, tuples and numpy arrays round-trip exactly.
* ``rng_state_<rank>.safetensors``: the Python, numpy and torch (CPU, and CUDA when in use) RNG
  states of each process; ``grad_scaler.safetensors`` under fp16 mixed precision.
* ``folders/<name>/``: folders a stage writes between checkpoints (CTR's best model so far),
  hard-linked in, so a resumed run gets back the one that belongs to the checkpointed step.
* ``manifest.json``: format version, step, number of processes, accelerate's step counter, the
  entry names and every file's size (a truncated file is refused by name).

Guarantees:

* **No pickle on the load path.** Loading reads JSON and safetensors only: no ``pickle``, no
  ``torch.load``; a ``.pkl``/``.bin`` dropped into a checkpoint folder is never opened, and a
  folder without ``manifest.json`` (e.g. one written by ``Accelerator.save_state``) is refused.
* **Atomic.** Files go to ``.tmp_step_<N>/`` and are fsynced; ``manifest.json`` is written last
  and the folder is renamed to ``step_<N>`` (then the parent is fsynced). Old checkpoints are
  renamed away before deletion. So a ``step_<N>`` folder is always complete: a process killed
  during a write leaves only a ``.tmp_`` folder, which :func:`latest_checkpoint` ignores and the
  next save removes. (The fsyncs make a checkpoint survive a power loss too; they are most of
  the save time.)
* **Exact resume on one machine.** Model, optimizer (AdamW moments and step counts), scheduler,
  RNG states and every stage object are restored; the data position is
  ``TrainingProgress.epoch`` / ``batches_in_epoch``, and the stages' samplers are functions of
  ``(seed, epoch)`` alone, so a resumed run sees the same batches. Same seed, same machine,
  same thread count, CPU: a resumed run's metrics and weights equal an uninterrupted run's
  bit for bit (tests/test_reliability_resume.py kills each stage with SIGKILL to check it).
  Not covered: a different number of processes (refused), a different thread count or device
  (float reductions reorder), GPU kernels without ``torch.use_deterministic_algorithms``, and
  FSDP / DeepSpeed (their sharded state is refused, not gathered).
* A fresh run (no ``--resume``) refuses an ``output_dir`` that holds an earlier run's complete
  checkpoints (``FileExistsError``): an old ``step_<N>`` can never be mistaken for this run's, and
  a forgotten ``--resume`` never deletes hours of training. Half-written ``.tmp_step_*`` folders
  are not checkpoints and are removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from mim_hf.common.fs import fsync_path

CHECKPOINT_PREFIX = "step_"
CHECKPOINT_FORMAT = "mim-hf-checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_STATE_METADATA_KEY = "mim_hf_state"
_FOLDERS = "folders"
_TEMPORARY_PREFIXES = (".tmp_", ".del_")
_ENTRY_NAME = re.compile(r"(?!.*_[0-9]+$)[A-Za-z][A-Za-z0-9_-]*")
_RESERVED_NAMES = {"rng_state", "grad_scaler", "manifest", "folders"}
# These shard model/optimizer state across processes; the format stores one full copy.
_UNSUPPORTED_DISTRIBUTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


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
    """Step/epoch counters, data position, best validation metric and a metric history.

    ``epoch`` and ``batches_in_epoch`` are the data loader's position; put the object in the
    checkpoint state (:func:`save_checkpoint`) and a resumed run continues from there.
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


# ---- checkpoints --------------------------------------------------------------------------------
def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_<N>`` folder under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in root.iterdir()
                  if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit())


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (``step_<N>`` folders only; temporaries are ignored)."""
    complete = _complete_checkpoints(checkpoint_dir(output_dir))
    return complete[-1][1] if complete else None


def _encode_state(value, tensors: dict[str, torch.Tensor], path: str, storages: set[int] | None = None):
    """A state tree -> a JSON-able skeleton; its tensors go into ``tensors`` under their path.

    Dicts keep their key types and order, tuples stay tuples, numpy arrays keep their dtype:
    :func:`_decode_state` gives back an equal tree without any pickle. ``storages`` (data
    pointers already stored) is internal: tensors sharing storage (tied weights) are copied,
    since safetensors refuses shared storage.
    """
    storages = set() if storages is None else storages
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = path if path and path not in tensors else f"{path}#{len(tensors)}"
        tensor = value.detach().to("cpu")
        pointer = tensor.untyped_storage().data_ptr()
        if not tensor.is_contiguous() or pointer in storages:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(pointer)
        tensors[key] = tensor
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"checkpoint state {path!r}: numpy arrays of Python objects cannot be stored without pickle")
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode_state(v, tensors, f"{path}.{i}".lstrip("."), storages)
                              for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode_state(v, tensors, f"{path}.{i}".lstrip("."), storages) for i, v in enumerate(value)]
    if isinstance(value, typing.Mapping):
        items = []
        for key, item in value.items():
            if not (key is None or isinstance(key, (bool, int, float, str, tuple))):
                raise TypeError(f"checkpoint state {path!r}: dict key {key!r} ({type(key).__name__}) is not a "
                                "str, int, float, bool, None or tuple")
            items.append([_encode_state(key, {}, path),
                          _encode_state(item, tensors, f"{path}.{key}".lstrip("."), storages)])
        return {"__dict__": items}
    raise TypeError(f"checkpoint state {path!r}: a {type(value).__name__} cannot be stored without pickle (allowed: "
                    "tensors, numpy arrays, dict, list, tuple, str, int, float, bool, None)")


def _decode_state(node, tensors: dict[str, torch.Tensor], where: str):
    """Inverse of :func:`_encode_state`; ``where`` (the file) names the source in errors."""
    if isinstance(node, list):
        return [_decode_state(item, tensors, where) for item in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        if node["__tensor__"] not in tensors:
            raise ValueError(f"{where}: the state names tensor {node['__tensor__']!r}, which the file does not hold")
        return tensors[node["__tensor__"]]
    if "__tuple__" in node:
        return tuple(_decode_state(item, tensors, where) for item in node["__tuple__"])
    if "__dict__" in node:
        return {_decode_state(key, tensors, where): _decode_state(item, tensors, where) for key, item in node["__dict__"]}
    if "__ndarray__" in node:
        dtype = np.dtype(node["dtype"])
        if dtype.hasobject:
            raise ValueError(f"{where}: numpy dtype {node['dtype']!r} holds Python objects; refusing to build it")
        return np.asarray(node["__ndarray__"], dtype=dtype).reshape(node["shape"])
    raise ValueError(f"{where}: unknown state node with keys {sorted(node)} (a newer or foreign checkpoint format?)")


def _write_state_file(path: Path, state) -> None:
    """One state tree -> ``path`` (safetensors: the tensors, plus the JSON skeleton as metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode_state(state, tensors, ""))
    save_file(tensors, str(path), metadata={"format": "pt", _STATE_METADATA_KEY: skeleton})
    fsync_path(path)


def _read_state_file(path: Path):
    """``path`` -> the state tree :func:`_write_state_file` stored (safetensors + JSON; never pickle)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"checkpoint file {path} is not a readable safetensors file: {error}") from error
    if _STATE_METADATA_KEY not in metadata:
        raise ValueError(f"checkpoint file {path} holds no {_STATE_METADATA_KEY!r} metadata (not written by mim-hf)")
    return _decode_state(json.loads(metadata[_STATE_METADATA_KEY]), tensors, str(path))


def _rng_state() -> dict:
    """This process's Python, numpy, torch CPU (and CUDA, when initialised) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, where: Path) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise ValueError(f"{where}: saved with {len(state['cuda'])} CUDA device(s), this process sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_checkpointable(accelerator, state: typing.Mapping[str, typing.Any], per_process) -> None:
    distributed = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if distributed in _UNSUPPORTED_DISTRIBUTED:
        raise ValueError(f"checkpoints support single-process and data-parallel runs; distributed_type={distributed} "
                         "shards model or optimizer state, which this format does not gather")
    for name, obj in state.items():
        # A trailing _<digits> would collide with the per-process file names (<entry>_<rank>).
        if not (isinstance(name, str) and _ENTRY_NAME.fullmatch(name)) or name in _RESERVED_NAMES:
            raise ValueError(f"checkpoint entry name {name!r} must match {_ENTRY_NAME.pattern} (no trailing "
                             f"_<digits>) and not be one of {sorted(_RESERVED_NAMES)}")
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"checkpoint entry {name!r}: a {type(obj).__name__} has no state_dict/load_state_dict")
    unknown = sorted(set(per_process) - set(state))
    if unknown:
        raise ValueError(f"per_process names {unknown} are not checkpoint entries ({sorted(state)})")


def _entry_file(name: str, per_process: bool, rank: int) -> str:
    return f"{name}_{rank}.safetensors" if per_process else f"{name}.safetensors"


def _state_of(accelerator, obj):
    # Modules wrapped for data parallelism are saved under their own parameter names.
    return (accelerator.unwrap_model(obj) if isinstance(obj, torch.nn.Module) else obj).state_dict()


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: typing.Mapping[str, typing.Any],
                    keep: int = 2, per_process: typing.Collection[str] = (),
                    folders: typing.Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Write ``<output_dir>/checkpoints/step_<step>/`` atomically; returns its path.

    ``state`` maps entry names to objects with ``state_dict()`` / ``load_state_dict()``
    (models, optimizers, schedulers, :class:`TrainingProgress`, ...); entries named in
    ``per_process`` differ between processes and are saved by each process. ``folders`` maps
    names to directories the main process wrote during training (e.g. the best model so far):
    they travel in the checkpoint (hard-linked when the file system allows, else copied; a
    missing folder is recorded as absent) and come back with :func:`restore_folder`.

    All processes must call it. Files are written into ``.tmp_step_<step>``, flushed to disk,
    and the folder is renamed to ``step_<step>`` last (the commit); then checkpoints older than
    the newest ``keep`` are removed (renamed away first: a ``step_<N>`` name always means complete).
    """
    _check_checkpointable(accelerator, state, per_process)
    folders = {name: Path(path) for name, path in (folders or {}).items()}
    _check_folder_names(folders)
    root = checkpoint_dir(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp_{CHECKPOINT_PREFIX}{step}"
    main, rank = accelerator.is_main_process, accelerator.process_index
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    _write_state_file(tmp / f"rng_state_{rank}.safetensors", _rng_state())
    for name in per_process:
        _write_state_file(tmp / _entry_file(name, True, rank), _state_of(accelerator, state[name]))
    if main:
        for name, obj in state.items():
            if name not in per_process:
                _write_state_file(tmp / _entry_file(name, False, rank), _state_of(accelerator, obj))
        if accelerator.scaler is not None:
            _write_state_file(tmp / "grad_scaler.safetensors", accelerator.scaler.state_dict())
        for name, source in folders.items():
            if source.is_dir():
                _link_or_copy_tree(source, tmp / _FOLDERS / name)
    accelerator.wait_for_everyone()
    if main:
        manifest = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
            "num_processes": accelerator.num_processes, "accelerator_step": accelerator.step,
            "entries": {name: {"per_process": name in per_process} for name in state},
            "grad_scaler": accelerator.scaler is not None,
            "folders": {name: source.is_dir() for name, source in folders.items()},
            "files": {path.relative_to(tmp).as_posix(): path.stat().st_size
                      for path in sorted(tmp.rglob("*")) if path.is_file()},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        fsync_path(tmp / MANIFEST_NAME)
        fsync_path(tmp)
        _commit_checkpoint(tmp, final)
        for _, old in _complete_checkpoints(root)[:-keep]:
            _remove_folder(old)
        for leftover in root.iterdir():  # temporaries of a run that was killed mid-write
            if leftover.name.startswith(_TEMPORARY_PREFIXES):
                shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _check_folder_names(folders: dict[str, Path]) -> None:
    for name in folders:
        if not (isinstance(name, str) and _ENTRY_NAME.fullmatch(name)):
            raise ValueError(f"checkpoint folder name {name!r} must match {_ENTRY_NAME.pattern}")


def _link_or_copy_tree(source: Path, destination: Path) -> None:
    """Mirror ``source`` into ``destination``: hard links (free; the writers of these folders
    replace files, never edit them in place), or copies where links are not possible."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
            fsync_path(Path(dst))

    shutil.copytree(source, destination, copy_function=link_or_copy)


def restore_folder(checkpoint: str | os.PathLike, name: str, destination: str | os.PathLike) -> bool:
    """Put the checkpoint's copy of folder ``name`` at ``destination`` (copied next to it, then
    swapped in); if the checkpoint recorded that folder as absent, remove ``destination``, so
    nothing written after the checkpoint survives. Returns whether a folder was restored."""
    checkpoint, destination = Path(checkpoint), Path(destination)
    recorded = read_manifest(checkpoint).get("folders", {})
    if name not in recorded:
        raise ValueError(f"{checkpoint} holds no folder entry {name!r} (it has {sorted(recorded)})")
    staged = destination.with_name(f".{destination.name}.restore")
    shutil.rmtree(staged, ignore_errors=True)
    if recorded[name]:
        shutil.copytree(checkpoint / _FOLDERS / name, staged)
    if destination.exists():
        _remove_folder(destination)
    if recorded[name]:
        os.replace(staged, destination)
    return recorded[name]


def _commit_checkpoint(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder into place (atomic on POSIX) and flush the rename."""
    if final.exists():  # the same step saved again: move the old copy away first
        _remove_folder(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


def _remove_folder(path: Path) -> None:
    """Rename ``path`` to a ``.del_`` temporary (atomic), then delete it: never a half-deleted ``step_<N>``."""
    doomed = path.with_name(f".del_{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def read_manifest(checkpoint: str | os.PathLike) -> dict:
    """The ``manifest.json`` of a checkpoint folder, checked for format, version and file sizes."""
    checkpoint = Path(checkpoint)
    manifest_file = checkpoint / MANIFEST_NAME
    if not manifest_file.is_file():
        raise ValueError(f"{checkpoint} has no {MANIFEST_NAME}: not a mim-hf checkpoint (checkpoints written by "
                         "Accelerator.save_state hold pickles and are not loaded); start without --resume")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != CHECKPOINT_FORMAT or manifest.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{manifest_file}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}")
    for name, size in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != size:
            found = path.stat().st_size if path.is_file() else "missing"
            raise ValueError(f"checkpoint file {path} is damaged: {found} bytes, the manifest says {size}")
    return manifest


def load_checkpoint(accelerator, checkpoint: str | os.PathLike, state: typing.Mapping[str, typing.Any],
                    per_process: typing.Collection[str] = ()) -> dict:
    """Restore every entry of ``state`` (same names as at save time), the accelerator's step
    counter, the gradient scaler and this process's RNG states from ``checkpoint``.

    Reads only JSON and safetensors: nothing is unpickled. Returns the manifest.
    """
    _check_checkpointable(accelerator, state, per_process)
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    if manifest["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{checkpoint} was written by {manifest['num_processes']} process(es); resuming with "
                         f"{accelerator.num_processes} would change the batches and the per-process state")
    saved = {name: entry["per_process"] for name, entry in manifest["entries"].items()}
    wanted = {name: name in per_process for name in state}
    if saved != wanted:
        raise ValueError(f"{checkpoint} holds entries {saved} (name: per process), this run expects {wanted}; "
                         "was it written by another stage or version?")
    if manifest["grad_scaler"] != (accelerator.scaler is not None):
        raise ValueError(f"{checkpoint}: grad scaler saved={manifest['grad_scaler']}, this run uses one="
                         f"{accelerator.scaler is not None} (mixed_precision differs)")
    rank = accelerator.process_index
    for name, obj in state.items():
        path = checkpoint / _entry_file(name, name in per_process, rank)
        target = accelerator.unwrap_model(obj) if isinstance(obj, torch.nn.Module) else obj
        try:
            target.load_state_dict(_read_state_file(path))
        except (RuntimeError, KeyError, ValueError) as error:
            raise ValueError(f"checkpoint entry {name!r} ({path}) does not fit this run's {type(target).__name__}: "
                             f"{error}") from error
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(_read_state_file(checkpoint / "grad_scaler.safetensors"))
    accelerator.step = manifest["accelerator_step"]
    rng_file = checkpoint / f"rng_state_{rank}.safetensors"
    _set_rng_state(_read_state_file(rng_file), rng_file)
    return manifest


def resume_if_requested(accelerator, output_dir: str | os.PathLike, resume: bool,
                        state: typing.Mapping[str, typing.Any], per_process: typing.Collection[str] = ()) -> Path | None:
    """With ``resume``: load the newest complete checkpoint into ``state`` (error if none exists)
    and return its path. Without: start fresh and return None; an earlier run's complete
    checkpoints in ``output_dir`` are an error (``FileExistsError``: resume it or delete them),
    never silently replaced or mixed with this run's."""
    root = checkpoint_dir(output_dir)
    if not resume:
        earlier = latest_checkpoint(output_dir)
        if earlier is not None:
            complete = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
            raise FileExistsError(
                f"{output_dir} holds checkpoints of an earlier run ({', '.join(complete)}): pass --resume to "
                f"continue it, or delete {root} to start over")
        if accelerator.is_main_process and root.is_dir():
            for leftover in root.iterdir():  # half-written or half-deleted by a killed run: not checkpoints
                if leftover.name.startswith(_TEMPORARY_PREFIXES):
                    shutil.rmtree(leftover, ignore_errors=True)
        accelerator.wait_for_everyone()
        return None
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {root}")
    load_checkpoint(accelerator, checkpoint, state, per_process)
    return checkpoint
