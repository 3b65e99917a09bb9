"""Compiled (numba) center look-up against the numpy path: same rows, masks, counts and embeddings
for every id container, unknown / colliding / non-ASCII ids, empty batches and damaged indexes;
the fallbacks (no numba, MIM_HF_NO_NUMBA=1, no writable numba cache) and lazy compilation."""

import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mim_hf.center.store as center_module
from mim_hf.center.store import INDEX_FILE, METADATA_FILE, RepresentationCenter
from test_center import ALPHABETS, FINGERPRINT, ID_CONTAINERS, as_container, build_with_ids, random_ids

numba = pytest.importorskip("numba")  # the dev extra installs it; without it only the numpy path exists


def both_paths(center, fn, monkeypatch):
    """``fn(center)`` on the numba path, then on the numpy path (stats reset before each)."""
    results = []
    for use_numba in (True, False):
        monkeypatch.setattr(center_module, "USE_NUMBA", use_numba)
        assert center_module.lookup_backend() == ("numba" if use_numba else "numpy")
        center.stats = {"lookups": 0, "unknown_lookups": 0}
        results.append((fn(center), dict(center.stats)))
    return results


def assert_same_lookups(center, make_queries, monkeypatch, level="item_embeds", dtype=torch.float32):
    """``make_queries()``: a fresh container each call (a generator is consumed once)."""
    (compiled, compiled_stats), (reference, reference_stats) = both_paths(
        center, lambda c: (c.rows_for(make_queries()), *c.lookup(make_queries(), level=level, dtype=dtype)),
        monkeypatch)
    np.testing.assert_array_equal(compiled[0], reference[0])  # rows
    assert torch.equal(compiled[2], reference[2])  # found_mask
    assert compiled[1].dtype == reference[1].dtype == dtype and torch.equal(compiled[1], reference[1])  # embeds
    assert compiled_stats == reference_stats
    return reference


@pytest.mark.parametrize("alphabet", sorted(ALPHABETS))
def test_numba_and_numpy_paths_agree_on_random_ids_in_every_container(tmp_path, alphabet, monkeypatch):
    rng = np.random.default_rng(7 + len(alphabet))
    stored = random_ids(rng, 300, ALPHABETS[alphabet])
    center, _, embeddings = build_with_ids(tmp_path / "c", stored)
    absent = [i for i in random_ids(rng, 100, ALPHABETS[alphabet]) if i not in set(stored)]
    queries = [stored[i] for i in rng.integers(0, len(stored), 200)] + absent + [s + "x" for s in stored[:10]]
    queries += [s[:-1] for s in stored[:10] if len(s) > 1]  # prefixes: same bytes, shorter
    expected = np.array([{v: k for k, v in enumerate(stored)}.get(q, -1) for q in queries])
    for kind in ID_CONTAINERS:
        if kind in ("numpy_str", "numpy_bytes") and alphabet == "with_nul":
            continue  # numpy 'U'/'S' arrays drop trailing NULs: such ids cannot be held in one
        rows, embeds, found = assert_same_lookups(center, lambda: as_container(queries, kind), monkeypatch)
        np.testing.assert_array_equal(rows, expected, err_msg=kind)
        assert found.numpy().tolist() == (expected >= 0).tolist()
        torch.testing.assert_close(embeds[found], embeddings["item_embeds"][expected[expected >= 0]], rtol=0, atol=0)
        assert embeds[~found].abs().sum() == 0


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_both_paths_agree_on_levels_dtypes_unknowns_and_empty_batches(tmp_path, dtype, monkeypatch):
    item_ids = [f"item-{i}" for i in range(64)] + ["é-ß-中文", "🙂", "x" * 40, "a"]
    rng = np.random.default_rng(0)
    embeddings = {level: torch.from_numpy(rng.standard_normal((len(item_ids), 5)).astype(np.float32))
                  for level in ("item_embeds", "text_embeds")}
    center = RepresentationCenter.build(item_ids, embeddings, tmp_path / "c", encoder_name="e",
                                        encoder_fingerprint=FINGERPRINT, dtype=dtype)
    queries = item_ids[::-1] + ["nope", "", "item-", "item-640", "é-ß-中", "x" * 39, "x" * 41] + item_ids[:3]
    for level in ("item_embeds", "text_embeds"):
        for out_dtype in (torch.float32, torch.float16):
            rows, embeds, found = assert_same_lookups(center, lambda: queries, monkeypatch, level, out_dtype)
            assert found.sum() == len(item_ids) + 3
            stored = embeddings[level].to(getattr(torch, dtype)).to(out_dtype)
            assert torch.equal(embeds[: len(item_ids)], stored.flip(0))
    for empty in ([], (), np.array([], dtype=str), np.array([], dtype=object)):
        (compiled, stats), (reference, _) = both_paths(center, lambda c: c.lookup(empty), monkeypatch)
        assert compiled[0].shape == reference[0].shape == (0, 5) and compiled[1].shape == (0,)
        assert stats == {"lookups": 0, "unknown_lookups": 0}
    (compiled, stats), _ = both_paths(center, lambda c: c.lookup(["nope", "item-1", "zz"]), monkeypatch)
    assert stats == {"lookups": 3, "unknown_lookups": 2} and compiled[1].tolist() == [False, True, False]


