"""Representation Center: item_id -> frozen content embedding, stored once, looked up fast.

Encoders are too slow to run inside CTR training and serving, so every item is encoded once
and its embeddings (one tensor per level: ``item_embeds``, ``text_embeds``, ``image_embeds``)
are stored next to an item-id index and metadata naming the encoder that produced them.

On-disk layout of one *version* (this is also exactly what is pushed to the Hub)::

    embeddings.safetensors   one (num_items, embed_dim) tensor per level, float16 or float32
    item_index.safetensors   item_id_bytes  uint8  (total_bytes,)  UTF-8 ids, concatenated
                             item_id_offsets int64 (num_items + 1,) id i = bytes[off[i]:off[i+1]]
                             id_hash_sorted uint64 (num_items,)    sorted 64-bit id hashes
                             id_hash_rows   int64  (num_items,)    row of each sorted hash
                             id_hash_buckets int32 (2**bits + 1,)  start of each top-bits bucket
    metadata.json            encoder name/revision/fingerprint, embed_dim, dtype, levels, ...
    README.md                dataset card generated from metadata.json

Why this index: parsing 10M ids from JSON (or building a 10M-entry Python dict) takes seconds
and a gigabyte; here the ids and a sorted hash table are memory-mapped, so opening is O(1). A
look-up turns the whole batch of query ids into one UTF-8 buffer (one ``str.join``), hashes it
8 bytes at a time with whole-batch numpy arithmetic (``HASH_ALGORITHM``), finds each hash
through a directory over the hashes' top bits (0.25-0.5 entries per bucket: ~4 in 5 ids are at
the first entry probed) and verifies every hit against the stored id bytes, so a hash collision can never return
another item's embedding. No Python object is made per id and nothing grows with the catalogue.
Format 1 (pandas SipHash ids) is still read; writing (build, upsert) produces format 2.

A local center directory is *versioned* so that updates are atomic::

    CURRENT                  text file naming the live version, e.g. "v0002"
    v0001/  v0002/           one version each (layout above)

A new version is written into a hidden temp directory, fsynced, renamed to ``vNNNN`` and only
then published by ``os.replace`` of ``CURRENT``; a crash at any point leaves the previous
version readable. A directory holding the version files directly (a Hub snapshot) is a
read-only *flat* center. :func:`build_center` stages encoded chunks in ``.build-staging/``
(see :class:`CenterBuildStaging`) so that a killed build resumes. Every file opened must
resolve inside the center directory (no ``..``, absolute names or symlinks leading out).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from mim_hf.common.fs import fsync_path, resolve_inside
from mim_hf.encoder.fingerprint import encoder_fingerprint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: vectorised id hash (HASH_ALGORITHM); 1 (pandas SipHash) is still read
READABLE_FORMAT_VERSIONS = (1, 2)
EMBEDDINGS_FILE = "embeddings.safetensors"
INDEX_FILE = "item_index.safetensors"
METADATA_FILE = "metadata.json"
CARD_FILE = "README.md"
CURRENT_FILE = "CURRENT"
DEFAULT_LEVEL = "item_embeds"
HASH_ALGORITHM = ("mimhash64(utf8 as 8-byte LE words, at least 2, zero-padded; h=len*K^seed; per word h^=w, h*=K, "
                  "h^=h>>32; K=0x9E3779B97F4A7C15, seed=blake2b-64(hash_key))")
LEGACY_HASH_ALGORITHM = "pandas.util.hash_array(siphash-2-4,utf8)"  # format 1
REQUIRED_METADATA_FIELDS = (
    "format_version",
    "encoder_name",
    "encoder_fingerprint",
    "embed_dim",
    "dtype",
    "normalized",
    "num_items",
    "levels",
    "created_at",
    "hash_key",
)
_STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
# safetensors dtype codes <-> numpy dtypes (only those this format writes or may meet).
_ST_TO_NP = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "U8": np.uint8,
    "I32": np.int32,
    "I64": np.int64,
    "U64": np.uint64,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_TO_NP.items()}
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_MAX_HEADER_BYTES = 100_000_000
_UPSERT_CHUNK_BYTES = 64 << 20  # rows of the old version streamed per write during upsert
_CHECK_CHUNK_ROWS = 1 << 16  # rows per step of the NaN/norm checks (bounded temporaries)


# ------------------------------------------------------------------------------------------
# safetensors: streaming writer + memory-mapped reader
# ------------------------------------------------------------------------------------------
def _write_chunk(handle, array: np.ndarray) -> None:
    """Write one C-contiguous array's bytes (a separate function so tests can inject a crash)."""
    handle.write(memoryview(array.reshape(-1)).cast("B"))


