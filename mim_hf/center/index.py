"""Item ids of a center: validation, the 64-bit id hash and the sorted-hash index.

The index (``item_index.safetensors``) stores the ids as one UTF-8 buffer plus offsets, and the
ids' hashes sorted (``id_hash_sorted``) with the row of each (``id_hash_rows``). A look-up hashes
the batch of query ids with whole-batch numpy arithmetic, finds each hash with
``numpy.searchsorted`` and compares the stored id bytes with the query (one pyarrow comparison),
so a hash collision can never return another item's row. ``build`` picks a hash key under which
the catalogue's hashes are distinct (re-keying on the rare collision).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

HASH_ALGORITHM = ("mimhash64(utf8 as 8-byte LE words, at least 2, zero-padded; h=len*K^seed; per word h^=w, h*=K, "
                  "h^=h>>32; K=0x9E3779B97F4A7C15, seed=blake2b-64(hash_key))")
_K = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplying is a bijection of uint64
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)  # mask of k bytes
_PADDING = 16  # zero bytes after the last id, so every 8-byte read stays in bounds
_HASH_CHUNK = 1 << 20  # ids hashed per step when hashing a whole catalogue


# ---- validation ----------------------------------------------------------------------------
def as_id_array(item_ids: Any, what: str = "item_ids") -> np.ndarray:
    """Validate ``item_ids`` (a sequence of str) and return them as a 1-D object array.

    ``TypeError`` for anything that is not a sequence of strings (ints, floats, None, bytes):
    raw ids are strings everywhere in mim-hf, and silently str()-ing an int would confuse a
    vocabulary index with a raw id. A numpy ``'S'`` array is taken as UTF-8 bytes of str ids."""
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
        try:
            item_ids = np.char.decode(item_ids, "utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} holds bytes that are not valid UTF-8 (a bytes array holds UTF-8 encoded "
                             "str ids)") from None
    elif not isinstance(item_ids, np.ndarray) and not hasattr(item_ids, "__iter__"):
        raise TypeError(f"{what} must be a sequence of str ids, got {type(item_ids).__name__}")
    ids = np.asarray(item_ids if isinstance(item_ids, np.ndarray) else list(item_ids), dtype=object)
    if ids.ndim != 1:
        raise TypeError(f"{what} must be a 1-D sequence of str ids, got shape {ids.shape}")
    if len(ids) and pd.api.types.infer_dtype(ids, skipna=False) != "string":
        bad = next(i for i, v in enumerate(ids) if not isinstance(v, str))
        raise TypeError(f"{what} must all be str (raw item ids), but element {bad} is {ids[bad]!r} of type "
                        f"{type(ids[bad]).__name__}; convert raw ids with str() if they are not vocabulary indices")
    return ids


def id_array(item_ids: Any, what: str = "item_ids") -> pa.LargeStringArray:
    """Validated ids as one pyarrow large_string array (a pyarrow or pandas string array is used
    in place; anything else goes through :func:`as_id_array`). ``ValueError`` for a str with no
    UTF-8 form (a lone surrogate)."""
    if isinstance(item_ids, (pa.Array, pa.ChunkedArray)) and (
            pa.types.is_string(item_ids.type) or pa.types.is_large_string(item_ids.type)) and not item_ids.null_count:
        array = item_ids.cast(pa.large_string())
        return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    if isinstance(item_ids, (pd.Series, pd.Index)) and item_ids.dtype != object \
            and pd.api.types.is_string_dtype(item_ids.dtype) and not item_ids.hasnans:
        return pa.array(item_ids, type=pa.large_string())
    if isinstance(item_ids, np.ndarray) and item_ids.dtype.kind == "U" and item_ids.ndim == 1:
        ids = item_ids
    else:
        ids = as_id_array(item_ids, what)
    try:
        return pa.array(ids, type=pa.large_string())
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


def validated_catalogue_ids(item_ids: Any, what: str = "item_ids") -> np.ndarray:
    """The ids of a catalogue to write, as an (N,) object array of str; ``TypeError`` for non-str
    ids, ``ValueError`` for an id with no UTF-8 form, an empty id or duplicates."""
    ids = as_id_array(item_ids, what)
    if len(ids) == 0:
        raise ValueError("cannot build a representation center from 0 items")
    if (pc.binary_length(id_array(ids, what)).to_numpy(zero_copy_only=False) == 0).any():
        raise ValueError(f"{what} contains an empty string; ids must be non-empty")
    duplicated = pd.Index(ids, dtype=object).duplicated()
    if duplicated.any():
        dupes = list(dict.fromkeys(ids[duplicated]))[:5]
        raise ValueError(f"{what} holds {int(duplicated.sum())} duplicate id(s), e.g. {dupes}; ids must be unique")
    return ids


def id_buffers(ids: pa.LargeStringArray) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes uint8 (B,), offsets int64 (N+1,) from 0) of a large_string array (views when possible)."""
    offsets = np.frombuffer(ids.buffers()[1], np.int64, count=len(ids) + 1, offset=ids.offset * 8)
    data = ids.buffers()[2]
    blob = np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.empty(0, np.uint8)
    return blob, offsets - offsets[0]


