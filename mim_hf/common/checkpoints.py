"""Atomic, pickle-free, verified checkpoints of a training run.

Checkpoints
-----------
A stage names what must survive a crash in one mapping, e.g. ``{"model": model, "optimizer":
optimizer, "scheduler": scheduler, "progress": progress}`` (anything with ``state_dict`` /
``load_state_dict``); it calls :func:`start_run` first (checks the output folder, picks the
checkpoint to resume, writes ``config.json``), :func:`restore_checkpoint` once its objects exist,
and :func:`save_checkpoint` every N steps. ``<output_dir>/checkpoints/step_<N>/`` holds:

* ``<entry>.safetensors`` per entry (``<entry>_<rank>.safetensors`` for entries that differ
  between processes, e.g. C-SFT's negative queues): the entry's ``state_dict()`` tensors, and
  its non-tensor part (optimizer hyper-parameters, scheduler counters, progress history) as
  JSON in the safetensors metadata. Dict key types, tuples and numpy arrays round-trip exactly.
* ``rng_state_<rank>.safetensors``: the Python, numpy and torch (CPU, and CUDA when in use) RNG
  states of each process; ``grad_scaler.safetensors`` under fp16 mixed precision.
* ``folders/<name>/``: folders a stage writes between checkpoints (CTR's best model so far),
  hard-linked in, so a resumed run gets back the one that belongs to the checkpointed step.
* ``manifest.json``: format version, step, number of processes, accelerate's step counter, the
  entry names, the run's configuration and every file's size and sha256.

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
* **Verified.** ``--resume`` checks every file's sha256 (a flipped bit, a truncated or missing
  file, a damaged manifest) and falls back to the newest intact checkpoint with a warning naming
  the damaged one; it refuses a configuration that differs from the checkpointed run's in any
  field but :data:`RESUMABLE_FIELDS` (and growth of a config's ``RESUME_MAY_GROW`` fields), naming
  the fields (tests/test_train_common.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mim_hf.common.config import save_config
from mim_hf.common.fs import fsync_path

CHECKPOINT_PREFIX = "step_"
CHECKPOINT_FORMAT = "mim-hf-checkpoint"
CHECKPOINT_VERSION = 2
MANIFEST_NAME = "manifest.json"
_STATE_METADATA_KEY = "mim_hf_state"
_FOLDERS = "folders"
_TEMPORARY_PREFIXES = (".tmp_", ".del_")
_ENTRY_NAME = re.compile(r"(?!.*_[0-9]+$)[A-Za-z][A-Za-z0-9_-]*")
_RESERVED_NAMES = {"rng_state", "grad_scaler", "manifest", "folders"}
# These shard model/optimizer state across processes; the format stores one full copy.
_UNSUPPORTED_DISTRIBUTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


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


def save_checkpoint(accelerator, config, step: int, state: typing.Mapping[str, typing.Any],
                    per_process: typing.Collection[str] = (),
                    folders: typing.Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Write ``<config.output_dir>/checkpoints/step_<step>/`` atomically; returns its path.

    ``config`` (the run's dataclass config) is recorded in the manifest, so that ``--resume``
    can refuse a different one (:func:`start_run`); its ``keep_checkpoints`` (default 2) newest
    checkpoints are kept.

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
    output_dir, keep = config.output_dir, getattr(config, "keep_checkpoints", 2)
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
            "config": _config_record(config),
            "files": {path.relative_to(tmp).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _config_record(config) -> dict:
    """The config as JSON would give it back (tuples become lists), for comparison on resume."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def read_manifest(checkpoint: str | os.PathLike, verify: bool = False) -> dict:
    """The ``manifest.json`` of a checkpoint folder, checked for format, version and file sizes;
    with ``verify`` also every file's sha256. Any damage is a ``ValueError`` naming the file."""
    checkpoint = Path(checkpoint)
    manifest_file = checkpoint / MANIFEST_NAME
    if not manifest_file.is_file():
        raise ValueError(f"{checkpoint} has no {MANIFEST_NAME}: not a mim-hf checkpoint (checkpoints written by "
                         "Accelerator.save_state hold pickles and are not loaded); start without --resume")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_file} is damaged: not readable JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT \
            or manifest.get("version") != CHECKPOINT_VERSION:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else type(manifest)
        raise ValueError(f"{manifest_file}: format/version {found!r}, expected {CHECKPOINT_FORMAT!r} version "
                         f"{CHECKPOINT_VERSION}")
    missing = sorted({"step", "num_processes", "accelerator_step", "entries", "grad_scaler", "folders", "config",
                      "files"} - set(manifest))
    if missing:
        raise ValueError(f"{manifest_file} is damaged: it lacks {missing}")
    for name, recorded in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != recorded["bytes"]:
            found = path.stat().st_size if path.is_file() else "missing"
            raise ValueError(f"checkpoint file {path} is damaged: {found} bytes, the manifest says {recorded['bytes']}")
        if verify and _sha256(path) != recorded["sha256"]:
            raise ValueError(f"checkpoint file {path} is damaged: its sha256 differs from the manifest's")
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


# Fields that do not change what a run computes; --resume accepts new values for them.
RESUMABLE_FIELDS = ("output_dir", "show_progress", "keep_checkpoints", "checkpoint_every", "num_threads")


def _newest_intact(root: Path) -> Path:
    """The newest checkpoint under ``root`` whose manifest and files (sha256) are intact; damaged
    newer ones are skipped with a warning naming them and the damage."""
    complete = _complete_checkpoints(root)
    if not complete:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {root}")
    damage = []
    for _, checkpoint in reversed(complete):
        try:
            read_manifest(checkpoint, verify=True)
        except ValueError as error:
            damage.append(f"{checkpoint.name}: {error}")
            continue
        if damage:
            warnings.warn(f"--resume: skipped damaged checkpoint(s) ({'; '.join(damage)}); resuming from the older "
                          f"intact {checkpoint}", stacklevel=3)
        return checkpoint
    raise ValueError(f"--resume: every checkpoint under {root} is damaged ({'; '.join(damage)})")


