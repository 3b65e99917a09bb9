"""The two tables every dataset is made of, and their validation.

* **items** -- one row per catalogue item: ``item_id`` (str), ``title`` (str), optional
  ``image`` (PIL image / datasets ``Image`` feature) and optional attribute columns
  (``genres``, ``year``, ``category``, ...).
* **interactions** -- one row per (user, item, time): ``user_id`` (str), ``item_id`` (str),
  ``timestamp`` (int64 seconds), ``label`` (0/1) and optional ``rating``.

Validation either raises a ``ValueError`` that names the column, row and value, or applies
a documented fallback and counts it in :class:`ValidationReport` (never a silent drop):

* empty or whitespace-only title -> kept as ``""`` (the encoder's processor then builds the
  item text from its attributes), counted as ``empty_titles``;
* unreadable image -> ``None`` (the encoder falls back to the text modality), counted as
  ``unreadable_images``.

Ids may arrive as str, int or integral float (an int id column with gaps reads back as float)
and always leave as non-empty str (``1``, ``1.0`` -> ``"1"``); ``"[UNK]"`` is reserved for the
vocabularies' unknown row. Timestamps may be numbers (seconds, floored) or datetimes; booleans,
text, NaN/inf and values outside int64 are errors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from datasets import Dataset

ITEM_REQUIRED = ("item_id", "title")
INTERACTION_REQUIRED = ("user_id", "item_id", "timestamp", "label")
# Item columns that are content (encoded by the content encoder), not categorical side features.
ITEM_CONTENT_COLUMNS = ("item_id", "title", "image", "description")
RESERVED_ID = "[UNK]"  # the vocabularies' index-0 token (mim_hf.data.vocab.UNKNOWN_TOKEN)
_INT64_LIMIT = 2.0 ** 63


@dataclass
class ValidationReport:
    """Counts of every fallback applied while validating (all zero for clean data)."""

    empty_titles: int = 0
    unreadable_images: int = 0
    missing_images: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RecData:
    """A recommendation dataset: the item catalogue, the interaction log, optional users.

    ``users`` (when present) has ``user_id`` plus categorical user features (``age``,
    ``gender``, ``occupation``, ...).
    """

    name: str
    items: Dataset
    interactions: Dataset
    users: Dataset | None = None
    report: ValidationReport = field(default_factory=ValidationReport)


def _require_columns(table: Dataset | pd.DataFrame, required: tuple[str, ...], table_name: str):
    columns = list(table.column_names if isinstance(table, Dataset) else table.columns)
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"{table_name} table is missing required column(s) {missing}; "
            f"it has {columns} (expected at least {list(required)})"
        )


def _column(table: Dataset, name: str) -> pd.Series:
    """One column of a Dataset as a pandas Series, through Arrow (no per-row Python objects)."""
    return table.select_columns([name]).to_pandas()[name]


def replace_column(table: Dataset, name: str, values: list) -> Dataset:
    """``table`` with column ``name`` replaced by ``values`` (same position)."""
    columns = table.column_names
    if columns == [name]:  # removing the only column would leave a table of 0 rows
        return Dataset.from_dict({name: values})
    return table.remove_columns(name).add_column(name, values).select_columns(columns)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _plain(value):
    """A numpy scalar as the Python value a user typed (for error messages)."""
    return value.item() if isinstance(value, np.generic) else value


def _id_text(value) -> str | None:
    """One id as text, or None when it is not an id (bool, NaN/inf, list, bytes, ...)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (str, int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)) and np.isfinite(value):
        return str(int(value)) if float(value).is_integer() else str(float(value))
    return None


def id_strings(values, table_name: str, column: str) -> pd.Series:
    """A column of ids -> Series (pandas string dtype) of non-empty str (see the module docstring).

    Raises ``ValueError`` naming the table, column, row and value for missing, empty, boolean,
    non-finite, non-scalar or reserved (``"[UNK]"``) ids.
    """
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    series = series.reset_index(drop=True)
    missing = series.isna().to_numpy()
    if missing.any():
        raise ValueError(f"{table_name} table: {column} is missing at row {_first_bad(missing)}; expected an id (str or int)")
    if pd.api.types.is_string_dtype(series) and not pd.api.types.is_object_dtype(series):
        texts = series
    elif pd.api.types.is_integer_dtype(series) and not pd.api.types.is_bool_dtype(series):
        texts = series.astype(str)
    else:
        texts = series.astype(object).map(_id_text)
        bad = texts.isna().to_numpy()
        if bad.any():
            row = _first_bad(bad)
            value = _plain(series.iloc[row])
            raise ValueError(f"{table_name} table: {column} at row {row} is {value!r} ({type(value).__name__}); "
                             "expected an id (str or int)")
        texts = texts.astype(str)  # pandas' string dtype: the checks below run vectorised in Arrow
    empty = texts.str.strip().eq("").to_numpy()
    if empty.any():
        row = _first_bad(empty)
        raise ValueError(f"{table_name} table: {column} at row {row} is {texts.iloc[row]!r}; expected a non-empty id")
    reserved = texts.eq(RESERVED_ID).to_numpy()
    if reserved.any():
        raise ValueError(f"{table_name} table: {column} at row {_first_bad(reserved)} is {RESERVED_ID!r}, which is "
                         "reserved for the vocabularies' unknown row; expected any other id")
    return texts


