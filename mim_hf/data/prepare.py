"""From raw tables to what the stages train on: splits, CTR samples, C-SFT pairs, vocabularies.

The flow, for one protocol::

    RecData (items, interactions[, users])
      -> split every interaction into train / valid / test          (split_interactions, item_splits)
      -> labels: the log's own (rating) or implicit + drawn negatives (mim_hf.data.labels)
      -> behaviour sequences: the user's earlier positives          (behaviour_sequences)
      -> popularity buckets counted on train only                   (popularity_buckets)
      -> CTR samples (one row per interaction) + side features
      -> C-SFT pairs (trigger -> later positive target)
      -> vocabularies from the train split only
      = PreparedData (save / load with save_to_disk + JSON)

Leakage rules (tested): a behaviour is strictly earlier than its sample; train pairs never
touch valid/test; popularity counts and vocabularies see the train split only; under
``item-cold`` held-out items never appear in a behaviour sequence, a vocabulary or a train
row (drawn negatives included). docs/data.md describes every option.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from datasets import Dataset, DatasetDict, load_from_disk
import datasets.utils as datasets_utils

from mim_hf.common.fs import resolve_inside

from .labels import LABEL_SCHEMES, draw_negatives
from .tables import ITEM_CONTENT_COLUMNS, ITEM_REQUIRED, RecData, _column, _require_columns, clean_titles, \
    interaction_frame, replace_column, unique_id_strings, validate_users
from .vocab import Vocabulary

PROTOCOLS = ("temporal", "item-cold")
SPLITS = ("train", "valid", "test")
BUCKETS = ("cold", "long_tail", "head")
FORMAT_VERSION = 1
# Columns prepare() adds to every sample (an interactions table must not bring its own).
SAMPLE_COLUMNS = ("split", "popularity_bucket", "history_length", "behavior_item_ids", "behavior_timestamps")


@dataclass
class PrepareConfig:
    """Every knob of :func:`prepare`, saved beside the prepared data."""

    protocol: str = "temporal"  # "temporal" (time-sorted 80/10/10) or "item-cold" (items split 80/10/10 or in folds)
    max_len: int = 50  # longest behaviour sequence kept (most recent positives)
    seed: int = 0  # seeds the item-cold item split and the implicit negatives
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / valid / test
    long_tail_max: int = 20  # items with 1..long_tail_max train interactions are long-tail; more is head
    pair_window: int = 3  # each train positive is a target for its pair_window most recent earlier positives
    labels: str = "rating"  # "rating" (the log's label) or "implicit" (every interaction 1 + drawn negatives)
    neg_ratio: int = 1  # implicit labels: negatives drawn per positive
    # item-cold: None = one hold-out by `fractions`; K >= 3 = K item folds, `fold` holds out part
    # `fold` as test and part `fold + 1` (mod K) as valid (`fractions` is then unused).
    folds: int | None = None
    fold: int = 0

    @classmethod
    def from_dict(cls, values, source: str = "config") -> "PrepareConfig":
        """A config from its saved JSON form (``fractions`` as a list); validated."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: config is {values!r}; expected a JSON object of PrepareConfig fields")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown PrepareConfig field(s) {unknown}; expected some of "
                             f"{[f.name for f in fields(cls)]}")
        fractions = values.get("fractions", cls.fractions)
        config = cls(**{**values, "fractions": tuple(fractions) if isinstance(fractions, list) else fractions})
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, its value and what is expected."""
        if not isinstance(self.protocol, str) or self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {list(PROTOCOLS)}")
        _check_int("max_len", self.max_len, 1, "a positive integer")
        _check_int("pair_window", self.pair_window, 1, "a positive integer")
        _check_int("long_tail_max", self.long_tail_max, 1, "an integer >= 1")
        _check_int("seed", self.seed, 0, "an integer >= 0")
        if not isinstance(self.labels, str) or self.labels not in LABEL_SCHEMES:
            raise ValueError(f"labels {self.labels!r} is not one of {list(LABEL_SCHEMES)}")
        _check_int("neg_ratio", self.neg_ratio, 1, "an integer >= 1 (negatives drawn per positive)")
        if self.folds is None:
            if self.fold != 0:
                raise ValueError(f"fold {self.fold!r} needs folds (the number of item folds); expected fold=0 "
                                 "without folds")
        else:
            _check_int("folds", self.folds, 3, "an integer >= 3 (one part test, one valid, the rest train) or None")
            if self.protocol != "item-cold":
                raise ValueError(f"folds={self.folds!r} splits items, which only protocol='item-cold' does; got "
                                 f"protocol={self.protocol!r} (expected folds=None)")
            _check_int("fold", self.fold, 0, f"an integer in 0..{self.folds - 1} (folds={self.folds})")
            if self.fold >= self.folds:
                raise ValueError(f"fold must be an integer in 0..{self.folds - 1} (folds={self.folds}), got {self.fold!r}")
        expected = f"fractions must be three positive numbers summing to 1, got {self.fractions!r}"
        if isinstance(self.fractions, (str, bytes)) or not hasattr(self.fractions, "__len__") or len(self.fractions) != 3:
            raise ValueError(expected)
        if not all(isinstance(f, (int, float, np.integer, np.floating)) and not isinstance(f, (bool, np.bool_))
                   for f in self.fractions):
            raise ValueError(expected)
        fractions = tuple(float(f) for f in self.fractions)
        if not all(np.isfinite(fractions)) or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(expected)


def _check_int(name: str, value, minimum: int, expected: str) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@dataclass
class PreparedData:
    """Everything the stages consume for one dataset under one protocol.

    Attributes:
        items: the whole catalogue (content is known for every item, cold ones included).
        samples: ``DatasetDict`` train/valid/test of CTR samples.
        pairs: ``DatasetDict`` train/valid/test of C-SFT (trigger -> target) pairs.
        vocabs: name -> :class:`Vocabulary` (``user_id``, ``item_id``, side features), train only.
        train_item_ids: items whose content stage 1 may train on (train split only).
        config: the :class:`PrepareConfig` used.
        stats: counts for the terminal and the report (see :func:`compute_stats`).
    """

    name: str
    items: Dataset
    samples: DatasetDict
    pairs: DatasetDict
    vocabs: dict[str, Vocabulary]
    train_item_ids: list[str]
    config: PrepareConfig
    stats: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write everything under ``path`` (datasets ``save_to_disk`` + JSON); returns ``path``.

        Atomic: the files are written to the sibling ``.<name>.saving`` and swapped in with two
        renames (an existing ``path`` moves to ``.<name>.replaced`` first, then is deleted), so a
        save killed at any point leaves ``path`` either as it was, complete, or absent -- never a
        mix of two datasets. Leftovers of a killed save are removed by the next one. An existing
        ``path`` that is neither empty nor a prepared-data directory is a ``ValueError``.
        """
        given, path = Path(path), Path(os.path.abspath(path))  # abspath: "." has no name to put a sibling beside
        if path.exists() and not (path / "prepared.json").is_file() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"{str(path)!r} exists and is not a prepared-data directory (no prepared.json); saving "
                             "replaces the whole folder, so expected a new or empty path or an earlier save")
        staging, replaced = path.with_name(f".{path.name}.saving"), path.with_name(f".{path.name}.replaced")
        for leftover in (staging, replaced):
            _remove(leftover)
        staging.mkdir(parents=True)
        self._write(staging)
        if path.exists() or path.is_symlink():
            os.rename(path, replaced)
        os.rename(staging, path)
        _remove(replaced)
        return given

    def metadata(self) -> dict:
        """The ``prepared.json`` content: format version, name, config and train item ids."""
        return {"format_version": FORMAT_VERSION, "name": self.name,
                "config": {**self.config.__dict__, "fractions": list(self.config.fractions)},
                "train_item_ids": self.train_item_ids}

    def _write(self, path: Path) -> None:
        with _quiet_progress():
            self.items.save_to_disk(str(path / "items"))
            for name, table in (("samples", self.samples), ("pairs", self.pairs)):
                # datasets writes no shard for an empty split and then cannot load it: ask for one.
                table.save_to_disk(str(path / name), num_shards={s: 1 for s, split in table.items() if len(split) == 0})
        (path / "prepared.json").write_text(json.dumps(self.metadata(), indent=1))
        (path / "vocabs.json").write_text(json.dumps({k: v.to_dict() for k, v in self.vocabs.items()}))
        (path / "stats.json").write_text(json.dumps(self.stats, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "PreparedData":
        """Read a directory written by :meth:`save`.

        Only the fixed file names of :meth:`save` are read, and every file datasets is told to
        open (split names, Arrow shard names) must lie inside ``path``: a tampered directory
        (``../``, absolute names, symlinks leading out) is a ``ValueError``, as are missing files,
        invalid JSON and an invalid config.
        """
        path = Path(path)
        meta_file = path / "prepared.json"
        if not meta_file.is_file():
            raise ValueError(f"{str(path)!r} is not a prepared-data directory (no prepared.json); run `mim-hf data prepare`")
        meta = _read_json(path, "prepared.json")
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_file} holds {type(meta).__name__}; expected a JSON object")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        missing = [key for key in ("name", "config", "train_item_ids") if key not in meta]
        if missing:
            raise ValueError(f"{meta_file} lacks {missing}; expected the fields written by PreparedData.save")
        vocab_entries = _read_json(path, "vocabs.json")
        try:
            vocabs = {k: Vocabulary.from_dict(v) for k, v in vocab_entries.items()}
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path / 'vocabs.json'}: malformed vocabulary ({err!r}); expected "
                             "{name: {'name': ..., 'tokens': [...]}}") from None
        config = PrepareConfig.from_dict(meta["config"], source=str(meta_file))
        tables = {name: _load_saved_table(path, name, splits) for name, splits in
                  (("items", None), ("samples", SPLITS), ("pairs", SPLITS))}
        return cls(
            name=meta["name"],
            items=tables["items"],
            samples=tables["samples"],
            pairs=tables["pairs"],
            vocabs=vocabs,
            train_item_ids=meta["train_item_ids"],
            config=config,
            stats=_read_json(path, "stats.json"),
        )


