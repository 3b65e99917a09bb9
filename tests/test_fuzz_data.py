"""Property-based fuzzing of the data layer (hypothesis, derandomised).

Every generated input must end in one of two ways:
* a result that satisfies the data layer's invariants: every input row is in exactly one split
  (no silent drop, ids/timestamps/labels normalised as documented), behaviours are the same
  user's strictly earlier positives (brute force), vocabularies and popularity come from train
  only, held-out items stay unseen under item-cold, stats are strict JSON; or
* a ``ValueError``/``TypeError`` that names the offending column (or config field / file) and
  says what was expected -- and the generator knows which inputs must fail, so a bad input that
  is silently accepted fails the test as surely as a crash does.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mim_hf.data import PreparedData, PrepareConfig, RecData, Vocabulary, load_movielens_100k, prepare
from mim_hf.data.movielens import GROUPLENS_GENRES, natural_title
from mim_hf.data.tables import ValidationReport, validate_interactions, validate_items, validate_users

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
SPLITS = ("train", "valid", "test")
EXPECTATION = re.compile(r"expected|must|not one of|is empty|unknown|absent", re.IGNORECASE)
# Printable text without the characters Arrow/pandas cannot round-trip (surrogates).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------- generated tables

def _id_values(draw, kind: str, n: int) -> tuple[list, list[str]]:
    """n distinct raw ids of one dtype and their documented normalised strings."""
    if kind == "str":
        raw = draw(st.lists(TEXT.filter(lambda t: t.strip() and t != "[UNK]"), min_size=n, max_size=n, unique=True))
        return raw, list(raw)
    if kind == "int":
        raw = draw(st.lists(st.integers(-(2**63), INT64_MAX), min_size=n, max_size=n, unique=True))
        return raw, [str(v) for v in raw]
    if kind == "uint":  # huge ids, beyond int64
        raw = draw(st.lists(st.integers(2**63, 2**64 - 1), min_size=n, max_size=n, unique=True))
        return raw, [str(v) for v in raw]
    raw = draw(st.lists(st.integers(-(2**40), 2**40), min_size=n, max_size=n, unique=True))  # "float": integral floats
    return [float(v) for v in raw], [str(v) for v in raw]


def _id_series(kind: str, raw: list) -> pd.Series:
    dtype = {"str": object, "int": "int64", "uint": "uint64", "float": "float64"}[kind]
    return pd.Series(raw, dtype=dtype)


CORRUPTIONS = {  # one defect per corrupted input -> the column(s) its error must name
    "duplicate_item": ["item_id"], "empty_interactions": ["interactions table is empty"],
    "text_time": ["timestamp"], "bool_time": ["timestamp"], "nan_time": ["timestamp"], "inf_time": ["timestamp"],
    "overflow_time": ["timestamp"], "bad_label": ["label"], "nan_label": ["label"], "unknown_item": ["item_id"],
    "blank_user": ["user_id"], "reserved_id": ["user_id"], "missing_column": None, "reserved_column": ["split"],
    "duplicate_user": ["user_id"],
}


@st.composite
def rec_tables(draw):
    """(items_df, interactions_df, users_df | None, expected_rows, problems).

    Two inputs in three are valid (``problems`` empty: they must prepare); the third carries
    exactly one defect from ``CORRUPTIONS`` and ``problems`` lists what its error must name.
    ``expected_rows``: the normalised (user_id, item_id, timestamp, label) input rows.
    """
    corruption = draw(st.sampled_from([None, None] + [None] * 13 + sorted(CORRUPTIONS)))
    n_items = draw(st.integers(1, 6))
    item_kind = draw(st.sampled_from(["str", "int", "uint", "float"]))
    raw_items, item_ids = _id_values(draw, item_kind, n_items)
    titles = draw(st.lists(st.one_of(st.none(), TEXT, st.just("   "), st.just("\u3000")), min_size=n_items,
                           max_size=n_items))
    items = pd.DataFrame({"item_id": _id_series(item_kind, raw_items), "title": pd.Series(titles, dtype=object)})
    for column in draw(st.lists(st.sampled_from(["genres", "year", "category", "price", "on_sale"]), unique=True,
                                max_size=3)):
        if column == "genres":
            items[column] = draw(st.lists(st.lists(TEXT.filter(lambda t: t != "[UNK]"), max_size=3),
                                          min_size=n_items, max_size=n_items))
        elif column == "year":
            items[column] = pd.array(draw(st.lists(st.one_of(st.none(), st.integers(1900, 2030)), min_size=n_items,
                                                   max_size=n_items)), dtype="Int64")
        elif column == "category":
            items[column] = draw(st.lists(st.one_of(st.none(), TEXT.filter(lambda t: t != "[UNK]")),
                                          min_size=n_items, max_size=n_items))
        elif column == "price":
            items[column] = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n_items,
                                          max_size=n_items))
        else:
            items[column] = draw(st.lists(st.booleans(), min_size=n_items, max_size=n_items))
    if corruption == "duplicate_item":
        items = pd.concat([items, items.iloc[:1]], ignore_index=True)

    n_users = draw(st.integers(1, 4))
    user_kind = draw(st.sampled_from(["str", "int", "float"]))
    raw_users, user_ids = _id_values(draw, user_kind, n_users)
    n_rows = 0 if corruption == "empty_interactions" else draw(st.integers(1, 24))
    user_pos = draw(st.lists(st.integers(0, n_users - 1), min_size=n_rows, max_size=n_rows))
    item_pos = draw(st.lists(st.integers(0, n_items - 1), min_size=n_rows, max_size=n_rows))
    labels = draw(st.lists(st.integers(0, 1), min_size=n_rows, max_size=n_rows))
    time_kind = draw(st.sampled_from(["int", "float", "datetime", "extreme"]))
    if time_kind == "int":
        times = draw(st.lists(st.integers(-5, 5), min_size=n_rows, max_size=n_rows))  # small range: many ties
        seconds = list(times)
    elif time_kind == "extreme":
        times = draw(st.lists(st.sampled_from([-(2**63), -1, 0, INT64_MAX - 1, INT64_MAX]), min_size=n_rows,
                              max_size=n_rows))
        seconds = list(times)
    elif time_kind == "float":
        times = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=n_rows, max_size=n_rows))
        seconds = [math.floor(t) for t in times]
    else:
        times = [pd.Timestamp("2020-01-01") + pd.Timedelta(seconds=int(s))
                 for s in draw(st.lists(st.integers(0, 10), min_size=n_rows, max_size=n_rows))]
        seconds = [int(t.timestamp()) for t in times]
    inter = pd.DataFrame({
        "user_id": _id_series(user_kind, [raw_users[i] for i in user_pos]),
        "item_id": _id_series(item_kind, [raw_items[i] for i in item_pos]),
        "timestamp": pd.Series(times, dtype={"datetime": "datetime64[ns]"}.get(time_kind, None)),
        "label": pd.Series(labels, dtype="int64"),
    })
    label_kind = draw(st.sampled_from(["int", "bool", "float"]))
    if label_kind == "bool":
        inter["label"] = inter["label"].astype(bool)
    elif label_kind == "float":
        inter["label"] = inter["label"].astype(float)
    if draw(st.booleans()):
        inter["rating"] = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=n_rows,
                                        max_size=n_rows))
    if draw(st.booleans()):  # duplicate rows are kept, never merged
        inter = pd.concat([inter, inter.iloc[:2]], ignore_index=True)
        user_pos, item_pos = user_pos + user_pos[:2], item_pos + item_pos[:2]
        seconds, labels = seconds + seconds[:2], labels + labels[:2]

    row = draw(st.integers(0, max(len(inter) - 1, 0)))
    if corruption == "text_time":
        inter["timestamp"] = inter["timestamp"].astype(str)
    elif corruption == "bool_time":
        inter["timestamp"] = pd.Series(seconds) > 0
    elif corruption in ("nan_time", "inf_time", "overflow_time"):
        inter["timestamp"] = pd.Series(seconds, dtype=float)
        inter.loc[row, "timestamp"] = {"nan_time": np.nan, "inf_time": -np.inf, "overflow_time": 1e19}[corruption]
    elif corruption in ("bad_label", "nan_label"):
        inter["label"] = inter["label"].astype(float)
        inter.loc[row, "label"] = 2.0 if corruption == "bad_label" else np.nan
    elif corruption == "unknown_item":
        inter["item_id"] = inter["item_id"].astype(str)
        inter.loc[row, "item_id"] = "no-such-item\u00e9"
    elif corruption in ("blank_user", "reserved_id"):
        inter["user_id"] = inter["user_id"].astype(str)
        inter.loc[row, "user_id"] = " \t" if corruption == "blank_user" else "[UNK]"
    elif corruption == "missing_column":
        dropped = draw(st.sampled_from(["user_id", "item_id", "timestamp", "label"]))
        inter = inter.drop(columns=dropped)
    elif corruption == "reserved_column":
        inter["split"] = "mine"

    users = None
    if draw(st.booleans()) or corruption == "duplicate_user":
        users = pd.DataFrame({"user_id": _id_series(user_kind, raw_users),
                              "gender": draw(st.lists(st.sampled_from(["F", "M", None]), min_size=n_users,
                                                      max_size=n_users))})
        if corruption == "duplicate_user":
            users = pd.concat([users, users.iloc[:1]], ignore_index=True)
    problems = [] if corruption is None else (CORRUPTIONS[corruption] or [dropped])
    expected = sorted(zip([user_ids[i] for i in user_pos], [item_ids[i] for i in item_pos], seconds, labels))
    return items, inter, users, expected, problems


def _assert_clear(err: BaseException, names: list[str]) -> None:
    message = str(err)
    assert EXPECTATION.search(message), f"error does not say what was expected: {message!r}"
    assert any(name in message for name in names), f"error names none of {names}: {message!r}"


def _run_pipeline(items_df, inter_df, users_df, protocol: str, max_len: int, **settings) -> PreparedData:
    report = ValidationReport()
    items = validate_items(Dataset.from_pandas(items_df, preserve_index=False), report)
    interactions = validate_interactions(Dataset.from_pandas(inter_df, preserve_index=False), items)
    users = validate_users(Dataset.from_pandas(users_df, preserve_index=False)) if users_df is not None else None
    return prepare(RecData("fuzz", items, interactions, users, report), protocol=protocol, max_len=max_len, **settings)


def _all_samples(prepared: PreparedData) -> pd.DataFrame:
    return pd.concat([prepared.samples[s].to_pandas() for s in SPLITS], ignore_index=True)


def check_invariants(prepared: PreparedData, expected_rows: list[tuple]) -> None:
    """Everything a prepared dataset promises, checked by brute force on a small input."""
    samples = _all_samples(prepared)
    config = prepared.config
    # No silent drop: the multiset of normalised input rows is exactly the union of the splits.
    got = sorted(zip(samples["user_id"], samples["item_id"], samples["timestamp"].astype(int), samples["label"].astype(int)))
    assert got == expected_rows
    stats = prepared.stats
    assert stats["interactions"] == len(expected_rows) == sum(stats["splits"][s]["rows"] for s in SPLITS)
    json.dumps(stats, allow_nan=False)  # strict JSON: no NaN sneaks into the report

    history = samples[samples["label"] == 1]
    if config.protocol == "item-cold":
        history = history[history["split"] == "train"]
    # Brute force: the same user's strictly earlier positives, time-sorted (ties in log order,
    # which the concatenated splits preserve), the most recent max_len of them.
    for row in samples.itertuples():
        earlier = history[(history["user_id"] == row.user_id) & (history["timestamp"] < row.timestamp)]
        earlier = earlier.sort_values("timestamp", kind="stable").tail(config.max_len)
        assert list(row.behavior_item_ids) == earlier["item_id"].tolist()
        assert list(row.behavior_timestamps) == earlier["timestamp"].tolist()

    train = samples[samples["split"] == "train"]
    assert set(prepared.vocabs["item_id"].tokens[1:]) == set(train["item_id"])
    assert set(prepared.vocabs["user_id"].tokens[1:]) == set(train["user_id"])
    counts = train["item_id"].value_counts()
    n = counts.reindex(samples["item_id"]).fillna(0).to_numpy()
    buckets = np.where(n == 0, "cold", np.where(n <= config.long_tail_max, "long_tail", "head"))
    np.testing.assert_array_equal(samples["popularity_bucket"].to_numpy(), buckets)
    if config.protocol == "item-cold":
        held_out = set(samples.loc[samples["split"] != "train", "item_id"])
        assert held_out.isdisjoint(prepared.vocabs["item_id"].tokens)
        assert held_out.isdisjoint(prepared.train_item_ids)
        for seq in samples["behavior_item_ids"]:
            assert held_out.isdisjoint(seq)
    else:
        times = {s: samples.loc[samples["split"] == s, "timestamp"] for s in SPLITS}
        for before, after in (("train", "valid"), ("valid", "test"), ("train", "test")):
            if len(times[before]) and len(times[after]):
                assert times[before].max() <= times[after].min()
    positives = set(zip(train.loc[train["label"] == 1, "user_id"], train.loc[train["label"] == 1, "item_id"],
                        train.loc[train["label"] == 1, "timestamp"]))
    for pair in prepared.pairs["train"].to_pandas().itertuples():
        assert pair.trigger_timestamp < pair.target_timestamp
        assert (pair.user_id, pair.trigger_item_id, pair.trigger_timestamp) in positives
        assert (pair.user_id, pair.target_item_id, pair.target_timestamp) in positives
        assert pair.trigger_item_id != pair.target_item_id


@settings(max_examples=50, **SETTINGS)
@given(tables=rec_tables(), protocol=st.sampled_from(["temporal", "item-cold"]),
       max_len=st.sampled_from([1, 2, 3, 50, 2**62]))
def test_random_tables_prepare_or_fail_clearly(tables, protocol, max_len):
    items_df, inter_df, users_df, expected, problems = tables
    if problems:
        with pytest.raises((ValueError, TypeError)) as info:
            _run_pipeline(items_df, inter_df, users_df, protocol, max_len)
        _assert_clear(info.value, problems)
        return
    prepared = _run_pipeline(items_df, inter_df, users_df, protocol, max_len)
    check_invariants(prepared, expected)
    assert prepared.stats["fallbacks"]["empty_titles"] == sum(
        1 for t in items_df["title"] if t is None or not str(t).strip())


@settings(max_examples=20, **SETTINGS)
@given(tables=rec_tables(), protocol=st.sampled_from(["temporal", "item-cold"]))
def test_prepare_validates_unvalidated_tables_itself(tables, protocol):
    """prepare() on raw (unvalidated) Datasets: same outcome as validating first, never a silent drop."""
    items_df, inter_df, users_df, expected, problems = tables
    data = RecData("raw", Dataset.from_pandas(items_df, preserve_index=False),
                   Dataset.from_pandas(inter_df, preserve_index=False),
                   Dataset.from_pandas(users_df, preserve_index=False) if users_df is not None else None)
    if problems:
        with pytest.raises((ValueError, TypeError)) as info:
            prepare(data, protocol=protocol, max_len=3)
        _assert_clear(info.value, problems)
        return
    check_invariants(prepare(data, protocol=protocol, max_len=3), expected)


@settings(max_examples=6, **SETTINGS)
@given(tables=rec_tables().filter(lambda t: not t[4]), protocol=st.sampled_from(["temporal", "item-cold"]))
def test_save_load_round_trip_of_random_prepared_data(tables, protocol, tmp_path_factory):
    items_df, inter_df, users_df, expected, _ = tables
    prepared = _run_pipeline(items_df, inter_df, users_df, protocol, 4)
    path = prepared.save(tmp_path_factory.mktemp("prepared") / "p")
    loaded = PreparedData.load(path)
    assert loaded.config == prepared.config and loaded.train_item_ids == prepared.train_item_ids
    assert loaded.stats == json.loads(json.dumps(prepared.stats))
    for split in SPLITS:
        assert loaded.samples[split].to_pandas().equals(prepared.samples[split].to_pandas())
        assert len(loaded.pairs[split]) == len(prepared.pairs[split])
    assert {k: v.tokens for k, v in loaded.vocabs.items()} == {k: v.tokens for k, v in prepared.vocabs.items()}
    check_invariants(loaded, expected)


@settings(max_examples=25, **SETTINGS)
@given(tables=rec_tables().filter(lambda t: not t[4]), protocol=st.sampled_from(["temporal", "item-cold"]),
       neg_ratio=st.integers(1, 3), folds=st.sampled_from([None, 3]))
def test_implicit_labels_on_random_tables(tables, protocol, neg_ratio, folds):
    """Every input row becomes a positive; negatives are untouched items of the positive's pool."""
    items_df, inter_df, users_df, expected, _ = tables
    fold_settings = {"folds": folds} if protocol == "item-cold" and folds else {}
    try:
        prepared = _run_pipeline(items_df, inter_df, users_df, protocol, 3, labels="implicit", neg_ratio=neg_ratio,
                                 **fold_settings)
    except ValueError as err:  # more folds than items
        assert fold_settings and len(items_df) < folds, str(err)
        _assert_clear(err, ["folds"])
        return
    samples = _all_samples(prepared)
    positives, negatives = samples[samples["label"] == 1], samples[samples["label"] == 0]
    got = sorted(zip(positives["user_id"], positives["item_id"], positives["timestamp"].astype(int)))
    assert got == sorted((u, i, t) for u, i, t, _ in expected)
    touched = set(zip(positives["user_id"], positives["item_id"]))
    assert not any(pair in touched for pair in zip(negatives["user_id"], negatives["item_id"]))
    counts = prepared.stats["negatives"]
    assert len(negatives) == sum(counts["drawn"].values()) == neg_ratio * (
        len(positives) - sum(counts["positives_without_negative"].values()))
    if protocol == "item-cold":
        train_items = set(prepared.train_item_ids)
        in_train = negatives["item_id"].isin(train_items).to_numpy()
        np.testing.assert_array_equal(in_train, negatives["split"].to_numpy() == "train")
        assert set(prepared.vocabs["item_id"].tokens[1:]) <= train_items
    else:
        first_seen = positives.groupby("item_id")["timestamp"].min()
        assert (first_seen.reindex(negatives["item_id"]).to_numpy() <= negatives["timestamp"].to_numpy()).all()
    json.dumps(prepared.stats, allow_nan=False)


