"""Compiled Representation Center look-up (optional: needs ``numba``, the ``fast`` extra).

One call does what the numpy path of :mod:`mim_hf.center.store` does in ~75 whole-batch operations:
hash each query id's UTF-8 bytes (format 2's ``HASH_ALGORITHM``, bit for bit), probe the bucket
directory and the sorted hash table, verify the stored id bytes, write the row (or -1) and,
for :func:`lookup_rows`, copy the rows' bytes from the memory-mapped embeddings into a
preallocated output, zero-filling unknown ids. Nothing here changes the on-disk format.

Every read of the (possibly damaged) index is bounds-checked: a kernel returns a negative
status instead of reading outside an array, and the caller turns it into a ``ValueError``.

This module imports numba, so :mod:`mim_hf.center.store` imports it only at the first look-up;
functions compile on their first call (``cache=True``: later processes load the machine code
from numba's cache; where no cache folder is writable they compile in memory, see
:func:`_jit`). Kernels release the GIL (``nogil``): :mod:`mim_hf.center.store` runs a large batch as
parts on helper threads, each part one kernel call.
"""

from __future__ import annotations

import logging
import sys

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

if sys.byteorder != "little":  # the kernels read ids as little-endian words with native loads
    raise ImportError("mim_hf.center.numba_lookup needs a little-endian machine; the numpy path is used instead")

logger = logging.getLogger(__name__)

# Statuses of find_rows / lookup_rows (>= 0 is the count of unknown ids); numba freezes these globals at compile time.
CORRUPTED_DIRECTORY = -1  # a bucket start outside 0..num_items
CORRUPTED_ROWS = -2  # id_hash_rows names a row outside 0..num_items-1
CORRUPTED_OFFSETS = -3  # an id's bytes lie outside item_id_bytes
SEPARATOR_IN_ID = -4  # joined ids held more "\x00" separators than ids (an id holds "\x00"): not damage
STATUS_MESSAGES = {
    CORRUPTED_DIRECTORY: "id_hash_buckets points outside the hash table",
    CORRUPTED_ROWS: "id_hash_rows names a row outside the center",
    CORRUPTED_OFFSETS: "item_id_offsets points outside item_id_bytes",
}
_GATHER_AHEAD = 16  # rows prefetched ahead of the copy (best of 4, 8, 16, 32 measured)
_BLOCK = 32  # ids taken through all passes together (best of 8, 16, 32, 64, 128, 256, 4096 measured)
_MAX_BUCKET_WINDOW = 64  # same as mim_hf.center.store: wider buckets only come from a damaged file


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
_ONES = np.uint64(0x0101010101010101)
_HIGHS = np.uint64(0x8080808080808080)
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=np.uint64)  # mask of k bytes


@intrinsic
def _load_unaligned_u64(typingctx, array, position):
    """``array``'s (uint8, C-contiguous) 8 bytes from ``position`` as one native-order uint64
    load with alignment 1 (numba's own view of a stride-1 uint64 array would claim alignment 8).
    The caller keeps ``position + 8 <= len(array)``."""
    if not (isinstance(array, types.Array) and array.dtype == types.uint8 and isinstance(position, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        pointer = builder.bitcast(builder.gep(data, [offset]), ir.IntType(64).as_pointer())
        return builder.load(pointer, align=1)

    return types.uint64(array, position), codegen


@intrinsic
def _trailing_zeros(typingctx, value):
    """Number of trailing zero bits of a non-zero uint64 (one ``tzcnt``)."""
    if value != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(value), codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to start loading ``array[index]`` (1-D) into cache and go on (``prefetcht0``).

    A prefetch never faults and changes no result; callers still pass in-bounds indexes."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        array_type, index_type = signature.args
        data = context.make_array(array_type)(context, builder, args[0])
        offset = context.cast(builder, args[1], index_type, types.intp)
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [offset], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer] + [ir.IntType(32)] * 3), "llvm.prefetch.p0")
        flags = [ir.Constant(ir.IntType(32), value) for value in (0, 3, 1)]  # read, keep in all levels, data
        builder.call(prefetch, [builder.bitcast(pointer, byte_pointer), *flags])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@numba.njit(inline="always")