def _remove(path: Path) -> None:
    """Delete a folder, file or link (a link only, never what it points at); nothing if absent."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _read_json(root: Path, relative: str):
    file = root / relative
    resolve_inside(root, file, "the prepared-data directory")
    if not file.is_file():
        raise ValueError(f"{str(root)!r}: {relative} is missing; expected the files written by PreparedData.save")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None


def _load_saved_table(root: Path, name: str, splits: tuple[str, ...] | None) -> Dataset | DatasetDict:
    """``load_from_disk`` of ``root/name`` once every file it would open is checked to be inside ``root``."""
    folder = root / name
    if splits is not None:
        listed = _read_json(root, f"{name}/dataset_dict.json").get("splits")
        if listed != list(splits):
            raise ValueError(f"{folder / 'dataset_dict.json'} lists splits {listed!r}; expected {list(splits)}")
    for table in [f"{name}/{split}" for split in splits] if splits is not None else [name]:
        state = _read_json(root, f"{table}/state.json")
        files = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(files, list):  # an empty split saves an empty list
            raise ValueError(f"{root / table / 'state.json'}: no _data_files list; expected a datasets save_to_disk folder")
        for entry in files:
            filename = entry.get("filename") if isinstance(entry, dict) else None
            if not isinstance(filename, str) or filename in ("", ".", "..") or Path(filename).name != filename:
                raise ValueError(f"{root / table / 'state.json'} names data file {filename!r}; expected a plain file "
                                 "name inside that folder")
            resolve_inside(root, root / table / filename, "the prepared-data directory")
    return load_from_disk(str(folder))


@contextlib.contextmanager
def _quiet_progress():
    """Silence datasets' per-shard progress bars (a prepare run saves seven tables)."""
    was_enabled = datasets_utils.is_progress_bar_enabled()
    datasets_utils.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets_utils.enable_progress_bars()


