"""C-SFT pair sources (mim_hf.csft.pairs): ID-aligned and co-occurrence train pairs, their
leakage rules, the DIN embedding loader's checks and the wiring into PairBatches."""

import numpy as np
import pytest
from datasets import Dataset

from mim_hf.csft.pairs import cooccurrence_pairs, din_item_embeddings, id_aligned_pairs, train_pairs_for
from mim_hf.csft.train import CSFTConfig, PairBatches
from mim_hf.data import RecData, make_synthetic_world, prepare


def _prepared(rows, items):
    """A temporal PreparedData of ``rows`` (user, item, timestamp, label): 80/10/10 by time."""
    items = Dataset.from_dict({"item_id": items, "title": [f"title {i}" for i in items]})
    user, item, time, label = zip(*rows)
    log = Dataset.from_dict({"user_id": list(user), "item_id": list(item), "timestamp": list(time),
                             "label": list(label)})
    return prepare(RecData("hand-made", items, log), protocol="temporal")


@pytest.fixture(scope="module")
def sequence():
    """u1 likes a, b, c, d in turn; u2 has one positive (e) and one negative (f); u3 likes a, b;
    g and h are u1's later (valid, test) positives."""
    rows = [("u1", "a", 1, 1), ("u1", "b", 2, 1), ("u1", "c", 3, 1), ("u1", "d", 4, 1), ("u2", "e", 5, 1),
            ("u2", "f", 6, 0), ("u3", "a", 7, 1), ("u3", "b", 8, 1), ("u1", "g", 9, 1), ("u1", "h", 10, 1)]
    return _prepared(rows, list("abcdefgh"))


@pytest.fixture(scope="module")
def co_liked():
    """u9: b a c; u2: a b; u3: a c (+ a negative e); u4: one positive d; u6: c f c f; later
    (valid/test) positives y, z -- u9's y would co-occur with c if the valid split leaked."""
    rows = [("u9", "b", 1, 1), ("u9", "a", 2, 1), ("u9", "c", 3, 1), ("u2", "a", 4, 1), ("u2", "b", 5, 1),
            ("u3", "a", 6, 1), ("u3", "c", 7, 1), ("u4", "d", 8, 1), ("u6", "c", 9, 1), ("u6", "f", 10, 1),
            ("u6", "c", 11, 1), ("u6", "f", 12, 1), ("u3", "e", 13, 0), ("u5", "y", 14, 1), ("u9", "y", 15, 1),
            ("u2", "z", 16, 1)]
    prepared = _prepared(rows, list("abcdefyz"))
    assert len(prepared.samples["train"]) == 13  # the fixture's premise: y and z lie outside train
    return prepared


@pytest.fixture(scope="module", params=["temporal", "item-cold"])
def world(request):
    return prepare(make_synthetic_world(n_users=30, n_items=40, impressions_per_user=12), protocol=request.param)


def _embeddings(prepared, vectors: dict, dim: int = 2, seed: int = 0):
    """A vocabulary-ordered table: ``vectors`` for the named items, random rows for the rest."""
    tokens = prepared.vocabs["item_id"].tokens
    table = np.random.default_rng(seed).normal(size=(len(tokens), dim))
    for item, vector in vectors.items():
        table[tokens.index(item)] = vector
    return table


def _pairs_of(pairs):
    return [(r["user_id"], r["trigger_item_id"], r["target_item_id"], r["trigger_timestamp"], r["target_timestamp"])
            for r in pairs]


def test_id_aligned_picks_the_earlier_positive_nearest_by_cosine(sequence):
    # d is closest to a by cosine; b has the larger dot product with d (norm 10) but not the cosine.
    # c points exactly like b, so it is b's nearest item -- but c is later than b, never its trigger.
    table = _embeddings(sequence, {"a": [1, 0], "b": [0, 10], "c": [0, 1], "d": [1, 0.1]})
    pairs, stats = id_aligned_pairs(sequence, table)
    assert _pairs_of(pairs) == [("u1", "a", "b", 1, 2), ("u1", "b", "c", 2, 3), ("u1", "a", "d", 1, 4),
                                ("u3", "a", "b", 7, 8)]
    # a (twice) and e have no earlier positive: skipped and counted, never silently.
    assert stats == {"train_positive_targets": 7, "pairs": 4, "targets_without_earlier_positive": 3,
                     "trigger_is_most_recent": 3}
    assert pairs.features == sequence.pairs["train"].features


