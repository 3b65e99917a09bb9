"""The files of one center version: what they hold, how they are written, and how they are checked.

One version is a folder of::

    embeddings.safetensors   one (num_items, embed_dim) tensor per level, float16 or float32
    item_index.safetensors   item_id_bytes   uint8  (total_bytes,)  UTF-8 ids, concatenated
                             item_id_offsets int64  (num_items + 1,) id i = bytes[off[i]:off[i+1]]
                             id_hash_sorted  uint64 (num_items,)    sorted 64-bit id hashes
                             id_hash_rows    int64  (num_items,)    row of each sorted hash
    metadata.json            encoder, embed_dim, dtype, levels, hash key, checksums (below)
    README.md                dataset card made from metadata.json

Both ``.safetensors`` files are written and opened by the ``safetensors`` library
(``safe_open(framework="pt")`` maps the file: tensors are views of the mapping, nothing is read
at open). Integrity: ``metadata.json`` carries the sha256 of its own other fields
(``metadata_sha256``, checked at every open) and a CRC32 of every ``CHECK_CHUNK_BYTES`` of every
tensor (``checksums``); :class:`ChunkChecks` checks a chunk the first time a reader touches it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mim_hf.common.fs import fsync_path

FORMAT_VERSION = 3  # 3: checksummed metadata and per-chunk CRC32s, plain sorted-hash index
EMBEDDINGS_FILE = "embeddings.safetensors"
INDEX_FILE = "item_index.safetensors"
METADATA_FILE = "metadata.json"
CARD_FILE = "README.md"
DEFAULT_LEVEL = "item_embeds"
INDEX_TENSORS = {"item_id_bytes": np.uint8, "item_id_offsets": np.int64, "id_hash_sorted": np.uint64,
                 "id_hash_rows": np.int64}
CHECK_CHUNK_BYTES = 4 << 20  # one CRC32 per 4 MiB of a tensor
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
REQUIRED_METADATA_FIELDS = ("format_version", "encoder_name", "encoder_fingerprint", "embed_dim", "dtype",
                            "normalized", "num_items", "levels", "created_at", "hash_key", "checksums",
                            "metadata_sha256")
_CHECK_ROWS = 1 << 16  # rows per step of the NaN/norm checks (bounded temporaries)


# ---- metadata -------------------------------------------------------------------------------
def metadata_digest(metadata: Mapping[str, Any]) -> str:
    """sha256 of every field but ``metadata_sha256`` itself, in canonical JSON."""
    fields = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def read_metadata(path: Path) -> dict[str, Any]:
    """Read and check a version's metadata.json; ``ValueError`` naming the file and the problem."""
    if not path.is_file():
        raise ValueError(f"{path}: missing file (a representation center needs it)")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (this mim-hf reads format "
                         f"{FORMAT_VERSION} only; rebuild the center with build_center or RepresentationCenter.build)")
    missing = [f for f in REQUIRED_METADATA_FIELDS if f not in metadata]
    if missing:
        raise ValueError(f"{path}: missing required field(s) {missing}")
    if metadata["metadata_sha256"] != metadata_digest(metadata):
        raise ValueError(f"{path}: corrupted (its fields do not match the metadata_sha256 it records)")

    def is_int(value, minimum):
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    levels = metadata["levels"]
    problems = {
        "num_items": (is_int(metadata["num_items"], 0), "an int >= 0"),
        "embed_dim": (is_int(metadata["embed_dim"], 1), "an int >= 1"),
        "dtype": (metadata["dtype"] in STORAGE_DTYPES, f"one of {sorted(STORAGE_DTYPES)}"),
        "levels": (isinstance(levels, list) and all(isinstance(lv, str) for lv in levels)
                   and len(set(levels)) == len(levels) and DEFAULT_LEVEL in levels,
                   f"a list of distinct level names holding {DEFAULT_LEVEL!r}"),
        "normalized": (isinstance(metadata["normalized"], bool), "true or false"),
        "encoder_fingerprint": (isinstance(metadata["encoder_fingerprint"], str), "a str"),
        "hash_key": (isinstance(metadata["hash_key"], str), "a str"),
        "checksums": (_valid_checksums(metadata["checksums"], levels),
                      "{'chunk_bytes': int, file name: {tensor name: [CRC32 per chunk]}}"),
    }
    for field, (ok, expected) in problems.items():
        if not ok:
            raise ValueError(f"{path}: field {field!r} is {metadata.get(field)!r}; expected {expected}")
    return metadata


