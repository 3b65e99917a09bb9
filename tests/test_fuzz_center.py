"""Property-based fuzzing of the Representation Center (hypothesis, derandomised).

Every generated input ends in one of two ways:
* a result that matches a plain-Python reference (a dict of id -> row, the stored float16/32
  values, brute-force cosine neighbours); or
* a ``ValueError``/``TypeError`` -- and the generator knows which inputs must fail (non-str ids,
  empty/duplicate/unencodable ids, NaN/inf, a zero dim, k < 1, a damaged file), so a bad input
  that is silently accepted fails the test as surely as a crash deep in numpy/torch does.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from mim_hf.center.layout import EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE, metadata_digest
from mim_hf.center.store import RepresentationCenter
from mim_hf.center.versions import CURRENT_FILE

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FINGERPRINT = "sha256:" + "ab" * 32
CLEAR_ERRORS = (ValueError, TypeError)

# Ids as they come: any text (lone surrogates included), empty, very long, huge numbers as strings,
# and things that are not str at all.
GOOD_IDS = st.one_of(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=12),
    st.text(st.characters(codec="utf-8"), min_size=60, max_size=200),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.sampled_from(["item-1", "é-ß-中文", "a\x00b", "0242", "242", "🙂", "x" * 16, "x" * 17]),
)
BAD_STR_IDS = st.sampled_from(["", "\ud800", "ok\udfffok"])  # empty, lone surrogates
NOT_STR = st.one_of(st.integers(), st.none(), st.binary(max_size=4), st.floats())
STR_IDS = st.one_of(GOOD_IDS, GOOD_IDS, GOOD_IDS, BAD_STR_IDS)
ANY_IDS = st.one_of(STR_IDS, STR_IDS, STR_IDS, NOT_STR)


@st.composite
def id_lists(draw, max_size=8):
    """Mostly valid, distinct ids; sometimes one duplicate, bad str or non-str slipped in."""
    ids = draw(st.lists(GOOD_IDS, max_size=max_size, unique=True))
    flaw = draw(st.sampled_from([None] * 9 + ["duplicate", "bad_str", "not_str"]))
    at = draw(st.integers(0, len(ids)))
    if flaw == "duplicate" and ids:
        ids.insert(at, ids[0])
    elif flaw == "bad_str":
        ids.insert(at, draw(BAD_STR_IDS))
    elif flaw == "not_str":
        ids.insert(at, draw(NOT_STR))
    return ids


def expected_id_error(ids: list) -> type[Exception] | None:
    """The error a build of ``ids`` must raise (None: it must succeed), given finite embeddings."""
    if any(not isinstance(i, str) for i in ids):
        return TypeError
    if not ids or any(i == "" for i in ids) or len(set(ids)) < len(ids) or not all(_encodes(i) for i in ids):
        return ValueError
    return None


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@st.composite
def catalogues(draw):
    """(ids, embeddings dict, dtype): random ids, 0-5 dims, 1-2 levels, occasional NaN/inf/huge."""
    ids = draw(id_lists())
    dim = draw(st.sampled_from([0, 1, 2, 3, 5, 1, 2, 3, 5]))
    dtype = draw(st.sampled_from(["float16", "float32"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    levels = ["item_embeds"] + (["text_embeds"] if draw(st.booleans()) else [])
    embeddings = {level: rng.standard_normal((len(ids), dim)).astype(np.float32) for level in levels}
    poison = draw(st.sampled_from([None] * 9 + [float("nan"), float("inf"), 1e6]))
    if poison is not None and len(ids) and dim:
        embeddings[levels[-1]][draw(st.integers(0, len(ids) - 1)), draw(st.integers(0, dim - 1))] = poison
    return ids, embeddings, dtype


def expected_build_error(ids, embeddings, dtype) -> type[Exception] | None:
    error = expected_id_error(ids)
    if error is not None:
        return error
    dim = embeddings["item_embeds"].shape[1]
    with np.errstate(over="ignore"):  # a value beyond float16's range becomes inf: that is the point
        stored_finite = all(np.isfinite(a.astype(dtype)).all() for a in embeddings.values())
    return None if dim > 0 and stored_finite else ValueError


def reference_rows(stored: list[str], queries: list) -> np.ndarray:
    row_of = {item_id: row for row, item_id in enumerate(stored)}
    return np.array([row_of.get(q, -1) for q in queries], dtype=np.int64)


def _catalogue(ids, dim=2, poison=None, dtype="float32"):
    embeddings = {"item_embeds": np.ones((len(ids), dim), np.float32)}
    if poison is not None:
        embeddings["item_embeds"][-1, -1] = poison
    return ids, embeddings, dtype


@settings(max_examples=40, **SETTINGS)
@given(catalogue=catalogues(), queries=st.lists(STR_IDS, max_size=6), k=st.integers(-1, 10))
@example(catalogue=_catalogue([]), queries=[], k=1)  # empty catalogue
@example(catalogue=_catalogue(["a", 7]), queries=[], k=1)  # a non-str id
@example(catalogue=_catalogue(["a", b"b"]), queries=[], k=1)  # bytes are not str ids
@example(catalogue=_catalogue(["a", "b"], dim=0), queries=[], k=1)
@example(catalogue=_catalogue(["a", "b"], poison=float("nan")), queries=[], k=1)
@example(catalogue=_catalogue(["a", "b"], poison=7e4, dtype="float16"), queries=[], k=1)  # overflows float16
@example(catalogue=_catalogue(["only"]), queries=["only"], k=3)  # no other item to return
@example(catalogue=_catalogue(["a", "b", "c"]), queries=["b", "\ud800"], k=50)  # k above the catalogue
def test_build_lookup_nearest_on_random_catalogues(catalogue, queries, k):
    ids, embeddings, dtype = catalogue
    expected = expected_build_error(ids, embeddings, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            center = RepresentationCenter.build(ids, embeddings, Path(tmp) / "c", encoder_name="fuzz",
                                                encoder_fingerprint=FINGERPRINT, dtype=dtype)
        except CLEAR_ERRORS as err:
            event(f"build refused: {type(err).__name__}")
            assert expected is not None and type(err) is expected, f"unexpected {err!r}"
            assert not (Path(tmp) / "c" / CURRENT_FILE).exists()  # nothing half-built is published
            return
        event("built")
        assert expected is None, f"build accepted bad input (expected {expected.__name__})"
        center = RepresentationCenter.load(Path(tmp) / "c")
        assert center.item_ids() == ids and center.embed_dim == embeddings["item_embeds"].shape[1]

        # look-up: stored ids, their prefixes/extensions and random strings, in every order
        mixed = queries + ids[::-1] + [i + "x" for i in ids] + [i[:-1] for i in ids]
        bad_query = next((q for q in mixed if not _encodes(q)), None)
        try:
            embeds, found = center.lookup(mixed, dtype=torch.float32)
        except ValueError as err:
            assert bad_query is not None and type(err) is ValueError and "UTF-8" in str(err)
            mixed = [q for q in mixed if _encodes(q)]
            embeds, found = center.lookup(mixed, dtype=torch.float32)
        rows = reference_rows(ids, mixed)
        np.testing.assert_array_equal(found.numpy(), rows >= 0)
        stored = embeddings["item_embeds"].astype(dtype).astype(np.float32)
        np.testing.assert_array_equal(embeds.numpy()[rows >= 0], stored[rows[rows >= 0]])
        assert embeds[~found].abs().sum() == 0

        # nearest: k < 1 is refused; otherwise capped at the other items, query never returned
        try:
            scores, neighbours = center.nearest(ids[:2], k=k)
        except ValueError as err:
            assert (k < 1 or len(ids) == 1) and type(err) is ValueError, f"unexpected {err!r}"
            return
        assert k >= 1
        assert scores.shape == (min(2, len(ids)), min(k, len(ids) - 1))
        for query, row in zip(ids[:2], neighbours):
            assert query not in row and len(set(row)) == len(row) and set(row) <= set(ids)


@settings(max_examples=30, **SETTINGS)
@given(update_ids=id_lists(max_size=4).map(lambda ids: ids + ["item-0"][: len(ids) % 2]), dim_delta=st.sampled_from([0, 0, 0, 1]),
       poison=st.sampled_from([None, None, float("nan")]), seed=st.integers(0, 100))
def test_upsert_random_updates(update_ids, dim_delta, poison, seed):
    base_ids = ["item-0", "é", "242", "x" * 40]
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        center = RepresentationCenter.build(base_ids, {"item_embeds": rng.standard_normal((4, 3))}, Path(tmp) / "c",
                                            encoder_name="fuzz", encoder_fingerprint=FINGERPRINT, dtype="float32")
        update = rng.standard_normal((len(update_ids), 3 + dim_delta)).astype(np.float32)
        if poison is not None and len(update_ids):
            update[0, 0] = poison
        expected = expected_id_error(update_ids) if update_ids else None
        if expected is None and update_ids and (dim_delta or poison is not None):
            expected = ValueError
        try:
            result = center.upsert_embeddings(update_ids, {"item_embeds": update})
        except CLEAR_ERRORS as err:
            event(f"upsert refused: {type(err).__name__}")
            assert expected is not None and type(err) is expected, f"unexpected {err!r}"
            assert RepresentationCenter.load(Path(tmp) / "c").version == "v0001"
            return
        event("upserted")
        assert expected is None, f"upsert accepted bad input (expected {expected.__name__})"
        new = [i for i in update_ids if i not in base_ids]
        assert result["added"] == len(new) and result["replaced"] == len(update_ids) - len(new)
        reopened = RepresentationCenter.load(Path(tmp) / "c")
        assert reopened.item_ids() == base_ids + new
        if update_ids:
            got, found = reopened.lookup(update_ids)
            assert found.all()
            np.testing.assert_array_equal(got.numpy(), update)


@settings(max_examples=25, **SETTINGS)
@given(queries=st.one_of(id_lists(6), st.lists(ANY_IDS, max_size=4)), container=st.sampled_from(["list", "tuple", "numpy", "arrow"]))
def test_lookup_of_random_queries(tmp_path_factory, queries, container):
    center = _shared_center(tmp_path_factory)
    stored = center.item_ids()
    if container == "numpy":
        batch = np.array(queries, dtype=object)
    elif container == "arrow":
        import pyarrow as pa

        try:
            batch = pa.array(queries)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return  # Arrow itself cannot hold this mix
    else:
        batch = tuple(queries) if container == "tuple" else list(queries)
    expected = TypeError if any(not isinstance(q, str) for q in queries) else (
        ValueError if not all(_encodes(q) for q in queries) else None)
    try:
        embeds, found = center.lookup(batch)
    except CLEAR_ERRORS as err:
        assert expected is not None and type(err) is expected, f"unexpected {err!r}"
        return
    assert expected is None, f"lookup accepted bad ids (expected {expected.__name__})"
    np.testing.assert_array_equal(found.numpy(), reference_rows(stored, queries) >= 0)


_CENTER_CACHE: dict[str, RepresentationCenter] = {}


def _shared_center(tmp_path_factory) -> RepresentationCenter:
    """One small center (unicode and long ids, 2 levels) shared by the examples that only read it."""
    if "center" not in _CENTER_CACHE:
        ids = ["item-0", "item-1", "é-ß-中文", "a\x00b", "x" * 100, "9" * 40, "🙂"]
        rng = np.random.default_rng(0)
        _CENTER_CACHE["center"] = RepresentationCenter.build(
            ids, {"item_embeds": rng.standard_normal((7, 4)), "text_embeds": rng.standard_normal((7, 4))},
            tmp_path_factory.mktemp("fuzz") / "c", encoder_name="fuzz", encoder_fingerprint=FINGERPRINT,
            dtype="float16")
    return _CENTER_CACHE["center"]


CORRUPTIONS = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from([EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE]),
              st.floats(0, 0.999)),
    st.tuples(st.just("flip"), st.sampled_from([EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE]),
              st.lists(st.tuples(st.floats(0, 0.999), st.integers(1, 255)), min_size=1, max_size=4)),
    st.tuples(st.just("metadata"), st.sampled_from(["format_version", "num_items", "embed_dim", "dtype", "levels",
                                                    "hash_key", "normalized", "checksums", "encoder_fingerprint"]),
              st.one_of(st.none(), st.integers(-5, 10**12), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                        st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))),
    st.tuples(st.just("current"), st.sampled_from(["v0002", "../v0001", "", "v0001/..", "v1"]), st.none()),
    st.tuples(st.just("retype"), st.sampled_from(["item_id_offsets", "id_hash_sorted", "id_hash_rows",
                                                  "item_id_bytes"]),
              st.sampled_from(["F64", "I64", "U64", "F32", "I32", "U8", "F16"])),
    st.tuples(st.just("delete"), st.sampled_from([EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE, CURRENT_FILE]),
              st.none()),
)


@settings(max_examples=50, **SETTINGS)
@given(corruption=CORRUPTIONS)
def test_damaged_files_end_in_a_result_or_a_clear_error(tmp_path_factory, corruption):
    """A truncated, bit-flipped, rewritten or deleted file: load/lookup/nearest/verify end in a
    result or ValueError/TypeError naming the problem; changed bytes never pass verify()."""
    source = _shared_center(tmp_path_factory).root
    kind, target, detail = corruption
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "c"
        shutil.copytree(source, root)
        version = root / "v0001"
        if kind == "truncate":
            data = (version / target).read_bytes()
            (version / target).write_bytes(data[: int(len(data) * detail)])
        elif kind == "flip":
            data = bytearray((version / target).read_bytes())
            for where, mask in detail:
                data[int(len(data) * where)] ^= mask
            (version / target).write_bytes(bytes(data))
        elif kind == "metadata":
            metadata = json.loads((version / METADATA_FILE).read_text())
            metadata[target] = detail
            metadata["metadata_sha256"] = metadata_digest(metadata)  # consistent: reaches the field checks
            (version / METADATA_FILE).write_text(json.dumps(metadata))
        elif kind == "retype":  # the index header claims another dtype (same header length)
            _retype_tensor(version / INDEX_FILE, target, detail)
        elif kind == "current":
            (root / CURRENT_FILE).write_text(target + "\n")
        else:
            (root / target if target == CURRENT_FILE else version / target).unlink()
        changed_data = kind != "retype" and target in (EMBEDDINGS_FILE, INDEX_FILE) and (version / target).exists() and (
            (version / target).read_bytes() != (source / "v0001" / target).read_bytes())
        try:
            center = RepresentationCenter.load(root)
        except CLEAR_ERRORS as err:
            event(f"load refused ({kind})")
            assert type(err) in CLEAR_ERRORS and str(err), f"unclear {err!r}"
            return
        event(f"loaded ({kind})")
        ids = ["item-0", "item-1", "é-ß-中文", "a\x00b", "x" * 100, "9" * 40, "🙂", "absent"]
        for action in (lambda: center.lookup(ids), lambda: center.lookup(ids, level="text_embeds"),
                       lambda: center.nearest(["item-0"], k=3), lambda: center.item_ids()):
            try:
                action()
            except CLEAR_ERRORS as err:
                event(f"read refused: {str(err)[-40:]}")
                assert type(err) in CLEAR_ERRORS and str(err), f"unclear {err!r}"
        if changed_data:
            with pytest.raises(ValueError, match="corrupted"):
                center.verify()


def _retype_tensor(path: Path, tensor: str, dtype: str) -> None:
    """Rewrite ``tensor``'s dtype in a safetensors header, keeping the header's byte length."""
    import struct

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header[tensor]["dtype"] = dtype
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if len(encoded) <= length:
        path.write_bytes(raw[:8] + encoded + b" " * (length - len(encoded)) + raw[8 + length:])