def _word(buffer, position, count):
    """The first ``count`` bytes (none if <= 0, at most 8) of ``buffer`` from ``position`` as a
    little-endian uint64, zero-padded; never reads past the end of ``buffer``. Away from the end of
    ``buffer`` it is one load and one mask from a table, with no branch on ``count`` (id lengths
    vary: such branches mispredict, and each mispredict drops the misses in flight)."""
    count = min(max(count, 0), 8)
    if position + 8 <= len(buffer):
        return _load_unaligned_u64(buffer, position) & _LOW_BYTES[count]
    word = np.uint64(0)
    for k in range(count):
        word |= np.uint64(buffer[position + k]) << np.uint64(8 * k)
    return word


@numba.njit(inline="always")
def _hash_one(buffer, start, length, seed):
    """Format 2's hash of ``buffer[start:start + length]`` (see ``mim_hf.center._hash_batch``)."""
    h = (np.uint64(length) * _K) ^ seed
    h ^= _word(buffer, start, length)  # words 0 and 1 always (ids up to 16 bytes): no branch on the length
    h *= _K
    h ^= h >> _U32
    h ^= _word(buffer, start + 8, length - 8)
    h *= _K
    h ^= h >> _U32
    for j in range(2, (length + 7) >> 3):
        h ^= _word(buffer, start + 8 * j, length - 8 * j)
        h *= _K
        h ^= h >> _U32
    return h


@numba.njit(inline="always")
def _id_end(buffer, start, n_text):
    """Position of the first ``\\x00`` in ``buffer[start:n_text]``, or ``n_text`` if none: 8 bytes
    per step (``n_text - start`` may be 0)."""
    position = start
    while True:
        word = _word(buffer, position, n_text - position)  # zero-padded past n_text: the end reads as a zero
        zeros = (word - _ONES) & ~word & _HIGHS  # lowest set bit: the first zero byte
        if zeros:
            return min(position + np.int64(_trailing_zeros(zeros) >> np.uint64(3)), n_text)
        position += 8


@numba.njit(inline="always")
def _next_id(buffer, n_text, start, starts, lengths, i):
    """One step of splitting joined ids: id ``i`` starts at ``start``; writes ``starts[i]`` and
    ``lengths[i]`` and returns where id ``i + 1`` starts (``n_text + 1`` after the last id)."""
    end = _id_end(buffer, start, n_text)
    starts[i] = start
    lengths[i] = end - start
    return end + 1


def _split_joined(buffer, n_text, starts, lengths):
    """Ids joined by ``\\x00`` in ``buffer[:n_text]`` -> ``starts``/``lengths`` (int64 (N,)).

    Returns the number of ids found (the caller compares it with N: an id holding ``\\x00``
    gives more)."""
    n_ids = len(starts)
    start = 0
    for i in range(n_ids):
        start = _next_id(buffer, n_text, start, starts, lengths, i)
        if start > n_text:
            return i + 1  # N when the last id ends the text
    return n_ids + 1