def item_splits(item_ids: np.ndarray, config: PrepareConfig) -> pd.Series:
    """``item-cold``: item id -> "train"/"valid"/"test", in a seeded random order of the items.

    Without ``config.folds`` the shuffled items are cut by ``config.fractions``; with K folds they
    are cut into K near-equal parts (``numpy.array_split``) and fold k holds out part k as test
    and part (k + 1) mod K as valid, so the K test sets are disjoint and cover the catalogue.
    """
    rng = np.random.default_rng(config.seed)
    shuffled = np.asarray(item_ids, dtype=object)[rng.permutation(len(item_ids))]
    n = len(shuffled)
    if config.folds is None:
        train_frac, valid_frac, _ = config.fractions
        n_train, n_valid = int(round(n * train_frac)), int(round(n * valid_frac))
        names = ["train"] * n_train + ["valid"] * n_valid + ["test"] * (n - n_train - n_valid)
        return pd.Series(names, index=shuffled, dtype=object)
    if config.folds > n:
        raise ValueError(f"folds={config.folds} but the items table has only {n} item(s); expected folds <= {n} "
                         "(every fold holds out at least one item)")
    part = np.repeat(np.arange(config.folds), [len(p) for p in np.array_split(np.arange(n), config.folds)])
    names = np.where(part == config.fold, "test", np.where(part == (config.fold + 1) % config.folds, "valid", "train"))
    return pd.Series(names, index=shuffled, dtype=object)