def _write_safetensors(
    path: Path,
    tensors: Sequence[tuple[str, np.dtype, tuple[int, ...], Iterable[np.ndarray]]],
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Stream tensors into a safetensors file without holding them all in memory.

    ``tensors``: (name, numpy dtype, shape, iterable of row chunks whose concatenation along
    axis 0 has that shape). Tensors are laid out in the given order; callers order them by
    decreasing itemsize so every tensor stays aligned. The file is fsynced.
    Returns ``{"bytes": file size, "sha256": hex digest of the whole file}``.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _NP_TO_ST[np.dtype(dtype)],
            "shape": [int(s) for s in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # safetensors pads the header with spaces so the data buffer starts 8-byte aligned.
    header_bytes += b" " * (-len(header_bytes) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        prefix = struct.pack("<Q", len(header_bytes)) + header_bytes
        handle.write(prefix)
        digest.update(prefix)
        for name, dtype, shape, chunks in tensors:
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            written = 0
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                if chunk.size == 0:
                    continue
                _write_chunk(handle, chunk)
                digest.update(memoryview(chunk).cast("B"))
                written += chunk.nbytes
            if written != expected:  # an internal bug, never user input
                raise RuntimeError(f"{path}: tensor {name!r} got {written} bytes, header says {expected}")
        handle.flush()
        os.fsync(handle.fileno())
    return {"bytes": len(prefix) + offset, "sha256": digest.hexdigest()}


def _open_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every tensor of a safetensors file (nothing but the header is read).

    Returns ``(arrays, metadata)``: read-only numpy views over one ``np.memmap`` of the file.
    Raises ``ValueError`` naming the file for a missing, truncated or corrupted file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing file (a representation center needs it)")
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, less than the 8-byte header length)")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(
                f"{path}: corrupted or truncated safetensors file (header claims {header_len} bytes, "
                f"file has {size - 8} after the length prefix)"
            )
        raw_header = handle.read(header_len)
    try:
        header = json.loads(raw_header.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: corrupted safetensors header ({err})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    specs = {}
    data_end = 0
    for name, spec in header.items():
        try:
            dtype = np.dtype(_ST_TO_NP[spec["dtype"]])
            shape = tuple(int(s) for s in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupted safetensors header entry for tensor {name!r}: {spec!r}") from None
        if (any(s < 0 for s in shape) or begin < 0 or end < begin
                or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize):
            raise ValueError(f"{path}: corrupted safetensors header: tensor {name!r} offsets {begin}..{end} "
                             f"do not match shape {shape} of {dtype}")
        specs[name] = (dtype, shape, begin, end)
        data_end = max(data_end, end)
    if data_start + data_end != size:
        raise ValueError(
            f"{path}: truncated or corrupted safetensors file: header describes {data_end} data bytes, "
            f"file holds {size - data_start}"
        )
    # A plain ndarray view of the mapping: np.memmap's subclass hooks cost ~0.1 ms per indexing.
    buffer = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray) if size > data_start else np.empty(0, np.uint8)
    arrays = {}
    for name, (dtype, shape, begin, end) in specs.items():
        if (data_start + begin) % dtype.itemsize:
            # Unaligned data (a foreign writer): copy rather than hand out an unaligned view.
            arrays[name] = np.frombuffer(bytes(buffer[data_start + begin: data_start + end]), dtype).reshape(shape)
        else:
            arrays[name] = buffer[data_start + begin: data_start + end].view(dtype).reshape(shape)
    return arrays, metadata


# ------------------------------------------------------------------------------------------
# Item ids: validation, UTF-8 batches, hashing
# ------------------------------------------------------------------------------------------
def _as_id_array(item_ids: Any, what: str = "item_ids") -> np.ndarray:
    """Validate ``item_ids`` (a sequence of str) and return them as a 1-D object array.

    Raises ``TypeError`` for anything that is not a sequence of strings (ints, floats, None):
    raw ids are strings everywhere in mim-hf, and silently str()-ing an int would confuse a
    vocabulary index with a raw id. A numpy ``'S'`` array is taken as UTF-8 bytes of str ids.
    """
    if isinstance(item_ids, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of str ids, got a single {type(item_ids).__name__} {item_ids!r}")
    if isinstance(item_ids, (pa.Array, pa.ChunkedArray)):
        item_ids = item_ids.to_pylist()
    elif isinstance(item_ids, (pd.Index, pd.Series)):
        item_ids = item_ids.to_numpy(dtype=object)
    elif isinstance(item_ids, torch.Tensor):
        raise TypeError(f"{what} must be a sequence of str ids, got a torch.Tensor of {item_ids.dtype} "
                        "(vocabulary indices are not raw item ids)")
    elif isinstance(item_ids, np.ndarray) and item_ids.dtype.kind == "S":
        item_ids = _decode_utf8_array(item_ids, what)
    ids = np.asarray(item_ids if isinstance(item_ids, np.ndarray) else list(item_ids), dtype=object)
    if ids.ndim != 1:
        raise TypeError(f"{what} must be a 1-D sequence of str ids, got shape {ids.shape}")
    if len(ids) and pd.api.types.infer_dtype(ids, skipna=False) != "string":
        bad = next(i for i, v in enumerate(ids) if not isinstance(v, str))
        raise TypeError(
            f"{what} must all be str (raw item ids), but element {bad} is {ids[bad]!r} of type "
            f"{type(ids[bad]).__name__}; convert raw ids with str() if they are not vocabulary indices"
        )
    return ids


def _decode_utf8_array(ids: np.ndarray, what: str) -> np.ndarray:
    """numpy 'S' array of UTF-8 bytes -> 'U' array; ValueError naming the first undecodable id."""
    try:
        return np.char.decode(ids, "utf-8")
    except UnicodeDecodeError:
        bad = next(i for i, v in enumerate(ids.tolist()) if not _decodes(v))
        raise ValueError(f"{what}[{bad}] = {ids[bad]!r} is not valid UTF-8 (a bytes array holds UTF-8 encoded str "
                         "ids)") from None


def _decodes(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


_ID_PADDING = 16  # zero bytes after the last id of a batch, so every 8-byte read stays in bounds
_MIN_HASH_WORDS = 2  # every id hashes >= 2 words: ids up to 16 bytes take no per-row branch
_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplying is a bijection of uint64
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)  # mask of k bytes
# _FIRST_WORD_MASKS[j][n]: mask of the bytes of word j inside an id of n <= 16 bytes
_FIRST_WORD_MASKS = _LOW_BYTES[np.clip(np.arange(8 * _MIN_HASH_WORDS + 1) - 8 * np.arange(_MIN_HASH_WORDS)[:, None], 0, 8)]
_SHIFT_32 = np.uint64(32)


class _IdBatch:
    """The UTF-8 bytes of N ids, read as little-endian 8-byte words without a Python object per id.

    ``buffer``: uint8 (B,) holding every id, then at least ``_ID_PADDING`` zero bytes (anything,
    e.g. separators, may lie between ids); ``starts``/``lengths``: int64 (N,) byte offset and byte
    length of id i in ``buffer``.
    """

    __slots__ = ("buffer", "starts", "lengths", "_columns")

    def __init__(self, buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.buffer, self.starts, self.lengths = buffer, starts, lengths
        self._columns: list | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def to_str_array(self) -> np.ndarray:
        """(N,) object array of the ids as str (one Python object per id: format-1 hashing only)."""
        return np.array([self.buffer[start:start + length].tobytes().decode("utf-8")
                         for start, length in zip(self.starts.tolist(), self.lengths.tolist())] or [], dtype=object)

    @property
    def word_columns(self) -> list[tuple[int, Any, np.ndarray, np.ndarray]]:
        """``(j, rows, mask, words)`` for j = 0, 1, ...: ``rows`` the ids that have a j-th 8-byte
        word (``slice(None)``, every id, for j < 2), ``mask`` (uint64) the bytes of that word
        inside the id, ``words`` (uint64) the word with the bytes past the id zeroed. Computed
        once per batch (hashing and verification both read them)."""
        if self._columns is None:
            self._columns = list(self._word_columns())
        return self._columns

    def _word_columns(self) -> Iterator[tuple[int, Any, np.ndarray, np.ndarray]]:
        words = np.ndarray((len(self.buffer) - 7,), dtype="<u8", buffer=self.buffer, strides=(1,))
        short = np.minimum(self.lengths, 8 * _MIN_HASH_WORDS)  # masks of the first words by table look-up
        for j in range(_MIN_HASH_WORDS):
            mask = _FIRST_WORD_MASKS[j][short]
            yield j, slice(None), mask, words[self.starts + 8 * j if j else self.starts] & mask
        n_words = (self.lengths + 7) >> 3
        total = int(n_words.max(initial=0))
        if total > _MIN_HASH_WORDS:  # long ids: word j is read only for the ids that have one
            by_words = np.argsort(-n_words, kind="stable")
            longer = len(n_words) - np.searchsorted(np.sort(n_words), np.arange(total), side="right")
            for j in range(_MIN_HASH_WORDS, total):
                rows = by_words[: longer[j]]
                mask = _LOW_BYTES[np.minimum(self.lengths[rows] - 8 * j, 8)]
                yield j, rows, mask, words[self.starts[rows] + 8 * j] & mask


def _id_batch(item_ids: Any, what: str = "item_ids") -> _IdBatch:
    """Validate ``item_ids`` and return their UTF-8 bytes as an :class:`_IdBatch`.

    Takes a list/tuple/iterable of str (encoded in one ``str.join``), a numpy array of str
    (``'U'``: ASCII ones are re-coded without Python objects; object arrays of str) or of UTF-8
    bytes (``'S'``), a pandas Series/Index of str, or a pyarrow string array (read in place).
    Raises ``TypeError`` for ids that are not str (see :func:`_as_id_array`) and ``ValueError``
    for a str that has no UTF-8 form (a lone surrogate).
    """
    if isinstance(item_ids, (pa.Array, pa.ChunkedArray)):
        array = item_ids.combine_chunks() if isinstance(item_ids, pa.ChunkedArray) else item_ids
        if len(array) == 0:
            return _id_batch([], what)
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)) or array.null_count:
            _as_id_array(array, what)  # raises, naming the offending element
            raise TypeError(f"{what} must be a pyarrow string array without nulls, got {array.type}")
        return _arrow_batch(array)
    if isinstance(item_ids, (pd.Series, pd.Index)):
        if item_ids.dtype != object and pd.api.types.is_string_dtype(item_ids.dtype) and not item_ids.hasnans:
            return _arrow_batch(pa.array(item_ids, type=pa.large_string()))
        item_ids = item_ids.to_numpy(dtype=object)
    if isinstance(item_ids, np.ndarray):
        if item_ids.ndim != 1:
            raise TypeError(f"{what} must be a 1-D sequence of str ids, got shape {item_ids.shape}")
        if item_ids.dtype.kind in "US":
            return _fixed_width_batch(item_ids, what)
    elif isinstance(item_ids, (str, bytes, torch.Tensor)) or not isinstance(item_ids, Iterable):
        _as_id_array(item_ids, what)  # raises the TypeError
        raise TypeError(f"{what} must be a sequence of str ids, got {type(item_ids).__name__}")
    ids = item_ids if isinstance(item_ids, (list, tuple, np.ndarray)) else list(item_ids)
    if len(ids) == 0:
        return _IdBatch(np.zeros(_ID_PADDING, np.uint8), np.empty(0, np.int64), np.empty(0, np.int64))
    buffer = np.frombuffer(_joined_utf8(ids, what) + bytes(_ID_PADDING), np.uint8)
    separators = np.flatnonzero(buffer == 0)
    if len(separators) != len(ids) - 1 + _ID_PADDING:  # an id holds "\x00": find the ids one by one
        return _arrow_batch(pa.array(ids, type=pa.large_string()))
    starts = np.empty(len(ids), np.int64)
    starts[0] = 0
    starts[1:] = separators[: len(ids) - 1] + 1
    return _IdBatch(buffer, starts, separators[: len(ids)] - starts)


def _joined_utf8(ids: Sequence[Any], what: str) -> bytes:
    """UTF-8 of ``"\\x00".join(ids)``: one join + one encode for the whole batch (no object per id).

    ``TypeError`` names the first non-str id, ``ValueError`` the first str with no UTF-8 form."""
    try:
        return "\x00".join(ids).encode("utf-8")
    except TypeError:
        _as_id_array(ids, what)  # raises, naming the first non-str element
        raise
    except UnicodeEncodeError:
        bad = next(i for i, v in enumerate(ids) if not _encodes(v))
        raise ValueError(f"{what}[{bad}] = {ids[bad]!r} cannot be encoded as UTF-8 (a lone surrogate?); "
                         "ids are stored as UTF-8") from None


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _arrow_batch(array: pa.Array) -> _IdBatch:
    """A pyarrow string / large_string array without nulls -> :class:`_IdBatch` (one copy of its bytes)."""
    offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], offset_type, count=len(array) + 1,
                            offset=array.offset * np.dtype(offset_type).itemsize).astype(np.int64)
    data = array.buffers()[2]
    buffer = np.zeros(int(offsets[-1] - offsets[0]) + _ID_PADDING, np.uint8)
    if data is not None:
        buffer[: len(buffer) - _ID_PADDING] = np.frombuffer(data, np.uint8)[offsets[0]: offsets[-1]]
    return _IdBatch(buffer, offsets[:-1] - offsets[0], np.diff(offsets))


def _fixed_width_batch(ids: np.ndarray, what: str) -> _IdBatch:
    """numpy 'U' (str) or 'S' (UTF-8 bytes) array -> :class:`_IdBatch`, row i of a zero-padded matrix.

    ASCII 'U' arrays are narrowed to bytes in bulk; other 'U' arrays go through the str path."""
    ids = np.ascontiguousarray(ids)
    width = ids.dtype.itemsize // (4 if ids.dtype.kind == "U" else 1)
    if width == 0:  # dtype 'U0'/'S0': every id is ""
        return _IdBatch(np.zeros(_ID_PADDING, np.uint8), np.zeros(len(ids), np.int64), np.zeros(len(ids), np.int64))
    if ids.dtype.kind == "U":
        codes = ids.view(np.uint32).reshape(len(ids), width)
        if len(ids) and width and int(codes.max()) >= 128:
            return _id_batch(ids.tolist(), what)
    else:
        codes = ids.view(np.uint8).reshape(len(ids), width)
        if len(ids) and width and int(codes.max()) >= 128:
            _decode_utf8_array(ids, what)  # ValueError for bytes that are no UTF-8 str
    stride = -(-max(width, 1) // 8) * 8
    buffer = np.zeros(len(ids) * stride + _ID_PADDING, np.uint8)
    buffer[: len(ids) * stride].reshape(len(ids), stride)[:, :width] = codes
    return _IdBatch(buffer, np.arange(len(ids), dtype=np.int64) * stride, np.char.str_len(ids).astype(np.int64))


@functools.lru_cache(maxsize=64)
def _hash_seed(hash_key: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(hash_key.encode("utf-8"), digest_size=8).digest(), "little"))


def _hash_batch(batch: _IdBatch, hash_key: str) -> np.ndarray:
    """(N,) ids -> (N,) uint64 ``HASH_ALGORITHM`` values under ``hash_key``, in ~15 numpy operations.

    Per id: ``h = len * K ^ seed``; for each 8-byte word w (at least 2, zero-padded):
    ``h ^= w; h *= K; h ^= h >> 32``. Each step is a bijection of uint64 (K is odd), so two ids
    of one length that differ in a single word never collide, and the multiply carries every
    input bit into the top bits the bucket directory reads."""
    h = batch.lengths.astype(np.uint64)
    h *= _HASH_MULTIPLIER
    h ^= _hash_seed(hash_key)
    for _, rows, _, words in batch.word_columns:
        if isinstance(rows, slice):
            h ^= words
            h *= _HASH_MULTIPLIER
            h ^= h >> _SHIFT_32
        else:
            part = h[rows] ^ words
            part *= _HASH_MULTIPLIER
            part ^= part >> _SHIFT_32
            h[rows] = part
    return h


def _hash_ids(ids: np.ndarray | pa.Array, hash_key: str) -> np.ndarray:
    """(N,) str ids (object array or pyarrow string array) -> (N,) uint64 ``HASH_ALGORITHM``
    values, hashed in chunks so temporaries stay bounded."""
    chunk = 1 << 20
    return np.concatenate([np.empty(0, np.uint64)] + [_hash_batch(_id_batch(ids[start:start + chunk]), hash_key)
                                                      for start in range(0, len(ids), chunk)])