@numba.njit(inline="always")
def _find_rows(buffer, n_text, starts, lengths, seed, shift, directory, table, sorted_rows, offsets, id_bytes, rows):
    """Query ids ``buffer[starts[i]:starts[i] + lengths[i]]`` -> ``rows[i]``: the row whose stored
    id equals it, -1 if none. Returns the count of -1 rows, or a negative status (damaged index,
    or ``SEPARATOR_IN_ID``).

    ``n_text`` >= 0: ``buffer[:n_text]`` holds the ids joined by ``\\x00`` and ``starts``/``lengths``
    are written here, in the hashing pass (see :func:`_split_joined`); ``SEPARATOR_IN_ID`` says the
    text holds more than N ids (the caller then splits it another way). ``n_text`` < 0: ``starts``/
    ``lengths`` are given.

    ``shift`` = 64 - log2(number of buckets); ``directory``/``table``/``sorted_rows``/``offsets``/
    ``id_bytes`` are the center's ``id_hash_buckets``/``id_hash_sorted``/``id_hash_rows``/
    ``item_id_offsets``/``item_id_bytes``. Same probe order as the numpy path, so both agree on
    every index that neither refuses.

    Why passes with prefetches: each random read of a table (directory, hashes, rows, offsets,
    id bytes) is a cache miss. Each pass reads what the previous pass asked the CPU to prefetch
    and prefetches what the next pass reads, so the misses of a whole pass are in flight
    together instead of one id at a time (measured: a loop that waits for each miss is 4x
    slower).

    Why blocks of ``_BLOCK`` ids: run over a whole 4096-id batch, a pass prefetched 4096 lines
    (256 KiB, 8x a 32 KiB L1 data cache) before reading the first of them, so most prefetched
    lines were gone again when read (measured: prefetching 4096 random lines and then reading them
    cost as much as reading them cold). A block of 32 ids keeps each pass's prefetched lines in
    cache until they are read. Not the TLB: on the machine measured most of the mapped files sat
    on 2 MiB pages (248 of 263 MB of embeddings, 30 of 41 MB of index). Measured on a 2-core AMD
    VM, ``rows_for`` of 4096 ids: 0.87 of the ``index_select`` ceiling with blocks of 32, 0.76-0.80
    with 128-256, 0.64-0.68 with the whole batch; copying each block's rows right after it,
    instead of all rows after the search, measured slower."""
    n_ids = len(starts)
    n_items = len(table)
    n_bytes = len(id_bytes)
    hashes = np.empty(min(n_ids, _BLOCK), np.uint64)
    where = np.empty(min(n_ids, _BLOCK), np.int64)
    start = 0
    unknown = 0
    for first_id in range(0, n_ids, _BLOCK):  # block by block: see the docstring
        last_id = min(first_id + _BLOCK, n_ids)
        for i in range(first_id, last_id):  # 1. (split and) hash; start loading the bucket's directory entry
            if n_text >= 0:
                if start > n_text:  # fewer ids than N (never from a join): refuse rather than guess
                    return SEPARATOR_IN_ID
                start = _next_id(buffer, n_text, start, starts, lengths, i)
            h = _hash_one(buffer, starts[i], lengths[i], seed)
            hashes[i - first_id] = h
            _prefetch(directory, np.int64(h >> shift))
        for i in range(first_id, last_id):  # 2. start of each hash's bucket; start loading its first entry
            position = np.int64(directory[np.int64(hashes[i - first_id] >> shift)])
            where[i - first_id] = position
            if 0 <= position < n_items:
                _prefetch(table, position)
        for i in range(first_id, last_id):  # 3. where = table position holding the hash, or -1
            h = hashes[i - first_id]
            position = where[i - first_id]
            if position < 0 or position > n_items:
                return CORRUPTED_DIRECTORY
            stored = table[min(position, n_items - 1)]  # an empty last bucket starts at n_items
            at = -1
            if stored == h:
                at = min(position, n_items - 1)
            elif stored < h:  # the rest of the bucket (sorted): ~1 id in 5
                first = position + 1
                bucket_end = np.int64(directory[np.int64(h >> shift) + 1])  # not ``end``: the split's, in 1.
                if bucket_end < 0:
                    return CORRUPTED_DIRECTORY
                size = min(bucket_end, n_items) - first
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
            where[i - first_id] = at
            if at >= 0:
                _prefetch(sorted_rows, at)
        for i in range(first_id, last_id):  # 4. row of each hit; start loading its id offsets
            row = -1
            if where[i - first_id] >= 0:
                row = sorted_rows[where[i - first_id]]
                if row < 0 or row >= n_items:
                    return CORRUPTED_ROWS
                _prefetch(offsets, row)
            rows[i] = row
        for i in range(first_id, last_id):  # 5. where = start of the stored id, if its length matches; start loading it
            row = rows[i]
            if row >= 0:
                stored_start = offsets[row]
                if offsets[row + 1] - stored_start != lengths[i]:
                    rows[i] = -1
                elif stored_start < 0 or stored_start + lengths[i] > n_bytes:
                    return CORRUPTED_OFFSETS
                else:
                    where[i - first_id] = stored_start
                    if stored_start < n_bytes:
                        _prefetch(id_bytes, stored_start)
        for i in range(first_id, last_id):  # 6. compare stored and query bytes, 8 at a time (lengths are equal here)
            row = rows[i]
            if row >= 0:
                stored_start = where[i - first_id]
                query_start = starts[i]  # not ``start``: that is the split's position in the next block
                length = lengths[i]
                # the first two words unconditionally (every id up to 16 bytes): no branch on the length
                differ = _word(id_bytes, stored_start, length) ^ _word(buffer, query_start, length)
                differ |= _word(id_bytes, stored_start + 8, length - 8) ^ _word(buffer, query_start + 8, length - 8)
                for k in range(16, length, 8):
                    differ |= (_word(id_bytes, stored_start + k, length - k)
                               ^ _word(buffer, query_start + k, length - k))
                if differ:
                    row = -1
                rows[i] = row
            if row < 0:
                unknown += 1
    if n_text >= 0 and start != n_text + 1:  # the last id did not end the text: a separator inside an id
        return SEPARATOR_IN_ID
    return unknown