def split_interactions(frame: pd.DataFrame, item_ids: np.ndarray,
                       config: PrepareConfig) -> tuple[np.ndarray, np.ndarray, pd.Series | None]:
    """Assign each interaction to a split.

    Returns ``(split, train_items, item_split)``: ``split`` is an array of "train"/"valid"/"test"
    per row of ``frame``; ``train_items`` the item ids whose content the train period may use;
    ``item_split`` the :func:`item_splits` of ``item-cold`` (``None`` under ``temporal``).
    """
    train_frac, valid_frac, _ = config.fractions
    n = len(frame)
    if config.protocol == "temporal":
        # Stable sort by time (ties keep log order) so the split is reproducible.
        order = np.argsort(frame["timestamp"].to_numpy(), kind="stable")
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n)
        n_train, n_valid = int(round(n * train_frac)), int(round(n * valid_frac))
        split = np.where(position < n_train, "train", np.where(position < n_train + n_valid, "valid", "test"))
        train_items = np.unique(frame["item_id"].to_numpy()[split == "train"])
        return split.astype(object), train_items, None
    item_split = item_splits(item_ids, config)
    split = item_split.reindex(frame["item_id"].to_numpy()).to_numpy()
    # sorted(), not numpy's fixed-width str (which drops an id's trailing "\0").
    train_items = np.array(sorted(item_split.index[item_split.to_numpy() == "train"]), dtype=object)
    return split.astype(object), train_items, item_split


def behaviour_sequences(frame: pd.DataFrame, history_mask: np.ndarray, max_len: int) -> tuple[pa.ListArray, pa.ListArray]:
    """For every row, the user's positives from ``frame[history_mask]`` strictly earlier in time.

    Vectorised: history rows are sorted by (user, time); for each sample a ``searchsorted``
    finds where its user's strictly-earlier history ends, and the last ``max_len`` of those
    are gathered. Returns Arrow list arrays (item ids, timestamps), most recent last.
    """
    max_len = min(int(max_len), len(frame))  # a huge max_len would overflow the int64 offsets below
    users = pd.factorize(frame["user_id"])[0].astype(np.int64)
    distinct_times = np.unique(frame["timestamp"].to_numpy())
    rank = np.searchsorted(distinct_times, frame["timestamp"].to_numpy()).astype(np.int64)
    stride = len(distinct_times) + 1
    keys = users * stride + rank
    hist_rows = np.flatnonzero(history_mask)
    hist_rows = hist_rows[np.argsort(keys[hist_rows], kind="stable")]
    hist_keys = keys[hist_rows]
    end = np.searchsorted(hist_keys, keys, side="left")  # first history row at the same or a later time
    user_start = np.searchsorted(hist_keys, users * stride, side="left")
    start = np.maximum(user_start, end - max_len)
    lengths = end - start
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.repeat(start, lengths) + (np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths))
    gathered = pa.array(hist_rows[flat])
    # Arrow's take gathers the strings in C++; going through Python str objects is 10x slower.
    item_values = pa.array(frame["item_id"].to_numpy(), type=pa.string()).take(gathered)
    time_values = pa.array(frame["timestamp"].to_numpy(), type=pa.int64()).take(gathered)
    return pa.ListArray.from_arrays(pa.array(offsets), item_values), pa.ListArray.from_arrays(pa.array(offsets), time_values)


def popularity_buckets(train_item_ids: np.ndarray, item_ids: np.ndarray, long_tail_max: int) -> np.ndarray:
    """``cold`` (0 train interactions), ``long_tail`` (1..long_tail_max) or ``head`` per item id."""
    counts = pd.Series(train_item_ids).value_counts()
    n = counts.reindex(item_ids).fillna(0).to_numpy()
    return np.select([n == 0, n <= long_tail_max], ["cold", "long_tail"], "head").astype(object)