def tampered_copy(center, path, victim_id, impostor_id):
    """A flat copy of ``center`` whose hash table holds ``impostor_id``'s hash where ``victim_id``'s
    was: a 64-bit collision, so only the check of the stored id bytes can refuse the impostor."""
    shutil.copytree(center.version_dir, path)
    index = load_file(path / INDEX_FILE)
    key = center.metadata["hash_key"]
    hashes = center_module._hash_ids(np.array(center.item_ids(), dtype=object), key)
    victim = center.item_ids().index(victim_id)
    hashes[victim] = center_module._hash_ids(np.array([impostor_id], dtype=object), key)[0]
    sorted_hashes, sorted_rows = center_module._sorted_hash_table(hashes)
    assert victim not in (sorted_rows[0], sorted_rows[-1])  # load() re-hashes the first and last entries
    index.update(id_hash_sorted=sorted_hashes, id_hash_rows=sorted_rows,
                 id_hash_buckets=center_module._bucket_directory(sorted_hashes))
    save_file(index, path / INDEX_FILE)
    metadata = json.loads((path / METADATA_FILE).read_text())
    metadata.pop("files")
    (path / METADATA_FILE).write_text(json.dumps(metadata))
    return RepresentationCenter.load(path)


def test_a_hash_collision_never_returns_another_items_row_on_either_path(tmp_path, monkeypatch):
    item_ids = [f"item-{i}" for i in range(40)]
    center, _, _ = build_with_ids(tmp_path / "c", item_ids)
    hashes = center_module._hash_ids(np.array(item_ids, dtype=object), center.metadata["hash_key"])
    order = np.argsort(hashes)
    victim = item_ids[order[20]]  # mid-table: load() does not re-hash it
    for impostor in ("impostor", victim + "x", victim[:-1], "zzzzzzzzzzzzzzzzzzzz-long-impostor"):
        tampered = tampered_copy(center, tmp_path / f"t-{len(impostor)}", victim, impostor)
        queries = [impostor, victim, item_ids[order[3]]]
        rows, embeds, found = assert_same_lookups(tampered, lambda: queries, monkeypatch)
        # the impostor's hash leads to the victim's row; its bytes differ, so it is not found
        assert found.tolist() == [False, False, True] and rows[0] == -1
        assert embeds[:2].abs().sum() == 0


@pytest.mark.parametrize("damage", ["rows", "offsets", "directory"])
def test_a_damaged_index_is_a_value_error_not_a_wild_read(tmp_path, damage, monkeypatch):
    """Damage load() does not see (it re-hashes only the table's first and last ids): the numba
    path, which reads without numpy's bounds checks, must refuse it with a ValueError naming the
    file. The numpy path refuses a bad row; bucket starts and id offsets past their arrays it
    clamps (no read outside), and may then only miss ids, never return another item's row."""
    item_ids = [f"item-{i}" for i in range(30)]
    center, _, _ = build_with_ids(tmp_path / "c", item_ids)
    sorted_rows = center._sorted_rows
    position = next(p for p in range(2, 28) if not {sorted_rows[p] - 1, sorted_rows[p], sorted_rows[p] + 1}
                    & {sorted_rows[0], sorted_rows[-1]})
    victim = int(sorted_rows[position])  # a mid-table id whose neighbours load() does not read either
    path = tmp_path / "damaged"
    shutil.copytree(center.version_dir, path)
    index = load_file(path / INDEX_FILE)
    if damage == "rows":  # the victim's entry names a row far outside the center
        index["id_hash_rows"][position] = 10**9
    elif damage == "offsets":  # the victim's bytes (right length) lie far past the id bytes
        length = len(item_ids[victim].encode())
        index["item_id_offsets"][victim: victim + 2] = [10**6, 10**6 + length]
    else:  # every bucket starts past the table
        index["id_hash_buckets"][1:-1] = 10**6
    save_file(index, path / INDEX_FILE)
    damaged = RepresentationCenter.load(path)
    queries = [item_ids[victim]] + item_ids[:3]
    monkeypatch.setattr(center_module, "USE_NUMBA", True)
    with pytest.raises(ValueError, match="corrupted id index") as info:
        damaged.lookup(queries)
    assert str(path) in str(info.value)
    monkeypatch.setattr(center_module, "USE_NUMBA", False)
    if damage in ("directory", "offsets"):
        rows = damaged.rows_for(queries)
        assert all(r in (-1, expected) for r, expected in zip(rows, [victim, 0, 1, 2]))
    else:
        with pytest.raises(ValueError, match="corrupted"):
            damaged.lookup(queries)