def _find_rows_kernel(buffer, n_text, starts, lengths, seed, shift, directory, table, sorted_rows, offsets, id_bytes,
                      rows):
    """:func:`_find_rows` as a cached entry point (``rows_for``)."""
    return _find_rows(buffer, n_text, starts, lengths, seed, shift, directory, table, sorted_rows, offsets, id_bytes,
                      rows)


@numba.njit(inline="always")
def _gather(embeddings, rows, out):
    """``out[i] = embeddings[rows[i]]`` (raw bytes: (N, row_bytes) uint8), zeros where ``rows[i] < 0``.

    ``rows`` are verified rows (inside ``0..len(embeddings)-1``)."""
    width = embeddings.shape[1]
    n_ids = len(rows)
    for i in range(-_GATHER_AHEAD, n_ids):
        ahead = i + _GATHER_AHEAD  # prefetch the row copied _GATHER_AHEAD steps later (measured: ~2x faster)
        if ahead < n_ids and rows[ahead] >= 0:
            source = embeddings[rows[ahead]]
            for k in range(0, width, 64):
                _prefetch(source, k)
            _prefetch(source, width - 1)  # a row need not start on a 64-byte line
        if i < 0:
            continue
        row = rows[i]
        if row < 0:
            for k in range(width):
                out[i, k] = 0
        else:
            for k in range(width):
                out[i, k] = embeddings[row, k]


def _lookup_rows(buffer, n_text, starts, lengths, seed, shift, directory, table, sorted_rows, offsets, id_bytes,
                 rows, embeddings, out):
    """:func:`_find_rows`, then (on a sound index) :func:`_gather` of ``embeddings`` (uint8
    (num_items, row_bytes)) into ``out`` (uint8 (N, row_bytes)) in the same call. Returns
    :func:`_find_rows`' status; ``out`` is unspecified when it is negative."""
    status = _find_rows(buffer, n_text, starts, lengths, seed, shift, directory, table, sorted_rows, offsets, id_bytes,
                        rows)
    if status >= 0:
        _gather(embeddings, rows, out)
    return status


split_joined = _jit(_split_joined)
find_rows = _jit(_find_rows_kernel)
lookup_rows = _jit(_lookup_rows)
