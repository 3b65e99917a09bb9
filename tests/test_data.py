"""Data layer: loaders, protocols, leakage rules, synthetic world, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from mim_hf.cli import main as cli_main
from mim_hf.data import (
    PreparedData,
    RecData,
    Vocabulary,
    load_movielens_100k,
    make_synthetic_world,
    prepare,
    validate_interactions,
    validate_items,
)
from mim_hf.data.movielens import natural_title
from mim_hf.data.prepare import format_stats
from mim_hf.data.tables import ValidationReport


@pytest.fixture(scope="module")
def world():
    return make_synthetic_world(n_users=60, n_items=80, seed=3, impressions_per_user=30)


@pytest.fixture(scope="module", params=["temporal", "item-cold"])
def prepared(request, world):
    return prepare(world, protocol=request.param, max_len=8)


def _all_samples(prepared: PreparedData) -> pd.DataFrame:
    return pd.concat([prepared.samples[s].to_pandas() for s in ("train", "valid", "test")], ignore_index=True)


# ---------------------------------------------------------------- MovieLens-100k (real data)

@pytest.fixture(scope="module")
def movielens():
    # Reads the recbole wheel from the cache (fetched once with `pip download --no-deps`).
    return load_movielens_100k()


def test_movielens_counts_and_labels(movielens):
    assert len(movielens.items) == 1682
    assert len(movielens.interactions) == 100_000
    frame = movielens.interactions.to_pandas()
    assert frame["user_id"].nunique() == 943
    np.testing.assert_array_equal(frame["label"].to_numpy(), (frame["rating"] >= 4).astype("int8").to_numpy())
    titles = dict(zip(movielens.items["item_id"], movielens.items["title"]))
    assert titles["1"] == "Toy Story"
    assert titles["12"] == "The Usual Suspects"
    assert movielens.items[0]["genres"] == ["Animation", "Children's", "Comedy"]
    assert movielens.items[0]["year"] == 1995
    assert set(movielens.users.column_names) == {"user_id", "age", "gender", "occupation"}


def test_movielens_prepare_both_protocols(movielens):
    temporal = prepare(movielens, protocol="temporal")
    rows = {s: len(temporal.samples[s]) for s in ("train", "valid", "test")}
    assert rows == {"train": 80_000, "valid": 10_000, "test": 10_000}
    cold = prepare(movielens, protocol="item-cold")
    assert cold.stats["splits"]["test"]["popularity_buckets"]["cold"] == len(cold.samples["test"])
    assert len(cold.train_item_ids) == round(1682 * 0.8)


def test_grouplens_folder(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t100\n1\t11\t2\t200\n2\t10\t4\t150\n")
    flags = ["0"] * 19
    drama = flags.copy()
    drama[8] = "1"
    comedy_war = flags.copy()
    comedy_war[5] = comedy_war[17] = "1"
    (tmp_path / "u.item").write_text(
        "|".join(["10", "Postino, Il (1994)", "01-Jan-1994", "", "http://x"] + drama) + "\n"
        + "|".join(["11", "Some Film (1997)", "01-Jan-1997", "", "http://y"] + comedy_war) + "\n",
        encoding="latin-1",
    )
    data = load_movielens_100k(tmp_path)
    assert data.items["title"] == ["Il Postino", "Some Film"]
    assert data.items["genres"] == [["Drama"], ["Comedy", "War"]]
    assert data.items["year"] == [1994, 1997]
    assert data.interactions["label"] == [1, 0, 1]


def test_movielens_bad_source(tmp_path):
    with pytest.raises(ValueError, match="neither a recbole wheel"):
        load_movielens_100k(tmp_path)


def test_natural_title():
    assert natural_title("Usual Suspects, The") == "The Usual Suspects"
    assert natural_title("Toy Story") == "Toy Story"


# ---------------------------------------------------------------- leakage rules

def test_behaviours_strictly_earlier_positives_of_same_user(prepared):
    samples = _all_samples(prepared)
    positives = samples[samples["label"] == 1]
    positive_keys = set(zip(positives["user_id"], positives["item_id"], positives["timestamp"]))
    for row in samples.itertuples():
        assert len(row.behavior_item_ids) <= prepared.config.max_len
        assert all(t < row.timestamp for t in row.behavior_timestamps)
        assert list(row.behavior_timestamps) == sorted(row.behavior_timestamps)  # most recent last
        for item, ts in zip(row.behavior_item_ids, row.behavior_timestamps):
            assert (row.user_id, item, ts) in positive_keys


def test_behaviours_match_brute_force(prepared):
    samples = _all_samples(prepared)
    history = samples[samples["label"] == 1]
    if prepared.config.protocol == "item-cold":
        history = history[history["split"] == "train"]
    by_user = {u: g.sort_values("timestamp", kind="stable") for u, g in history.groupby("user_id")}
    for row in samples.sample(200, random_state=0).itertuples():
        group = by_user.get(row.user_id)
        expected = [] if group is None else group[group["timestamp"] < row.timestamp]["timestamp"].tolist()[-prepared.config.max_len:]
        assert list(row.behavior_timestamps) == expected


def test_popularity_and_vocabularies_from_train_only(prepared):
    train = prepared.samples["train"].to_pandas()
    counts = train["item_id"].value_counts()
    for split in ("train", "valid", "test"):
        frame = prepared.samples[split].to_pandas()
        n = counts.reindex(frame["item_id"]).fillna(0).to_numpy()
        expected = np.where(n == 0, "cold", np.where(n <= 20, "long_tail", "head"))
        np.testing.assert_array_equal(frame["popularity_bucket"].to_numpy(), expected)
    assert set(prepared.vocabs["item_id"].tokens[1:]) == set(train["item_id"])
    assert set(prepared.vocabs["user_id"].tokens[1:]) == set(train["user_id"])
    assert set(prepared.vocabs["item_category"].tokens[1:]) == set(train["item_category"])


def test_item_cold_held_out_items_never_seen(world):
    cold = prepare(world, protocol="item-cold", max_len=8)
    held_out = set(cold.samples["valid"]["item_id"]) | set(cold.samples["test"]["item_id"])
    assert held_out, "item-cold must hold some items out"
    assert held_out.isdisjoint(cold.vocabs["item_id"].tokens)
    assert held_out.isdisjoint(cold.train_item_ids)
    assert held_out.isdisjoint(set(cold.samples["train"]["item_id"]))
    for split in ("train", "valid", "test"):
        for seq in cold.samples[split]["behavior_item_ids"]:
            assert held_out.isdisjoint(seq)
        assert set(cold.samples[split]["popularity_bucket"]) == ({"cold"} if split != "train" else set(cold.samples[split]["popularity_bucket"]) - {"cold"})
    train_pairs = cold.pairs["train"].to_pandas()
    assert held_out.isdisjoint(set(train_pairs["trigger_item_id"]) | set(train_pairs["target_item_id"]))


def test_train_pairs_stay_in_training_period(prepared):
    train = prepared.samples["train"].to_pandas()
    train_positive = set(zip(train.loc[train["label"] == 1, "user_id"], train.loc[train["label"] == 1, "item_id"],
                             train.loc[train["label"] == 1, "timestamp"]))
    pairs = prepared.pairs["train"].to_pandas()
    assert len(pairs) > 0
    assert (pairs["trigger_timestamp"] < pairs["target_timestamp"]).all()
    for row in pairs.itertuples():
        assert (row.user_id, row.trigger_item_id, row.trigger_timestamp) in train_positive
        assert (row.user_id, row.target_item_id, row.target_timestamp) in train_positive
    # Held-out pairs: one trigger per positive target of that split.
    for split in ("valid", "test"):
        held = prepared.pairs[split].to_pandas()
        frame = prepared.samples[split].to_pandas()
        assert set(held["target_item_id"]) <= set(frame.loc[frame["label"] == 1, "item_id"])


def test_temporal_split_is_time_ordered(world):
    temporal = prepare(world, protocol="temporal")
    last_train = max(temporal.samples["train"]["timestamp"])
    first_test = min(temporal.samples["test"]["timestamp"])
    assert last_train <= first_test
    assert [len(temporal.samples[s]) for s in ("train", "valid", "test")] == [1440, 180, 180]


def test_prepared_save_load_round_trip(prepared, tmp_path):
    prepared.save(tmp_path / "p")
    loaded = PreparedData.load(tmp_path / "p")
    assert loaded.config == prepared.config
    assert loaded.train_item_ids == prepared.train_item_ids
    assert loaded.stats == json.loads(json.dumps(prepared.stats))
    for split in ("train", "valid", "test"):
        assert loaded.samples[split].to_dict() == prepared.samples[split].to_dict()
        assert loaded.pairs[split].to_dict() == prepared.pairs[split].to_dict()
    assert {k: v.tokens for k, v in loaded.vocabs.items()} == {k: v.tokens for k, v in prepared.vocabs.items()}


def test_load_rejects_non_prepared_dir(tmp_path):
    with pytest.raises(ValueError, match="not a prepared-data directory"):
        PreparedData.load(tmp_path)


# ---------------------------------------------------------------- synthetic world

def test_synthetic_world_is_deterministic():
    a = make_synthetic_world(n_users=20, n_items=30, seed=7, impressions_per_user=10)
    b = make_synthetic_world(n_users=20, n_items=30, seed=7, impressions_per_user=10)
    c = make_synthetic_world(n_users=20, n_items=30, seed=8, impressions_per_user=10)
    assert a.interactions.to_dict() == b.interactions.to_dict()
    assert a.items["title"] == b.items["title"]
    assert [np.asarray(i).tobytes() for i in a.items["image"]] == [np.asarray(i).tobytes() for i in b.items["image"]]
    np.testing.assert_array_equal(a.truth["click_probability"], b.truth["click_probability"])
    assert a.interactions.to_dict() != c.interactions.to_dict()


def test_synthetic_content_matches_truth(world):
    truth = world.truth
    for i in range(len(world.items)):
        item = world.items[i]
        colour = truth["colours"][truth["item_colour"][i]]
        shape = truth["shapes"][truth["item_shape"][i]]
        assert colour in item["title"] and shape in item["title"] and truth["patterns"][truth["item_pattern"][i]] in item["title"]
        assert item["category"] == shape
        pixels = np.asarray(item["image"]).reshape(-1, 3).astype(int)
        from mim_hf.data.synthetic import COLOURS
        # The item's own colour is drawn somewhere on the picture.
        assert (np.abs(pixels - np.array(COLOURS[colour])).sum(axis=1) < 10).any()
    assert (truth["complement_shape"] != np.arange(len(truth["shapes"]))).all()


def test_synthetic_clicks_follow_taste(world):
    truth = world.truth
    frame = world.interactions.to_pandas()
    users = frame["user_id"].str[1:].astype(int).to_numpy()
    items = frame["item_id"].str[1:].astype(int).to_numpy()
    taste = truth["taste_colour"][users, truth["item_colour"][items]]
    liked = taste > np.median(taste)
    assert frame["label"][liked].mean() > frame["label"][~liked].mean() + 0.1
    np.testing.assert_allclose(frame["label"].mean(), truth["click_probability"].mean(), atol=0.05)


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_items must be a positive integer"):
        make_synthetic_world(n_items=0)


# ---------------------------------------------------------------- bad input

def _items(**overrides):
    data = {"item_id": ["a", "b", "c"], "title": ["Alpha", "Beta", "Gamma"], "genres": [["x"], ["y"], []]}
    data.update(overrides)
    return Dataset.from_dict(data)


def _interactions(**overrides):
    data = {"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "c"], "timestamp": [1, 2, 3], "label": [1, 0, 1]}
    data.update(overrides)
    return Dataset.from_dict(data)


def test_missing_columns_named():
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['title'\]"):
        validate_items(Dataset.from_dict({"item_id": ["a"], "name": ["x"]}))
    with pytest.raises(ValueError, match=r"interactions table is missing required column\(s\) \['timestamp'\]"):
        validate_interactions(Dataset.from_dict({"user_id": ["u"], "item_id": ["a"], "time": [1], "label": [1]}), _items())


def test_duplicate_item_ids():
    with pytest.raises(ValueError, match=r"duplicate item_id value\(s\), e.g. \['a'\]"):
        validate_items(_items(item_id=["a", "a", "c"]))


def test_unknown_items_in_interactions():
    with pytest.raises(ValueError, match=r"item_id 'x91' \(row 1\) absent from items table \(3 rows\)"):
        validate_interactions(_interactions(item_id=["a", "x91", "c"]), validate_items(_items()))


@pytest.mark.parametrize("labels, bad", [([1, float("nan"), 0], "nan"), ([1, 2, 0], "2")])
def test_bad_labels(labels, bad):
    with pytest.raises(ValueError, match=rf"label at row 1 is {bad}.*expected 0 or 1"):
        validate_interactions(_interactions(label=labels), validate_items(_items()))


def test_non_numeric_timestamps():
    with pytest.raises(ValueError, match=r"timestamp must be numeric.*row 1 has 'yesterday'"):
        validate_interactions(_interactions(timestamp=["1", "yesterday", "3"]), validate_items(_items()))


def test_datetime_timestamps_become_seconds():
    stamps = pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-03"])
    out = validate_interactions(Dataset.from_pandas(pd.DataFrame({
        "user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "c"], "timestamp": stamps, "label": [1, 0, 1]})), validate_items(_items()))
    assert list(out["timestamp"]) == [1577836800, 1577923200, 1578009600]


def test_empty_titles_are_counted_fallback():
    report = ValidationReport()
    items = validate_items(_items(title=["Alpha", "   ", None]), report)
    assert items["title"] == ["Alpha", "", ""]
    assert report.empty_titles == 2


def test_unreadable_images_are_counted_fallback(tmp_path):
    from PIL import Image

    good = Image.new("RGB", (4, 4), (1, 2, 3))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    items = Dataset.from_dict({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"], "image": [good, str(broken), None]})
    from datasets import Image as ImageFeature
    items = items.cast_column("image", ImageFeature())
    report = ValidationReport()
    out = validate_items(items, report)
    assert report.unreadable_images == 1 and report.missing_images == 1
    assert out[0]["image"].size == (4, 4) and out[1]["image"] is None and out[2]["image"] is None


@pytest.mark.parametrize("max_len", [0, -3])
def test_bad_max_len(world, max_len):
    with pytest.raises(ValueError, match=rf"max_len must be a positive integer, got {max_len}"):
        prepare(world, max_len=max_len)


def test_bad_protocol(world):
    with pytest.raises(ValueError, match=r"protocol 'random' is not one of"):
        prepare(world, protocol="random")


def test_prepare_on_hand_made_tables():
    items = validate_items(_items())
    data = RecData("tiny", items, validate_interactions(_interactions(), items))
    out = prepare(data, protocol="temporal", fractions=(0.34, 0.33, 0.33))
    assert sum(len(out.samples[s]) for s in ("train", "valid", "test")) == 3
    assert out.stats["interactions"] == 3


# ---------------------------------------------------------------- vocabulary, CLI

def test_vocabulary_encode_counts_unknown():
    vocab = Vocabulary.build([["b", "a"], ["a"], []], "genres")
    assert vocab.tokens == ["[UNK]", "a", "b"]
    np.testing.assert_array_equal(vocab.encode(["b", "zzz", "a"]), [2, 0, 1])
    assert vocab.unknown_count == 1
    # distinct values encoded once, standing for several occurrences each: unknowns counted per occurrence
    np.testing.assert_array_equal(vocab.encode(["zzz", "a", "yyy"], counts=np.array([3, 5, 2])), [0, 1, 0])
    assert vocab.unknown_count == 1 + 3 + 2
    assert Vocabulary.from_dict(vocab.to_dict()).tokens == vocab.tokens
    with pytest.raises(ValueError, match="duplicate tokens"):
        Vocabulary(["a", "a"])


def test_cli_prepare_synthetic_json(tmp_path, capsys):
    assert cli_main(["data", "prepare", "--dataset", "synthetic", "--n-users", "20", "--n-items", "30",
                     "--out", str(tmp_path), "--protocol", "item-cold", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    stats = result["item-cold"]["stats"]
    assert stats["protocol"] == "item-cold" and stats["items"] == 30
    assert (tmp_path / "item-cold" / "stats.json").exists()
    assert cli_main(["data", "stats", str(tmp_path / "item-cold")]) == 0
    assert "protocol=item-cold" in capsys.readouterr().out


def test_cli_help_explains_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["data", "prepare", "--help"])
    text = capsys.readouterr().out
    for option in ("--dataset", "--out", "--protocol", "--max-len", "--seed", "--source", "--json"):
        assert option in text


# ---------------------------------------------------------------- regressions found by tests/test_fuzz_data.py

def test_items_with_only_id_and_title_columns():
    items = validate_items(Dataset.from_dict({"item_id": ["a", "b"], "title": ["A", None]}))
    assert items.column_names == ["item_id", "title"] and items["title"] == ["A", ""]


def test_ids_of_any_scalar_dtype_become_the_same_strings():
    items = validate_items(Dataset.from_pandas(pd.DataFrame({"item_id": [1, 2], "title": ["A", "B"]})))
    assert items["item_id"] == ["1", "2"]
    # An int id column with gaps reads back as float: 2.0 is item "2", not "2.0".
    frame = pd.DataFrame({"user_id": [7.0, 8.0], "item_id": [2.0, 1.0], "timestamp": [5, 6], "label": [True, False]})
    out = validate_interactions(Dataset.from_pandas(frame), items)
    assert out["user_id"] == ["7", "8"] and out["item_id"] == ["2", "1"] and out["label"] == [1, 0]


@pytest.mark.parametrize("ids, bad", [(["a", " "], "' '"), (["a", "[UNK]"], "'\\[UNK\\]'"), ([["x"], ["y"]], "array")])
def test_bad_ids_named(ids, bad):
    with pytest.raises(ValueError, match=rf"item_id at row \d is {bad}.*expected"):
        validate_items(Dataset.from_pandas(pd.DataFrame({"item_id": pd.Series(ids, dtype=object), "title": ["A", "B"]})))


@pytest.mark.parametrize("stamps, bad", [([1.0, float("inf")], "inf"), ([1.0, 1e19], "1e\\+19"), ([True, False], "True")])
def test_bad_timestamps_named(stamps, bad):
    with pytest.raises(ValueError, match=rf"timestamp.*{bad}.*expected"):
        validate_interactions(Dataset.from_pandas(pd.DataFrame(
            {"user_id": ["u1", "u2"], "item_id": ["a", "b"], "timestamp": stamps, "label": [1, 0]})), validate_items(_items()))


def test_empty_interactions_are_an_error():
    empty = Dataset.from_dict({"user_id": [], "item_id": [], "timestamp": [], "label": []})
    with pytest.raises(ValueError, match="interactions table is empty"):
        validate_interactions(empty, validate_items(_items()))


def test_prepare_checks_raw_tables_instead_of_dropping_rows():
    # int item ids in the items table, str in the log: before, item-cold matched no item and lost every row.
    items = Dataset.from_dict({"item_id": [1, 2, 3], "title": ["A", "B", "C"]})
    log = Dataset.from_dict({"user_id": ["u", "u", "v"], "item_id": ["1", "2", "3"], "timestamp": [1, 2, 3], "label": [1, 1, 0]})
    out = prepare(RecData("raw", items, log), protocol="item-cold")
    assert sum(len(out.samples[s]) for s in ("train", "valid", "test")) == 3
    with pytest.raises(ValueError, match=r"column\(s\) \['split'\], which prepare\(\) writes"):
        prepare(RecData("raw", items, log.add_column("split", ["x"] * 3)))


def test_vocabulary_refuses_reserved_value():
    with pytest.raises(ValueError, match="reserved for index 0"):
        Vocabulary.build(["[UNK]", "a"], "genres")


def test_empty_split_saves_and_loads(tmp_path):
    items = validate_items(_items())
    out = prepare(RecData("tiny", items, validate_interactions(_interactions(), items)), protocol="item-cold")
    assert min(len(out.samples[s]) for s in ("train", "valid", "test")) == 0
    loaded = PreparedData.load(out.save(tmp_path / "p"))
    assert {s: len(loaded.samples[s]) for s in loaded.samples} == {s: len(out.samples[s]) for s in out.samples}


def test_grouplens_bad_values_name_file_and_line(tmp_path):
    (tmp_path / "u.item").write_text("|".join(["10", "A \"quoted\" title (1994)", "", "", ""] + ["0"] * 19) + "\n")
    (tmp_path / "u.data").write_text("1\t10\t5\t100\n1\t10\t\t200\n")
    with pytest.raises(ValueError, match=r"u.data, line 2: rating is ''; expected a finite number"):
        load_movielens_100k(tmp_path)
    (tmp_path / "u.data").write_text("1\t10\t5\t100\n")
    assert load_movielens_100k(tmp_path).items["title"] == ['A "quoted" title']


# ---------------------------------------------------------------- reliability (save, unvalidated tables)

KILLED_SAVE = r"""
import os, sys
from datasets import DatasetDict
from mim_hf.data import make_synthetic_world, prepare