def field_defaults(config) -> dict:
    """The config class's field defaults, recorded as :func:`_config_record` records values."""
    defaults = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return json.loads(json.dumps(defaults))


def config_differences(saved: dict, config, may_grow: tuple = ()) -> list[str]:
    """The fields where ``config`` differs from a recorded config ``saved`` in a way that changes
    results, each as ``"name (recorded: a, this run: b)"``. Not counted: :data:`RESUMABLE_FIELDS`,
    ``may_grow`` fields that grew, two spellings of one existing path (relative / absolute), a path
    that moved with the run (an existing path at the same place relative to the run's ``output_dir``
    as recorded: a results folder moved or copied elsewhere whole), and a field ``saved`` does not
    record (added to the config after it was written) at its default value, which keeps the old
    behaviour."""
    now, defaults = _config_record(config), field_defaults(config)

    def same_path(before, after) -> bool:
        if not (isinstance(before, str) and isinstance(after, str) and before and after and os.path.exists(after)):
            return False
        if os.path.exists(before) and Path(before).resolve() == Path(after).resolve():
            return True
        runs = saved.get("output_dir"), now.get("output_dir")
        return all(isinstance(run, str) and run for run in runs) and (
            os.path.relpath(os.path.abspath(before), os.path.abspath(runs[0]))
            == os.path.relpath(os.path.abspath(after), os.path.abspath(runs[1])))

    def allowed(name):
        before, after = saved.get(name, "<absent>"), now.get(name, "<absent>")
        grows = name in may_grow and isinstance(before, int) and isinstance(after, int) and after > before
        added_at_default = name not in saved and name in defaults and after == defaults[name]
        return before == after or name in RESUMABLE_FIELDS or grows or added_at_default or same_path(before, after)

    return [f"{name} (recorded: {saved.get(name, '<absent>')!r}, this run: {now.get(name, '<absent>')!r})"
            for name in sorted(set(saved) | set(now)) if not allowed(name)]


def _check_same_config(checkpoint: Path, config) -> None:
    """Refuse to resume ``checkpoint`` with a config that differs in a field that changes results.

    A stage's config class may name fields that can *grow* on resume (a longer schedule) in a
    ``RESUME_MAY_GROW`` class attribute, where continuing equals having asked for more from the start.
    A field the checkpoint does not record is accepted at its default (:func:`config_differences`).
    """
    may_grow = getattr(type(config), "RESUME_MAY_GROW", ())
    changed = config_differences(read_manifest(checkpoint)["config"], config, may_grow)
    if changed:
        raise ValueError(f"--resume: this run's configuration differs from {checkpoint}'s in "
                         f"{', '.join(changed).replace('recorded:', 'checkpoint:')}; resume with "
                         f"the checkpoint's values, or start a fresh run in another output_dir (only "
                         f"{', '.join(RESUMABLE_FIELDS)} may change on resume"
                         + (f", and {', '.join(may_grow)} may grow)" if may_grow else ")"))


def check_finished_run(output_dir: str | os.PathLike, config) -> None:
    """Before reusing a finished run in ``output_dir`` (a later command that would skip it), check
    that its ``config.json`` matches ``config``; a ``ValueError`` names the fields that differ."""
    path = Path(output_dir) / "config.json"
    changed = config_differences(json.loads(path.read_text()), config)
    if changed:
        raise ValueError(f"the finished run in {output_dir} was made with another configuration: {', '.join(changed)}; "
                         "delete that folder to run it again with this one")


def start_run(accelerator, config, resume: bool) -> Path | None:
    """Check ``config.output_dir`` for this run, then write its ``config.json``; returns the
    checkpoint to continue from (``resume``) or None (fresh). All processes call it.

    Fresh run: an earlier run's complete checkpoints there are an error (``FileExistsError``:
    resume it or delete them), never silently replaced or mixed with this run's; half-written
    temporaries are removed. ``resume``: the newest intact checkpoint (every file's sha256 is
    checked; damaged newer ones are skipped with a warning), whose recorded config must equal
    ``config`` except in :data:`RESUMABLE_FIELDS` and growth of ``RESUME_MAY_GROW`` fields (else
    ``ValueError`` naming the fields).
    ``config.json`` is written only once these checks pass.
    """
    output_dir = Path(config.output_dir)
    root = checkpoint_dir(output_dir)
    checkpoint = None
    if resume:
        checkpoint = _newest_intact(root)
        _check_same_config(checkpoint, config)
    elif latest_checkpoint(output_dir) is not None:
        complete = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        raise FileExistsError(f"{output_dir} holds checkpoints of an earlier run ({', '.join(complete)}): pass "
                              f"--resume to continue it, or delete {root} to start over")
    accelerator.wait_for_everyone()  # every process checked before the main process writes
    if accelerator.is_main_process:
        if root.is_dir() and not resume:
            for leftover in root.iterdir():  # half-written or half-deleted by a killed run: not checkpoints
                if leftover.name.startswith(_TEMPORARY_PREFIXES):
                    shutil.rmtree(leftover, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.json")
    accelerator.wait_for_everyone()
    return checkpoint


def restore_checkpoint(accelerator, checkpoint: Path | None, state: typing.Mapping[str, typing.Any],
                       per_process: typing.Collection[str] = ()) -> Path | None:
    """:func:`load_checkpoint` of the checkpoint :func:`start_run` chose (nothing when None); returns it."""
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, state, per_process)
    return checkpoint