def test_no_numba_falls_back_to_numpy_with_identical_results(tmp_path, monkeypatch):
    center, item_ids, _ = build_with_ids(tmp_path / "c", [f"id-{i}" for i in range(20)])
    queries = item_ids[::-1] + ["nope"]
    monkeypatch.setattr(center_module, "USE_NUMBA", True)
    compiled = center.lookup(queries)
    monkeypatch.setattr(center_module, "_NUMBA_KERNELS", [None])  # what a failed `import numba` leaves
    assert center_module.lookup_backend() == "numpy"
    reference = center.lookup(queries)
    assert torch.equal(compiled[0], reference[0]) and torch.equal(compiled[1], reference[1])


def test_without_a_writable_cache_numba_compiles_in_memory(monkeypatch, caplog):
    """A read-only install with no writable cache folder: numba refuses cache=True at decoration;
    the kernels are then compiled in memory (a warning says so) and still work."""
    from numba.core import caching

    cache_impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # renamed in numba 0.59
    monkeypatch.setattr(cache_impl, "_locator_classes", [])  # numba finds no writable cache location
    spec = importlib.util.spec_from_file_location("center_numba_uncached", center_module.__file__.replace(
        "center.py", "center_numba.py"))
    module = importlib.util.module_from_spec(spec)
    with caplog.at_level(logging.WARNING):
        spec.loader.exec_module(module)
    assert "numba cannot cache _split_joined" in caplog.text
    buffer = np.frombuffer(b"ab\x00\x00xyz", np.uint8)
    starts, lengths = np.empty(3, np.int64), np.empty(3, np.int64)
    assert module.split_joined(buffer, len(buffer), starts, lengths) == 3  # the smallest kernel: compiles fast
    assert starts.tolist() == [0, 3, 4] and lengths.tolist() == [2, 0, 3]


SUBPROCESS = textwrap.dedent("""
    import sys, time
    import numpy as np
    from mim_hf.center.store import RepresentationCenter, lookup_backend
    center = RepresentationCenter.load(sys.argv[1])
    print("numba imported at open:", "numba" in sys.modules)
    started = time.perf_counter()
    embeds, found = center.lookup(["id-3", "nope"])
    print("first lookup s:", round(time.perf_counter() - started, 3))
    print("backend:", lookup_backend(), "found:", found.tolist())
""")