new = prepare(make_synthetic_world(n_users=20, n_items=30, seed=0, impressions_per_user=10), protocol="item-cold", seed=1)
real_save = DatasetDict.save_to_disk

def save_then_die(self, *args, **kwargs):
    real_save(self, *args, **kwargs)
    os._exit(17)  # killed right after the samples are written: pairs, vocabularies and JSON not yet

DatasetDict.save_to_disk = save_then_die
new.save(sys.argv[1])
"""


def test_save_killed_midway_leaves_the_old_dataset_whole(tmp_path):
    import subprocess
    import sys

    world = make_synthetic_world(n_users=20, n_items=30, seed=0, impressions_per_user=10)
    old, new = (prepare(world, protocol="item-cold", seed=s) for s in (0, 1))
    assert old.samples["train"].to_dict() != new.samples["train"].to_dict()
    old.save(tmp_path / "p")
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "p")], capture_output=True, text=True)
    assert killed.returncode == 17, killed.stderr
    loaded = PreparedData.load(tmp_path / "p")  # the old dataset, complete: never half old, half new
    for split in ("train", "valid", "test"):
        assert loaded.samples[split].to_dict() == old.samples[split].to_dict()
        assert loaded.pairs[split].to_dict() == old.pairs[split].to_dict()
    assert {k: v.tokens for k, v in loaded.vocabs.items()} == {k: v.tokens for k, v in old.vocabs.items()}
    assert loaded.train_item_ids == old.train_item_ids
    # The next save clears the killed one's leftovers and replaces the folder.
    new.save(tmp_path / "p")
    assert PreparedData.load(tmp_path / "p").samples["train"].to_dict() == new.samples["train"].to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_save_refuses_to_replace_a_folder_that_is_not_prepared_data(world, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a prepared-data directory"):
        prepare(world, protocol="temporal").save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_prepare_checks_titles_of_unvalidated_items():
    log = Dataset.from_dict({"user_id": ["u", "u", "v"], "item_id": ["a", "b", "c"], "timestamp": [1, 2, 3], "label": [1, 1, 0]})
    raw = _items(title=["Alpha", "  ", None])
    out = prepare(RecData("raw", raw, log), protocol="temporal")
    assert out.stats["fallbacks"]["empty_titles"] == 2
    assert out.items["title"] == ["Alpha", "", ""]
    with pytest.raises(ValueError, match=r"title at row 0 is b'\\xff' \(bytes\); expected str"):
        prepare(RecData("raw", _items(title=[b"\xff", b"B", b"C"]), log))


def test_users_missing_from_users_table_are_counted(world):
    users = Dataset.from_dict({"user_id": ["u00000", "u00001"], "age": [20, 30]})
    interactions = world.interactions.to_pandas()
    out = prepare(RecData("w", world.items, world.interactions, users), protocol="temporal")
    missing = ~interactions["user_id"].isin(["u00000", "u00001"])
    assert out.stats["fallbacks"]["users_missing_from_users_table"] == interactions.loc[missing, "user_id"].nunique() > 0
    assert out.stats["fallbacks"]["rows_without_user_features"] == int(missing.sum())
    train = out.samples["train"].to_pandas()
    assert train.loc[~train["user_id"].isin(["u00000", "u00001"]), "user_age"].isna().all()
    assert train.loc[train["user_id"] == "u00000", "user_age"].eq(20).all()
    assert "users_missing_from_users_table=" in format_stats(out.stats)


def test_train_item_ids_keep_every_character_of_the_ids():
    # numpy's fixed-width str dropped a trailing "\0": "a\0" was listed as train item "a".
    items = Dataset.from_dict({"item_id": ["a\x00", "b", "c", "d", "e", "f"], "title": ["A"] * 6})
    log = Dataset.from_dict({"user_id": ["u"], "item_id": ["b"], "timestamp": [0], "label": [1]})
    out = prepare(RecData("nul", items, log), protocol="item-cold")
    assert set(out.train_item_ids) <= set(items["item_id"]) and "a" not in out.train_item_ids


def test_save_over_a_link_replaces_the_link_not_its_target(world, tmp_path):
    old = prepare(world, protocol="temporal")
    old.save(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    new = prepare(world, protocol="item-cold")
    new.save(tmp_path / "link")
    assert not (tmp_path / "link").is_symlink() and PreparedData.load(tmp_path / "link").config.protocol == "item-cold"
    assert PreparedData.load(tmp_path / "real").config.protocol == "temporal"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
