"""Tests for mim_hf.ctr.metrics: AUC/logloss against sklearn, GAUC by hand, bucket table, errors."""

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from mim_hf.ctr.metrics import auc, evaluate_by_bucket, gauc, logloss


def test_auc_matches_sklearn_with_heavy_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=2000)
    # rounding creates many tied scores; sklearn counts ties as one half
    scores = np.round(rng.random(2000) + 0.3 * labels, 1)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_hand_example_and_accepts_torch():
    torch = pytest.importorskip("torch")
    # pairs (pos, neg): (0.8,0.1) win, (0.8,0.4) win, (0.4,0.1) win, (0.4,0.4) tie -> 3.5 / 4
    labels = torch.tensor([1, 0, 1, 0])
    scores = torch.tensor([0.8, 0.1, 0.4, 0.4])
    assert auc(labels, scores) == pytest.approx(0.875)


def test_gauc_hand_computed_and_one_class_user_skipped():
    user_ids = ["a", "a", "a", "b", "b", "b", "b", "c", "c"]
    labels = [1, 0, 0, 1, 1, 0, 0, 1, 1]
    scores = [0.9, 0.5, 0.95, 0.2, 0.6, 0.4, 0.1, 0.3, 0.7]
    # user a: positive 0.9 beats 0.5, loses to 0.95 -> AUC 1/2, n=3
    # user b: positives {0.2, 0.6} vs negatives {0.4, 0.1}: wins 0.2>0.1, 0.6>0.4, 0.6>0.1 -> 3/4, n=4
    # user c: only positives -> skipped
    expected = (3 * 0.5 + 4 * 0.75) / 7
    value, used, skipped = gauc(user_ids, labels, scores, return_counts=True)
    assert value == pytest.approx(expected)
    assert (used, skipped) == (2, 1)
    assert gauc(user_ids, labels, scores) == pytest.approx(expected)


def test_gauc_matches_per_user_sklearn_loop():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 40, size=1500)
    labels = rng.integers(0, 2, size=1500)
    scores = np.round(rng.random(1500), 2)
    total, weight = 0.0, 0
    for user in np.unique(users):
        sel = users == user
        if 0 < labels[sel].sum() < sel.sum():
            total += roc_auc_score(labels[sel], scores[sel]) * sel.sum()
            weight += sel.sum()
    assert gauc(users, labels, scores) == pytest.approx(total / weight, abs=1e-12)


def test_logloss_matches_sklearn_and_clips():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=500)
    probs = rng.uniform(0.01, 0.99, size=500)
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-10)
    # a certain mistake is clipped to -log(eps), finite
    assert logloss([1], [0.0], eps=1e-7) == pytest.approx(-np.log(1e-7))