def test_id_aligned_ties_go_to_the_most_recent(sequence):
    table = _embeddings(sequence, {"a": [1, 0], "b": [2, 0], "c": [1, 0], "d": [0, 1]})
    pairs, _ = id_aligned_pairs(sequence, table)
    by_target = {(r["user_id"], r["target_item_id"]): r["trigger_item_id"] for r in pairs}
    assert by_target[("u1", "c")] == "b"  # a and b score 1.0 against c: the later one wins


def test_id_aligned_checks_the_table_shape(sequence):
    with pytest.raises(ValueError, match=r"shape \(3, 2\); expected \(7, d\)"):
        id_aligned_pairs(sequence, np.ones((3, 2)))


def test_cooccurrence_counts_distinct_users_within_the_window(co_liked):
    pairs, stats = cooccurrence_pairs(co_liked, window=2, max_pairs_per_item=1)
    # window 2: ab by u9 and u2, ac by u9 and u3, cf by u6 alone (three times, counted once, so c
    # pairs with a); a's tie (b, c at two users each) goes to the lower id. The evidence is the
    # latest co-occurrence (ab: u2's a@4, b@5, not u9's b@1, a@2 -- the larger user id; cf: u6's c@11, f@12).
    assert _pairs_of(pairs) == [("u2", "a", "b", 4, 5), ("u2", "b", "a", 5, 4), ("u3", "c", "a", 7, 6),
                                ("u6", "f", "c", 12, 11)]
    assert stats == {"window": 2, "max_pairs_per_item": 1, "train_positives": 12, "users": 5,
                     "users_with_one_positive": 1, "co_occurring_item_pairs": 3, "pairs": 4,
                     "pairs_over_max_per_item": 2, "trigger_items": 4}
    wider, wider_stats = cooccurrence_pairs(co_liked, window=3, max_pairs_per_item=2)
    # window 3 adds u9's (b, c); c keeps a and b (b, f tie at one user). Neither y (u9's valid
    # positive) nor e (u3's negative) ever appears.
    assert [(t, g) for _, t, g, _, _ in _pairs_of(wider)] == [("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"),
                                                              ("c", "a"), ("c", "b"), ("f", "c")]
    assert wider_stats["co_occurring_item_pairs"] == 4 and wider_stats["pairs_over_max_per_item"] == 1
    assert wider.features == co_liked.pairs["train"].features


@pytest.mark.parametrize("builder", ["id_aligned", "cooccurrence"])
def test_pairs_are_train_positives_of_training_items_only(world, builder):
    train = world.samples["train"].to_pandas()
    positive = train[train["label"] == 1]
    events = set(zip(positive["user_id"], positive["item_id"], positive["timestamp"]))
    if builder == "id_aligned":
        pairs, stats = id_aligned_pairs(world, _embeddings(world, {}, dim=8))
    else:
        pairs, stats = cooccurrence_pairs(world, window=4, max_pairs_per_item=3)
    rows = _pairs_of(pairs)
    assert rows and stats["pairs"] == len(rows)
    for user, trigger, target, trigger_time, target_time in rows:
        assert (user, trigger, trigger_time) in events and (user, target, target_time) in events
        assert trigger != target
        if builder == "id_aligned":
            assert trigger_time < target_time
    used = {item for _, trigger, target, _, _ in rows for item in (trigger, target)}
    assert used <= set(world.train_item_ids)
    held_out = {item for split in ("valid", "test") for item in world.samples[split]["item_id"]}
    if world.config.protocol == "item-cold":
        assert held_out and not used & held_out
    # Rebuilt from scratch, the pairs are the same.
    again = id_aligned_pairs(world, _embeddings(world, {}, dim=8)) if builder == "id_aligned" else \
        cooccurrence_pairs(world, window=4, max_pairs_per_item=3)
    assert _pairs_of(again[0]) == rows and again[1] == stats


