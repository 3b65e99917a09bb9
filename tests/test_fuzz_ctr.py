"""Property-based fuzzing of the CTR model inputs (CiUBMForCTR.forward) and of CTRCollator
(hypothesis, derandomised).

Every generated input must end in one of two ways:
* a result with the documented properties: finite logits/probs/loss, padded positions ignored
  (any in-range value there, and an empty sequence, score like all-padding), collator counts
  that add up; or
* a ``ValueError``/``TypeError`` whose message names the offending input and what was expected
  (the collator always checks; the model only with ``config.check_inputs=True``) -- and the
  generator knows which inputs must fail, so a bad input that is silently accepted fails the
  test as surely as a crash deep in torch or a NaN in the output does.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mim_hf.ctr.collator import CTRCollator, center_content_table
from mim_hf.data import Vocabulary
from mim_hf.modeling.configuration_ciubm import CiUBMConfig
from mim_hf.modeling.modeling_ciubm import CiUBMForCTR

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
N_USERS, N_ITEMS, CONTENT_DIM, N_GENRES, N_GENDERS, N_ROWS = 7, 12, 6, 5, 3, 10
MODES = ("din", "content_feature", "ciubm")


def tiny_model(mode: str, base: str, check_inputs: bool = False) -> CiUBMForCTR:
    config = CiUBMConfig(
        mode=mode, base=base, n_users=N_USERS, n_items=N_ITEMS, user_feature_sizes={"user_gender": N_GENDERS},
        item_feature_sizes={"item_genres": N_GENRES}, multi_valued_item_features=["item_genres"],
        id_embed_dim=4, content_dim=CONTENT_DIM, content_proj_dim=4, attention_hidden_sizes=[8],
        fusion_hidden_sizes=[8], histogram_n_bins=4, sim_top_k=3, dropout=0.0, initializer_range=0.3,
        check_inputs=check_inputs,
    )
    torch.manual_seed(0)
    return CiUBMForCTR(config).eval()


MODELS = {(mode, base): tiny_model(mode, base) for mode in MODES for base in ("din", "sim")}
CHECKED = {(mode, base): tiny_model(mode, base, check_inputs=True) for mode in MODES for base in ("din", "sim")}


def with_table(model, inputs):
    """The model, holding the batch's content table when it reads content."""
    return model.set_content_table(inputs["_table"]) if model.needs_content_inputs else model


def model_inputs(inputs):
    return {k: v for k, v in inputs.items() if k != "_table"}


@st.composite
def valid_batches(draw):
    """A valid batch: B in 1..5, L in 0..7, lengths 0..L (all-padding rows too), in-range garbage at
    padding; "_table" = the content table the rows index (row 0 zeros)."""
    batch = draw(st.integers(1, 5))
    length = draw(st.integers(0, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch)))
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    pad = ~mask

    def with_garbage(values, high):
        # padded positions may hold any index of the table
        garbage = torch.randint(0, high, values.shape, generator=g)
        where = pad.view(*pad.shape, *([1] * (values.dim() - 2)))
        return torch.where(where, garbage.to(values.dtype), values)

    table = torch.randn(N_ROWS, CONTENT_DIM, generator=g)
    table[0] = 0.0
    return {
        "user_ids": torch.randint(0, N_USERS, (batch,), generator=g),
        "target_item_ids": torch.randint(0, N_ITEMS, (batch,), generator=g),
        "behavior_item_ids": with_garbage(torch.randint(0, N_ITEMS, (batch, length), generator=g), N_ITEMS),
        "behavior_mask": mask,
        "user_features": {"user_gender": torch.randint(0, N_GENDERS, (batch,), generator=g)},
        "target_item_features": {"item_genres": torch.randint(0, N_GENRES, (batch, 2), generator=g)},
        "behavior_item_features": {
            "item_genres": with_garbage(torch.randint(0, N_GENRES, (batch, length, 3), generator=g), N_GENRES)},
        "target_content_rows": torch.randint(0, N_ROWS, (batch,), generator=g),
        "behavior_content_rows": with_garbage(torch.randint(0, N_ROWS, (batch, length), generator=g), N_ROWS),
        "labels": torch.randint(0, 2, (batch,), generator=g),
        "_table": table,
    }


def cleaned(inputs):
    """The same batch with every padded position reset to zeros (what the collator writes)."""
    mask = inputs["behavior_mask"]
    out = dict(inputs)
    out["behavior_item_ids"] = inputs["behavior_item_ids"] * mask
    out["behavior_item_features"] = {k: v * mask.unsqueeze(-1) for k, v in inputs["behavior_item_features"].items()}
    out["behavior_content_rows"] = inputs["behavior_content_rows"] * mask
    return out


def emptied(inputs):
    """The same batch with no behaviours at all (L = 0)."""
    batch = len(inputs["user_ids"])
    out = dict(inputs)
    out["behavior_item_ids"] = torch.zeros(batch, 0, dtype=torch.long)
    out["behavior_mask"] = torch.zeros(batch, 0, dtype=torch.bool)
    out["behavior_item_features"] = {"item_genres": torch.zeros(batch, 0, 3, dtype=torch.long)}
    out["behavior_content_rows"] = torch.zeros(batch, 0, dtype=torch.long)
    return out