def test_evaluate_by_bucket_one_class_bucket_gives_none():
    labels = np.array([1, 0, 1, 0, 1, 1])
    probs = np.array([0.9, 0.2, 0.6, 0.7, 0.4, 0.8])
    users = np.array(["u1", "u1", "u2", "u2", "u3", "u3"])
    buckets = np.array(["head", "head", "long_tail", "long_tail", "cold", "cold"])
    table = evaluate_by_bucket(labels, probs, users, buckets)
    assert set(table) == {"overall", "cold", "long_tail", "head"}
    assert table["overall"]["auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert table["overall"]["n"] == 6 and table["overall"]["n_pos"] == 4
    assert table["head"]["auc"] == 1.0 and table["long_tail"]["auc"] == 0.0
    cold = table["cold"]  # only positives: AUC/GAUC undefined, logloss defined
    assert cold["auc"] is None and cold["gauc"] is None
    assert cold["logloss"] == pytest.approx(log_loss([1, 1], [0.4, 0.8], labels=[0, 1]))
    assert cold["gauc_skipped_users"] == 1


def test_evaluate_by_bucket_empty_bucket_and_unknown_bucket():
    table = evaluate_by_bucket([1, 0], [0.7, 0.3], ["u", "u"], ["head", "head"])
    assert table["cold"] == {
        "auc": None, "gauc": None, "logloss": None, "n": 0, "n_pos": 0,
        "gauc_users": 0, "gauc_skipped_users": 0,
    }
    with pytest.raises(ValueError, match="warm"):
        evaluate_by_bucket([1, 0], [0.7, 0.3], ["u", "u"], ["head", "warm"])


@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "labels must be 0 or 1.*first 2"),
        ([0, 1, -1], [0.1, 0.2, 0.3], "labels must be 0 or 1"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], "NaN/inf.*position 1"),
        ([0, 1], [0.1, 0.2, 0.3], "same length"),
        ([1, 1], [0.1, 0.2], "one class"),
    ],
)
def test_auc_bad_input_raises(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        auc(labels, scores)


def test_other_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        logloss([0, 1], [-0.5, 2.0])  # logits passed instead of probabilities
    with pytest.raises(ValueError, match="same length"):
        gauc(["a", "a"], [0, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="none of the 2 user"):
        gauc(["a", "b"], [0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_by_bucket([0, 1], [0.1, float("nan")], ["a", "a"], ["head", "head"])


def test_ctr_metrics_evaluate_module_accumulates_batches():
    from mim_hf.ctr.metrics import CTRMetrics

    labels = [1, 0, 1, 0, 1, 0]
    probs = [0.9, 0.3, 0.4, 0.6, 0.8, 0.1]
    users = ["a", "a", "b", "b", "c", "c"]
    metric = CTRMetrics(keep_in_memory=True)
    metric.add_batch(predictions=probs[:3], references=labels[:3], user_ids=users[:3])
    result = metric.compute(predictions=probs[3:], references=labels[3:], user_ids=users[3:])
    assert result["auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert result["gauc"] == pytest.approx(gauc(users, labels, probs))
    assert result["n"] == 6

    by_bucket = CTRMetrics(config_name="by_bucket", keep_in_memory=True)
    buckets = ["head", "head", "cold", "cold", "long_tail", "long_tail"]
    table = by_bucket.compute(
        predictions=probs, references=labels, user_ids=users, popularity_bucket=buckets
    )
    assert table["cold"]["auc"] == 0.0 and table["head"]["auc"] == 1.0


def test_similarity_auc_example_scores_history_similarity():
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    import torch
    from datasets import Dataset

    path = Path(__file__).resolve().parents[1] / "examples" / "similarity_auc.py"
    spec = importlib.util.spec_from_file_location("similarity_auc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vectors = {"a": [1.0, 0.0], "b": [0.9, 0.1], "c": [0.0, 1.0]}
    center = SimpleNamespace(lookup=lambda ids: (torch.tensor([vectors[i] for i in ids]), torch.ones(len(ids), dtype=torch.bool)))
    # Targets similar to the history are clicked: AUC 1; the history-less row is skipped.
    samples = Dataset.from_dict({"item_id": ["b", "c", "b", "c", "a"],
                                 "behavior_item_ids": [["a"], ["a"], ["a", "b"], ["b"], []],
                                 "label": [1, 0, 1, 0, 1]})
    result = module.similarity_auc(SimpleNamespace(samples={"test": samples}), center)
    assert result == {"n": 4, "auc_mean_cos": 1.0, "auc_max_cos": 1.0}
    flipped = samples.map(lambda row: {"label": 1 - row["label"]})
    assert module.similarity_auc(SimpleNamespace(samples={"test": flipped}), center)["auc_mean_cos"] == 0.0
    # the attribute reference: "b" shares a genre with "a", "c" none; "c" is clicked here, so AUC 0
    items = {"item_id": ["a", "b", "c"], "genres": [["x", "y"], ["y"], ["z"]]}
    clicked_c = samples.map(lambda row: {"label": int(row["item_id"] == "c")})
    assert module.attribute_overlap_auc(SimpleNamespace(samples={"test": clicked_c}, items=items)) == {
        "n": 4, "auc_mean_jaccard": 0.0}
    assert module.attribute_overlap_auc(SimpleNamespace(samples={"test": samples}, items=items))["auc_mean_jaccard"] == 1.0