def unique_id_strings(values, table_name: str, column: str) -> pd.Series:
    """:func:`id_strings` that must also be unique (a table's own key)."""
    ids = id_strings(values, table_name, column)
    duplicated = ids.duplicated(keep=False)
    if duplicated.any():
        dup_values = sorted(set(ids[duplicated]))
        raise ValueError(
            f"{table_name} table has {len(dup_values)} duplicate {column} value(s), e.g. "
            f"{dup_values[:5]} (rows {np.flatnonzero(duplicated.to_numpy())[:5].tolist()}); "
            f"{column} must be unique"
        )
    return ids


def timestamp_seconds(timestamps: pd.Series) -> np.ndarray:
    """A timestamp column (numbers in seconds, or datetimes) -> int64 seconds (floored).

    Raises ``ValueError`` naming the row and value for text, booleans, missing or non-finite
    values and values outside the int64 range.
    """
    timestamps = timestamps.reset_index(drop=True)
    expected = "expected numeric seconds or a datetime"
    if pd.api.types.is_bool_dtype(timestamps):
        raise ValueError(f"interactions table: timestamp is boolean (row 0 has {_plain(timestamps.iloc[0])!r}); {expected}")
    if pd.api.types.is_datetime64_any_dtype(timestamps):
        seconds = (timestamps - pd.Timestamp(0, tz=timestamps.dt.tz)) // pd.Timedelta(seconds=1)
        values = seconds.to_numpy(dtype=float, na_value=np.nan)
    elif pd.api.types.is_numeric_dtype(timestamps):
        if pd.api.types.is_integer_dtype(timestamps) and timestamps.dtype != np.uint64 and not timestamps.isna().any():
            return timestamps.to_numpy().astype(np.int64)  # exact: no float round trip for large ints
        values = timestamps.to_numpy(dtype=float, na_value=np.nan)
    else:
        is_number = np.array([isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
                              for v in timestamps], dtype=bool)
        if not is_number.all():
            # Point at a value that is not even numeric text when there is one (the likelier typo).
            parses = pd.to_numeric(timestamps.astype(object).where(is_number | timestamps.map(
                lambda v: isinstance(v, str))), errors="coerce").notna().to_numpy()
            row = _first_bad(~parses) if (~parses).any() else _first_bad(~is_number)
            value = _plain(timestamps.iloc[row])
            raise ValueError(f"interactions table: timestamp must be numeric (seconds) or datetime; "
                             f"row {row} has {value!r} ({type(value).__name__}); {expected}")
        if all(isinstance(v, (int, np.integer)) and -_INT64_LIMIT <= v < _INT64_LIMIT for v in timestamps):
            return np.array([int(v) for v in timestamps], dtype=np.int64)
        values = np.array([float(v) for v in timestamps], dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        row = _first_bad(bad)
        raise ValueError(f"interactions table: timestamp at row {row} is {_plain(timestamps.iloc[row])!r}; "
                         "expected a finite number")
    bad = (values < -_INT64_LIMIT) | (values >= _INT64_LIMIT)
    if bad.any():
        row = _first_bad(bad)
        raise ValueError(f"interactions table: timestamp at row {row} is {_plain(timestamps.iloc[row])!r}; "
                         f"expected seconds within the int64 range (|t| < 2**63)")
    return np.floor(values).astype(np.int64)


def validate_items(items: Dataset, report: ValidationReport | None = None) -> Dataset:
    """Check an items table; returns it with ids as str and fallbacks applied.

    Raises ``ValueError`` on missing columns, an empty table, missing/empty/duplicate
    ``item_id`` values and titles that are not text (NaN counts as a missing title).
    """
    report = report if report is not None else ValidationReport()
    _require_columns(items, ITEM_REQUIRED, "items")
    if len(items) == 0:
        raise ValueError("items table is empty (expected at least one item)")
    ids = unique_id_strings(_column(items, "item_id"), "items", "item_id")
    titles = clean_titles(_column(items, "title"))
    report.empty_titles = sum(1 for t in titles if not t)
    items = replace_column(replace_column(items, "title", titles), "item_id", ids.tolist())
    if "image" in items.column_names:
        items = _validate_images(items, report)
    front = ["item_id", "title"]
    return items.select_columns(front + [c for c in items.column_names if c not in front])


def clean_titles(titles: pd.Series) -> list[str]:
    """Titles stripped, missing ones (None/NaN) as ``""``; anything but text is a ``ValueError``."""
    titles = titles.astype(object).tolist()
    for row, title in enumerate(titles):
        if isinstance(title, float) and np.isnan(title):
            titles[row] = None  # pandas' missing value: the empty-title fallback
        elif title is not None and not isinstance(title, str):
            raise ValueError(f"items table: title at row {row} is {title!r} ({type(title).__name__}); expected str")
    return [(t or "").strip() for t in titles]


def validate_users(users: Dataset) -> Dataset:
    """Check a users table (``user_id`` + categorical features); returns it with ids as str.

    Raises ``ValueError`` on a missing ``user_id`` column and missing/empty/duplicate ids.
    """
    _require_columns(users, ("user_id",), "users")
    ids = unique_id_strings(_column(users, "user_id"), "users", "user_id")
    users = replace_column(users, "user_id", ids.tolist())
    return users.select_columns(["user_id"] + [c for c in users.column_names if c != "user_id"])


def _validate_images(items: Dataset, report: ValidationReport) -> Dataset:
    """Decode every image once; unreadable ones become ``None`` (counted)."""
    from datasets import Image as ImageFeature
    from PIL import Image

    raw = items.cast_column("image", ImageFeature(decode=False))["image"]
    cleaned, unreadable, missing = [], 0, 0
    for entry in raw:
        if entry is None or (entry.get("bytes") is None and entry.get("path") is None):
            cleaned.append(None)
            missing += 1
            continue
        try:
            source = io.BytesIO(entry["bytes"]) if entry.get("bytes") is not None else entry["path"]
            with Image.open(source) as img:
                img.load()
            cleaned.append(entry)
        except Exception:  # any decode failure is the documented fallback, counted below
            cleaned.append(None)
            unreadable += 1
    report.unreadable_images = unreadable
    report.missing_images = missing
    items = items.remove_columns("image").add_column("image", cleaned)
    return items.cast_column("image", ImageFeature())


def validate_interactions(interactions: Dataset, items: Dataset) -> Dataset:
    """Check an interactions table against the (validated) items table.

    Ids become str, ``timestamp`` int64 seconds, ``label`` int8 in {0, 1}. Raises ``ValueError``
    naming the row and value for missing columns, an empty table, missing ids, unknown items,
    NaN/non-binary labels and timestamps that are not finite numbers or datetimes.
    """
    _require_columns(interactions, INTERACTION_REQUIRED, "interactions")
    frame = interaction_frame(interactions.to_pandas(), pd.Index(_column(items, "item_id")))
    return Dataset.from_pandas(frame, preserve_index=False)


def interaction_frame(frame: pd.DataFrame, item_ids: pd.Index) -> pd.DataFrame:
    """The checks of :func:`validate_interactions` on a DataFrame (returned normalised, new index).

    ``item_ids``: the validated items table's ids (str). Idempotent on validated data.
    """
    _require_columns(frame, INTERACTION_REQUIRED, "interactions")
    if len(frame) == 0:
        raise ValueError("interactions table is empty (expected at least one interaction)")
    frame = frame.reset_index(drop=True)
    for column in ("user_id", "item_id"):
        frame[column] = id_strings(frame[column], "interactions", column)
    frame["timestamp"] = timestamp_seconds(frame["timestamp"])

    raw_labels = frame["label"]
    labels = pd.to_numeric(raw_labels.astype(int) if pd.api.types.is_bool_dtype(raw_labels) else raw_labels,
                           errors="coerce")
    bad = labels.isna().to_numpy() | ~np.isin(labels.to_numpy(dtype=float, na_value=np.nan), (0.0, 1.0))
    if bad.any():
        row = _first_bad(bad)
        raise ValueError(f"interactions table: label at row {row} is {_plain(raw_labels.iloc[row])!r}; expected 0 or 1")
    frame["label"] = labels.astype("int8")

    unknown = item_ids.get_indexer(frame["item_id"]) < 0
    if unknown.any():
        row = _first_bad(unknown)
        raise ValueError(
            f"interactions table references item_id {frame['item_id'].iloc[row]!r} (row {row}) absent from "
            f"items table ({len(item_ids)} rows); {int(unknown.sum())} interaction(s) name unknown items"
        )
    return frame


def side_feature_columns(table: Dataset, exclude: tuple[str, ...]) -> list[str]:
    """Categorical side-feature columns of a table: everything but ids and content."""
    return [c for c in table.column_names if c not in exclude]