@settings(max_examples=40, **SETTINGS)
@given(inputs=valid_batches(), mode=st.sampled_from(MODES), base=st.sampled_from(("din", "sim")))
def test_valid_batches_give_finite_padding_free_results(inputs, mode, base):
    model = with_table(MODELS[(mode, base)], inputs)
    with torch.no_grad():
        out = model(**model_inputs(inputs))
        batch = len(inputs["user_ids"])
        assert out.logits.shape == out.probs.shape == (batch,)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        torch.testing.assert_close(model(**model_inputs(cleaned(inputs))).logits, out.logits, rtol=1e-5, atol=1e-6)
        # rows without any behaviour score as if the sequence were empty
        empty = ~inputs["behavior_mask"].any(1)
        torch.testing.assert_close(model(**model_inputs(emptied(inputs))).logits[empty], out.logits[empty],
                                   rtol=1e-5, atol=1e-6)
        # checking changes nothing on valid inputs
        checked = with_table(CHECKED[(mode, base)], inputs)
        torch.testing.assert_close(checked(**model_inputs(inputs)).logits, out.logits, rtol=0, atol=0)


# ---------------------------------------------------------------- bad model inputs (check_inputs=True)
def _set(inputs, key, value):
    out = dict(inputs)
    if "." in key:
        outer, inner = key.split(".")
        out[outer] = {**out[outer], inner: value}
    else:
        out[key] = value
    return out


def _bad_index(key, value):
    def corrupt(inputs):
        tensor = inputs[key.split(".")[0]]
        tensor = (tensor[key.split(".")[1]] if "." in key else tensor).clone()
        tensor.view(-1)[0] = value
        return _set(inputs, key, tensor)
    return corrupt


def _uses_content(inputs, mode, base):
    return mode != "din" or base == "sim"


def _has_behaviours(inputs, mode, base):
    return inputs["behavior_mask"].shape[1] > 0


ALWAYS = lambda inputs, mode, base: True  # noqa: E731
CORRUPTIONS = [
    ("user id too large", ALWAYS, _bad_index("user_ids", N_USERS), r"user_ids holds index 7 outside \[0, 7\)"),
    ("negative target id", ALWAYS, _bad_index("target_item_ids", -3), r"target_item_ids holds index -3 outside"),
    ("behaviour id too large", _has_behaviours, _bad_index("behavior_item_ids", 10**6),
     r"behavior_item_ids holds index 1000000 outside \[0, 12\)"),
    ("user feature out of range", ALWAYS, _bad_index("user_features.user_gender", N_GENDERS),
     r"user_features\['user_gender'\] holds index 3"),
    ("behaviour genre negative", _has_behaviours, _bad_index("behavior_item_features.item_genres", -1),
     r"behavior_item_features\['item_genres'\] holds index -1"),
    ("content row out of table", lambda i, m, b: _uses_content(i, m, b) and _has_behaviours(i, m, b),
     _bad_index("behavior_content_rows", N_ROWS), r"behavior_content_rows holds index 10 outside \[0, 10\)"),
    ("label 2", ALWAYS, lambda i: _set(i, "labels", torch.full_like(i["labels"], 2)), r"labels must be 0 or 1, got 2"),
    ("label NaN", ALWAYS, lambda i: _set(i, "labels", torch.full((len(i["labels"]),), float("nan"))),
     r"labels must be 0 or 1, got nan"),
    ("no content rows", _uses_content, lambda i: {k: v for k, v in i.items() if "content_rows" not in k},
     r"needs target_content_rows \(B,\) and behavior_content_rows"),
]


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
@settings(max_examples=6, **SETTINGS)
@given(inputs=valid_batches(), mode=st.sampled_from(MODES), base=st.sampled_from(("din", "sim")))
def test_bad_model_inputs_raise_clear_errors_when_checking(corruption, inputs, mode, base):
    name, applies, corrupt, message = corruption
    assume(applies(inputs, mode, base))  # e.g. a defect at a behaviour needs one
    with pytest.raises(ValueError) as caught:
        with_table(CHECKED[(mode, base)], inputs)(**model_inputs(corrupt(inputs)))
    assert re.search(message, str(caught.value)), (name, str(caught.value))


def test_bad_content_tables_are_refused_when_set():
    model = tiny_model("ciubm", "din")
    for value in (float("nan"), float("inf")):
        table = torch.ones(N_ROWS, CONTENT_DIM)
        table[3, 1] = value
        with pytest.raises(ValueError, match="content table row 3 holds NaN/inf"):
            model.set_content_table(table)
    with pytest.raises(ValueError, match=r"float \(N, 6\) tensor with N >= 1"):
        model.set_content_table(torch.ones(N_ROWS, 4))


# ---------------------------------------------------------------- collator
ITEMS = ["m1", "m2", "m3", "m4"]


class DictCenter:
    """The Representation Center's contract: ``rows_for`` (-1 = absent) and ``embeddings``."""

    def __init__(self, table):
        self.ids, self.table = list(table), table

    def rows_for(self, item_ids):
        return np.array([self.ids.index(i) if i in self.ids else -1 for i in item_ids], dtype=np.int64)

    def embeddings(self, level="item_embeds"):
        return torch.stack(list(self.table.values())).numpy()


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
    assert batch["behavior_mask"].shape[1] == max(1, max(map(len, kept)))  # padded to the longest history
    model = MODELS[("ciubm", "sim")].set_content_table(center_content_table(center))
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