def _valid_checksums(checksums: Any, levels: Any) -> bool:
    if not isinstance(checksums, dict) or not isinstance(checksums.get("chunk_bytes"), int):
        return False
    expected = {EMBEDDINGS_FILE: set(levels) if isinstance(levels, list) else set(), INDEX_FILE: set(INDEX_TENSORS)}
    return checksums["chunk_bytes"] > 0 and set(checksums) == {"chunk_bytes", *expected} and all(
        isinstance(checksums.get(name), dict) and set(checksums[name]) == tensors
        and all(isinstance(crcs, list) and all(isinstance(c, int) for c in crcs) for crcs in checksums[name].values())
        for name, tensors in expected.items())


def write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


# ---- tensors --------------------------------------------------------------------------------
def chunk_crcs(array: np.ndarray, chunk_bytes: int = CHECK_CHUNK_BYTES) -> list[int]:
    """CRC32 of every ``chunk_bytes`` of a C-contiguous array's bytes."""
    data = memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")
    return [zlib.crc32(data[start:start + chunk_bytes]) for start in range(0, len(data), chunk_bytes)]


def save_tensors(path: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """Write ``arrays`` with ``safetensors.numpy.save_file`` and fsync; return each tensor's chunk CRC32s."""
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    save_file(arrays, str(path), metadata={"format": "pt"})
    fsync_path(path)
    return {name: chunk_crcs(array) for name, array in arrays.items()}


def open_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one read-only memory map (nothing is read).

    ``safe_open(framework="pt")`` maps the file (a private, copy-on-write mapping: pages come from
    the page cache, so private memory stays ~0). ``ValueError`` names a missing or damaged file."""
    if not path.is_file():
        raise ValueError(f"{path}: missing file (a representation center needs it)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path}: corrupted or truncated safetensors file ({err})") from None


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Read-only numpy view of a mapped tensor (a write would only touch this process's copy)."""
    array = tensor.numpy()
    array.flags.writeable = False
    return array


class ChunkChecks:
    """The CRC32s of one tensor's chunks, each chunk checked the first time it is read.

    ``array``: the mapped tensor as numpy; ``crcs``: one CRC32 per ``chunk_bytes`` of its bytes.
    ``check(first, last)`` checks the chunks holding bytes ``first[i]..last[i]`` (inclusive) not
    checked yet; a mismatch is a ``ValueError`` naming the file, tensor and byte range."""

    def __init__(self, path: Path, name: str, array: np.ndarray, crcs: list[int], chunk_bytes: int):
        self.path, self.name, self.chunk_bytes = path, name, chunk_bytes
        self.bytes = array.reshape(-1).view(np.uint8)
        n_chunks = -(-len(self.bytes) // chunk_bytes)
        if len(crcs) != n_chunks:
            raise ValueError(f"{path}: tensor {name!r} has {len(self.bytes)} bytes ({n_chunks} chunks) but "
                             f"metadata.json records {len(crcs)} chunk checksums")
        self.crcs = np.asarray(crcs, dtype=np.int64)
        self.done = np.zeros(n_chunks, bool)
        self.complete = n_chunks == 0

    def check(self, first: np.ndarray, last: np.ndarray) -> None:
        if self.complete or len(first) == 0:
            return
        lo, hi = first // self.chunk_bytes, last // self.chunk_bytes
        spans = hi - lo + 1
        if int(spans.max()) <= 2:
            chunks = np.concatenate([lo, hi])
        else:  # a value longer than a chunk (a very long id)
            chunks = np.repeat(lo, spans) + np.arange(int(spans.sum())) - np.repeat(np.cumsum(spans) - spans, spans)
        chunks = np.unique(chunks)
        self._check_chunks(chunks[~self.done[chunks]])

    def check_all(self) -> None:
        if not self.complete:
            self._check_chunks(np.flatnonzero(~self.done))

    def _check_chunks(self, chunks: np.ndarray) -> None:
        for chunk in chunks.tolist():
            start = chunk * self.chunk_bytes
            data = self.bytes[start:start + self.chunk_bytes]
            if zlib.crc32(memoryview(data)) != self.crcs[chunk]:
                raise ValueError(f"{self.path}: corrupted data in tensor {self.name!r}, bytes {start}.."
                                 f"{start + len(data) - 1} (CRC32 differs from metadata.json); rebuild the center "
                                 "or restore this file")
            self.done[chunk] = True
        self.complete = bool(self.done.all())


# ---- embeddings to store --------------------------------------------------------------------
def to_numpy_embeddings(name: str, embeddings: Any) -> np.ndarray:
    """A (N, D) tensor/array of floats -> float32 or float16 numpy (no copy when possible)."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().to("cpu")
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings[{name!r}] must be floating point, got {embeddings.dtype}")
        if embeddings.dtype not in (torch.float16, torch.float32):
            embeddings = embeddings.float()
        return embeddings.numpy()
    array = np.asarray(embeddings)
    if array.dtype.kind != "f":
        raise TypeError(f"embeddings[{name!r}] must be floating point, got {array.dtype}")
    return array


def validated_embeddings(ids: np.ndarray, embeddings: Mapping[str, Any], dtype: str,
                         expected_levels: list[str] | tuple[str, ...] | None,
                         expected_dim: int | None) -> dict[str, np.ndarray]:
    """Check levels/shapes/finiteness; return level -> (N, D) numpy in the storage dtype, item_embeds first."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if not isinstance(embeddings, Mapping) or DEFAULT_LEVEL not in embeddings:
        got = sorted(embeddings) if isinstance(embeddings, Mapping) else type(embeddings).__name__
        raise ValueError(f"embeddings must be a dict level -> (N, D) tensor containing {DEFAULT_LEVEL!r}, got {got}")
    if expected_levels is not None and sorted(embeddings) != sorted(expected_levels):
        raise ValueError(f"embeddings levels {sorted(embeddings)} differ from the center's {sorted(expected_levels)}")
    arrays = {}
    for level in [DEFAULT_LEVEL] + sorted(set(embeddings) - {DEFAULT_LEVEL}):
        array = to_numpy_embeddings(level, embeddings[level])
        dim = expected_dim if expected_dim is not None else (
            arrays[DEFAULT_LEVEL].shape[1] if arrays else (array.shape[1] if array.ndim == 2 else None))
        if array.ndim != 2 or array.shape[0] != len(ids) or array.shape[1] != dim or dim == 0:
            raise ValueError(f"embeddings[{level!r}] has shape {tuple(array.shape)}, expected "
                             f"({len(ids)} items, {dim if dim else 'D>0'})")
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            stored = array.astype(STORAGE_DTYPES[dtype], copy=False)
        finite = np.concatenate([np.isfinite(stored[start:start + _CHECK_ROWS]).all(axis=1)
                                 for start in range(0, len(stored), _CHECK_ROWS)] or [np.ones(0, bool)])
        if not finite.all():
            bad = np.flatnonzero(~finite)
            cast_note = f" (overflows {dtype}; store as float32)" if np.isfinite(array[bad[0]]).all() else ""
            raise ValueError(f"embeddings[{level!r}] has NaN/inf in {len(bad)} row(s), e.g. item_id "
                             f"{ids[bad[0]]!r}{cast_note}")
        arrays[level] = np.ascontiguousarray(stored)
    return arrays


def rows_normalized(arrays: Mapping[str, np.ndarray]) -> bool:
    """True if every row of every level is L2-normalised or all-zero (a missing modality), within
    float16 precision."""
    for array in arrays.values():
        for start in range(0, len(array), _CHECK_ROWS):
            norms = np.linalg.norm(array[start:start + _CHECK_ROWS].astype(np.float32), axis=1)
            if not bool(((np.abs(norms - 1.0) <= 1e-2) | (norms == 0)).all()):
                return False
    return True
