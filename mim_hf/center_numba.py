"""Compiled Representation Center look-up (optional: needs ``numba``, the ``fast`` extra).

One pass per query id does what the numpy path of :mod:`mim_hf.center` does in ~75 whole-batch
operations: hash the id's UTF-8 bytes (format 2's ``HASH_ALGORITHM``, bit for bit), probe the
bucket directory and the sorted hash table, verify the stored id bytes, write the row (or -1).
A second kernel gathers the rows' bytes from the memory-mapped embeddings into a preallocated
output, zero-filling unknown ids. Nothing here changes the on-disk format.

Every read of the (possibly damaged) index is bounds-checked: a kernel returns a negative
status instead of reading outside an array, and the caller turns it into a ``ValueError``.

This module imports numba, so :mod:`mim_hf.center` imports it only at the first look-up;
functions compile on their first call (``cache=True``: later processes load the machine code
from numba's cache; where no cache folder is writable they compile in memory, see
:func:`_jit`).
"""

from __future__ import annotations

import logging

import numba
import numpy as np

logger = logging.getLogger(__name__)

# Statuses of find_rows (>= 0 is the count of unknown ids); numba freezes these globals at compile time.
CORRUPTED_DIRECTORY = -1  # a bucket start outside 0..num_items
CORRUPTED_ROWS = -2  # id_hash_rows names a row outside 0..num_items-1
CORRUPTED_OFFSETS = -3  # an id's bytes lie outside item_id_bytes
STATUS_MESSAGES = {
    CORRUPTED_DIRECTORY: "id_hash_buckets points outside the hash table",
    CORRUPTED_ROWS: "id_hash_rows names a row outside the center",
    CORRUPTED_OFFSETS: "item_id_offsets points outside item_id_bytes",
}
_MAX_BUCKET_WINDOW = 64  # same as mim_hf.center: wider buckets only come from a damaged file


def _jit(function):
    """``numba.njit(cache=True)``; without a writable cache location (a read-only install and no
    writable NUMBA_CACHE_DIR / user cache) numba refuses ``cache=True`` at decoration, so the
    kernel then compiles in memory in every process (a warning says so)."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError as err:  # "cannot cache function ...: no locator available"
        logger.warning("numba cannot cache %s (%s); it will compile in memory at each process start",
                       function.__name__, err)
        return numba.njit(cache=False, nogil=True)(function)


_K = np.uint64(0x9E3779B97F4A7C15)
_U32 = np.uint64(32)


@numba.njit(inline="always")
def _load8(buffer, position):
    """8 bytes of ``buffer`` from ``position`` as a little-endian uint64 (LLVM merges this into one load)."""
    return (np.uint64(buffer[position]) | (np.uint64(buffer[position + 1]) << np.uint64(8))
            | (np.uint64(buffer[position + 2]) << np.uint64(16)) | (np.uint64(buffer[position + 3]) << np.uint64(24))
            | (np.uint64(buffer[position + 4]) << np.uint64(32)) | (np.uint64(buffer[position + 5]) << np.uint64(40))
            | (np.uint64(buffer[position + 6]) << np.uint64(48)) | (np.uint64(buffer[position + 7]) << np.uint64(56)))


@numba.njit(inline="always")
def _word(buffer, position, count):
    """The first ``count`` bytes (none if <= 0, at most 8) of ``buffer`` from ``position`` as a
    little-endian uint64, zero-padded; never reads past the end of ``buffer``."""
    if count <= 0:
        return np.uint64(0)
    if position + 8 <= len(buffer):  # one load, then mask: a byte loop is 4x slower
        word = _load8(buffer, position)
        if count >= 8:
            return word
        return word & ((np.uint64(1) << np.uint64(8 * count)) - np.uint64(1))
    word = np.uint64(0)
    for k in range(min(count, 8)):
        word |= np.uint64(buffer[position + k]) << np.uint64(8 * k)
    return word


@numba.njit(inline="always")
def _hash_one(buffer, start, length, seed):
    """Format 2's hash of ``buffer[start:start + length]`` (see ``mim_hf.center._hash_batch``)."""
    h = (np.uint64(length) * _K) ^ seed
    for j in range(max(2, (length + 7) >> 3)):
        h ^= _word(buffer, start + 8 * j, length - 8 * j)
        h *= _K
        h ^= h >> _U32
    return h


def _split_joined(buffer, n_text, starts, lengths):
    """Ids joined by ``\\x00`` in ``buffer[:n_text]`` -> ``starts``/``lengths`` (int64 (N,)).

    Returns the number of ids found (the caller compares it with N: an id holding ``\\x00``
    gives more)."""
    n_ids = len(starts)
    found = 0
    start = 0
    for position in range(n_text):
        if buffer[position] == 0:
            if found < n_ids:
                starts[found] = start
                lengths[found] = position - start
            found += 1
            start = position + 1
    if found < n_ids:
        starts[found] = start
        lengths[found] = n_text - start
    return found + 1