# ---------------------------------------------------------------- config, vocabulary

ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(2**62, 2**64),
                       st.floats(allow_nan=True, allow_infinity=True), TEXT, st.lists(st.integers(0, 2), max_size=4))


@settings(max_examples=80, **SETTINGS)
@given(field=st.sampled_from(["protocol", "max_len", "seed", "fractions", "long_tail_max", "pair_window", "labels",
                              "neg_ratio"]),
       value=ODD_VALUES)
def test_prepare_config_fields_accept_or_name_the_field(field, value):
    config = PrepareConfig(**{field: value})
    try:
        config.validate()
    except (ValueError, TypeError) as err:
        assert field in str(err) and repr(value)[:20] in str(err), str(err)
        _assert_clear(err, [field])
        return
    # Accepted values are exactly the documented ones.
    if field == "protocol":
        assert value in ("temporal", "item-cold")
    elif field == "labels":
        assert value in ("rating", "implicit")
    elif field == "fractions":
        assert len(value) == 3 and min(value) > 0 and abs(sum(value) - 1) < 1e-6
    else:
        assert isinstance(value, int) and not isinstance(value, bool) and value >= (0 if field == "seed" else 1)


VOCAB_VALUE = st.one_of(TEXT, st.integers(), st.just("[UNK]"))