def test_id_aligned_targets_are_the_behaviour_pairs_targets(world):
    pairs, stats = id_aligned_pairs(world, _embeddings(world, {}, dim=8))
    targets = {(r["user_id"], r["target_item_id"], r["target_timestamp"]) for r in pairs}
    behaviour = {(r["user_id"], r["target_item_id"], r["target_timestamp"]) for r in world.pairs["train"]}
    assert behaviour <= targets and len(targets) == len(pairs)  # one trigger per target
    assert stats["pairs"] + stats["targets_without_earlier_positive"] == stats["train_positive_targets"]
    assert stats["targets_without_earlier_positive"] > 0


def _save_ctr_model(folder, item_tokens, user_tokens):
    from mim_hf.modeling.configuration_ciubm import CiUBMConfig
    from mim_hf.modeling.modeling_ciubm import CiUBMForCTR

    config = CiUBMConfig(mode="din", vocabularies={"user_id": list(user_tokens), "item_id": list(item_tokens)},
                         id_embed_dim=4, content_dim=4, content_proj_dim=4, attention_hidden_sizes=[4],
                         fusion_hidden_sizes=[4], histogram_n_bins=2)
    model = CiUBMForCTR(config)
    model.save_pretrained(folder)
    return model.embeddings.item_id_embeddings.weight.detach().numpy()


def test_din_item_embeddings_feed_id_aligned_pairs(sequence, tmp_path):
    weight = _save_ctr_model(tmp_path / "din", sequence.vocabs["item_id"].tokens, sequence.vocabs["user_id"].tokens)
    np.testing.assert_array_equal(din_item_embeddings(tmp_path / "din", sequence), weight)
    config = CSFTConfig(data_dir="unused", pair_source="id_aligned", id_model_path=str(tmp_path / "din"))
    config.validate()
    pairs, stats = train_pairs_for(sequence, config)
    expected, expected_stats = id_aligned_pairs(sequence, weight)
    assert _pairs_of(pairs) == _pairs_of(expected) and stats == expected_stats


def test_din_item_embeddings_refuse_other_vocabularies_and_missing_models(sequence, tmp_path):
    tokens, users = sequence.vocabs["item_id"].tokens, sequence.vocabs["user_id"].tokens
    _save_ctr_model(tmp_path / "bigger", tokens + ["zz"], users)
    with pytest.raises(ValueError, match="another item vocabulary \\(8 item tokens, the prepared data 7"):
        din_item_embeddings(tmp_path / "bigger", sequence)
    _save_ctr_model(tmp_path / "renamed", tokens[:-1] + ["zz"], users)
    with pytest.raises(ValueError, match="the same 7 item tokens in another order or with other ids"):
        din_item_embeddings(tmp_path / "renamed", sequence)
    with pytest.raises(ValueError, match="id_model_path '.*nowhere' holds no trained CTR model"):
        din_item_embeddings(tmp_path / "nowhere", sequence)


def test_pair_source_config_is_validated():
    with pytest.raises(ValueError, match="pair_source='id_aligned' needs id_model_path"):
        CSFTConfig(data_dir="d", pair_source="id_aligned").validate()
    with pytest.raises(ValueError, match="pair_source must be one of"):
        CSFTConfig(data_dir="d", pair_source="swing").validate()
    with pytest.raises(ValueError, match="id_model_path='m' is only read with pair_source='id_aligned'"):
        CSFTConfig(data_dir="d", id_model_path="m").validate()
    with pytest.raises(ValueError, match="cooccurrence_window must be an int >= 2, got 1"):
        CSFTConfig(data_dir="d", pair_source="cooccurrence", cooccurrence_window=1).validate()


def test_pair_batches_take_the_configured_source(co_liked):
    class _Processor:
        image_field = "image"

    behaviour = PairBatches(co_liked, _Processor(), object(), CSFTConfig(data_dir="d"))
    assert len(behaviour) == len(co_liked.pairs["train"]) and behaviour.pair_stats == {}
    config = CSFTConfig(data_dir="d", pair_source="cooccurrence", cooccurrence_window=2, cooccurrence_pairs_per_item=1)
    batches = PairBatches(co_liked, _Processor(), object(), config)
    rows = {co_liked.items["item_id"][r]: r for r in range(len(co_liked.items))}
    assert batches.trigger_rows.tolist() == [rows["a"], rows["b"], rows["c"], rows["f"]]
    assert batches.target_rows.tolist() == [rows["b"], rows["a"], rows["a"], rows["c"]]
    assert batches.pair_stats["pairs"] == 4
