"""Retrieval metrics (mim_hf.csft.retrieval) against a brute-force per-query sort."""

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from mim_hf.csft.retrieval import (
    evaluate_pairs,
    metrics_from_ranks,
    popularity_retrieval,
    retrieval_metrics,
    train_item_counts,
)


def brute_force_ranks(scores: np.ndarray, target_rows, exclude_rows) -> np.ndarray:
    """Stable descending sort of each row (ties: lower row first), excluded row removed."""
    ranks = []
    for q, row_scores in enumerate(scores):
        order = [j for j in np.argsort(-row_scores, kind="stable") if j != exclude_rows[q]]
        ranks.append(order.index(target_rows[q]) + 1)
    return np.array(ranks)


def brute_force_metrics(ranks, ks=(1, 10, 50)):
    out = {f"recall@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["mrr"] = float(np.mean(1.0 / ranks))
    out["n"] = len(ranks)
    return out


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_retrieval_metrics_match_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    catalogue = torch.tensor(rng.normal(size=(120, 8)), dtype=torch.float32)
    # Duplicate rows create exact ties that the tie rule must order by row.
    catalogue[60:70] = catalogue[0:10]
    triggers = rng.integers(0, 120, size=40)
    targets = (triggers + rng.integers(1, 119, size=40)) % 120
    queries = catalogue[torch.as_tensor(triggers)]
    got = retrieval_metrics(queries, catalogue, targets, ks=(1, 10, 50), exclude_rows=triggers, chunk_size=chunk_size)
    normed = torch.nn.functional.normalize(catalogue, dim=-1)
    scores = (normed[torch.as_tensor(triggers)] @ normed.T).numpy()
    expected = brute_force_metrics(brute_force_ranks(scores, targets, triggers))
    assert got == pytest.approx(expected)
    assert 0 < got["recall@50"] < 1  # the test data is not degenerate


def test_excluding_the_trigger_moves_targets_up():
    catalogue = torch.eye(4)
    catalogue[1] = torch.tensor([1.0, 0.1, 0, 0])  # target close to trigger 0
    kept = retrieval_metrics(catalogue[[0]], catalogue, [1])
    excluded = retrieval_metrics(catalogue[[0]], catalogue, [1], exclude_rows=[0])
    assert kept["recall@1"] == 0.0 and excluded["recall@1"] == 1.0
    assert kept["mrr"] == 0.5


def test_bad_inputs_raise():
    catalogue = torch.randn(5, 3)
    with pytest.raises(ValueError, match="outside the catalogue"):
        retrieval_metrics(catalogue[:2], catalogue, [0, 9])
    with pytest.raises(ValueError, match="exclude their own target"):
        retrieval_metrics(catalogue[:2], catalogue, [0, 1], exclude_rows=[0, 2])
    with pytest.raises(ValueError, match="share D"):
        retrieval_metrics(torch.randn(2, 4), catalogue, [0, 1])
    with pytest.raises(ValueError, match="ks must be positive"):
        retrieval_metrics(catalogue[:2], catalogue, [0, 1], ks=(0,))
    assert metrics_from_ranks(torch.tensor([], dtype=torch.long))["n"] == 0


def test_popularity_reference_matches_brute_force():
    ids = [f"i{j}" for j in range(30)]
    rng = np.random.default_rng(1)
    counts = {ids[j]: int(c) for j, c in enumerate(rng.integers(0, 5, size=30)) if c}  # many ties, some zero
    triggers = rng.integers(0, 30, size=25)
    targets = (triggers + rng.integers(1, 29, size=25)) % 30
    pairs = {"trigger_item_id": [ids[t] for t in triggers], "target_item_id": [ids[t] for t in targets]}
    got = popularity_retrieval(counts, pairs, ids, ks=(1, 5))
    scores = np.array([[counts.get(i, 0) for i in ids]] * 25, dtype=float)
    assert got == pytest.approx(brute_force_metrics(brute_force_ranks(scores, targets, triggers), ks=(1, 5)))
    with pytest.raises(ValueError, match="'zz'"):
        popularity_retrieval({"zz": 3}, pairs, ids)
    samples = {"item_id": ["a", "b", "a", "a"], "label": [1, 1, 0, 1]}
    assert train_item_counts(samples) == {"a": 2, "b": 1}


class ColumnEncoder(torch.nn.Module):
    """Stands in for a content encoder: embeds an item by a fixed vector looked up from its title."""

    text_model = None  # no transformers tower: nothing for encode_items to switch

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.config = type("C", (), {"embed_dim": table.shape[1]})()
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, return_dict=True):
        return type("O", (), {"item_embeds": self.table[input_ids[:, 0]]})()


class ColumnProcessor:
    """Stands in for the processor: an item's "text" is its title, its one token the title as an int."""

    fallback_counts = {}
    image_field = "image"
    image_processor = None
    tokenizer = type("T", (), {"pad": staticmethod(lambda rows, return_tensors: {k: torch.tensor(v) for k, v in rows.items()})})()

    def build_texts(self, rows, view="full"):
        return [r["title"] for r in rows]

    def tokenize(self, texts, padding="longest", return_tensors="pt"):
        return {"input_ids": [[int(t)] for t in texts], "attention_mask": [[1] for _ in texts]}


def test_evaluate_pairs_encodes_once_per_call_and_maps_ids():
    rng = np.random.default_rng(2)
    table = torch.tensor(rng.normal(size=(12, 4)), dtype=torch.float32)
    items = Dataset.from_dict({"item_id": [f"m{j}" for j in range(12)], "title": [str(j) for j in range(12)]})
    pairs = Dataset.from_dict({"trigger_item_id": ["m0", "m3", "m5"], "target_item_id": ["m1", "m11", "m2"]})
    got = evaluate_pairs(ColumnEncoder(table), ColumnProcessor(), items, pairs, ks=(1, 3), batch_size=5)
    expected = retrieval_metrics(table[[0, 3, 5]], table, [1, 11, 2], ks=(1, 3), exclude_rows=[0, 3, 5])
    assert got == expected
    by_split = evaluate_pairs(ColumnEncoder(table), ColumnProcessor(), items,
                              DatasetDict({"valid": pairs, "test": pairs.select([0])}), ks=(1, 3))
    assert by_split["valid"] == expected and by_split["test"]["n"] == 1
    bad = Dataset.from_dict({"trigger_item_id": ["m0"], "target_item_id": ["nope"]})
    with pytest.raises(ValueError, match="'nope'"):
        evaluate_pairs(ColumnEncoder(table), ColumnProcessor(), items, bad)
    duplicated = Dataset.from_dict({"item_id": ["m0", "m0"], "title": ["0", "1"]})
    with pytest.raises(ValueError, match="appears twice"):
        evaluate_pairs(ColumnEncoder(table), ColumnProcessor(), duplicated, pairs)