@settings(max_examples=60, **SETTINGS)
@given(values=st.one_of(st.lists(st.one_of(VOCAB_VALUE, st.none()), max_size=12),
                        st.lists(st.lists(VOCAB_VALUE, max_size=3), max_size=6)),  # multi-valued (genres)
       queries=st.lists(st.one_of(TEXT, st.integers()), max_size=8))
def test_vocabulary_build_encode_decode(values, queries):
    flat = [v for value in values for v in (value if isinstance(value, list) else [value]) if v is not None]
    if "[UNK]" in flat:  # data may not take the reserved row's name: it would merge with unknowns
        with pytest.raises(ValueError, match=r"'\[UNK\]' is reserved.*expected"):
            Vocabulary.build(values, "fuzz")
        return
    vocab = Vocabulary.build(values, "fuzz")
    assert vocab.tokens[0] == "[UNK]" and sorted(vocab.tokens[1:]) == vocab.tokens[1:]
    assert set(vocab.tokens[1:]) == {str(v) for v in flat}
    codes = vocab.encode(queries)
    assert codes.dtype == np.int64 and len(codes) == len(queries)
    known = [str(q) in set(vocab.tokens[1:]) for q in queries]
    assert vocab.unknown_count == known.count(False)
    assert [c > 0 for c in codes] == known
    assert vocab.decode(codes) == [str(q) if k else "[UNK]" for q, k in zip(queries, known)]
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))).tokens == vocab.tokens


