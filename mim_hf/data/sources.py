"""Your own items and interactions as :class:`RecData`: readers, column mapping, presets.

    load_tables(items="meta.jsonl", interactions="reviews.jsonl", preset="amazon-reviews-2023")
    load_tables(items="items.csv", interactions="log.parquet", columns={"item_id": "asin"})

A source is a file (CSV / TSV, Parquet, JSON Lines; ``.gz``/``.bz2``/``.xz``/``.zst`` compressed
too), a folder written by ``datasets``' ``save_to_disk``, a Hub dataset id (``owner/name``), or a
``datasets.Dataset`` / ``pandas.DataFrame``. Files are read with ``datasets.load_dataset``;
CSV cells are read as text and converted below, so ids keep their leading zeros.

Column mapping: ``{"item_id": "asin"}`` reads the column ``asin`` as ``item_id`` in every table
that has it; ``{"items.item_id": "id"}`` in one table only (``items``, ``interactions`` or
``users``). The other columns are kept (item columns become attributes: item text and side
features), except under a preset, which keeps the columns it names.

Conversions, each failing with a ``ValueError`` that names the source, column, row and value:

* ``timestamp``: numbers in ``timestamp_unit`` (``"s"`` or ``"ms"``), datetimes, or text holding
  either (ISO 8601 dates such as ``2021-03-04T12:00:00Z``); kept as int64 seconds.
* ``rating``: numbers (or numeric text); ``label`` (0/1), when the interactions have none, is
  ``rating >= positive_rating``.
* ``image``: a path (relative to the items file's folder, else to the working directory), an
  http(s) URL, a list of those (the first is used) or a dict of sizes (``large``, ``hi_res``,
  ``thumb``: the first present is used). URLs are fetched here; one that cannot be fetched (offline, 404, timeout)
  becomes a missing image, counted in ``RecData.report.missing_images`` and logged, never an error.

The tables then go through :func:`~mim_hf.data.tables.validate_items`,
:func:`~mim_hf.data.tables.validate_interactions` and :func:`~mim_hf.data.tables.validate_users`
(duplicate item ids, unknown items, bad labels...), whose errors come back prefixed with the source
and the columns that were renamed.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from huggingface_hub import constants

from .movielens import POSITIVE_RATING
from .tables import RecData, ValidationReport, _plain, replace_column, timestamp_seconds, validate_interactions, \
    validate_items, validate_users

logger = logging.getLogger(__name__)

TABLES = ("items", "interactions", "users")
# Columns each table must end up with (after mapping); interactions also need a rating or a label.
REQUIRED = {"items": ("item_id", "title"), "interactions": ("user_id", "item_id", "timestamp"), "users": ("user_id",)}
# File suffix -> datasets' packaged builder (and its reader options).
FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}), ".parquet": ("parquet", {}),
           ".jsonl": ("json", {}), ".json": ("json", {}), ".ndjson": ("json", {})}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TIMESTAMP_UNITS = {"s": 1, "ms": 1000}
IMAGE_URL_KEYS = ("large", "hi_res", "thumb")  # a dict of sizes (Amazon's layout): the first present
IMAGE_FETCH_TIMEOUT_S = 10.0
IMAGE_FETCH_THREADS = 16
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Preset:
    """A known file layout.

    Attributes:
        columns: target -> source column mapping (``--column`` options override it).
        item_columns / interaction_columns: the columns kept (after mapping), when present.
        timestamp_unit: unit of numeric timestamps.
    """

    columns: dict
    item_columns: tuple[str, ...]
    interaction_columns: tuple[str, ...]
    timestamp_unit: str = "s"


PRESETS = {
    # https://amazon-reviews-2023.github.io: reviews <category>.jsonl + meta_<category>.jsonl, joined on
    # parent_asin; timestamps in milliseconds; images a list of {thumb, large, hi_res, variant} dicts.
    "amazon-reviews-2023": Preset(
        columns={"item_id": "parent_asin", "items.image": "images"},
        item_columns=("item_id", "title", "image", "main_category", "store", "categories", "description"),
        interaction_columns=("user_id", "item_id", "timestamp", "rating", "label"),
        timestamp_unit="ms",
    ),
}


@dataclass
class _Table:
    """One source read into a Dataset, with what error messages need to say where it came from."""

    role: str  # "items", "interactions" or "users"
    data: Dataset
    where: str  # e.g. "items file '/data/meta.jsonl'"
    folder: Path  # relative image paths resolve here
    renamed: dict  # source column -> target column

    def error(self, message: str) -> ValueError:
        renamed = ", ".join(f"{s!r} read as {t!r}" for s, t in self.renamed.items())
        return ValueError(f"{self.where}{f' (columns {renamed})' if renamed else ''}: {message}")


def parse_column_options(options: list[str] | None) -> dict:
    """``["item_id=asin", "items.title=name"]`` (the CLI's ``--column``) -> ``{"item_id": "asin", ...}``."""
    columns = {}
    for option in options or []:
        target, sep, source = option.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise ValueError(f"--column {option!r}: expected NAME=SOURCE_COLUMN, e.g. item_id=asin")
        if target.strip() in columns:
            raise ValueError(f"--column {option!r}: {target.strip()!r} is mapped twice; expected one source per column")
        columns[target.strip()] = source.strip()
    return columns


def load_tables(items, interactions, users=None, columns: dict | None = None, preset: str | None = None,
                timestamp_unit: str | None = None, positive_rating: float = POSITIVE_RATING,
                name: str | None = None) -> RecData:
    """Read, map, convert and validate your own tables (see the module docstring).

    Args:
        items / interactions / users: a file path, a ``save_to_disk`` folder, a Hub dataset id,
            a ``datasets.Dataset`` or a ``pandas.DataFrame``. ``users`` is optional.
        columns: ``{target: source}``; a target may name its table (``"items.title"``).
        preset: a name in :data:`PRESETS` (its mapping, kept columns and timestamp unit).
        timestamp_unit: ``"s"`` or ``"ms"`` (default: the preset's, else ``"s"``).
        positive_rating: ``label = rating >= positive_rating`` when the interactions have no label.
        name: the dataset's name in statistics (default: the interactions file's name without
            its suffixes, else the preset's name, else ``"custom"``).

    Returns:
        validated :class:`RecData`; its ``report`` counts the fallbacks (missing images...).
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {sorted(PRESETS)}")
    layout = PRESETS.get(preset)
    columns = columns or {}
    # A mapping of yours replaces the preset's for the same column, whichever table either names.
    overridden = {target.rpartition(".")[2] for target in columns}
    preset_columns = layout.columns if layout else {}
    mapping = {**{t: s for t, s in preset_columns.items() if t.rpartition(".")[2] not in overridden}, **columns}
    unit = timestamp_unit or (layout.timestamp_unit if layout else "s")
    if unit not in TIMESTAMP_UNITS:
        raise ValueError(f"timestamp_unit {unit!r} is not one of {list(TIMESTAMP_UNITS)}")
    sources = {"items": items, "interactions": interactions, "users": users}
    tables = {role: _read_source(source, role) for role, source in sources.items() if source is not None}
    _apply_mapping(tables, mapping)
    if layout is not None:
        for role, keep in (("items", layout.item_columns), ("interactions", layout.interaction_columns)):
            table = tables[role]
            table.data = table.data.select_columns([c for c in keep if c in table.data.column_names])
    for table in tables.values():
        missing = [c for c in REQUIRED[table.role] if c not in table.data.column_names]
        if missing:
            raise table.error(f"no column for {missing}; it has {table.data.column_names} (map one with "
                              f"columns={{{missing[0]!r}: <its column>}} / --column {missing[0]}=<its column>)")

    report = ValidationReport()
    item_table = tables["items"]
    if "image" in item_table.data.column_names and not isinstance(item_table.data.features["image"], ImageFeature):
        item_table.data = replace_column(item_table.data, "image", _image_entries(item_table))
        item_table.data = item_table.data.cast_column("image", ImageFeature())
    item_data = _validated(item_table, lambda: validate_items(item_table.data, report))
    interactions_raw = _interaction_dataset(tables["interactions"], unit, positive_rating)
    interaction_data = _validated(tables["interactions"], lambda: validate_interactions(interactions_raw, item_data))
    user_data = _validated(tables["users"], lambda: validate_users(tables["users"].data)) if "users" in tables else None
    if name is None:
        is_file = isinstance(interactions, (str, os.PathLike)) and Path(interactions).is_file()
        name = Path(interactions).name.split(".")[0] if is_file else preset or "custom"
    return RecData(name, item_data, interaction_data, user_data, report)


def _read_source(source, role: str) -> _Table:
    """One source -> ``_Table`` (see :func:`load_tables` for what a source may be)."""
    if isinstance(source, pd.DataFrame):
        return _Table(role, Dataset.from_pandas(source, preserve_index=False), f"{role} DataFrame", Path.cwd(), {})
    if isinstance(source, (Dataset, DatasetDict)):
        return _Table(role, _one_split(source, f"{role} Dataset"), f"{role} Dataset", Path.cwd(), {})
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{role}: expected a path, a Hub dataset id, a datasets.Dataset or a pandas.DataFrame, "
                        f"got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        where = f"{role} folder {str(path)!r}"
        try:
            data = load_from_disk(str(path))
        except FileNotFoundError as err:
            raise ValueError(f"{where} is not a datasets save_to_disk folder ({err}); expected one, or a file") \
                from None
        return _Table(role, _one_split(data, where), where, path, {})
    suffix = _format_suffix(path)
    if path.is_file():
        where = f"{role} file {str(path)!r}"
        if suffix not in FORMATS:
            raise ValueError(f"{where}: unknown file type {''.join(path.suffixes)!r}; expected one of "
                             f"{sorted(FORMATS)} (optionally {'/'.join(COMPRESSIONS)} compressed)")
        return _Table(role, _read_file(path, suffix, where), where, path.parent, {})
    if suffix in FORMATS or not _HUB_ID.match(str(source)):
        raise ValueError(f"{role} file {str(path)!r} does not exist; expected a file, a save_to_disk folder or a "
                         "Hub dataset id (owner/name)")
    where = f"{role} Hub dataset {str(source)!r}"
    try:
        data = load_dataset(str(source))
    except Exception as err:  # any Hub failure (not found, offline, no data files) reads the same to the user
        raise ValueError(f"{where} cannot be loaded ({type(err).__name__}: {err}); expected an existing file, "
                         "folder or Hub dataset id") from None
    return _Table(role, _one_split(data, where), where, Path.cwd(), {})


def _format_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_file(path: Path, suffix: str, where: str) -> Dataset:
    builder, options = FORMATS[suffix]
    try:
        if builder == "csv":
            # Every CSV cell as text: ids keep leading zeros; numbers are converted where expected.
            header = pd.read_csv(path, nrows=0, **options).columns
            options = {**options, "features": Features({str(c): Value("string") for c in header})}
        return load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # datasets wraps parser errors; show the root cause (truncated JSON, ragged CSV...)
        cause = err.__cause__ or err
        raise ValueError(f"{where} cannot be read as {builder.upper()} ({type(cause).__name__}: "
                         f"{str(cause).strip()}); expected a complete, well-formed file") from None


def _one_split(data, where: str) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if len(data) != 1:
        raise ValueError(f"{where} has splits {list(data)}; expected one table (in Python, pass the split you mean, "
                         "e.g. dataset['train'])")
    return next(iter(data.values()))


def _apply_mapping(tables: dict, mapping: dict) -> None:
    """Rename source -> target columns in place; raises on sources absent from the file(s)."""
    unscoped_found = {target: False for target in mapping if "." not in target}
    for target, source in mapping.items():
        role, _, column = target.rpartition(".")
        if role and role not in TABLES:
            raise ValueError(f"column mapping {target!r}={source!r}: {role!r} is not one of {list(TABLES)}")
        if role and role not in tables:
            raise ValueError(f"column mapping {target!r}={source!r}: no {role} table was given")
        for table in ([tables[role]] if role else tables.values()):
            columns = table.data.column_names
            if source not in columns:
                if role:
                    raise table.error(f"column {source!r} (mapped to {column!r}) is absent; it has {columns}")
                continue
            if not role:
                unscoped_found[target] = True
            if source == column:
                continue
            if column in columns:
                raise table.error(f"has both {source!r} (mapped to {column!r}) and {column!r}; expected one of them")
            if source in table.renamed:
                raise table.error(f"column {source!r} is mapped twice ({table.renamed[source]!r}, {column!r}); "
                                  "expected one target per column")
            table.renamed[source] = column
    absent = [t for t, found in unscoped_found.items() if not found]
    if absent:
        seen = "; ".join(f"{t.where} has {t.data.column_names}" for t in tables.values())
        raise ValueError(f"column {mapping[absent[0]]!r} (mapped to {absent[0]!r}) is in none of the tables: {seen}")
    for table in tables.values():
        if table.renamed:
            table.data = table.data.rename_columns(table.renamed)


def _validated(table: _Table, check):
    """Run a data-layer check; its ValueError comes back naming the source and the renamed columns."""
    try:
        return check()
    except ValueError as err:
        raise table.error(str(err)) from None


def _numbers(values: pd.Series, table: _Table, column: str) -> pd.Series:
    """Numbers, or numeric text -> numeric Series; anything else (text, bool, missing) is an error."""
    values = values.reset_index(drop=True)
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values
    else:
        is_bool = values.map(lambda v: isinstance(v, (bool, np.bool_))).to_numpy(dtype=bool)
        numbers = pd.to_numeric(values.astype(object).where(~is_bool), errors="coerce")
    bad = ~np.isfinite(numbers.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise table.error(f"{column} at row {row} is {_plain(values.iloc[row])!r}; expected a finite number")
    return numbers


def _seconds(values: pd.Series, table: _Table, unit: str) -> np.ndarray:
    """A timestamp column (numbers in ``unit``, datetimes, or text of either) -> int64 seconds."""
    values = values.reset_index(drop=True)
    if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values)):
        text = values.astype(object)
        numbers = pd.to_numeric(text, errors="coerce")
        # A column of numbers (as text) or of dates: one that parses as neither is named.
        parsed = numbers if numbers.notna().any() else pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
        bad = parsed.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise table.error(f"timestamp at row {row} is {_plain(text.iloc[row])!r}; expected a number "
                              f"({unit}) or an ISO 8601 date such as '2021-03-04T12:00:00Z'")
        values = parsed
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values) and unit != "s":
        scale = TIMESTAMP_UNITS[unit]
        values = values // scale if pd.api.types.is_integer_dtype(values) else values / scale
    try:
        return timestamp_seconds(values)
    except ValueError as err:
        raise table.error(str(err)) from None


def _interaction_dataset(table: _Table, unit: str, positive_rating: float) -> Dataset:
    """Timestamps as int64 seconds, ratings as float32, a label from the rating when there is none."""
    frame = table.data.to_pandas()
    if "rating" not in frame.columns and "label" not in frame.columns:
        raise table.error(f"no rating or label column; it has {list(frame.columns)} (map one with "
                          "--column rating=<its column> or --column label=<its column>)")
    frame["timestamp"] = _seconds(frame["timestamp"], table, unit)
    if "rating" in frame.columns:
        frame["rating"] = _numbers(frame["rating"], table, "rating").astype("float32").to_numpy()
        if "label" not in frame.columns:
            frame["label"] = (frame["rating"] >= positive_rating).astype("int8")
    return Dataset.from_pandas(frame, preserve_index=False)


def _image_reference(value):
    """An image cell -> a path/URL str, a datasets image dict, or None (see the module docstring)."""
    if isinstance(value, dict):
        if "bytes" in value or "path" in value:
            return value if value.get("bytes") is not None or value.get("path") else None
        return next((value[k] for k in IMAGE_URL_KEYS if isinstance(value.get(k), str) and value[k].strip()), None)
    if isinstance(value, (list, tuple, np.ndarray)):
        return next((ref for ref in map(_image_reference, value) if ref is not None), None)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _is_url(reference) -> bool:
    return isinstance(reference, str) and reference.lower().startswith(("http://", "https://"))


def _fetch(url: str) -> tuple[str, bytes | None, str | None]:
    """``(url, content, None)``, or ``(url, None, why)`` when it cannot be fetched."""
    try:
        with urllib.request.urlopen(url, timeout=IMAGE_FETCH_TIMEOUT_S) as response:
            return url, response.read(), None
    except Exception as err:  # offline, 404, timeout, bad URL: a counted missing image, not a crash
        return url, None, f"{type(err).__name__}: {err}"


def _image_entries(table: _Table) -> list:
    """The image column as datasets image dicts: paths resolved, URLs fetched (failures -> None, logged)."""
    references = [_image_reference(v) for v in table.data.select_columns(["image"]).to_pandas()["image"]]
    urls = sorted({r for r in references if _is_url(r)})
    fetched, failures = {}, {}
    if urls and constants.HF_HUB_OFFLINE:
        failures = dict.fromkeys(urls, "HF_HUB_OFFLINE is set")
    elif urls:
        with ThreadPoolExecutor(IMAGE_FETCH_THREADS) as pool:
            for url, content, problem in pool.map(_fetch, urls):
                if problem is None:
                    fetched[url] = content
                else:
                    failures[url] = problem
    if failures:
        first = next(iter(failures))
        logger.warning("%s: %d of %d image URL(s) could not be fetched (e.g. %r: %s); those items count as missing "
                       "images and are encoded from their text", table.where, len(failures), len(urls), first,
                       failures[first])
    entries = []
    for reference in references:
        if _is_url(reference):
            entries.append({"bytes": fetched[reference], "path": reference} if reference in fetched else None)
        elif isinstance(reference, str):
            entries.append({"bytes": None, "path": str(table.folder / reference)})
        else:
            entries.append(reference)
    return entries