def _checked_items(items: Dataset) -> tuple[Dataset, int]:
    """The items table with ids as unique non-empty str and titles checked as :func:`validate_items`
    does (images are not re-decoded); returns it and its number of empty titles."""
    _require_columns(items, ITEM_REQUIRED, "items")
    if len(items) == 0:
        raise ValueError("items table is empty (expected at least one item)")
    raw = _column(items, "item_id")
    ids = unique_id_strings(raw, "items", "item_id").tolist()
    raw_titles = _column(items, "title")
    titles = clean_titles(raw_titles)
    if not (items.features["item_id"].dtype == "string" and raw.tolist() == ids):
        items = replace_column(items, "item_id", ids)
    if not (items.features["title"].dtype == "string" and raw_titles.tolist() == titles):
        items = replace_column(items, "title", titles)
    return items, sum(1 for t in titles if not t)


def _check_column_names(frame: pd.DataFrame, items: Dataset, users: Dataset | None) -> None:
    """Sample columns prepare() adds must not collide with the user's own columns."""
    taken = [c for c in frame.columns if c in SAMPLE_COLUMNS]
    if taken:
        raise ValueError(f"interactions table has column(s) {taken}, which prepare() writes; expected none of "
                         f"{list(SAMPLE_COLUMNS)} (rename them)")
    joined = [f"item_{c}" for c in items.column_names if c not in ITEM_CONTENT_COLUMNS]
    joined += [f"user_{c}" for c in users.column_names if c != "user_id"] if users is not None else []
    clashes = sorted(set(joined) & set(frame.columns))
    if len(set(joined)) != len(joined) or clashes:
        raise ValueError(f"side-feature column(s) {clashes or joined} collide: item/user attributes become item_<name>/"
                         "user_<name> sample columns; expected the interactions table not to hold those names")


def _side_features(frame: pd.DataFrame, items: Dataset, users: Dataset | None) -> tuple[pd.DataFrame, dict]:
    """Join ``item_*`` (catalogue attributes) and ``user_*`` (user table) columns onto samples.

    Returns the frame and, with a users table, the counts of users (and rows) it lacks."""
    item_cols = [c for c in items.column_names if c not in ITEM_CONTENT_COLUMNS]
    if item_cols:
        attrs = items.select_columns(["item_id", *item_cols]).to_pandas().set_index("item_id")
        attrs = attrs.reindex(frame["item_id"].to_numpy())
        for col in item_cols:
            values = attrs[col]
            exact_int = np.isfinite(values) & (values == np.round(values)) & (np.abs(values) < 2**53) \
                if pd.api.types.is_float_dtype(values) else None
            if exact_int is not None and np.all(np.isnan(values) | exact_int):
                values = values.astype("Int64")  # an int attribute with gaps (e.g. year) stays int
            frame[f"item_{col}"] = values.to_numpy() if values.dtype != "Int64" else values.array
    missing = {}
    if users is not None:
        user_frame = users.to_pandas().set_index("user_id")
        absent = ~frame["user_id"].isin(user_frame.index).to_numpy()
        # The fallback: their user_* features are missing, which the vocabularies encode as [UNK].
        missing = {"users_missing_from_users_table": int(frame["user_id"][absent].nunique()),
                   "rows_without_user_features": int(absent.sum())}
        user_frame = user_frame.reindex(frame["user_id"].to_numpy())
        for col in user_frame.columns:
            frame[f"user_{col}"] = user_frame[col].to_numpy()
    return frame, missing


def _pairs_frame(samples: pd.DataFrame, offsets: np.ndarray, behaviour_items: np.ndarray, behaviour_times: np.ndarray,
                 split: str, window: int) -> pd.DataFrame:
    """(trigger -> target) pairs: each positive target of ``split`` with its most recent earlier positives."""
    rows = np.flatnonzero((samples["split"].to_numpy() == split) & (samples["label"].to_numpy() == 1))
    take = np.minimum(offsets[rows + 1] - offsets[rows], window)
    flat = np.repeat(offsets[rows + 1] - take, take) + (np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take))
    target_rows = np.repeat(rows, take)
    return pd.DataFrame({
        "user_id": samples["user_id"].to_numpy()[target_rows],
        "trigger_item_id": behaviour_items[flat],
        "target_item_id": samples["item_id"].to_numpy()[target_rows],
        "trigger_timestamp": behaviour_times[flat],
        "target_timestamp": samples["timestamp"].to_numpy()[target_rows],
    })


