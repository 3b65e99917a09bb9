"""Label schemes (rating / implicit with drawn negatives) and item folds for ``item-cold``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from mim_hf.cli import main as cli_main
from mim_hf.data import PreparedData, RecData, make_synthetic_world, prepare
from mim_hf.data.prepare import format_stats

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def world():
    return make_synthetic_world(n_users=40, n_items=60, seed=5, impressions_per_user=20)


@pytest.fixture(scope="module")
def log(world):
    return world.interactions.to_pandas()


def _samples(prepared: PreparedData) -> pd.DataFrame:
    return pd.concat([prepared.samples[s].to_pandas() for s in SPLITS], ignore_index=True)


def _negatives(prepared: PreparedData, log: pd.DataFrame) -> pd.DataFrame:
    """Sample rows that are not interactions of the log (the drawn negatives)."""
    samples = _samples(prepared)
    real = set(zip(log["user_id"], log["item_id"], log["timestamp"]))
    drawn = ~pd.Series([k in real for k in zip(samples["user_id"], samples["item_id"], samples["timestamp"])])
    return samples[drawn.to_numpy()]


# ---------------------------------------------------------------- label schemes

@pytest.mark.parametrize("protocol", ["temporal", "item-cold"])
def test_implicit_negatives_are_untouched_items_from_the_pool(world, log, protocol):
    prepared = prepare(world, protocol=protocol, labels="implicit", neg_ratio=3, seed=4)
    samples = _samples(prepared)
    negatives = _negatives(prepared, log)
    # Every interaction is a positive; every added row is a negative.
    assert len(samples) == len(log) + len(negatives)
    assert (samples.loc[~samples.index.isin(negatives.index), "label"] == 1).all()
    assert (negatives["label"] == 0).all()
    touched = set(zip(log["user_id"], log["item_id"]))
    assert not any(pair in touched for pair in zip(negatives["user_id"], negatives["item_id"]))
    # At a positive's timestamp, in the positive's split; neg_ratio per positive unless the pool is exhausted.
    positives = samples[~samples.index.isin(negatives.index)]
    per_positive = positives.groupby(["user_id", "timestamp", "split"]).size()
    per_negative = negatives.groupby(["user_id", "timestamp", "split"]).size()
    assert set(per_negative.index) <= set(per_positive.index)
    counts = prepared.stats["negatives"]
    for split in SPLITS:
        part = positives[positives["split"] == split]
        assert counts["drawn"][split] == (negatives["split"] == split).sum()
        assert counts["drawn"][split] == 3 * (len(part) - counts["positives_without_negative"][split])
    assert sum(counts["rejected_draws"].values()) > 0  # users touch many items: some draws were rejected
    if protocol == "item-cold":
        pool = {s: set(samples.loc[(samples["split"] == s) & ~samples.index.isin(negatives.index), "item_id"])
                for s in SPLITS}
        train_items = set(prepared.train_item_ids)
        assert set(negatives.loc[negatives["split"] == "train", "item_id"]) <= train_items
        held_out = set(world.items["item_id"]) - train_items
        for split in ("valid", "test"):
            drawn = set(negatives.loc[negatives["split"] == split, "item_id"])
            assert drawn <= held_out and drawn.isdisjoint(pool["valid" if split == "test" else "test"])
    else:
        first_seen = log.groupby("item_id")["timestamp"].min()
        assert (first_seen.reindex(negatives["item_id"]).to_numpy() <= negatives["timestamp"].to_numpy()).all()
    # Histories hold positives only; popularity counts interactions, not drawn negatives.
    negative_keys = set(zip(negatives["user_id"], negatives["item_id"], negatives["timestamp"]))
    for row in samples.itertuples():
        assert not any((row.user_id, i, t) in negative_keys for i, t in zip(row.behavior_item_ids, row.behavior_timestamps))
    train_counts = positives[positives["split"] == "train"]["item_id"].value_counts()
    n = train_counts.reindex(samples["item_id"]).fillna(0).to_numpy()
    np.testing.assert_array_equal(samples["popularity_bucket"].to_numpy(),
                                  np.where(n == 0, "cold", np.where(n <= 20, "long_tail", "head")))
    assert prepared.stats["interactions"] == len(log)


def test_implicit_negatives_are_deterministic_per_seed(world):
    a, b = (prepare(world, protocol="temporal", labels="implicit", seed=1) for _ in range(2))
    c = prepare(world, protocol="temporal", labels="implicit", seed=2)
    assert a.samples["train"].to_dict() == b.samples["train"].to_dict()
    assert a.samples["train"]["item_id"] != c.samples["train"]["item_id"]


def test_rating_labels_are_the_default_and_add_no_row(world, log):
    prepared = prepare(world, protocol="temporal")
    assert prepared.config.labels == "rating" and "negatives" not in prepared.stats
    samples = _samples(prepared)
    assert len(samples) == len(log) and samples["label"].sum() == log["label"].sum()


def test_implicit_negatives_saved_and_loaded(world, tmp_path):
    prepared = prepare(world, protocol="item-cold", labels="implicit", neg_ratio=2)
    loaded = PreparedData.load(prepared.save(tmp_path / "p"))
    assert loaded.config.labels == "implicit" and loaded.config.neg_ratio == 2
    for split in SPLITS:
        assert loaded.samples[split].to_dict() == prepared.samples[split].to_dict()
    assert loaded.stats["negatives"] == prepared.stats["negatives"]


def test_user_who_touched_the_whole_pool_gets_no_negative_counted():
    items = Dataset.from_dict({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"]})
    # u touched every item; v leaves "c" untouched.
    log = Dataset.from_dict({"user_id": ["u", "u", "u", "v", "v"], "item_id": ["a", "b", "c", "a", "b"],
                             "timestamp": [1, 2, 3, 4, 5], "label": [1, 1, 1, 1, 1]})
    prepared = prepare(RecData("tiny", items, log), protocol="temporal", labels="implicit", neg_ratio=2,
                       fractions=(0.6, 0.2, 0.2))
    samples = _samples(prepared)
    counts = prepared.stats["negatives"]
    assert sum(counts["positives_without_negative"].values()) == 3  # u's three positives
    negatives = samples[samples["label"] == 0]
    assert set(negatives["user_id"]) == {"v"} and set(negatives["item_id"]) == {"c"}
    assert len(negatives) == 2 * 2  # v's two positives, two negatives each
    assert "positives_without_negative=" in format_stats(prepared.stats)


@pytest.mark.parametrize("values, match", [
    ({"labels": "clicks"}, r"labels 'clicks' is not one of \['rating', 'implicit'\]"),
    ({"neg_ratio": 0}, "neg_ratio must be an integer >= 1.*got 0"),
    ({"neg_ratio": -2, "labels": "implicit"}, "neg_ratio must be.*got -2"),
])
def test_bad_label_settings_named(world, values, match):
    with pytest.raises(ValueError, match=match):
        prepare(world, protocol="temporal", **values)


# ---------------------------------------------------------------- item folds

def test_default_item_cold_is_the_single_80_10_10_hold_out(world):
    prepared = prepare(world, protocol="item-cold", seed=3)
    assert prepared.config.folds is None and "fold" not in prepared.stats
    ids = np.asarray(world.items["item_id"], dtype=object)
    shuffled = ids[np.random.default_rng(3).permutation(len(ids))]
    assert prepared.train_item_ids == sorted(shuffled[:48])
    samples = _samples(prepared)
    test_items = set(samples.loc[samples["split"] == "test", "item_id"])
    assert test_items <= set(shuffled[54:]) and set(samples.loc[samples["split"] == "valid", "item_id"]) <= set(shuffled[48:54])


def test_folds_partition_items_and_hold_them_out_everywhere(world):
    folds = 5
    catalogue = set(world.items["item_id"])
    test_sets, valid_sets = [], []
    for fold in range(folds):
        prepared = prepare(world, protocol="item-cold", folds=folds, fold=fold, labels="implicit")
        assert prepared.stats["fold"] == {"folds": folds, "fold": fold}
        train_items = set(prepared.train_item_ids)
        held_out = catalogue - train_items
        assert len(held_out) == 2 * len(catalogue) // folds
        samples = _samples(prepared)
        test_sets.append(set(samples.loc[samples["split"] == "test", "item_id"]))
        valid_sets.append(set(samples.loc[samples["split"] == "valid", "item_id"]))
        assert (test_sets[-1] | valid_sets[-1]) <= held_out
        # Nothing from a held-out item in any vocabulary, history, pair or count.
        for name, vocab in prepared.vocabs.items():
            assert held_out.isdisjoint(vocab.tokens), name
        assert held_out.isdisjoint(set(samples.loc[samples["split"] == "train", "item_id"]))
        assert all(held_out.isdisjoint(seq) for seq in samples["behavior_item_ids"])
        train_pairs = prepared.pairs["train"].to_pandas()
        assert held_out.isdisjoint(set(train_pairs["trigger_item_id"]) | set(train_pairs["target_item_id"]))
        assert held_out.isdisjoint(set(prepared.pairs["valid"]["trigger_item_id"]))
        assert (samples.loc[samples["split"] != "train", "popularity_bucket"] == "cold").all()
        assert set(prepared.vocabs["item_id"].tokens[1:]) <= train_items
    for i in range(folds):
        for j in range(folds):
            assert i == j or test_sets[i].isdisjoint(test_sets[j])
            # fold i's valid part is fold i+1's test part
            assert j == (i + 1) % folds or valid_sets[i].isdisjoint(test_sets[j])
    # The test parts cover every item that has interactions.
    assert set(world.interactions["item_id"]) <= set().union(*test_sets) <= catalogue


@pytest.mark.parametrize("values, match", [
    ({"folds": 2}, "folds must be an integer >= 3.*got 2"),
    ({"folds": 1}, "folds must be an integer >= 3.*got 1"),
    ({"folds": 61}, r"folds=61 but the items table has only 60 item\(s\); expected folds <= 60"),
    ({"folds": 5, "fold": 5}, r"fold must be an integer in 0..4 \(folds=5\), got 5"),
    ({"folds": 5, "fold": -1}, r"fold must be an integer in 0..4 \(folds=5\), got -1"),
    ({"fold": 2}, "fold 2 needs folds"),
    ({"folds": 5, "protocol": "temporal"}, "only protocol='item-cold' does; got protocol='temporal'"),
])
def test_bad_fold_settings_named(world, values, match):
    with pytest.raises(ValueError, match=match):
        prepare(world, **{"protocol": "item-cold", **values})


def test_cli_prepare_labels_and_folds(tmp_path, capsys):
    args = ["data", "prepare", "--dataset", "synthetic", "--n-users", "20", "--n-items", "30", "--out", str(tmp_path),
            "--protocol", "all", "--labels", "implicit", "--neg-ratio", "2", "--folds", "5", "--fold", "1", "--json"]
    assert cli_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["item-cold"]["stats"]["fold"] == {"folds": 5, "fold": 1}
    assert "fold" not in result["temporal"]["stats"]  # folds split items: item-cold only
    for protocol in ("temporal", "item-cold"):
        assert result[protocol]["stats"]["negatives"]["neg_ratio"] == 2
        assert PreparedData.load(tmp_path / protocol).config.labels == "implicit"
    assert cli_main(["data", "stats", str(tmp_path / "item-cold")]) == 0
    text = capsys.readouterr().out
    assert "item fold 1 of 5" in text and "rejected_draws=" in text
    with pytest.raises(SystemExit, match="error: mim-hf data prepare: neg_ratio must be an integer >= 1"):
        cli_main([*args, "--neg-ratio", "0"])  # the last value wins


def test_data_card_describes_fold_and_labels(world):
    from mim_hf.common.cards import data_card

    prepared = prepare(world, protocol="item-cold", folds=4, fold=2, labels="implicit", neg_ratio=3)
    card = data_card(prepared.metadata(), prepared.stats, {"samples": {"train": 1}}, {"samples": ["user_id"]}, "org/x")
    assert "cut into 4 folds at random; this is fold 2" in card.text
    assert "3 drawn negative(s) per positive" in card.text
    assert "from mim_hf.data.hub import load_prepared_from_hub" in card.text