def _legacy_hash_ids(ids: np.ndarray, hash_key: str) -> np.ndarray:
    """Format-1 hash (``LEGACY_HASH_ALGORITHM``): (N,) object array of str -> (N,) uint64 under ``hash_key``."""
    if len(ids) == 0:
        return np.empty(0, np.uint64)
    return pd.util.hash_array(ids, encoding="utf8", hash_key=hash_key, categorize=False)


def _salt(attempt: int) -> str:
    return f"mimcenter{attempt:07d}"  # 16 bytes (format 1's pandas SipHash needed exactly 16)


def validated_catalogue_ids(item_ids: Any) -> np.ndarray:
    """The ids of a catalogue to write, as an (N,) object array of str; ``TypeError`` for non-str
    ids, ``ValueError`` for no ids, an empty id or duplicates."""
    ids = _as_id_array(item_ids)
    if len(ids) == 0:
        raise ValueError("cannot build a representation center from 0 items")
    _check_new_ids(ids, "item_ids")
    return ids


def _check_new_ids(ids: np.ndarray, what: str) -> None:
    """ValueError unless the (N,) str ids can be stored: UTF-8 encodable, non-empty, unique."""
    if (_id_batch(ids, what).lengths == 0).any():  # _id_batch names an id with no UTF-8 form
        raise ValueError(f"{what} contains an empty string; ids must be non-empty")
    _check_unique(ids, what)


def _check_unique(ids: np.ndarray, what: str) -> None:
    duplicated = pd.Index(ids, dtype=object).duplicated()
    if duplicated.any():
        dupes = list(dict.fromkeys(ids[duplicated]))[:5]
        raise ValueError(f"{what} holds {int(duplicated.sum())} duplicate id(s), e.g. {dupes}; ids must be unique")


def _encode_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) str ids -> (UTF-8 bytes blob uint8 (B,), offsets int64 (N+1,))."""
    encoded = pa.array(ids, type=pa.large_string())
    offsets = np.frombuffer(encoded.buffers()[1], np.int64, count=len(ids) + 1, offset=encoded.offset * 8)
    blob = np.frombuffer(encoded.buffers()[2], np.uint8)[offsets[0]: offsets[-1]]
    return blob, offsets - offsets[0]


def _sorted_hash_table(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) uint64 hashes of rows 0..N-1 -> (sorted hashes, row of each)."""
    rows = np.argsort(hashes, kind="stable").astype(np.int64)
    return hashes[rows], rows


def _bucket_directory(sorted_hashes: np.ndarray) -> np.ndarray:
    """(N,) sorted uint64 hashes -> (2**bits + 1,) start offset of each top-``bits`` bucket.

    ``bits`` = ceil(log2 N) + 1 gives 0.25-0.5 hash per bucket, so ~4 in 5 ids are found at their
    bucket's first entry; int32 (while N < 2**31) keeps that at 4-8 bytes per item. Format 1
    wrote int64 with 3 fewer bits; the reader takes ``bits`` from the length."""
    bits = max(1, math.ceil(math.log2(max(len(sorted_hashes), 2))) + 1)
    buckets = (sorted_hashes >> np.uint64(64 - bits)).astype(np.int64)
    directory = np.zeros(2**bits + 1, np.int32 if len(sorted_hashes) < 2**31 else np.int64)
    np.cumsum(np.bincount(buckets, minlength=2**bits), out=directory[1:])
    return directory


def _has_collision(sorted_hashes: np.ndarray) -> bool:
    return bool(len(sorted_hashes) > 1 and (sorted_hashes[1:] == sorted_hashes[:-1]).any())


# ------------------------------------------------------------------------------------------
# The center
# ------------------------------------------------------------------------------------------
def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _to_numpy_embeddings(name: str, embeddings: Any) -> np.ndarray:
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


def _rows_normalized(arrays: Mapping[str, np.ndarray]) -> bool:
    """True if every row of every level is L2-normalised or all-zero (a missing modality,
    e.g. ``image_embeds`` of an item without image), within float16 precision."""
    for array in arrays.values():
        for start in range(0, len(array), _CHECK_CHUNK_ROWS):  # chunked: no float32 copy of a huge table
            norms = np.linalg.norm(array[start:start + _CHECK_CHUNK_ROWS].astype(np.float32), axis=1)
            if not bool(((np.abs(norms - 1.0) <= 1e-2) | (norms == 0)).all()):
                return False
    return True


# The compiled look-up (mim_hf/center/numba_lookup.py, the ``fast`` extra) is used when numba imports;
# MIM_HF_NO_NUMBA=1 or ``mim_hf.center.USE_NUMBA = False`` selects the numpy path (same results).
def _numba_wanted(no_numba: str | None) -> bool:
    """False when the MIM_HF_NO_NUMBA value asks for the numpy path ("1", "true", "yes")."""
    return (no_numba or "").strip().lower() in ("", "0", "false", "no")


USE_NUMBA = _numba_wanted(os.environ.get("MIM_HF_NO_NUMBA"))
_NUMBA_KERNELS: list = []  # [module or None] once the import was tried


def _numba_kernels():
    """``mim_hf.center.numba_lookup`` when ``USE_NUMBA`` and numba imports, else None. Imported at the first
    look-up, not at open (importing numba takes ~0.5 s; its functions compile at their first call)."""
    if not USE_NUMBA:
        return None
    if not _NUMBA_KERNELS:
        try:
            from mim_hf.center import numba_lookup as center_numba
        except ImportError as err:
            logger.info("numba is not available (%s); center look-ups use the numpy path "
                        "(pip install 'mim-hf[fast]' for the compiled one)", err)
            center_numba = None
        _NUMBA_KERNELS.append(center_numba)
    return _NUMBA_KERNELS[0]


def lookup_backend() -> str:
    """``"numba"`` or ``"numpy"``: the path format-2 look-ups take now (see ``USE_NUMBA``)."""
    return "numba" if _numba_kernels() is not None else "numpy"


_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}  # storage dtypes
_MIN_IDS_PER_THREAD = 1024  # smaller parts cost more in thread hand-off (~30 us) than they save
_POOL: list = []  # [(pid, workers, ThreadPoolExecutor)]: the compiled look-up's helper threads, made at first use