# ---------------------------------------------------------------- MovieLens folders with odd content

def _grouplens_item(item_id: str, title: str, flags: list[str]) -> str:
    return "|".join([item_id, title, "01-Jan-1995", "", "http://x"] + flags)


@st.composite
def grouplens_folders(draw):
    """(files {name: bytes}, problem or None, expected n_interactions)."""
    n_items = draw(st.integers(1, 4))
    titles = draw(st.lists(TEXT.filter(lambda t: "|" not in t and "\n" not in t and "\r" not in t),
                           min_size=n_items, max_size=n_items))
    flags = [["1" if draw(st.booleans()) else "0" for _ in GROUPLENS_GENRES] for _ in range(n_items)]
    item_lines = [_grouplens_item(str(i + 1), titles[i] + draw(st.sampled_from(["", " (1995)"])), flags[i])
                  for i in range(n_items)]
    n_rows = draw(st.integers(1, 10))
    rows = [[str(draw(st.integers(1, 3))), str(draw(st.integers(1, n_items))), str(draw(st.integers(1, 5))),
             str(draw(st.integers(0, 10**12)))] for _ in range(n_rows)]
    problem = draw(st.sampled_from([None] * 4 + ["rating", "timestamp", "flag", "short_item", "empty_data",
                                                 "ragged_data", "missing_item_file", "unknown_item"]))
    row = draw(st.integers(0, n_rows - 1))
    if problem == "rating":
        rows[row][2] = draw(st.sampled_from(["", "nan", "five", "inf"]))
    elif problem == "timestamp":
        rows[row][3] = draw(st.sampled_from(["", "yesterday", "1e400", "99999999999999999999"]))
    elif problem == "flag":
        flags_line = item_lines[0].split("|")
        flags_line[5] = "2"
        item_lines[0] = "|".join(flags_line)
    elif problem == "short_item":
        item_lines = ["|".join(line.split("|")[:10]) for line in item_lines]
    elif problem == "unknown_item":
        rows[row][1] = str(n_items + 7)
    files = {"u.item": ("\n".join(item_lines) + "\n").encode("latin-1", errors="replace")}
    data_text = "\n".join("\t".join(r) for r in rows) + "\n"
    if problem == "empty_data":
        data_text = ""
    elif problem == "ragged_data":
        data_text += "1\t1\t5\t100\textra\tfields\n"
    files["u.data"] = data_text.encode()
    if problem == "missing_item_file":
        del files["u.item"]
    if draw(st.booleans()):
        ages = draw(st.lists(st.sampled_from(["24", "", "old", "7"]), min_size=3, max_size=3))
        files["u.user"] = "".join(f"{u}|{a}|F|other|00000\n" for u, a in zip((1, 2, 3), ages)).encode()
    return files, problem, n_rows