# ---- hashing -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _seed(hash_key: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(hash_key.encode("utf-8"), digest_size=8).digest(), "little"))


def hash_ids(ids: pa.LargeStringArray, hash_key: str) -> np.ndarray:
    """(N,) ids -> (N,) uint64 ``HASH_ALGORITHM`` values under ``hash_key``.

    Per id: ``h = len * K ^ seed``; for each 8-byte little-endian word w of its UTF-8 bytes (at
    least 2, zero-padded): ``h ^= w; h *= K; h ^= h >> 32``. Each step is a bijection of uint64,
    so two ids of one length that differ in a single word never collide."""
    if len(ids) > _HASH_CHUNK:
        return np.concatenate([hash_ids(ids.slice(start, _HASH_CHUNK), hash_key)
                               for start in range(0, len(ids), _HASH_CHUNK)])
    blob, offsets = id_buffers(ids)
    buffer = np.zeros(len(blob) + _PADDING, np.uint8)
    buffer[:len(blob)] = blob
    words = np.ndarray((len(buffer) - 7,), dtype="<u8", buffer=buffer, strides=(1,))  # an 8-byte read at every byte
    starts, lengths = offsets[:-1], np.diff(offsets)
    n_words = np.maximum((lengths + 7) >> 3, 2)
    h = lengths.astype(np.uint64) * _K ^ _seed(hash_key)
    for j in range(int(n_words.max(initial=0))):
        rows = slice(None) if j < 2 else np.flatnonzero(n_words > j)
        word = words[starts[rows] + 8 * j] & _LOW_BYTES[np.clip(lengths[rows] - 8 * j, 0, 8)]
        part = (h[rows] ^ word) * _K
        h[rows] = part ^ (part >> np.uint64(32))
    return h


def hash_table(ids: pa.LargeStringArray) -> tuple[str, np.ndarray, np.ndarray]:
    """A hash key under which ``ids`` have distinct hashes, with (sorted hashes, row of each)."""
    for attempt in range(16):
        key = f"mimcenter{attempt:07d}"
        hashes = hash_ids(ids, key)
        rows = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[rows]
        if not (sorted_hashes[1:] == sorted_hashes[:-1]).any():
            return key, sorted_hashes, rows.astype(np.int64)
    raise RuntimeError("16 hash keys all collided; this cannot happen with distinct ids")


# ---- look-up -------------------------------------------------------------------------------
def search(sorted_hashes: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in ``sorted_hashes`` of each query hash, whether it is there)."""
    positions = np.minimum(np.searchsorted(sorted_hashes, hashes), len(sorted_hashes) - 1)
    return positions, sorted_hashes[positions] == hashes


def stored_ids(blob: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pa.LargeStringArray:
    """The stored ids ``blob[starts[i]:ends[i]]`` as a large_string array (one gather of their bytes)."""
    lengths = ends - starts
    offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    array = pa.LargeStringArray.from_buffers(len(starts), pa.py_buffer(offsets),
                                             pa.py_buffer(np.ascontiguousarray(blob[positions])))
    array.validate(full=True)  # UTF-8 (the bytes passed their checksum, so this never fails on a sound file)
    return array


def same_ids(stored: pa.LargeStringArray, queries: pa.LargeStringArray) -> np.ndarray:
    """(N,) bool: stored[i] == queries[i], compared byte for byte."""
    return pc.equal(stored, queries).to_numpy(zero_copy_only=False)