def _helper_pool(workers: int):
    """A thread pool of ``workers`` threads owned by this process (a forked child, e.g. a DataLoader
    worker, gets a fresh one: the parent's threads do not exist there)."""
    from concurrent.futures import ThreadPoolExecutor

    if not _POOL or _POOL[0][:2] != (os.getpid(), workers):
        _POOL[:] = [(os.getpid(), workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mim-hf-center"))]
    return _POOL[0][2]


def _run_in_parts(kernels, kernel, buffer: np.ndarray, n_text: int, per_id: tuple, index: tuple, extra: tuple) -> int:
    """``kernel(buffer, n_text, starts, lengths, *index, rows, *extra[, out])`` over the batch, split
    into ``torch.get_num_threads()`` parts (at most one per ``_MIN_IDS_PER_THREAD`` ids) run at
    once: the kernels release the GIL, and each id's result depends on that id alone.

    ``per_id``: (starts, lengths, rows[, out]), sliced per part; joined ids (``n_text`` >= 0) are
    split first when there is more than one part. Returns the sum of the parts' unknown counts,
    or the first part's negative status."""
    starts, lengths, rows, *out = per_id
    n_ids = len(starts)
    parts = min(torch.get_num_threads(), n_ids // _MIN_IDS_PER_THREAD)
    if parts <= 1:
        return kernel(buffer, n_text, starts, lengths, *index, rows, *extra, *out)
    if n_text >= 0:
        if kernels.split_joined(buffer, n_text, starts, lengths) != n_ids:
            return kernels.SEPARATOR_IN_ID

    def run(a: int, b: int) -> int:
        return kernel(buffer, -1, starts[a:b], lengths[a:b], *index, rows[a:b], *extra, *(o[a:b] for o in out))

    bounds = [n_ids * p // parts for p in range(parts + 1)]
    pending = [_helper_pool(parts - 1).submit(run, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
    statuses = [run(bounds[0], bounds[1])] + [future.result() for future in pending]
    failed = [status for status in statuses if status < 0]
    return failed[0] if failed else sum(statuses)


_ID_BOUNDS = np.dtype([("start", "<i8"), ("stop", "<i8")])
_MAX_BUCKET_WINDOW = 64  # widest bucket scanned by window; wider ones only come from a damaged file


class RepresentationCenter:
    """A memory-mapped item_id -> content-embedding store (see the module docstring for layout).

    Open with :meth:`load`, create with :meth:`build` (or :func:`build_center` from an
    encoder). ``stats`` counts look-ups: ``{"lookups", "unknown_lookups"}`` (ids requested /
    ids that were not in the center and got a zero row).
    """

    def __init__(self, root: Path, version_dir: Path, versioned: bool, trusted_dir: Path | None = None):
        """Use :meth:`load`; this opens the version in ``version_dir`` (memory-mapped).

        Every file read must resolve (symlinks followed) inside ``trusted_dir`` (default
        ``root``; for a Hub snapshot the repo's cache folder, whose snapshot files link to its
        blobs), so a tampered center cannot make mim-hf read files elsewhere."""
        self.root = Path(root)
        self.version_dir = Path(version_dir)
        self.versioned = versioned
        self._trusted_dir = Path(trusted_dir) if trusted_dir is not None else self.root
        self.stats = {"lookups": 0, "unknown_lookups": 0}
        self._open()

    def _file(self, name: str) -> Path:
        """``version_dir / name``, refused (``ValueError``) if it resolves outside the center."""
        return resolve_inside(self._trusted_dir, self.version_dir / name, "the center directory")

    # ---- opening ------------------------------------------------------------------------
    def _open(self) -> None:
        metadata_path = self.version_dir / METADATA_FILE
        if not metadata_path.is_file():
            raise ValueError(f"{metadata_path}: missing file (a representation center needs it)")
        resolved = self._file(METADATA_FILE)
        try:
            metadata = json.loads(resolved.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{metadata_path}: not valid JSON ({err})") from None
        _check_metadata(metadata, metadata_path)
        num_items, embed_dim = metadata["num_items"], metadata["embed_dim"]
        dtype = metadata["dtype"]

        embeddings_path = self._file(EMBEDDINGS_FILE)
        arrays, _ = _open_safetensors(embeddings_path)
        levels = list(metadata["levels"])
        if DEFAULT_LEVEL not in levels:
            raise ValueError(f"{metadata_path}: levels {levels} lack {DEFAULT_LEVEL!r}")
        for level in levels:
            if level not in arrays:
                raise ValueError(f"{embeddings_path}: no tensor {level!r} (metadata.json lists levels {levels}; "
                                 f"file holds {sorted(arrays)})")
            array = arrays[level]
            if array.shape != (num_items, embed_dim):
                raise ValueError(f"{embeddings_path}: tensor {level!r} has shape {tuple(array.shape)}, "
                                 f"metadata.json says (num_items={num_items}, embed_dim={embed_dim})")
            if array.dtype != np.dtype(_STORAGE_DTYPES[dtype]):
                raise ValueError(f"{embeddings_path}: tensor {level!r} is {array.dtype}, metadata.json says {dtype}")

        index_path = self._file(INDEX_FILE)
        index, _ = _open_safetensors(index_path)
        expected = {"item_id_bytes": 1, "item_id_offsets": num_items + 1,
                    "id_hash_sorted": num_items, "id_hash_rows": num_items, "id_hash_buckets": 3}
        dtypes = {"item_id_bytes": ("uint8",), "item_id_offsets": ("int64",), "id_hash_sorted": ("uint64",),
                  "id_hash_rows": ("int64",), "id_hash_buckets": ("int32", "int64")}
        for name, length in expected.items():
            if name not in index:
                raise ValueError(f"{index_path}: no tensor {name!r}")
            if index[name].dtype.name not in dtypes[name]:
                raise ValueError(f"{index_path}: tensor {name!r} is {index[name].dtype}, expected {dtypes[name]}")
            if index[name].ndim != 1 or (name not in ("item_id_bytes", "id_hash_buckets") and len(index[name]) != length):
                raise ValueError(f"{index_path}: tensor {name!r} has shape {index[name].shape}, expected "
                                 f"({length},) for num_items={num_items}")
        offsets, blob = index["item_id_offsets"], index["item_id_bytes"]
        if num_items and (offsets[0] != 0 or offsets[-1] != len(blob)):
            raise ValueError(f"{index_path}: corrupted id offsets (first {offsets[0]}, last {offsets[-1]}, "
                             f"{len(blob)} id bytes)")
        directory = index["id_hash_buckets"]
        n_buckets = len(directory) - 1
        if n_buckets < 2 or n_buckets & (n_buckets - 1) or directory[0] != 0 or directory[-1] != num_items:
            raise ValueError(f"{index_path}: corrupted id_hash_buckets (length {len(directory)}, "
                             f"ends {directory[0]}..{directory[-1]}, expected 2**bits + 1 entries from 0 to {num_items})")

        self.metadata = metadata
        self._levels = {level: arrays[level] for level in levels}
        # (num_items, row bytes) uint8 views: the compiled gather copies raw rows whatever the dtype
        self._level_bytes = {level: np.ascontiguousarray(array).view(np.uint8) for level, array in self._levels.items()}
        self._level_torch_dtypes = {level: _TORCH_DTYPES[array.dtype.name] for level, array in self._levels.items()}
        self._id_offsets = offsets
        # (start, stop) of id i as one 16-byte record: a look-up reads both with one gather.
        self._id_bounds = np.ndarray((num_items,), dtype=_ID_BOUNDS, buffer=offsets, strides=(8,))
        self._id_bytes = blob
        self._hash_key = metadata["hash_key"]
        self._legacy_hash = metadata["format_version"] == 1
        # Unaligned 8-byte reads anywhere in the stored ids (a tiny blob is padded in RAM).
        word_source = blob if len(blob) >= 8 else np.concatenate([blob, np.zeros(8, np.uint8)])
        self._id_words = np.ndarray((len(word_source) - 7,), dtype="<u8", buffer=word_source, strides=(1,))
        self._sorted_hashes = index["id_hash_sorted"]
        self._sorted_rows = index["id_hash_rows"]
        self._bucket_directory = directory
        self._check_hash_compatibility()
        # the compiled kernels' index arguments, in their order (after the hash check: it may rebuild the table)
        self._kernel_index = (_hash_seed(self._hash_key), np.uint64(65 - len(self._bucket_directory).bit_length()),
                              self._bucket_directory, self._sorted_hashes, self._sorted_rows, self._id_offsets,
                              self._id_bytes)

    def _check_hash_compatibility(self) -> None:
        """Re-hash two stored ids: format 1 tables whose pandas hashes differently are rebuilt in
        RAM; a format 2 table that disagrees with its own ids is corrupted (ValueError)."""
        if self.num_items == 0:
            return
        probe = np.array([0, self.num_items - 1])
        probe_ids = self._id_strings(self._sorted_rows[probe])
        if np.array_equal(self._hash(probe_ids), self._sorted_hashes[probe]):
            return
        if not self._legacy_hash:
            raise ValueError(f"{self.version_dir / INDEX_FILE}: corrupted id index (id_hash_sorted does not match "
                             f"the hashes of the stored ids {probe_ids.to_pylist()})")
        logger.warning("%s: stored id hashes differ from this pandas' hash_array; rebuilding the id table "
                       "in memory (%d ids)", self.version_dir, self.num_items)
        self._sorted_hashes, self._sorted_rows = _sorted_hash_table(self._hash(self._id_strings()))
        self._bucket_directory = _bucket_directory(self._sorted_hashes)
        self.stats["index_rebuilt_in_memory"] = 1

    def _hash(self, item_ids: Any, batch: _IdBatch | None = None) -> np.ndarray:
        """(N,) ids -> (N,) uint64 with this center's hash (format 2, or format 1's SipHash)."""
        batch = batch if batch is not None else _id_batch(item_ids)
        if self._legacy_hash:
            return _legacy_hash_ids(batch.to_str_array(), self._hash_key)
        return _hash_batch(batch, self._hash_key)

    @classmethod
    def load(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None,
             token: str | None = None) -> "RepresentationCenter":
        """Open a center from a local directory (versioned or flat) or a Hub dataset repo.

        A path that is an existing directory is opened locally (``revision`` must be None);
        anything else is taken as a Hub dataset repo id and fetched with
        ``huggingface_hub.snapshot_download(repo_type="dataset", revision=revision)``.
        Opening memory-maps the files: cost and resident memory do not grow with the catalogue.
        """
        local = Path(path_or_repo_id)
        if local.is_dir():
            if revision is not None:
                raise ValueError(f"revision={revision!r} only applies to Hub repos; {local} is a local directory")
            return cls(*cls._resolve_local(local), trusted_dir=local)
        if local.exists():
            raise ValueError(f"{local}: not a directory (a representation center is a directory)")
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(repo_id=str(path_or_repo_id), repo_type="dataset", revision=revision, token=token)
        snapshot = Path(snapshot)
        # Hub cache layout: <repo folder>/snapshots/<sha>/<file> links into <repo folder>/blobs/.
        repo_folder = snapshot.parent.parent if snapshot.parent.name == "snapshots" else snapshot
        return cls(*cls._resolve_local(snapshot), trusted_dir=repo_folder)

    @staticmethod
    def _resolve_local(root: Path) -> tuple[Path, Path, bool]:
        current = root / CURRENT_FILE
        if current.is_file():
            try:
                name = current.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"{current}: not a UTF-8 version name (corrupted)") from None
            if not _VERSION_RE.match(name) or not (root / name).is_dir():
                raise ValueError(f"{current}: names version {name!r}, which is not a version directory in {root}")
            return root, resolve_inside(root, root / name, "the center directory"), True
        if (root / METADATA_FILE).is_file():
            return root, root, False
        raise ValueError(f"{root}: not a representation center (no {CURRENT_FILE} or {METADATA_FILE})")

    # ---- properties ---------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return int(self.metadata["num_items"])

    def __len__(self) -> int:
        return self.num_items

    @property
    def embed_dim(self) -> int:
        return int(self.metadata["embed_dim"])

    @property
    def levels(self) -> list[str]:
        return list(self._levels)

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the encoder that produced these embeddings (see :func:`encoder_fingerprint`)."""
        return self.metadata["encoder_fingerprint"]

    @property
    def version(self) -> str | None:
        """Live version name (``"v0003"``) of a versioned center, None for a flat one."""
        return self.version_dir.name if self.versioned else None

    def __repr__(self) -> str:
        return (f"RepresentationCenter(path={str(self.root)!r}, version={self.version!r}, items={self.num_items}, "
                f"embed_dim={self.embed_dim}, dtype={self.metadata['dtype']}, levels={self.levels})")

    def embeddings(self, level: str = DEFAULT_LEVEL) -> np.ndarray:
        """The read-only memory-mapped (num_items, embed_dim) array of ``level``, row order = index."""
        self._check_level(level)
        return self._levels[level]

    def item_ids(self, rows: Sequence[int] | np.ndarray | None = None) -> list[str]:
        """Ids of ``rows`` (all rows when None; that materialises every id, avoid on huge centers).

        Raises ``ValueError`` for a row outside ``0..num_items-1`` or a corrupted index file."""
        return self._id_strings(rows).to_pylist()

    def _id_strings(self, rows: Sequence[int] | np.ndarray | None = None) -> pa.LargeStringArray:
        """Stored ids of ``rows`` (all when None: a zero-copy view) as a validated Arrow array.

        Only the offsets and bytes of these rows are checked, so reading two ids of a 10M-item
        center stays O(1); corrupted offsets or bytes are a ``ValueError``, never a wild read."""
        offsets, blob, n_items = self._id_offsets, self._id_bytes, self.num_items
        if rows is None:
            starts, ends = offsets[:-1], offsets[1:]
        else:
            rows = np.asarray(rows)
            if rows.ndim != 1 or (len(rows) and rows.dtype.kind not in "iu"):
                raise ValueError(f"rows must be a 1-D sequence of ints, got {rows.dtype} of shape {rows.shape}")
            rows = rows.astype(np.int64)
            if len(rows) and (rows.min() < 0 or rows.max() >= n_items):
                bad = rows[(rows < 0) | (rows >= n_items)][:5].tolist()
                raise ValueError(f"rows {bad} are outside 0..{n_items - 1} ({self.version_dir / INDEX_FILE})")
            starts, ends = offsets[rows], offsets[rows + 1]
        index_path = self.version_dir / INDEX_FILE
        if len(starts) and (starts.min() < 0 or ends.max() > len(blob) or (ends < starts).any()):
            raise ValueError(f"{index_path}: corrupted item_id_offsets (an id outside 0..{len(blob)} or of negative "
                             "length); RepresentationCenter.verify() names the damaged file")
        if rows is None:
            array = pa.LargeStringArray.from_buffers(n_items, pa.py_buffer(offsets), pa.py_buffer(blob))
        else:
            lengths = ends - starts
            new_offsets = np.zeros(len(rows) + 1, np.int64)
            np.cumsum(lengths, out=new_offsets[1:])
            positions = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
            array = pa.LargeStringArray.from_buffers(len(rows), pa.py_buffer(new_offsets),
                                                     pa.py_buffer(np.ascontiguousarray(blob[positions])))
        try:
            array.validate(full=True)
        except pa.ArrowInvalid as err:
            raise ValueError(f"{index_path}: corrupted item ids ({err})") from None
        return array

    def _check_level(self, level: str) -> None:
        if level not in self._levels:
            raise ValueError(f"level {level!r} is not in this center (levels: {self.levels})")

    # ---- look-up ------------------------------------------------------------------------
    def rows_for(self, item_ids: Sequence[str]) -> np.ndarray:
        """(N,) str ids -> (N,) int64 rows, -1 for ids not in the center. Vectorised.

        ``item_ids``: list/tuple of str, numpy ``'U'``/object array of str or ``'S'`` array of
        UTF-8 bytes, pandas Series/Index of str, or pyarrow string array (fastest: read in place).
        Raises ``TypeError`` for non-str ids, ``ValueError`` for a str with no UTF-8 form or a
        corrupted index file."""
        return self._rows(item_ids)[0]

    def _rows(self, item_ids: Any, level: str | None = None,
              pin_memory: bool = False) -> tuple[np.ndarray, int, torch.Tensor | None]:
        """``(rows (N,) int64 with -1 for unknown ids, number of unknown ids, embeds)``.

        ``embeds`` is None unless ``level`` is given and the compiled path ran: then it is the
        (N, embed_dim) tensor of ``level`` in the storage dtype, zero rows for unknown ids,
        gathered by the same compiled call that found the rows (into page-locked memory with
        ``pin_memory``)."""
        kernels = None if self._legacy_hash or self.num_items == 0 else _numba_kernels()
        if kernels is not None:
            return self._rows_compiled(item_ids, kernels, level, pin_memory)
        batch = _id_batch(item_ids)
        if len(batch.starts) == 0 or self.num_items == 0:
            return np.full(len(batch.starts), -1, np.int64), len(batch.starts), None
        try:
            rows = self._verified(batch, self._find_hashes(self._hash(item_ids, batch)))
        except IndexError as err:  # only a corrupted table points outside its arrays
            raise ValueError(f"{self.version_dir / INDEX_FILE}: corrupted id index ({err}); "
                             "RepresentationCenter.verify() names the damaged file") from None
        return rows, int(np.count_nonzero(rows < 0)), None

    def _rows_compiled(self, item_ids: Any, kernels, level: str | None,
                       pin_memory: bool = False) -> tuple[np.ndarray, int, torch.Tensor | None]:
        """The numba path of :meth:`_rows` (format 2, num_items > 0): split (for a list of str), hash,
        probe and verify each id (and gather ``level``'s rows) in one compiled call over the batch's
        UTF-8 bytes."""
        n_text = -1
        if isinstance(item_ids, (list, tuple)) and item_ids:
            # list/tuple of str: one join + encode; the kernel finds the "\x00" separators while hashing
            buffer = np.frombuffer(_joined_utf8(item_ids, "item_ids"), np.uint8)  # read-only: one compiled signature
            n_text = len(buffer)
            starts, lengths = np.empty(len(item_ids), np.int64), np.empty(len(item_ids), np.int64)
        else:
            batch = _id_batch(item_ids)
            buffer, starts, lengths = batch.buffer, batch.starts, batch.lengths
            if buffer.flags.writeable:  # one compiled signature: query bytes are always read-only
                buffer = buffer.view()
                buffer.flags.writeable = False
        n_ids = len(starts)
        if n_ids == 0:
            return np.empty(0, np.int64), 0, None
        rows = np.empty(n_ids, np.int64)
        if level is None:
            kernel, out, extra = kernels.find_rows, (), ()
            embeds = None
        else:  # written straight into a torch-owned buffer: no copy after the kernel
            table_bytes, torch_dtype = self._level_bytes[level], self._level_torch_dtypes[level]
            embeds = torch.empty(n_ids, self.embed_dim, dtype=torch_dtype, pin_memory=pin_memory)
            kernel, out, extra = kernels.lookup_rows, (embeds.numpy().view(np.uint8),), (table_bytes,)
        status = _run_in_parts(kernels, kernel, buffer, n_text, (starts, lengths, rows, *out), self._kernel_index, extra)
        if status == kernels.SEPARATOR_IN_ID:  # an id holds "\x00": the general path finds the ids
            return self._rows_compiled(np.array(item_ids, dtype=object), kernels, level, pin_memory)
        if status < 0:
            raise ValueError(f"{self.version_dir / INDEX_FILE}: corrupted id index "
                             f"({kernels.STATUS_MESSAGES[status]}); RepresentationCenter.verify() names the "
                             "damaged file")
        return rows, int(status), embeds

    def _find_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """(Q,) uint64 -> (Q,) int64 row of the stored entry with that hash, -1 where none has it."""
        directory, table, n_items = self._bucket_directory, self._sorted_hashes, self.num_items
        bucket = (hashes >> np.uint64(65 - len(directory).bit_length())).astype(np.int64)  # top log2(len - 1) bits
        position = directory[bucket]
        probe = np.minimum(position, n_items - 1)  # an empty last bucket starts at n_items
        stored = table[probe]
        # An empty bucket's start holds the next bucket's first hash, never equal to this one.
        rows = np.where(stored == hashes, self._sorted_rows[probe], -1)
        # The rest of a bucket (sorted): only where the first entry is below the wanted hash.
        rest = np.flatnonzero(stored < hashes)
        if len(rest) == 0:
            return rows
        first = position[rest] + 1
        size = np.minimum(directory[bucket[rest] + 1], n_items) - first
        wide = size > _MAX_BUCKET_WINDOW  # never in a sound table (buckets hold ~0.5 hashes)
        if wide.any():  # a damaged directory: binary-search the whole (sorted) table instead
            at = np.minimum(np.searchsorted(table, hashes[rest[wide]]), n_items - 1)
            rows[rest[wide]] = np.where(table[at] == hashes[rest[wide]], self._sorted_rows[at], -1)
        more = (size > 0) & ~wide  # size 0: the bucket held just the probed entry
        rest, first, size = rest[more], first[more], size[more]
        if len(rest):
            window = np.arange(int(size.max()))
            positions = np.minimum(first[:, None] + window, n_items - 1)
            match = (table[positions] == hashes[rest, None]) & (window < size[:, None])
            column = match.argmax(axis=1)
            found = match[np.arange(len(rest)), column]
            rows[rest[found]] = self._sorted_rows[positions[np.flatnonzero(found), column[found]]]
        return rows

    def _verified(self, batch: _IdBatch, rows: np.ndarray) -> np.ndarray:
        """``rows`` with -1 wherever the stored id differs from the query id (a hash collision)."""
        found = rows >= 0
        all_found = bool(found.all())
        candidates = rows if all_found else np.where(found, rows, 0)
        bounds = self._id_bounds[candidates]  # offsets[row] and offsets[row + 1] in one gather
        start = bounds["start"]
        same = (bounds["stop"] - start) == batch.lengths
        last_word = len(self._id_words) - 1
        max_start = int(start.max(initial=0))
        for j, columns, mask, query_words in batch.word_columns:
            position = start[columns] + 8 * j if j else start[columns]
            if max_start + 8 * j <= last_word:
                stored = self._id_words[position]
            else:  # ids ending in the blob's last 8 bytes: read the last word, shift the id's bytes down
                clamped = np.minimum(position, last_word)
                stored = self._id_words[clamped] >> ((position - clamped) * 8).astype(np.uint64)
            same[columns] &= (stored & mask) == query_words
        if not all_found:
            same &= found
        return np.where(same, rows, -1)

    def lookup(self, item_ids: Sequence[str], level: str = DEFAULT_LEVEL, dtype: torch.dtype = torch.float32,
               pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of a batch of item ids.

        ``item_ids``: (N,) str ids (see :meth:`rows_for` for the accepted containers). Returns
        ``(embeds (N, embed_dim) in ``dtype``, found_mask BoolTensor (N,))``; ids not in the
        center get a zero row and ``found_mask`` False, and are counted in
        ``stats["unknown_lookups"]``. Raises ``TypeError`` for non-str ids.
        With numba installed (``pip install 'mim-hf[fast]'``) ids are found and rows gathered by
        compiled loops (:mod:`mim_hf.center.numba_lookup`), else by numpy; the results are identical.
        ``pin_memory=True`` returns ``embeds`` in page-locked memory (needs CUDA), ready for
        ``.to("cuda", non_blocking=True)``; the compiled path then gathers straight into it when
        ``dtype`` is the storage dtype.
        """
        self._check_level(level)
        pin = pin_memory and self._level_torch_dtypes[level] == dtype  # else pinned after the dtype conversion
        rows, unknown, embeds = self._rows(item_ids, level, pin)
        self.stats["lookups"] += len(rows)
        self.stats["unknown_lookups"] += unknown
        found = rows >= 0
        if self.num_items == 0:
            return torch.zeros(len(rows), self.embed_dim, dtype=dtype), torch.from_numpy(found)
        if embeds is None:  # numpy path (or an empty batch)
            table = self._levels[level]
            gathered = np.take(table, rows if not unknown else np.where(found, rows, 0), axis=0)
            if unknown:
                gathered[~found] = 0
            embeds = torch.from_numpy(gathered)
        if embeds.dtype != dtype:
            embeds = embeds.to(dtype)
        if pin_memory and not embeds.is_pinned():
            embeds = embeds.pin_memory()
        return embeds, torch.from_numpy(found)

    # ---- nearest neighbours -------------------------------------------------------------
    def nearest(self, queries: Sequence[str] | torch.Tensor, k: int = 10, level: str = DEFAULT_LEVEL,
                chunk_size: int = 65536, exclude_self: bool = True) -> tuple[torch.Tensor, list[list[str]]]:
        """Top-``k`` items by cosine similarity, scanning the catalogue in chunks.

        ``queries``: (Q,) str item ids (all must be in the center) or a (Q, embed_dim) / (embed_dim,)
        float tensor. With ids and ``exclude_self`` the query item itself is never returned.
        Memory is O(Q * (k + chunk_size)) whatever the catalogue size. ``k`` is capped at the
        number of candidates. Returns ``(scores (Q, k) float32, ids list of Q lists of k str)``,
        best first.
        """
        self._check_level(level)
        for name, value in (("k", k), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        query_rows = None
        if isinstance(queries, torch.Tensor):
            if not (queries.is_floating_point() or queries.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"query vectors must be a float tensor, got {queries.dtype}")
            query_vectors = queries.detach().float().cpu()
            if query_vectors.ndim == 1:
                query_vectors = query_vectors[None]
            if query_vectors.ndim != 2 or query_vectors.shape[1] != self.embed_dim:
                raise ValueError(f"query vectors must be (Q, {self.embed_dim}), got {tuple(queries.shape)}")
            if not bool(torch.isfinite(query_vectors).all()):
                raise ValueError("query vectors hold NaN/inf; nearest() needs finite vectors")
        else:
            query_rows = self.rows_for(queries)
            if (query_rows < 0).any():
                unknown = [q for q, r in zip(_as_id_array(queries), query_rows) if r < 0][:5]
                raise ValueError(f"nearest(): query ids {unknown} are not in the center ({self.num_items} items)")
            query_vectors = torch.from_numpy(np.take(self._levels[level], query_rows, axis=0)).float()
        query_vectors = torch.nn.functional.normalize(query_vectors, dim=-1)
        n_queries = len(query_vectors)
        candidates = self.num_items - (1 if query_rows is not None and exclude_self else 0)
        k = min(k, candidates)
        if k < 1:
            raise ValueError(f"nearest(): no candidates left (center holds {self.num_items} item(s))")
        best_scores = torch.full((n_queries, 0), -math.inf)
        best_rows = torch.zeros((n_queries, 0), dtype=torch.long)
        table = self._levels[level]
        for start in range(0, self.num_items, chunk_size):
            stop = min(start + chunk_size, self.num_items)
            chunk = torch.nn.functional.normalize(torch.from_numpy(np.array(table[start:stop])).float(), dim=-1)
            scores = query_vectors @ chunk.T  # (Q, chunk)
            if query_rows is not None and exclude_self:
                own = torch.from_numpy(query_rows)
                inside = (own >= start) & (own < stop)
                scores[inside.nonzero().squeeze(1), own[inside] - start] = -math.inf
            rows = torch.arange(start, stop).expand(n_queries, -1)
            merged_scores = torch.cat([best_scores, scores], dim=1)
            merged_rows = torch.cat([best_rows, rows], dim=1)
            top = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_scores, best_rows = top.values, merged_rows.gather(1, top.indices)
        flat_ids = self.item_ids(best_rows.reshape(-1).numpy())
        return best_scores, [flat_ids[i * k:(i + 1) * k] for i in range(n_queries)]

    # ---- compatibility ------------------------------------------------------------------
    def check_fingerprint(self, expected_fingerprint: str, expected_dim: int | None = None) -> None:
        """Raise ``ValueError`` unless this center came from the encoder a model was trained with.

        ``expected_fingerprint`` / ``expected_dim``: what the CTR model recorded at training time.
        """
        problems = []
        if expected_fingerprint != self.fingerprint:
            problems.append(f"encoder fingerprint: model expects {expected_fingerprint!r}, "
                            f"center has {self.fingerprint!r}")
        if expected_dim is not None and int(expected_dim) != self.embed_dim:
            problems.append(f"embed_dim: model expects {int(expected_dim)}, center has {self.embed_dim}")
        if problems:
            raise ValueError(f"representation center {self.version_dir} does not match the model ("
                             + "; ".join(problems) + "); rebuild the center with the model's encoder or retrain")

    def verify(self) -> None:
        """Re-hash every file against the checksums in metadata.json (reads everything).

        Raises ``ValueError`` naming the file whose bytes changed (silent corruption)."""
        for name, expected in self.metadata.get("files", {}).items():  # names checked at open: center files only
            digest = hashlib.sha256()
            with open(self._file(name), "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
            if digest.hexdigest() != expected["sha256"]:
                raise ValueError(f"{self.version_dir / name}: corrupted (sha256 {digest.hexdigest()[:16]}... "
                                 f"!= {expected['sha256'][:16]}... recorded in metadata.json)")

    # ---- writing ------------------------------------------------------------------------
    @classmethod
    def build(cls, item_ids: Sequence[str], embeddings: Mapping[str, torch.Tensor | np.ndarray],
              path: str | os.PathLike, *, encoder_name: str, encoder_fingerprint: str,
              encoder_revision: str | None = None, dtype: str = "float16", normalized: bool | None = None,
              overwrite: bool = False, keep_versions: int = 2,
              extra_metadata: Mapping[str, Any] | None = None) -> "RepresentationCenter":
        """Write a new center (or, with ``overwrite``, a new version of an existing one).

        ``item_ids``: (N,) unique str ids. ``embeddings``: level name -> (N, D) float tensor; must
        contain ``"item_embeds"``; all levels share D. ``dtype``: storage dtype, "float16" or
        "float32". ``normalized``: whether rows are L2-normalised (detected when None).
        Raises ``ValueError`` for duplicate ids, NaN/inf (also after the cast to ``dtype``),
        mismatched shapes, or an existing center at ``path`` without ``overwrite``.
        Returns the opened center.
        """
        ids = validated_catalogue_ids(item_ids)
        arrays = cls._validated_embeddings(ids, embeddings, dtype, expected_levels=None, expected_dim=None)
        if normalized is None:
            normalized = _rows_normalized(arrays)
        root = Path(path)
        cls.check_destination(root, overwrite)
        hash_key, sorted_hashes, sorted_rows = cls._hash_table_for(ids)  # first: names an id with no UTF-8 form
        blob, offsets = _encode_ids(ids)
        metadata = {
            "format_version": FORMAT_VERSION,
            "encoder_name": encoder_name,
            "encoder_revision": encoder_revision,
            "encoder_fingerprint": encoder_fingerprint,
            "embed_dim": int(next(iter(arrays.values())).shape[1]),
            "dtype": dtype,
            "normalized": bool(normalized),
            "num_items": len(ids),
            "levels": list(arrays),
            "created_at": _utc_now(),
            "updated_at": _utc_now(),
            "hash_key": hash_key,
            **dict(extra_metadata or {}),
        }
        level_specs = [(level, a.dtype, a.shape, [a]) for level, a in arrays.items()]
        index_specs = cls._index_specs(blob, offsets, sorted_hashes, sorted_rows)
        cls._write_version(root, metadata, level_specs, index_specs, keep_versions)
        return cls.load(root)

    @classmethod
    def check_destination(cls, root: str | os.PathLike, overwrite: bool) -> None:
        """Raise ``ValueError`` unless a center can be written at ``root``: missing, empty (hidden
        entries such as a build's staging aside) or, with ``overwrite``, a center."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ValueError(f"{root}: exists and is not a directory")
        if root.is_dir() and any(not entry.name.startswith(".") for entry in root.iterdir()):
            try:
                cls._resolve_local(root)
            except ValueError:
                raise ValueError(f"{root}: exists and is not an empty directory or a representation center") from None
            if not overwrite:
                raise ValueError(f"{root}: a representation center already exists; pass overwrite=True to "
                                 "write a new version, or use upsert() to add items")

    @staticmethod
    def _validated_embeddings(ids: np.ndarray, embeddings: Mapping[str, Any], dtype: str,
                              expected_levels: Sequence[str] | None,
                              expected_dim: int | None) -> dict[str, np.ndarray]:
        """Check levels/shapes/finiteness; return level -> (N, D) numpy in the storage dtype."""
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_STORAGE_DTYPES)}, got {dtype!r}")
        if not isinstance(embeddings, Mapping) or DEFAULT_LEVEL not in embeddings:
            got = sorted(embeddings) if isinstance(embeddings, Mapping) else type(embeddings).__name__
            raise ValueError(f"embeddings must be a dict level -> (N, D) tensor containing {DEFAULT_LEVEL!r}, got {got}")
        if expected_levels is not None and sorted(embeddings) != sorted(expected_levels):
            raise ValueError(f"embeddings levels {sorted(embeddings)} differ from the center's {sorted(expected_levels)}")
        arrays = {}
        # item_embeds first, so the stored order is stable whatever order the caller used.
        for level in [DEFAULT_LEVEL] + sorted(set(embeddings) - {DEFAULT_LEVEL}):
            array = _to_numpy_embeddings(level, embeddings[level])
            dim = expected_dim if expected_dim is not None else (
                arrays[DEFAULT_LEVEL].shape[1] if arrays else (array.shape[1] if array.ndim == 2 else None))
            if array.ndim != 2 or array.shape[0] != len(ids) or array.shape[1] != dim or dim == 0:
                raise ValueError(f"embeddings[{level!r}] has shape {tuple(array.shape)}, expected "
                                 f"({len(ids)} items, {dim if dim else 'D>0'})")
            with np.errstate(over="ignore"):  # overflow to inf is reported just below
                stored = array.astype(_STORAGE_DTYPES[dtype], copy=False)
            finite = np.concatenate([np.isfinite(stored[start:start + _CHECK_CHUNK_ROWS]).all(axis=1)
                                     for start in range(0, len(stored), _CHECK_CHUNK_ROWS)])
            if not finite.all():
                bad = np.flatnonzero(~finite)
                # Finite input that became inf in storage overflowed the float16 range.
                cast_note = f" (overflows {dtype}; store as float32)" if np.isfinite(array[bad[0]]).all() else ""
                raise ValueError(f"embeddings[{level!r}] has NaN/inf in {len(bad)} row(s), e.g. item_id "
                                 f"{ids[bad[0]]!r}{cast_note}")
            arrays[level] = np.ascontiguousarray(stored)
        return arrays

    @staticmethod
    def _hash_table_for(ids: np.ndarray | pa.Array) -> tuple[str, np.ndarray, np.ndarray]:
        """Find a hash key without collisions among ``ids`` (object array of str or pyarrow string
        array); return (key, sorted hashes, rows)."""
        for attempt in range(16):
            key = _salt(attempt)
            sorted_hashes, sorted_rows = _sorted_hash_table(_hash_ids(ids, key))
            if not _has_collision(sorted_hashes):
                return key, sorted_hashes, sorted_rows
        raise RuntimeError("16 hash keys all collided; this cannot happen with distinct ids")

    @staticmethod
    def _index_specs(blob, offsets, sorted_hashes, sorted_rows) -> list:
        """safetensors specs of the id index, by decreasing itemsize so every tensor stays aligned
        (an unaligned one would be copied into RAM at open)."""
        blob_chunks = blob if isinstance(blob, list) else [blob]
        directory = _bucket_directory(sorted_hashes)
        specs = [
            ("item_id_offsets", np.dtype(np.int64), (len(offsets),), [offsets]),
            ("id_hash_sorted", np.dtype(np.uint64), (len(sorted_hashes),), [sorted_hashes]),
            ("id_hash_rows", np.dtype(np.int64), (len(sorted_rows),), [sorted_rows]),
            ("id_hash_buckets", directory.dtype, (len(directory),), [directory]),
            ("item_id_bytes", np.dtype(np.uint8), (sum(len(b) for b in blob_chunks),), blob_chunks),
        ]
        return sorted(specs, key=lambda spec: -spec[1].itemsize)  # stable: the order above within a size

    @classmethod
    def _write_version(cls, root: Path, metadata: dict, level_specs: list, index_specs: list,
                       keep_versions: int) -> Path:
        """Write one version atomically under ``root`` (see module docstring); return its dir."""
        root.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(root):
            existing = sorted(int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name)))
            for stale in root.glob(".tmp-v*"):  # leftovers of a crashed writer; never live
                shutil.rmtree(stale, ignore_errors=True)
            name = f"v{(existing[-1] + 1) if existing else 1:04d}"
            tmp = root / f".tmp-{name}-{os.getpid()}"
            tmp.mkdir()
            try:
                files = {
                    EMBEDDINGS_FILE: _write_safetensors(tmp / EMBEDDINGS_FILE, level_specs, {"format": "pt"}),
                    INDEX_FILE: _write_safetensors(tmp / INDEX_FILE, index_specs,
                                                   {"hash": HASH_ALGORITHM, "hash_key": metadata["hash_key"]}),
                }
                metadata = {**metadata, "version": name, "files": files}
                _write_text_synced(tmp / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
                _write_text_synced(tmp / CARD_FILE, dataset_card(metadata))
                fsync_path(tmp)
                os.rename(tmp, root / name)
                fsync_path(root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            # Publish: the single atomic step. Before it readers see the old version, after it the new.
            _write_text_synced(root / (CURRENT_FILE + ".tmp"), name + "\n")
            os.replace(root / (CURRENT_FILE + ".tmp"), root / CURRENT_FILE)
            fsync_path(root)
            for old in existing[: max(0, len(existing) + 1 - max(keep_versions, 1))]:
                shutil.rmtree(root / f"v{old:04d}", ignore_errors=True)
        return root / name

    def upsert_embeddings(self, item_ids: Sequence[str], embeddings: Mapping[str, torch.Tensor | np.ndarray],
                          encoder_fingerprint: str | None = None, keep_versions: int = 2) -> dict[str, Any]:
        """Add new items and replace existing ones, writing a new version atomically.

        ``item_ids``: (M,) unique str ids; ``embeddings``: level -> (M, D), the same levels as the
        center. Existing rows keep their position (replaced in place); new items are appended.
        ``encoder_fingerprint``: when given, must equal the center's (embeddings from another
        encoder live in another space). Everything else is streamed from the memory-mapped
        current version, so nothing is re-encoded and memory stays O(M + chunk).
        Returns ``{"added", "replaced", "version"}``; ``self`` then reads the new version.
        """
        if not self.versioned:
            raise ValueError(f"{self.root}: a flat (read-only, e.g. Hub snapshot) center cannot be updated; "
                             "copy it into a versioned one with RepresentationCenter.build(..., path) first")
        if encoder_fingerprint is not None and encoder_fingerprint != self.fingerprint:
            raise ValueError(f"upsert: embeddings come from encoder {encoder_fingerprint!r} but the center was "
                             f"built with {self.fingerprint!r}; build a new center instead of mixing spaces")
        ids = _as_id_array(item_ids)
        if len(ids) == 0:
            return {"added": 0, "replaced": 0, "version": self.version}
        _check_new_ids(ids, "upsert item_ids")
        arrays = self._validated_embeddings(ids, embeddings, self.metadata["dtype"],
                                            expected_levels=self.levels, expected_dim=self.embed_dim)
        rows = self.rows_for(ids)
        replace = rows >= 0
        replaced_rows, replaced_src = rows[replace], np.flatnonzero(replace)
        order = np.argsort(replaced_rows)
        replaced_rows, replaced_src = replaced_rows[order], replaced_src[order]
        new_ids = ids[~replace]
        n_old, n_new = self.num_items, len(new_ids)
        row_bytes = self.embed_dim * np.dtype(_STORAGE_DTYPES[self.metadata["dtype"]]).itemsize
        chunk_rows = max(1, _UPSERT_CHUNK_BYTES // row_bytes)

        def level_chunks(level: str) -> Iterator[np.ndarray]:
            old, update = self._levels[level], arrays[level]
            for start in range(0, n_old, chunk_rows):
                stop = min(start + chunk_rows, n_old)
                chunk = np.array(old[start:stop])
                lo, hi = np.searchsorted(replaced_rows, [start, stop])
                chunk[replaced_rows[lo:hi] - start] = update[replaced_src[lo:hi]]
                yield chunk
            yield update[~replace]

        level_specs = [(level, self._levels[level].dtype, (n_old + n_new, self.embed_dim), level_chunks(level))
                       for level in self.levels]
        new_blob, new_offsets = _encode_ids(new_ids)
        offsets = np.concatenate([self._id_offsets, new_offsets[1:] + self._id_offsets[-1]])
        hash_key = self._hash_key
        if not self._legacy_hash:  # hash only the new ids and merge them into the sorted table
            hashes = np.concatenate([self._sorted_hashes, _hash_ids(new_ids, hash_key)])
            hash_rows = np.concatenate([self._sorted_rows, np.arange(n_old, n_old + n_new, dtype=np.int64)])
            order = np.argsort(hashes, kind="stable")
            sorted_hashes, sorted_rows = hashes[order], hash_rows[order]
        if self._legacy_hash or _has_collision(sorted_hashes):  # format 1 (rehash all), or a collision: re-key
            all_ids = pa.concat_arrays([self._id_strings(), pa.array(new_ids, type=pa.large_string())])
            hash_key, sorted_hashes, sorted_rows = self._hash_table_for(all_ids)
        index_specs = self._index_specs([self._id_bytes, new_blob], offsets, sorted_hashes, sorted_rows)
        metadata = {**{k: v for k, v in self.metadata.items() if k not in ("version", "files")},
                    "format_version": FORMAT_VERSION, "num_items": n_old + n_new, "hash_key": hash_key,
                    "updated_at": _utc_now()}
        if metadata["normalized"]:
            metadata["normalized"] = _rows_normalized(arrays)
        self._write_version(self.root, metadata, level_specs, index_specs, keep_versions)
        self._reopen()
        return {"added": n_new, "replaced": int(replace.sum()), "version": self.version}

    def upsert(self, items, encoder: torch.nn.Module, processor, batch_size: int = 64,
               show_progress: bool = True, keep_versions: int = 2) -> dict[str, Any]:
        """Encode ``items`` (a ``datasets.Dataset`` with an ``item_id`` column: new or changed
        items only) with ``encoder``/``processor`` and upsert them (see :meth:`upsert_embeddings`).

        Raises ``ValueError`` if ``encoder`` is not the encoder the center was built with.
        """
        fingerprint = encoder_fingerprint(encoder)
        if fingerprint != self.fingerprint:
            raise ValueError(f"upsert: encoder fingerprint {fingerprint!r} differs from the center's "
                             f"{self.fingerprint!r} ({self.metadata['encoder_name']}); build a new center")
        embeddings = encode_levels(encoder, processor, items, self.levels, batch_size, show_progress)
        return self.upsert_embeddings(items["item_id"], embeddings, keep_versions=keep_versions)

    def _reopen(self) -> None:
        self.root, self.version_dir, self.versioned = self._resolve_local(self.root)
        self._trusted_dir = self.root
        self._open()

    # ---- sharing ------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, revision: str | None = None, private: bool | None = None,
                    commit_message: str | None = None, token: str | None = None) -> str:
        """Upload the live version (flat layout + card) as a Hub *dataset* repo, in one commit.

        ``revision``: branch to push to (created if missing). Files of an earlier push that this
        version no longer has are deleted. Returns the commit URL. The same code path as
        ``mim_hf.hub.push_center`` (which this calls), so there is one card and one file list.
        """
        from mim_hf.common.hub import push_center

        info = push_center(self, repo_id, revision=revision, private=private, token=token,
                           commit_message=commit_message)
        return str(info.commit_url)


_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _check_metadata(metadata: Any, path: Path) -> None:
    """Raise ``ValueError`` naming ``path``, the field and its value unless ``metadata`` is a
    center's metadata.json as :meth:`RepresentationCenter.build` writes it."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    missing = [f for f in REQUIRED_METADATA_FIELDS if f not in metadata]
    if missing:
        raise ValueError(f"{path}: missing required field(s) {missing}")

    def is_int(value, minimum):
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    version = metadata["format_version"]
    if not is_int(version, 0) or version not in READABLE_FORMAT_VERSIONS:
        raise ValueError(f"{path}: format_version {version!r} is not supported "
                         f"(this mim-hf reads {list(READABLE_FORMAT_VERSIONS)})")
    levels = metadata["levels"]
    key = metadata["hash_key"]
    problems = {
        "num_items": (is_int(metadata["num_items"], 0), "an int >= 0"),
        "embed_dim": (is_int(metadata["embed_dim"], 1), "an int >= 1"),
        "dtype": (metadata["dtype"] in _STORAGE_DTYPES, f"one of {sorted(_STORAGE_DTYPES)}"),
        "levels": (isinstance(levels, list) and all(isinstance(lv, str) for lv in levels)
                   and len(set(levels)) == len(levels), "a list of distinct level names"),
        "normalized": (isinstance(metadata["normalized"], bool), "true or false"),
        "encoder_fingerprint": (isinstance(metadata["encoder_fingerprint"], str), "a str"),
        "hash_key": (isinstance(key, str) and (version != 1 or len(key.encode("utf-8")) == 16),
                     "a str (16 bytes in format 1)"),
        "files": (_valid_files_field(metadata.get("files", {})),
                  f"a mapping of {[EMBEDDINGS_FILE, INDEX_FILE]} to {{'bytes': int, 'sha256': 64 hex chars}}"),
    }
    for field, (ok, expected) in problems.items():
        if not ok:
            raise ValueError(f"{path}: field {field!r} is {metadata.get(field)!r}; expected {expected}")


def _valid_files_field(files: Any) -> bool:
    """The checksums entry names only the center's own files (it decides what verify() opens)."""
    return isinstance(files, dict) and all(
        name in (EMBEDDINGS_FILE, INDEX_FILE) and isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str) and bool(_HEX_SHA256.match(entry["sha256"]))
        for name, entry in files.items())


@contextlib.contextmanager
def _exclusive_lock(root: Path):
    """One writer per center at a time (readers never lock)."""
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def dataset_card(metadata: Mapping[str, Any]) -> str:
    """Generate the dataset card (README.md) of a center version from its metadata only."""
    levels = ", ".join(f"`{lv}`" for lv in metadata["levels"])
    rows = [
        ("Items", f"{metadata['num_items']:,}"),
        ("Embedding dim", metadata["embed_dim"]),
        ("Storage dtype", metadata["dtype"]),
        ("L2-normalised", metadata["normalized"]),
        ("Levels", levels),
        ("Encoder", f"`{metadata['encoder_name']}`"),
        ("Encoder revision", f"`{metadata.get('encoder_revision')}`"),
        ("Encoder fingerprint", f"`{metadata['encoder_fingerprint']}`"),
        ("Created", metadata["created_at"]),
        ("Updated", metadata.get("updated_at", metadata["created_at"])),
        ("Format version", metadata["format_version"]),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
tags:
- mim-hf
- representation-center
- embeddings
viewer: false
---

# Representation Center

Frozen content embeddings of a catalogue, one row per item, produced by a
[mim-hf](https://github.com/) content encoder. CTR models look items up here instead of
running the encoder.

| Field | Value |
|---|---|
{table}

## Use

```python
from mim_hf.center.store import RepresentationCenter

center = RepresentationCenter.load("<this repo id>")         # memory-mapped
embeds, found = center.lookup(["item-1", "item-2"])          # (2, {metadata['embed_dim']}) float32, found mask
scores, ids = center.nearest(["item-1"], k=10)               # cosine top-10
center.check_fingerprint(model_fingerprint, {metadata['embed_dim']})  # refuse another encoder
```

## Files

- `{EMBEDDINGS_FILE}`: one `({metadata['num_items']}, {metadata['embed_dim']})` {metadata['dtype']} tensor per level ({levels}).
- `{INDEX_FILE}`: item ids as UTF-8 bytes (`item_id_bytes`) with `item_id_offsets`
  (id *i* = `bytes[off[i]:off[i+1]]`, row *i* of every embedding tensor), and a sorted
  64-bit hash table (`id_hash_sorted`, `id_hash_rows`, bucket starts by top bits
  `id_hash_buckets`; hash `{HASH_ALGORITHM}`, key in metadata).
- `{METADATA_FILE}`: everything in the table above plus file checksums.
"""


def encoder_levels(encoder: torch.nn.Module) -> tuple[str, ...]:
    """Embedding levels an encoder produces: item and text, plus image with a vision tower."""
    has_vision = getattr(encoder, "vision_model", None) is not None
    return ("item_embeds", "text_embeds") + (("image_embeds",) if has_vision else ())


def encode_levels(encoder, processor, items, levels: Sequence[str], batch_size: int = 64,
                  show_progress: bool = True, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Encode ``items`` (``datasets.Dataset`` with an ``item_id`` column) for a center.

    Runs ``mim_hf.encoder.encoding.encode_items`` and keeps only the embedding ``levels``: returns
    level -> (N, embed_dim) float32 tensor, in the items' order (rows of items without an
    image are zero in ``image_embeds``).
    """
    from mim_hf.encoder.encoding import encode_items

    if "item_id" not in items.column_names:
        raise ValueError(f"items must have an 'item_id' column, got columns {items.column_names}")
    embeddings = encode_items(encoder, processor, items, batch_size=batch_size, levels=tuple(levels),
                              show_progress=show_progress, device=device)
    return {level: embeddings[level] for level in levels}


STAGING_DIR = ".build-staging"
STAGING_MANIFEST = "manifest.json"
DEFAULT_CHUNK_SIZE = 8192


class CenterBuildStaging:
    """Encoded chunks of a center build kept on disk, so that a killed build resumes where it stopped.

    Lives in ``<center dir>/.build-staging/``: ``manifest.json`` names what is being built
    (encoder fingerprint, levels, storage dtype, chunk size, item count, sha256 of the item ids)
    and ``chunk-NNNNNN.safetensors`` holds chunk k: rows ``k*chunk_size`` up to
    ``(k+1)*chunk_size`` of every level, already validated and cast to the storage dtype. A chunk
    is written under a temp name, fsynced and renamed, so a kill leaves only whole chunks (and a
    temp file, removed on the next start). ``resume=False`` discards earlier chunks; with
    ``resume=True`` they are kept when the manifest matches, else ``ValueError`` says what differs.
    """

    def __init__(self, path: str | os.PathLike, item_ids: np.ndarray, *, encoder_fingerprint: str,
                 levels: Sequence[str], dtype: str, chunk_size: int = DEFAULT_CHUNK_SIZE, resume: bool = False):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if dtype not in _STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_STORAGE_DTYPES)}, got {dtype!r}")
        self.item_ids, self.levels, self.dtype, self.chunk_size = item_ids, tuple(levels), dtype, chunk_size
        self.dir = Path(path) / STAGING_DIR
        blob, offsets = _encode_ids(item_ids)
        ids_digest = hashlib.sha256(offsets.tobytes() + blob.tobytes()).hexdigest()
        self.manifest = {"encoder_fingerprint": encoder_fingerprint, "levels": list(self.levels), "dtype": dtype,
                         "chunk_size": chunk_size, "num_items": len(item_ids), "item_ids_sha256": ids_digest}
        manifest_path = self.dir / STAGING_MANIFEST
        if resume and manifest_path.is_file():
            try:
                previous = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError):
                previous = None
            if previous != self.manifest:
                differs = sorted(k for k in self.manifest if not isinstance(previous, dict)
                                 or previous.get(k) != self.manifest[k])
                raise ValueError(f"{manifest_path}: the staged chunks belong to another build ({', '.join(differs)} "
                                 "differ); build without resume to start over")
            for stale in self.dir.glob(".chunk-*"):  # half-written by a killed build
                stale.unlink()
            return
        if self.dir.exists():
            logger.info("%s: discarding the chunks of an earlier build (resume=False)", self.dir)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        _write_text_synced(manifest_path, json.dumps(self.manifest, indent=2) + "\n")
        fsync_path(self.dir)

    @property
    def num_chunks(self) -> int:
        return -(-len(self.item_ids) // self.chunk_size)

    def chunk_rows(self, chunk: int) -> range:
        """Catalogue rows of ``chunk``."""
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, len(self.item_ids)))

    def _chunk_path(self, chunk: int) -> Path:
        return self.dir / f"chunk-{chunk:06d}.safetensors"

    def _read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
        """Level -> (rows, D) memory-mapped array of a staged chunk; ValueError if it is not whole."""
        path = self._chunk_path(chunk)
        arrays, _ = _open_safetensors(path)
        rows = len(self.chunk_rows(chunk))
        for level in self.levels:
            array = arrays.get(level)
            if array is None or array.ndim != 2 or array.shape[0] != rows or array.dtype != _STORAGE_DTYPES[self.dtype]:
                raise ValueError(f"{path}: staged chunk lacks a ({rows}, D) {self.dtype} tensor {level!r}")
        return {level: arrays[level] for level in self.levels}

    def missing(self) -> list[int]:
        """Chunks still to encode (a staged chunk that does not read back whole counts as missing)."""
        todo = []
        for chunk in range(self.num_chunks):
            if not self._chunk_path(chunk).exists():
                todo.append(chunk)
                continue
            try:
                self._read_chunk(chunk)
            except ValueError as err:
                logger.warning("re-encoding chunk %d: %s", chunk, err)
                todo.append(chunk)
        return todo

    def write(self, chunk: int, embeddings: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Validate ``embeddings`` (level -> (rows of ``chunk``, D)) and stage them atomically."""
        rows = self.chunk_rows(chunk)
        arrays = RepresentationCenter._validated_embeddings(
            self.item_ids[rows.start:rows.stop], embeddings, self.dtype, expected_levels=self.levels, expected_dim=None)
        temp = self.dir / f".chunk-{chunk:06d}-{os.getpid()}.tmp"
        _write_safetensors(temp, [(level, arrays[level].dtype, arrays[level].shape, [arrays[level]])
                                  for level in self.levels])
        _stage_chunk(temp, self._chunk_path(chunk))

    def read(self) -> dict[str, np.ndarray]:
        """Level -> (N, D) storage-dtype array of the whole catalogue; ValueError if a chunk is missing."""
        missing = self.missing()
        if missing:
            raise ValueError(f"{self.dir}: chunks {missing[:10]} are not staged yet")
        chunks = [self._read_chunk(chunk) for chunk in range(self.num_chunks)]
        return {level: np.concatenate([chunk[level] for chunk in chunks]) for level in self.levels}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _stage_chunk(temp: Path, final: Path) -> None:
    """Publish a fully written chunk (a separate function so tests can kill the process here)."""
    os.replace(temp, final)
    fsync_path(final.parent)


def build_center(encoder: torch.nn.Module, processor, items, path: str | os.PathLike, batch_size: int = 64,
                 dtype: str = "float16", levels: Sequence[str] | None = None, encoder_name: str | None = None,
                 encoder_revision: str | None = None, show_progress: bool = True,
                 overwrite: bool = False, resume: bool = False,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> RepresentationCenter:
    """Encode every item of ``items`` and write a center at ``path``.

    ``items``: ``datasets.Dataset`` with an ``item_id`` str column plus the content columns
    ``processor`` reads (title, attributes, image). ``levels``: which embeddings to store
    (default :func:`encoder_levels`: item + text, + image with a vision tower); rows of items
    without an image are zero in ``image_embeds``. Encoding is ``mim_hf.encoder.encoding.encode_items``
    (batched, length-sorted, original order restored), ``chunk_size`` items at a time; each
    finished chunk is staged on disk (:class:`CenterBuildStaging`) and ``resume=True`` skips the
    chunks a killed build already staged (same encoder, items, levels, dtype, chunk size), so
    the result equals an uninterrupted build exactly. ``encoder_name`` defaults to the encoder's
    ``name_or_path``. Returns the opened :class:`RepresentationCenter`.
    """
    from tqdm.auto import tqdm

    levels = tuple(levels) if levels is not None else encoder_levels(encoder)
    if "item_id" not in items.column_names:
        raise ValueError(f"items must have an 'item_id' column, got columns {items.column_names}")
    RepresentationCenter.check_destination(path, overwrite)  # before the encoding, not after
    item_ids = validated_catalogue_ids(items["item_id"])
    fingerprint = encoder_fingerprint(encoder)
    staging = CenterBuildStaging(path, item_ids, encoder_fingerprint=fingerprint, levels=levels, dtype=dtype,
                                 chunk_size=chunk_size, resume=resume)
    todo = staging.missing()
    for chunk in tqdm(todo, desc="encoding chunks", unit="chunk", disable=not show_progress or len(todo) < 2):
        rows = staging.chunk_rows(chunk)
        staging.write(chunk, encode_levels(encoder, processor, items.select(rows), levels, batch_size,
                                           show_progress=show_progress and len(todo) == 1))
    config = getattr(encoder, "config", None)
    center = RepresentationCenter.build(
        item_ids, staging.read(), path, encoder_name=encoder_name or _encoder_name(encoder),
        encoder_fingerprint=fingerprint, encoder_revision=encoder_revision or getattr(config, "_commit_hash", None),
        dtype=dtype, overwrite=overwrite)
    staging.remove()
    return center


def _encoder_name(encoder: torch.nn.Module) -> str:
    name = getattr(encoder, "name_or_path", None) or getattr(getattr(encoder, "config", None), "_name_or_path", None)
    return str(name) if name else type(encoder).__name__