def test_opening_does_not_import_numba(tmp_path):
    """Opening a center costs no numba import or compilation; the first look-up brings both."""
    build_with_ids(tmp_path / "c", [f"id-{i}" for i in range(20)])
    result = subprocess.run([sys.executable, "-c", SUBPROCESS, str(tmp_path / "c")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "numba imported at open: False" in result.stdout
    assert "backend: numba found: [True, False]" in result.stdout, result.stdout


@pytest.mark.parametrize("value, wanted", [(None, True), ("", True), ("0", True), ("1", False), ("true", False),
                                           (" YES ", False)])
def test_the_env_switch_selects_the_numpy_path(value, wanted, monkeypatch):
    assert center_module._numba_wanted(value) is wanted
    monkeypatch.setattr(center_module, "USE_NUMBA", wanted)
    assert center_module.lookup_backend() == ("numba" if wanted else "numpy")


# ---- session 4: fused split/hash/probe/verify/gather kernel, helper threads, pinned output ----------
def test_the_word_wise_split_matches_str_split_at_every_length_and_word_boundary():
    """``split_joined`` reads 8 bytes per step: ids of 0-24 bytes (each side of every 8-byte
    boundary), empty ids at the start, middle and end, and more separators than ids."""
    kernels = center_module._numba_kernels()
    rng = np.random.default_rng(3)
    for trial in range(200):
        ids = [bytes(rng.integers(1, 256, int(rng.integers(0, 25)), dtype=np.uint8)) for _ in range(rng.integers(1, 9))]
        text = b"\x00".join(ids)
        buffer = np.frombuffer(text, np.uint8)
        starts, lengths = np.empty(len(ids), np.int64), np.empty(len(ids), np.int64)
        assert kernels.split_joined(buffer, len(text), starts, lengths) == len(ids)
        assert [text[s:s + n] for s, n in zip(starts, lengths)] == ids
        if len(ids) > 1:  # one id fewer asked for than the text holds: reported as "more ids"
            assert kernels.split_joined(buffer, len(text), starts[:-1].copy(), lengths[:-1].copy()) == len(ids)


def test_joined_and_presplit_kernel_calls_agree_and_a_nul_inside_an_id_is_reported(tmp_path):
    """The kernel's own split (n_text >= 0) and given starts/lengths (n_text = -1) give the same
    rows, counts and gathered bytes; joined text with a NUL inside an id gives SEPARATOR_IN_ID."""
    kernels = center_module._numba_kernels()
    stored = [f"id-{i}" for i in range(50)] + ["é" * 9, "x" * 17]
    center, _, _ = build_with_ids(tmp_path / "c", stored)
    queries = stored[::3] + ["nope", "", "x" * 16, "é" * 9]
    text = "\x00".join(queries).encode()
    buffer = np.frombuffer(text, np.uint8)
    table = center._level_bytes["item_embeds"]
    results = []
    for n_text in (len(text), -1):
        starts, lengths = np.empty(len(queries), np.int64), np.empty(len(queries), np.int64)
        if n_text < 0:
            kernels.split_joined(buffer, len(text), starts, lengths)
        rows, out = np.empty(len(queries), np.int64), np.full((len(queries), table.shape[1]), 7, np.uint8)
        status = kernels.lookup_rows(buffer, n_text, starts, lengths, *center._kernel_index, rows, table, out)
        results.append((status, rows, out))
    assert results[0][0] == results[1][0] == 3  # "nope", "", "x" * 16
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][2], results[1][2])
    assert not results[0][2][results[0][1] < 0].any()  # unknown rows zero-filled over the 7s
    nul = np.frombuffer(b"id-1\x00id-\x002", np.uint8)  # two ids asked for, three in the text
    starts, lengths, rows = np.empty(2, np.int64), np.empty(2, np.int64), np.empty(2, np.int64)
    assert kernels.find_rows(nul, len(nul), starts, lengths, *center._kernel_index, rows) == kernels.SEPARATOR_IN_ID


def test_blocks_carry_the_split_across_block_boundaries(tmp_path):
    """The kernel searches ``_BLOCK`` ids at a time while splitting the joined text: batches of
    1 to 3 blocks and a bit (ids of varied lengths, unknowns and empty ids on every side of a block
    boundary) give a dict's rows in one call, and a NUL inside an id in the last block is still
    reported (the ids split before it were searched in earlier blocks)."""
    kernels = center_module._numba_kernels()
    block = importlib.import_module("mim_hf.center.numba_lookup")._BLOCK
    rng = np.random.default_rng(5)
    stored = random_ids(rng, 150, ALPHABETS["unicode"]) + [f"item-{i}" for i in range(3 * block)]
    center, _, _ = build_with_ids(tmp_path / "c", stored)
    row_of = {item: row for row, item in enumerate(stored)}
    for n_queries in (1, block - 1, block, block + 1, 3 * block + 5):
        queries = [stored[int(i)] if i % 4 else f"unknown-{i}" for i in rng.integers(0, len(stored), n_queries)]
        queries[min(block, n_queries - 1)] = ""  # an empty id at a block's first position
        text = "\x00".join(queries).encode()
        buffer = np.frombuffer(text, np.uint8)
        starts, lengths, rows = (np.empty(n_queries, np.int64) for _ in range(3))
        unknown = kernels.find_rows(buffer, len(text), starts, lengths, *center._kernel_index, rows)
        expected = np.array([row_of.get(q, -1) for q in queries])
        np.testing.assert_array_equal(rows, expected)
        assert unknown == int((expected < 0).sum())
    queries = [f"item-{i}" for i in range(2 * block + 3)]
    text = "\x00".join(queries[:-1] + ["item-\x001"]).encode()  # one more piece than ids asked for
    buffer = np.frombuffer(text, np.uint8)
    starts, lengths, rows = (np.empty(len(queries), np.int64) for _ in range(3))
    assert kernels.find_rows(buffer, len(text), starts, lengths, *center._kernel_index, rows) == kernels.SEPARATOR_IN_ID
    embeds, found = center.lookup(queries[:-1] + ["item-\x001"])  # the general split finds the ids instead
    assert found.tolist() == [True] * (len(queries) - 1) + [False]


