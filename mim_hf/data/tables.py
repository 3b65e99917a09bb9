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


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _plain(value):
    """A numpy scalar as the Python value a user typed (for error messages)."""
    return value.item() if isinstance(value, np.generic) else value


def validate_items(items: Dataset, report: ValidationReport | None = None) -> Dataset:
    """Check an items table; returns it with ids as str and fallbacks applied.

    Raises ``ValueError`` on missing columns, missing/duplicate ``item_id`` values and
    non-string titles.
    """
    report = report if report is not None else ValidationReport()
    _require_columns(items, ITEM_REQUIRED, "items")
    if len(items) == 0:
        raise ValueError("items table is empty (expected at least one item)")
    ids = pd.Series(items["item_id"], dtype=object)
    if ids.isna().any():
        row = _first_bad(ids.isna().to_numpy())
        raise ValueError(f"items table: item_id is missing at row {row}")
    ids = ids.astype(str)
    duplicated = ids.duplicated(keep=False)
    if duplicated.any():
        dup_values = sorted(set(ids[duplicated]))
        raise ValueError(
            f"items table has {len(dup_values)} duplicate item_id value(s), e.g. "
            f"{dup_values[:5]} (rows {np.flatnonzero(duplicated.to_numpy())[:5].tolist()}); "
            "item_id must be unique"
        )
    titles = list(items["title"])
    for row, title in enumerate(titles):
        if title is not None and not isinstance(title, str):
            raise ValueError(f"items table: title at row {row} is {title!r} ({type(title).__name__}); expected str")
    clean_titles = [(t or "").strip() for t in titles]
    report.empty_titles = sum(1 for t in clean_titles if not t)
    items = items.remove_columns(["item_id", "title"])
    items = items.add_column("title", clean_titles).add_column("item_id", ids.tolist())
    if "image" in items.column_names:
        items = _validate_images(items, report)
    front = ["item_id", "title"]
    return items.select_columns(front + [c for c in items.column_names if c not in front])


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

    Ids become str, ``timestamp`` int64, ``label`` int8 in {0, 1}. Raises ``ValueError``
    naming the row and value for missing columns, unknown items, NaN/non-binary labels and
    non-numeric or missing timestamps.
    """
    _require_columns(interactions, INTERACTION_REQUIRED, "interactions")
    frame = interactions.to_pandas()
    for column in ("user_id", "item_id"):
        if frame[column].isna().any():
            raise ValueError(f"interactions table: {column} is missing at row {_first_bad(frame[column].isna().to_numpy())}")
        frame[column] = frame[column].astype(str)

    timestamps = frame["timestamp"]
    if not (pd.api.types.is_numeric_dtype(timestamps) or pd.api.types.is_datetime64_any_dtype(timestamps)):
        numeric = pd.to_numeric(timestamps, errors="coerce")
        row = _first_bad(numeric.isna().to_numpy()) if numeric.isna().any() else 0
        raise ValueError(
            f"interactions table: timestamp must be numeric (seconds) or datetime; "
            f"row {row} has {_plain(timestamps.iloc[row])!r} ({timestamps.dtype})"
        )
    if pd.api.types.is_datetime64_any_dtype(timestamps):
        timestamps = (timestamps - pd.Timestamp(0, tz=timestamps.dt.tz)) // pd.Timedelta(seconds=1)
    bad = ~np.isfinite(timestamps.to_numpy(dtype=float))
    if bad.any():
        row = _first_bad(bad)
        raise ValueError(f"interactions table: timestamp at row {row} is {_plain(timestamps.iloc[row])!r}; expected a finite number")
    frame["timestamp"] = timestamps.astype("int64")

    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = labels.isna().to_numpy() | ~np.isin(labels.to_numpy(dtype=float), (0.0, 1.0))
    if bad.any():
        row = _first_bad(bad)
        raise ValueError(f"interactions table: label at row {row} is {_plain(frame['label'].iloc[row])!r}; expected 0 or 1")
    frame["label"] = labels.astype("int8")

    known = pd.Index(items["item_id"])
    unknown = known.get_indexer(frame["item_id"]) < 0
    if unknown.any():
        row = _first_bad(unknown)
        raise ValueError(
            f"interactions table references item_id {frame['item_id'].iloc[row]!r} (row {row}) absent from "
            f"items table ({len(known)} rows); {int(unknown.sum())} interaction(s) name unknown items"
        )
    return Dataset.from_pandas(frame, preserve_index=False)


def side_feature_columns(table: Dataset, exclude: tuple[str, ...]) -> list[str]:
    """Categorical side-feature columns of a table: everything but ids and content."""
    return [c for c in table.column_names if c not in exclude]
