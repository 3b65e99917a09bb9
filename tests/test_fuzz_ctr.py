"""Property-based fuzzing of the CTR model inputs (CiUBMForCTR.forward) and of CTRCollator
(hypothesis, derandomised).

Every generated input must end in one of two ways:
* a result with the documented properties: finite logits/probs/loss, padded positions ignored
  (any garbage there, and an empty sequence, score like all-padding), the same logits whether
  content comes as embeddings or as content-table rows, collator counts that add up; or
* a ``ValueError``/``TypeError`` whose message names the offending input and what was expected --
  and the generator knows which inputs must fail, so a bad input that is silently accepted fails
  the test as surely as a crash deep in torch (an IndexError from an embedding, a shape error from
  a matmul) or a NaN in the output does.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mim_hf.ctr.collator import CTRCollator
from mim_hf.data import Vocabulary
from mim_hf.modeling.configuration_ciubm import CiUBMConfig
from mim_hf.modeling.modeling_ciubm import CiUBMForCTR

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
N_USERS, N_ITEMS, CONTENT_DIM, N_GENRES, N_GENDERS = 7, 12, 6, 5, 3
MODES = ("din", "content_feature", "ciubm")


def tiny_model(mode: str, base: str) -> CiUBMForCTR:
    config = CiUBMConfig(
        mode=mode, base=base, n_users=N_USERS, n_items=N_ITEMS, user_feature_sizes={"user_gender": N_GENDERS},
        item_feature_sizes={"item_genres": N_GENRES}, multi_valued_item_features=["item_genres"],
        id_embed_dim=4, content_dim=CONTENT_DIM, content_proj_dim=4, attention_hidden_sizes=[8],
        fusion_hidden_sizes=[8], histogram_n_bins=4, sim_top_k=3, dropout=0.0, initializer_range=0.3,
    )
    torch.manual_seed(0)
    return CiUBMForCTR(config).eval()


MODELS = {(mode, base): tiny_model(mode, base) for mode in MODES for base in ("din", "sim")}


@st.composite
def valid_batches(draw):
    """A valid batch: B in 1..5, L in 0..7, lengths 0..L (all-padding rows too), garbage at padding."""
    batch = draw(st.integers(1, 5))
    length = draw(st.integers(0, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch)))
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    pad = ~mask

    def with_garbage(values, high):
        # padded positions may hold anything, out-of-range and negative values included
        garbage = torch.randint(-50, 50, values.shape, generator=g) if high else torch.randn(values.shape, generator=g) * 1e3
        where = pad.view(*pad.shape, *([1] * (values.dim() - 2)))
        return torch.where(where, garbage.to(values.dtype), values)

    table = torch.randn(10, CONTENT_DIM, generator=g)
    table[0] = 0.0
    behavior_rows = torch.randint(0, 10, (batch, length), generator=g)
    inputs = {
        "user_ids": torch.randint(0, N_USERS, (batch,), generator=g),
        "target_item_ids": torch.randint(0, N_ITEMS, (batch,), generator=g),
        "behavior_item_ids": with_garbage(torch.randint(0, N_ITEMS, (batch, length), generator=g), True),
        "behavior_mask": mask,
        "user_features": {"user_gender": torch.randint(0, N_GENDERS, (batch,), generator=g)},
        "target_item_features": {"item_genres": torch.randint(0, N_GENRES, (batch, 2), generator=g)},
        "behavior_item_features": {
            "item_genres": with_garbage(torch.randint(0, N_GENRES, (batch, length, 3), generator=g), True)},
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }
    if draw(st.booleans()):
        target_rows = torch.randint(0, 10, (batch,), generator=g)
        inputs.update(content_table=table, target_content_rows=target_rows,
                      behavior_content_rows=with_garbage(behavior_rows, True))
    else:
        inputs.update(target_content_embeds=table[torch.randint(0, 10, (batch,), generator=g)],
                      behavior_content_embeds=with_garbage(table[behavior_rows], False))
    return inputs


def cleaned(inputs):
    """The same batch with every padded position reset to zeros."""
    mask = inputs["behavior_mask"]
    out = dict(inputs)
    out["behavior_item_ids"] = inputs["behavior_item_ids"] * mask
    out["behavior_item_features"] = {k: v * mask.unsqueeze(-1) for k, v in inputs["behavior_item_features"].items()}
    if "behavior_content_rows" in inputs:
        out["behavior_content_rows"] = inputs["behavior_content_rows"] * mask
    else:
        out["behavior_content_embeds"] = inputs["behavior_content_embeds"] * mask.unsqueeze(-1)
    return out


def emptied(inputs):
    """The same batch with no behaviours at all (L = 0)."""
    batch = len(inputs["user_ids"])
    out = dict(inputs)
    out["behavior_item_ids"] = torch.zeros(batch, 0, dtype=torch.long)
    out["behavior_mask"] = torch.zeros(batch, 0, dtype=torch.bool)
    out["behavior_item_features"] = {"item_genres": torch.zeros(batch, 0, 3, dtype=torch.long)}
    if "behavior_content_rows" in inputs:
        out["behavior_content_rows"] = torch.zeros(batch, 0, dtype=torch.long)
    else:
        out["behavior_content_embeds"] = torch.zeros(batch, 0, CONTENT_DIM)
    return out


@settings(max_examples=40, **SETTINGS)
@given(inputs=valid_batches(), mode=st.sampled_from(MODES), base=st.sampled_from(("din", "sim")))
def test_valid_batches_give_finite_padding_free_results(inputs, mode, base):
    model = MODELS[(mode, base)]
    with torch.no_grad():
        out = model(**inputs)
        batch = len(inputs["user_ids"])
        assert out.logits.shape == out.probs.shape == (batch,)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        torch.testing.assert_close(model(**cleaned(inputs)).logits, out.logits, rtol=1e-5, atol=1e-6)
        # rows without any behaviour score as if the sequence were empty
        empty = ~inputs["behavior_mask"].any(1)
        torch.testing.assert_close(model(**emptied(inputs)).logits[empty], out.logits[empty], rtol=1e-5, atol=1e-6)
        if "content_table" in inputs:  # the same content as embeddings gives the same logits
            as_embeds = {k: v for k, v in cleaned(inputs).items()
                         if k not in ("content_table", "target_content_rows", "behavior_content_rows")}
            as_embeds["target_content_embeds"] = inputs["content_table"][inputs["target_content_rows"]]
            as_embeds["behavior_content_embeds"] = inputs["content_table"][cleaned(inputs)["behavior_content_rows"]]
            torch.testing.assert_close(model(**as_embeds).logits, out.logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad model inputs
def _set(inputs, key, value):
    out = dict(inputs)
    if "." in key:
        outer, inner = key.split(".")
        out[outer] = {**out[outer], inner: value}
    else:
        out[key] = value
    return out


def _first_valid(inputs):
    """(b, l) of a real behaviour, or None."""
    where = inputs["behavior_mask"].nonzero()
    return tuple(where[0].tolist()) if len(where) else None


# each corruption: (name, applies(inputs, mode, base), corrupt(inputs) -> inputs, error type, message regex)
def _bad_index(key, high):
    def corrupt(inputs, value):
        tensor = inputs[key.split(".")[0]]
        tensor = tensor[key.split(".")[1]] if "." in key else tensor
        tensor = tensor.clone()
        if tensor.dim() >= 2:  # a real behaviour (padded positions may legally hold anything)
            b, l = _first_valid(inputs)
            tensor[b, l] = value
        else:
            tensor.view(-1)[0] = value
        return _set(inputs, key, tensor)
    return corrupt


def _needs_valid(inputs, mode, base):
    return _first_valid(inputs) is not None


def _uses_content(inputs, mode, base):
    return mode != "din" or base == "sim"


def _dense(inputs, mode, base):
    return _uses_content(inputs, mode, base) and "behavior_content_embeds" in inputs


def _rows(inputs, mode, base):
    return _uses_content(inputs, mode, base) and "content_table" in inputs


def _nan_content(inputs, value):
    if "content_table" in inputs:
        table = inputs["content_table"].clone()
        table[inputs["target_content_rows"][0]] = value  # a row the batch uses
        return _set(inputs, "content_table", table)
    content = inputs["target_content_embeds"].clone()
    content[0, 0] = value
    return _set(inputs, "target_content_embeds", content)


def _nan_padded_content(inputs, value):
    content = inputs["behavior_content_embeds"].clone()
    b, l = (~inputs["behavior_mask"]).nonzero()[0].tolist()
    content[b, l, 0] = value
    return _set(inputs, "behavior_content_embeds", content)


def _has_padding(inputs, mode, base):
    return _dense(inputs, mode, base) and bool((~inputs["behavior_mask"]).any())


ALWAYS = lambda inputs, mode, base: True  # noqa: E731
CORRUPTIONS = [
    ("user id too large", ALWAYS, lambda i: _bad_index("user_ids", 0)(i, N_USERS), ValueError, r"user_ids holds index 7 outside"),
    ("negative target id", ALWAYS, lambda i: _bad_index("target_item_ids", 0)(i, -3), ValueError, r"target_item_ids holds index -3 outside"),
    ("behaviour id too large", _needs_valid, lambda i: _bad_index("behavior_item_ids", 0)(i, 10**6), ValueError,
     r"behavior_item_ids .*holds index 1000000 outside the vocabulary \[0, 12\)"),
    ("user feature out of range", ALWAYS, lambda i: _bad_index("user_features.user_gender", 0)(i, N_GENDERS), ValueError,
     r"user_features\['user_gender'\] holds index 3"),
    ("behaviour genre negative", _needs_valid, lambda i: _bad_index("behavior_item_features.item_genres", 0)(i, -1),
     ValueError, r"behavior_item_features\['item_genres'\].*index -1"),
    ("content row out of table", lambda i, m, b: _rows(i, m, b) and _first_valid(i) is not None,
     lambda i: _bad_index("behavior_content_rows", 0)(i, 10), ValueError, r"behavior_content_rows .*index 10 outside the rows of content_table"),
    ("label 2", ALWAYS, lambda i: _set(i, "labels", torch.full_like(i["labels"], 2)), ValueError, r"labels must be 0 or 1, got 2"),
    ("label NaN", ALWAYS, lambda i: _set(i, "labels", torch.full((len(i["labels"]),), float("nan"))), ValueError,
     r"labels must be 0 or 1, got nan"),
    ("mask value 2", _needs_valid,
     lambda i: _set(i, "behavior_mask", i["behavior_mask"].long() * 2 + 0), ValueError, r"behavior_mask must be 0/1"),
    ("content dim", _dense, lambda i: _set(i, "behavior_content_embeds", i["behavior_content_embeds"][..., :-1]),
     ValueError, r"behavior_content_embeds has content dim 5 but config.content_dim is 6"),
    ("table dim", _rows, lambda i: _set(i, "content_table", i["content_table"][:, :4]), ValueError, r"content_table must be \(N, 6\)"),
    ("NaN content", _uses_content, lambda i: _nan_content(i, float("nan")), ValueError,
     r"(target_content_embeds|content_table \(at target_content_rows\)) holds nan"),
    ("inf content", _uses_content, lambda i: _nan_content(i, float("inf")), ValueError,
     r"(target_content_embeds|content_table \(at target_content_rows\)) holds inf"),
    ("NaN content at padding", _has_padding, lambda i: _nan_padded_content(i, float("nan")), ValueError,
     r"behavior_content_embeds holds nan .*padded positions included"),
    ("float ids", ALWAYS, lambda i: _set(i, "target_item_ids", i["target_item_ids"].float()), TypeError,
     r"target_item_ids must be an int64 or int32 tensor, got torch.float32"),
    ("list ids", ALWAYS, lambda i: _set(i, "user_ids", i["user_ids"].tolist()), TypeError, r"user_ids must be a torch.Tensor, got list"),
    ("integer content", _dense, lambda i: _set(i, "target_content_embeds", i["target_content_embeds"].long()), TypeError,
     r"target_content_embeds must be a floating-point tensor"),
    ("batch mismatch", ALWAYS, lambda i: _set(i, "target_item_ids", torch.cat([i["target_item_ids"], i["target_item_ids"]])),
     ValueError, r"target_item_ids must have shape"),
    ("mask shape", ALWAYS, lambda i: _set(i, "behavior_mask", torch.ones(len(i["user_ids"]), i["behavior_mask"].shape[1] + 1, dtype=torch.bool)),
     ValueError, r"behavior_mask shape"),
    ("feature shape", ALWAYS, lambda i: _set(i, "user_features.user_gender", i["user_features"]["user_gender"].unsqueeze(1)),
     ValueError, r"user_features\['user_gender'\] must have shape"),
    ("multi-valued feature without G", ALWAYS,
     lambda i: _set(i, "target_item_features.item_genres", i["target_item_features"]["item_genres"][:, 0]), ValueError,
     r"target_item_features\['item_genres'\] must have shape \(\d+,\) \+ \(G,\)"),
    ("rows shape", _rows, lambda i: _set(i, "behavior_content_rows", i["behavior_content_rows"][:, :0] if i["behavior_content_rows"].shape[1] else i["behavior_content_rows"][:, None]),
     ValueError, r"behavior_content_rows must have shape"),
    ("missing feature", ALWAYS, lambda i: _set(i, "user_features", {}), ValueError, r"user_features keys \[\] do not match"),
    ("extra feature", ALWAYS, lambda i: _set(i, "user_features.user_age", i["user_features"]["user_gender"]), ValueError,
     r"user_features keys .* do not match"),
    ("no content", _uses_content, lambda i: {k: v for k, v in i.items() if "content" not in k}, ValueError,
     r"needs target_content_embeds"),
    ("empty batch", ALWAYS, lambda i: {**i, "user_ids": i["user_ids"][:0]}, ValueError, r"batch_size >= 1"),
    ("unknown input", ALWAYS, lambda i: {**i, "item_ids": i["target_item_ids"]}, TypeError, r"unexpected inputs \['item_ids'\]"),
]


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
@settings(max_examples=6, **SETTINGS)
@given(inputs=valid_batches(), mode=st.sampled_from(MODES), base=st.sampled_from(("din", "sim")))
def test_bad_model_inputs_raise_clear_errors(corruption, inputs, mode, base):
    name, applies, corrupt, error, message = corruption
    assume(applies(inputs, mode, base))  # e.g. a defect at a real behaviour needs one
    with pytest.raises(error) as caught:
        MODELS[(mode, base)](**corrupt(inputs))
    assert re.search(message, str(caught.value)), (name, str(caught.value))


# ---------------------------------------------------------------- collator
ITEMS = ["m1", "m2", "m3", "m4"]


class DictCenter:
    def __init__(self, table):
        self.table = table

    def lookup(self, item_ids):
        found = torch.tensor([i in self.table for i in item_ids], dtype=torch.bool)
        embeds = torch.stack([self.table.get(i, torch.zeros(CONTENT_DIM)) for i in item_ids]) if item_ids else (
            torch.zeros(0, CONTENT_DIM))
        return embeds, found


def collator(center=None, max_len=3):
    vocabs = {"user_id": Vocabulary(["u1", "u2"], "user_id"), "item_id": Vocabulary(ITEMS[:3], "item_id"),
              "user_gender": Vocabulary(["F", "M"], "user_gender")}
    return CTRCollator(vocabs, center=center, max_len=max_len, user_features=["user_gender"])


HISTORY = st.one_of(st.none(), st.lists(st.sampled_from(ITEMS + ["zz"]), max_size=5),
                    st.lists(st.sampled_from(ITEMS), max_size=5).map(lambda h: np.array(h, dtype=object)),
                    st.lists(st.sampled_from(ITEMS), max_size=5).map(tuple))
ROW = st.fixed_dictionaries({
    "user_id": st.sampled_from(["u1", "u2", "u9", None, 5]),
    "item_id": st.sampled_from(ITEMS + ["zz"]),
    "behavior_item_ids": HISTORY,
    "user_gender": st.sampled_from(["F", "M", "X", None]),
    "label": st.sampled_from([0, 1, True, False, 0.0, 1.0, np.int64(1)]),
})


@settings(max_examples=40, **SETTINGS)
@given(rows=st.lists(ROW, min_size=1, max_size=6), as_columns=st.booleans())
def test_collator_valid_rows(rows, as_columns):
    g = torch.Generator().manual_seed(0)
    center = DictCenter({item: torch.randn(CONTENT_DIM, generator=g) for item in ITEMS[:3]})
    c = collator(center)
    given_rows = {k: [row[k] for row in rows] for k in rows[0]} if as_columns else rows
    batch = c(given_rows)
    histories = [[] if r["behavior_item_ids"] is None else list(r["behavior_item_ids"]) for r in rows]
    kept = [h[-3:] for h in histories]
    assert batch["behavior_mask"].sum(1).tolist() == [len(h) for h in kept]
    assert c.stats["samples"] == len(rows) and c.stats["behaviors"] == sum(map(len, kept))
    assert c.stats["truncated_samples"] == sum(len(h) > 3 for h in histories)
    unknown = {"u9", "None", "5"}
    assert c.stats["unknown_users"] == sum(str(r["user_id"]) in unknown for r in rows)
    assert c.stats["unknown_behavior_items"] == sum(i not in ITEMS[:3] for h in kept for i in h)
    assert c.stats["content_missing"] == sum(r["item_id"] not in ITEMS[:3] for r in rows) + sum(
        i not in ITEMS[:3] for h in kept for i in h)
    assert batch["labels"].tolist() == [int(r["label"]) for r in rows]
    model = MODELS[("ciubm", "sim")]
    config = model.config
    assert (batch["user_ids"] < config.n_users).all() and (batch["behavior_item_ids"] < config.n_items).all()
    out = model(**{**batch, "target_item_features": {"item_genres": torch.zeros(len(rows), 1, dtype=torch.long)},
                   "behavior_item_features": {"item_genres": torch.zeros(*batch["behavior_mask"].shape, 1, dtype=torch.long)}})
    assert torch.isfinite(out.loss)


def _drop(key, index=0):
    return lambda rows: [({k: v for k, v in r.items() if k != key} if i == index % len(rows) else r)
                         for i, r in enumerate(rows)]


def _replace(key, value, index=0):
    return lambda rows: [({**r, key: value} if i == index % len(rows) else r) for i, r in enumerate(rows)]


BAD_ROWS = [
    ("missing user_id", _drop("user_id"), ValueError, r"row 0 lacks \['user_id'\]"),
    ("missing history", _drop("behavior_item_ids", -1), ValueError, r"row \d+ lacks \['behavior_item_ids'\]"),
    ("missing user feature", _drop("user_gender"), ValueError, r"row 0 lacks \['user_gender'\]"),
    ("label in some rows only", lambda rows: rows + [{k: v for k, v in rows[0].items() if k != "label"}], ValueError,
     r"row \d+ lacks 'label' but row 0 has one"),
    ("label 2", _replace("label", 2), ValueError, r"label must be 0 or 1, got 2 in row 0"),
    ("label NaN", _replace("label", float("nan")), ValueError, r"label must be 0 or 1, got nan"),
    ("label None", _replace("label", None), ValueError, r"label must be 0 or 1, got None"),
    ("label string", _replace("label", "1"), ValueError, r"label must be 0 or 1, got '1'"),
    ("history string", _replace("behavior_item_ids", "m1"), TypeError, r"behavior_item_ids must be a list"),
    ("history number", _replace("behavior_item_ids", 3), TypeError, r"behavior_item_ids must be a list"),
    ("row not a dict", lambda rows: rows[:-1] + [list(rows[-1].values())], TypeError, r"must be a dict"),
    ("empty batch", lambda rows: [], ValueError, r"empty batch"),
    ("rows a string", lambda rows: "rows", TypeError, r"rows must be a list of dicts"),
    ("ragged columns", lambda rows: {"user_id": ["u1"] * (len(rows) + 1), **{k: [r[k] for r in rows] for k in rows[0] if k != "user_id"}},
     ValueError, r"equal lengths"),
]


@pytest.mark.parametrize("bad", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
@settings(max_examples=5, **SETTINGS)
@given(rows=st.lists(ROW, min_size=1, max_size=4))
def test_collator_bad_rows_raise_clear_errors(bad, rows):
    name, corrupt, error, message = bad
    with pytest.raises(error) as caught:
        collator()(corrupt(rows))
    assert re.search(message, str(caught.value)), (name, str(caught.value))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_collator_refuses_non_finite_content(value):
    table = {item: torch.ones(CONTENT_DIM) for item in ITEMS}
    table["m2"] = torch.full((CONTENT_DIM,), value)
    rows = [{"user_id": "u1", "item_id": "m1", "behavior_item_ids": ["m3", "m2"], "user_gender": "F", "label": 1}]
    with pytest.raises(ValueError, match="non-finite values .* for item 'm2'"):
        collator(DictCenter(table))(rows)
    with pytest.raises(TypeError, match="content lookup must return"):
        collator(lambda ids: torch.zeros(len(ids), CONTENT_DIM))(rows)