PROBLEM_NAMES = {"rating": ["u.data", "rating"], "timestamp": ["u.data", "timestamp"], "flag": ["u.item"],
                 "short_item": ["u.item"], "empty_data": ["u.data"], "ragged_data": ["u.data"],
                 "missing_item_file": ["u.item"], "unknown_item": ["item_id"]}


@settings(max_examples=25, **SETTINGS)
@given(folder=grouplens_folders())
def test_grouplens_folder_with_odd_content(folder, tmp_path_factory):
    files, problem, n_rows = folder
    root = tmp_path_factory.mktemp("ml")
    for name, content in files.items():
        (root / name).write_bytes(content)
    if problem is not None:
        with pytest.raises(ValueError) as info:
            load_movielens_100k(root)
        _assert_clear(info.value, PROBLEM_NAMES[problem])
        return
    data = load_movielens_100k(root)
    assert len(data.interactions) == n_rows
    ratings = pd.read_csv(root / "u.data", sep="\t", header=None)[2].to_numpy()
    assert data.interactions["label"] == [int(r >= 4) for r in ratings]
    if data.users is not None:
        assert set(data.users["age"]) <= {"20s", "0s", None}


ATOMIC_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


@settings(max_examples=30, **SETTINGS)
@given(header=st.sampled_from([ATOMIC_HEADER] * 4 + ["user_id:token\titem_id:token\ttimestamp:float", ""]),
       body=st.lists(st.tuples(st.sampled_from(["1", "2", "x"] * 3 + [""]), st.sampled_from(["1", "2"] * 4 + ["9"]),
                               st.sampled_from(["1", "4.5", "5", "3"] * 2 + ["", "nan"]),
                               st.sampled_from(["10", "-3", "0"] * 3 + ["t"])),
                     max_size=5),
       title=TEXT.filter(lambda t: "\t" not in t and "\n" not in t and "\r" not in t))
def test_atomic_folder_with_odd_content(header, body, title, tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    (root / "ml-100k.inter").write_text(header + "\n" + "".join("\t".join(r) + "\n" for r in body), encoding="utf-8")
    (root / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                       f"1\t{title}\t1995\tDrama\n2\t\t\t\n", encoding="utf-8")
    valid = (header == ATOMIC_HEADER and bool(body)
             and all(r[0] != "" and r[1] != "9" and r[2] not in ("", "nan") and r[3] != "t" for r in body))
    if not valid:
        with pytest.raises(ValueError) as info:
            load_movielens_100k(root)
        _assert_clear(info.value, ["ml-100k.inter", "user_id", "item_id", "rating", "timestamp", "interactions"])
        return
    event("valid atomic folder")
    data = load_movielens_100k(root)
    assert len(data.interactions) == len(body)
    assert data.interactions["label"] == [int(float(r[2]) >= 4) for r in body]
    assert data.items["title"] == [natural_title(title), ""]
    assert data.report.empty_titles == 1 + (not natural_title(title))