def _find_rows(buffer, starts, lengths, seed, shift, directory, table, sorted_rows, offsets, id_bytes, rows):
    """Query ids ``buffer[starts[i]:starts[i] + lengths[i]]`` -> ``rows[i]``: the row whose stored
    id equals it, -1 if none. Returns the count of -1 rows, or a negative status (damaged index).

    ``shift`` = 64 - log2(number of buckets); ``directory``/``table``/``sorted_rows``/``offsets``/
    ``id_bytes`` are the center's ``id_hash_buckets``/``id_hash_sorted``/``id_hash_rows``/
    ``item_id_offsets``/``item_id_bytes``. Same probe order as the numpy path, so both agree on
    every index that neither refuses.

    Why passes: each random read of a table (directory, hashes, rows, offsets, id bytes) is a
    cache and TLB miss; a tight loop doing only that read keeps ~10 misses in flight, a loop
    that also hashes or compares keeps ~1 (measured: 4x slower)."""
    n_ids = len(starts)
    n_items = len(table)
    n_bytes = len(id_bytes)
    hashes = np.empty(n_ids, np.uint64)
    where = np.empty(n_ids, np.int64)
    stored = np.empty(n_ids, np.uint64)
    for i in range(n_ids):  # 1. hash
        hashes[i] = _hash_one(buffer, starts[i], lengths[i], seed)
    for i in range(n_ids):  # 2. start of each hash's bucket
        where[i] = directory[np.int64(hashes[i] >> shift)]
    for i in range(n_ids):  # 3. the bucket's first entry (an empty last bucket starts at n_items)
        position = where[i]
        if position < 0 or position > n_items:
            return CORRUPTED_DIRECTORY
        stored[i] = table[min(position, n_items - 1)]
    for i in range(n_ids):  # 3b. where[i] = table position holding the hash, or -1
        h = hashes[i]
        position = where[i]
        at = -1
        if stored[i] == h:
            at = min(position, n_items - 1)
        elif stored[i] < h:  # the rest of the bucket (sorted): ~1 id in 5
            first = position + 1
            end = np.int64(directory[np.int64(h >> shift) + 1])
            if end < 0:
                return CORRUPTED_DIRECTORY
            size = min(end, n_items) - first
            if size > _MAX_BUCKET_WINDOW:  # a damaged directory: binary-search the whole table
                lo, hi = 0, n_items
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if table[mid] < h:
                        lo = mid + 1
                    else:
                        hi = mid
                lo = min(lo, n_items - 1)
                if table[lo] == h:
                    at = lo
            else:
                for step in range(max(size, 0)):
                    candidate = min(first + step, n_items - 1)
                    if table[candidate] == h:
                        at = candidate
                        break
        where[i] = at
    for i in range(n_ids):  # 4. row of each hit
        row = -1
        if where[i] >= 0:
            row = sorted_rows[where[i]]
            if row < 0 or row >= n_items:
                return CORRUPTED_ROWS
        rows[i] = row
    for i in range(n_ids):  # 5. where[i] = start of the stored id, if its length matches
        row = rows[i]
        if row >= 0:
            stored_start = offsets[row]
            if offsets[row + 1] - stored_start != lengths[i]:
                rows[i] = -1
            elif stored_start < 0 or stored_start + lengths[i] > n_bytes:
                return CORRUPTED_OFFSETS
            else:
                where[i] = stored_start
    touched = np.uint8(0)
    for i in range(n_ids):  # 6. bring each stored id's first bytes into cache
        if rows[i] >= 0:
            touched ^= id_bytes[where[i]]
    unknown = 0
    for i in range(n_ids):  # 7. compare stored and query bytes (a byte loop measured faster than 8-byte words)
        row = rows[i]
        if row >= 0:
            stored_start = where[i]
            start = starts[i]
            for k in range(lengths[i]):
                if id_bytes[stored_start + k] != buffer[start + k]:
                    row = -1
                    break
            rows[i] = row
        if row < 0:
            unknown += 1
    return unknown + (touched & 0)  # (keeps pass 6's reads)


def _gather_rows(table, rows, out):
    """``out[i] = table[rows[i]]`` (raw bytes: (N, row_bytes) uint8), zeros where ``rows[i] < 0``.

    ``rows`` are the verified rows of :func:`_find_rows` (inside ``0..len(table)-1``)."""
    width = table.shape[1]
    for i in range(len(rows)):
        row = rows[i]
        if row < 0:
            for k in range(width):
                out[i, k] = 0
        else:
            for k in range(width):
                out[i, k] = table[row, k]


split_joined = _jit(_split_joined)
find_rows = _jit(_find_rows)
gather_rows = _jit(_gather_rows)