def prepare(data: RecData, config: PrepareConfig | None = None, **overrides) -> PreparedData:
    """Split ``data`` under a protocol and build CTR samples, C-SFT pairs and vocabularies.

    Args:
        data: validated tables (see :mod:`mim_hf.data.tables`).
        config: a :class:`PrepareConfig`; keyword ``overrides`` replace its fields
            (e.g. ``prepare(data, protocol="item-cold", max_len=20)``).
    """
    config = PrepareConfig(**{**(config.__dict__ if config else {}), **overrides})
    config.validate()
    # Re-checked here (cheap, idempotent) so unvalidated tables cannot lose rows silently,
    # e.g. int item ids that would match no item-cold split.
    (items, empty_titles), users = _checked_items(data.items), validate_users(data.users) if data.users is not None else None
    item_ids = _column(items, "item_id").to_numpy(dtype=object)
    frame = interaction_frame(data.interactions.to_pandas(), pd.Index(item_ids))
    _check_column_names(frame, items, users)
    frame["split"], train_items, item_split = split_interactions(frame, item_ids, config)
    negative_counts = None
    if config.labels == "implicit":
        frame["label"] = np.int8(1)
        negatives, negative_counts = draw_negatives(frame, item_ids, item_split, config.neg_ratio, config.seed)
        frame = pd.concat([frame, negatives.assign(label=np.int8(0))], ignore_index=True)
    # Stable order inside each split: by time, then by the log's own order (drawn negatives last).
    split_rank = pd.Categorical(frame["split"], categories=list(SPLITS)).codes
    frame = frame.iloc[np.lexsort((frame["timestamp"].to_numpy(), split_rank))].reset_index(drop=True)

    is_train = frame["split"].to_numpy() == "train"
    positive = frame["label"].to_numpy() == 1
    # item-cold: held-out items' interactions never become behaviours (their IDs stay unknown
    # everywhere). temporal: any earlier positive is observable history at serving time.
    history_mask = positive & is_train if config.protocol == "item-cold" else positive
    behaviours, behaviour_times = behaviour_sequences(frame, history_mask, config.max_len)
    counted = is_train & positive if config.labels == "implicit" else is_train  # interactions, not drawn negatives
    frame["popularity_bucket"] = popularity_buckets(frame["item_id"].to_numpy()[counted], frame["item_id"].to_numpy(),
                                                    config.long_tail_max)
    frame, missing_users = _side_features(frame, items, users)

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.append_column("behavior_item_ids", behaviours).append_column("behavior_timestamps", behaviour_times)
    all_samples = Dataset(table)
    samples = DatasetDict({s: all_samples.select(np.flatnonzero(frame["split"].to_numpy() == s)) for s in SPLITS})

    offsets = behaviours.offsets.to_numpy()
    flat_items = behaviours.values.to_numpy(zero_copy_only=False)
    flat_times = behaviour_times.values.to_numpy()
    pairs_frames = {s: _pairs_frame(frame, offsets, flat_items, flat_times, s, config.pair_window if s == "train" else 1)
                    for s in SPLITS}
    self_pairs = {s: int((p["trigger_item_id"] == p["target_item_id"]).sum()) for s, p in pairs_frames.items()}
    pairs = DatasetDict({
        s: Dataset.from_pandas(p[p["trigger_item_id"] != p["target_item_id"]].reset_index(drop=True), preserve_index=False)
        for s, p in pairs_frames.items()
    })

    train_frame = frame[is_train]
    vocabs = {"user_id": Vocabulary.build(train_frame["user_id"], "user_id"),
              "item_id": Vocabulary.build(train_frame["item_id"], "item_id")}
    for col in frame.columns:
        if col.startswith(("user_", "item_")) and col not in ("user_id", "item_id"):
            vocabs[col] = Vocabulary.build(train_frame[col], col)

    prepared = PreparedData(data.name, items, samples, pairs, vocabs, [str(i) for i in train_items], config)
    frame["history_length"] = np.diff(offsets)
    fallbacks = {**data.report.to_dict(), "empty_titles": empty_titles, "self_pairs_skipped": sum(self_pairs.values()),
                 **missing_users}
    prepared.stats = compute_stats(prepared, frame, data, fallbacks, negative_counts)
    return prepared