@pytest.mark.parametrize("storage", ["float16", "float32"])
def test_batches_split_over_helper_threads_match_a_dict_and_the_numpy_path(tmp_path, storage, monkeypatch):
    """With parts of 16 ids over 2 threads: duplicates, unknowns, non-ASCII ids and both output
    dtypes give a brute-force dict's rows, the stored rows and the numpy path's counts."""
    rng = np.random.default_rng(11)
    stored = random_ids(rng, 120, ALPHABETS["unicode"]) + [f"item-{i}" for i in range(80)]
    embeddings = {"item_embeds": torch.from_numpy(rng.standard_normal((len(stored), 6)).astype(np.float32))}
    center = RepresentationCenter.build(stored, embeddings, tmp_path / "c", encoder_name="e",
                                        encoder_fingerprint=FINGERPRINT, dtype=storage)
    queries = [stored[i] for i in rng.integers(0, len(stored), 150)] + ["nope", "", "item-80", "item-1é"]
    queries += queries[:20]  # duplicates
    expected = np.array([{v: k for k, v in enumerate(stored)}.get(q, -1) for q in queries])
    monkeypatch.setattr(center_module, "_MIN_IDS_PER_THREAD", 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for kind in ("list", "numpy_str", "pyarrow"):
            for out_dtype in (torch.float16, torch.float32):
                rows, embeds, found = assert_same_lookups(center, lambda: as_container(queries, kind), monkeypatch,
                                                          dtype=out_dtype)
                np.testing.assert_array_equal(rows, expected)
                reference = embeddings["item_embeds"].to(getattr(torch, storage)).to(out_dtype)
                assert torch.equal(embeds[expected >= 0], reference[expected[expected >= 0]])
                assert not embeds[expected < 0].any() and found.tolist() == (expected >= 0).tolist()
    finally:
        torch.set_num_threads(threads)


FORKED = textwrap.dedent("""
    import os, sys
    import torch
    import mim_hf.center.store as center_module
    from mim_hf.center.store import RepresentationCenter
    center_module._MIN_IDS_PER_THREAD = 4
    torch.set_num_threads(2)
    center = RepresentationCenter.load(sys.argv[1])
    queries = [f"id-{i}" for i in range(20)] + ["nope"]
    before = center.lookup(queries)  # starts the helper thread pool
    pid = os.fork()
    if pid == 0:  # a forked child (a DataLoader worker) gets its own pool, not the parent's dead threads
        after = center.lookup(queries)
        os._exit(0 if torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) else 3)
    _, status = os.waitpid(pid, 0)
    print("child exit:", os.waitstatus_to_exitcode(status))
""")


def test_a_forked_child_looks_up_with_its_own_helper_threads(tmp_path):
    build_with_ids(tmp_path / "c", [f"id-{i}" for i in range(20)])
    result = subprocess.run([sys.executable, "-c", FORKED, str(tmp_path / "c")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "child exit: 0" in result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_pin_memory_returns_the_same_embeddings_page_locked(tmp_path, out_dtype):
    center, item_ids, _ = build_with_ids(tmp_path / "c", [f"id-{i}" for i in range(20)])
    queries = item_ids[::-1] + ["nope"]
    pinned, found = center.lookup(queries, dtype=out_dtype, pin_memory=True)
    plain, plain_found = center.lookup(queries, dtype=out_dtype)
    assert pinned.is_pinned() and torch.equal(pinned, plain) and torch.equal(found, plain_found)