def compute_stats(prepared: PreparedData, frame: pd.DataFrame, data: RecData, fallbacks: dict[str, int],
                  negatives: dict | None = None) -> dict:
    """Every count a reader needs to trust the split (printed by ``mim-hf data prepare``).

    ``frame`` holds all samples with their ``split`` and ``history_length``; ``negatives`` the
    counts of :func:`mim_hf.data.labels.draw_negatives` (``implicit`` labels only).
    """
    known_users = frame["user_id"].isin(prepared.vocabs["user_id"].tokens[1:]).to_numpy()
    known_items = frame["item_id"].isin(prepared.vocabs["item_id"].tokens[1:]).to_numpy()
    splits = {}
    for name in SPLITS:
        in_split = frame["split"].to_numpy() == name
        part = frame[in_split]
        buckets = part["popularity_bucket"].value_counts()
        lengths = part["history_length"].to_numpy()
        splits[name] = {
            "rows": len(part),
            "users": int(part["user_id"].nunique()),
            "items": int(part["item_id"].nunique()),
            "positive_rate": float(part["label"].mean()) if len(part) else None,
            "popularity_buckets": {b: int(buckets.get(b, 0)) for b in BUCKETS},
            "rows_with_unknown_user": int((~known_users[in_split]).sum()),
            "rows_with_unknown_item": int((~known_items[in_split]).sum()),
            "rows_with_empty_history": int((lengths == 0).sum()),
            "mean_history_length": float(lengths.mean()) if len(lengths) else 0.0,
            "pairs": len(prepared.pairs[name]),
        }
    config = prepared.config
    extra = {"fold": {"folds": config.folds, "fold": config.fold}} if config.folds is not None else {}
    if negatives is not None:
        extra["negatives"] = {"labels": config.labels, "neg_ratio": config.neg_ratio, **negatives}
    return {
        "dataset": prepared.name,
        "protocol": prepared.config.protocol,
        **extra,
        "users": int(frame["user_id"].nunique()),
        "items": len(data.items),
        "interactions": len(frame) - (sum(negatives["drawn"].values()) if negatives is not None else 0),
        "positive_rate": float(frame["label"].mean()),
        "train_items": len(prepared.train_item_ids),
        "splits": splits,
        "vocab_sizes": {k: len(v) for k, v in prepared.vocabs.items()},
        "fallbacks": fallbacks,
    }


def format_stats(stats: dict) -> str:
    """A plain-text table of :func:`mim_hf.data.prepare.compute_stats` output."""
    lines = [
        f"{stats['dataset']} / protocol={stats['protocol']}: {stats['users']} users, {stats['items']} items, "
        f"{stats['interactions']} interactions, positive rate {stats['positive_rate']:.3f}, "
        f"{stats['train_items']} items usable for training",
        f"{'split':<6} {'rows':>7} {'users':>6} {'items':>6} {'pos%':>6} {'cold':>7} {'long_tail':>9} {'head':>7} "
        f"{'unk_user':>8} {'unk_item':>8} {'no_hist':>7} {'hist_len':>8} {'pairs':>7}",
    ]
    for name, split in stats["splits"].items():
        b = split["popularity_buckets"]
        pos = 100 * split["positive_rate"] if split["positive_rate"] is not None else float("nan")
        lines.append(
            f"{name:<6} {split['rows']:>7} {split['users']:>6} {split['items']:>6} {pos:>6.1f} {b['cold']:>7} "
            f"{b['long_tail']:>9} {b['head']:>7} {split['rows_with_unknown_user']:>8} {split['rows_with_unknown_item']:>8} "
            f"{split['rows_with_empty_history']:>7} {split['mean_history_length']:>8.1f} {split['pairs']:>7}"
        )
    if "fold" in stats:
        lines.insert(1, f"item fold {stats['fold']['fold']} of {stats['fold']['folds']} (test: part "
                        f"{stats['fold']['fold']}, valid: the next part, train: the rest)")
    if "negatives" in stats:
        neg = stats["negatives"]
        lines.append(f"labels={neg['labels']}, {neg['neg_ratio']} negative(s) per positive: "
                     + "; ".join(f"{s} drawn={neg['drawn'][s]} rejected_draws={neg['rejected_draws'][s]} "
                                 f"positives_without_negative={neg['positives_without_negative'][s]}" for s in SPLITS))
    lines.append("vocabulary sizes (incl. [UNK]): " + ", ".join(f"{k}={v}" for k, v in stats["vocab_sizes"].items()))
    lines.append("fallbacks applied: " + ", ".join(f"{k}={v}" for k, v in stats["fallbacks"].items()))
    return "\n".join(lines)
