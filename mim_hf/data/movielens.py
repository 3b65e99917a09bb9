"""MovieLens-100k, offline.

Two sources are understood:

* RecBole's atomic files (``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.user``) as they ship
  inside PyPI's ``recbole==1.2.1`` wheel. With no ``source`` the wheel is fetched once with
  ``pip download --no-deps`` into the cache directory and read in place (nothing installed).
* A GroupLens ``ml-100k`` folder (``u.data``, ``u.item``, ``u.user``).

Label = ``rating >= 4``. Expected: 943 users, 1,682 items, 100,000 interactions.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset

from .tables import RecData, ValidationReport, validate_interactions, validate_items, validate_users

RECBOLE_SPEC = "recbole==1.2.1"
WHEEL_PREFIX = "recbole/dataset_example/ml-100k/"
POSITIVE_RATING = 4.0
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
_ARTICLE_SUFFIX = re.compile(r"^(?P<rest>.*), (?P<article>The|A|An|Il|La|Le|Les|L'|Das|Der|Die|El)$")


def default_cache_dir() -> Path:
    """``$MIM_HF_CACHE`` or ``~/.cache/mim_hf``."""
    return Path(os.environ.get("MIM_HF_CACHE", Path.home() / ".cache" / "mim_hf"))


def natural_title(title: str) -> str:
    """'Usual Suspects, The' -> 'The Usual Suspects' (how a person would write it)."""
    match = _ARTICLE_SUFFIX.match(title.strip())
    if not match:
        return title.strip()
    article = match.group("article")
    sep = "" if article.endswith("'") else " "
    return f"{article}{sep}{match.group('rest')}"


def fetch_recbole_wheel(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the cached recbole wheel, downloading it (no deps) if absent."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", RECBOLE_SPEC, "-d", str(cache)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch {RECBOLE_SPEC} (which carries MovieLens-100k) into {cache}: "
                f"{result.stderr.strip()[-500:]}\nPass source=<path to a GroupLens ml-100k folder> instead."
            )
    return wheels[-1]


def _read_table(source, name: str, **read_csv_kwargs) -> pd.DataFrame:
    """``pd.read_csv`` whose failures (missing, empty, ragged, undecodable) name the file."""
    if isinstance(source, Path) and not source.is_file():
        raise ValueError(f"MovieLens file {name} is missing from {str(source.parent)!r}; expected the ml-100k layout")
    try:
        # MovieLens files are not quoted: a '"' in a title is part of the title.
        return pd.read_csv(source, dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE, **read_csv_kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"MovieLens file {name}: cannot be read as a table ({err}); expected the ml-100k layout") from None


def _columns(frame: pd.DataFrame, name: str, needed) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"MovieLens file {name} lacks column(s) {missing}; it has {list(frame.columns)}, "
                         f"expected at least {list(needed)}")


def _numbers(values: pd.Series, name: str, column: str, first_line: int) -> pd.Series:
    """Text column -> numbers (int64 when all are integers, so large timestamps stay exact); a missing
    or non-numeric value is a ``ValueError`` naming file and line."""
    numbers = pd.to_numeric(values.fillna("").astype(str).str.strip(), errors="coerce")
    bad = ~np.isfinite(numbers.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"MovieLens file {name}, line {row + first_line}: {column} is {values.iloc[row]!r}; "
                         "expected a finite number")
    return numbers


def _read_atomic(text: str, name: str) -> pd.DataFrame:
    """RecBole atomic file: tab-separated, header 'name:type'."""
    frame = _read_table(io.StringIO(text), name, sep="\t")
    frame.columns = [str(c).split(":")[0] for c in frame.columns]
    return frame


def _interactions(user_ids: pd.Series, item_ids: pd.Series, timestamps: pd.Series, ratings: pd.Series, name: str,
                  first_line: int) -> pd.DataFrame:
    if len(user_ids) == 0:
        raise ValueError(f"MovieLens file {name} holds no interactions; expected one rating per line")
    return pd.DataFrame({
        "user_id": user_ids,
        "item_id": item_ids,
        # timestamps stay numbers here; validate_interactions names any out-of-range one
        "timestamp": _numbers(timestamps, name, "timestamp", first_line),
        "rating": _numbers(ratings, name, "rating", first_line).astype("float32"),
    })


def _from_atomic(inter: str, item: str, user: str | None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    inter_f, item_f = _read_atomic(inter, "ml-100k.inter"), _read_atomic(item, "ml-100k.item")
    _columns(inter_f, "ml-100k.inter", ("user_id", "item_id", "rating", "timestamp"))
    _columns(item_f, "ml-100k.item", ("item_id", "movie_title", "release_year", "class"))
    items = pd.DataFrame({
        "item_id": item_f["item_id"],
        "title": item_f["movie_title"].map(natural_title),
        "genres": item_f["class"].map(lambda s: s.split()),
        "year": pd.to_numeric(item_f["release_year"], errors="coerce").astype("Int64"),
    })
    interactions = _interactions(inter_f["user_id"], inter_f["item_id"], inter_f["timestamp"], inter_f["rating"],
                                 "ml-100k.inter", 2)
    users = None
    if user is not None:
        user_f = _read_atomic(user, "ml-100k.user")
        _columns(user_f, "ml-100k.user", ("user_id", "age", "gender", "occupation"))
        users = user_f[["user_id", "age", "gender", "occupation"]].copy()
    return items, interactions, users


def _from_grouplens(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    data = _read_table(folder / "u.data", "u.data", sep="\t", header=None,
                       names=["user_id", "item_id", "rating", "timestamp"])
    raw_items = _read_table(folder / "u.item", "u.item", sep="|", header=None, encoding="latin-1")
    n_columns = 5 + len(GROUPLENS_GENRES)
    if raw_items.shape[1] != n_columns:
        raise ValueError(f"MovieLens file u.item has {raw_items.shape[1]} '|'-separated fields; expected {n_columns} "
                         "(id, title, release date, video date, url, 19 genre flags)")
    flag_text = raw_items.iloc[:, 5:].fillna("")
    flags = flag_text.isin(["0", "1"])
    if not flags.to_numpy().all():
        row, col = (int(i[0]) for i in np.nonzero(~flags.to_numpy()))
        raise ValueError(f"MovieLens file u.item, line {row + 1}: genre flag {GROUPLENS_GENRES[col]!r} is "
                         f"{flag_text.iat[row, col]!r}; expected 0 or 1")
    genres = [[g for g, on in zip(GROUPLENS_GENRES, row) if on == "1"] for row in flag_text.to_numpy()]
    titles = raw_items[1].fillna("")
    year_in_title = titles.str.extract(r"\((\d{4})\)\s*$")[0]
    items = pd.DataFrame({
        "item_id": raw_items[0],
        "title": titles.str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True).map(natural_title),
        "genres": genres,
        "year": pd.to_numeric(year_in_title, errors="coerce").astype("Int64"),
    })
    interactions = _interactions(data["user_id"], data["item_id"], data["timestamp"], data["rating"], "u.data", 1)
    users = None
    if (folder / "u.user").exists():
        users = _read_table(folder / "u.user", "u.user", sep="|", header=None,
                            names=["user_id", "age", "gender", "occupation", "zip_code"])
        users = users[["user_id", "age", "gender", "occupation"]]
    return items, interactions, users


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"MovieLens file {name} is not UTF-8 text ({err}); expected RecBole's atomic files") from None


def _read_text(path: Path) -> str:
    return _decode(path.read_bytes(), path.name)


def load_movielens_100k(source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> RecData:
    """Load MovieLens-100k as :class:`RecData`.

    Args:
        source: ``None`` (read from the cached recbole wheel, fetching it if needed), a path
            to a recbole wheel, a folder with RecBole atomic files (``ml-100k.inter``), or a
            GroupLens folder (``u.data`` / ``u.item``).
        cache_dir: where the wheel is cached (default :func:`default_cache_dir`).

    Returns:
        ``RecData`` with items (item_id, title, genres, year), interactions (user_id,
        item_id, timestamp, rating, label) and users (user_id, age, gender, occupation).
        ``age`` is bucketed by decade ("20s") so it is a categorical feature.
    """
    path = Path(source) if source is not None else fetch_recbole_wheel(cache_dir)
    if path.is_file() and path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            read = lambda name: _decode(wheel.read(WHEEL_PREFIX + name), name)  # noqa: E731
            items, interactions, users = _from_atomic(read("ml-100k.inter"), read("ml-100k.item"), read("ml-100k.user"))
    elif (path / "ml-100k.inter").exists():
        user_file = path / "ml-100k.user"
        items, interactions, users = _from_atomic(
            _read_text(path / "ml-100k.inter"), _read_text(path / "ml-100k.item"),
            _read_text(user_file) if user_file.exists() else None,
        )
    elif (path / "u.data").exists():
        items, interactions, users = _from_grouplens(path)
    else:
        raise ValueError(
            f"MovieLens-100k source {str(path)!r} is neither a recbole wheel, a folder with "
            "ml-100k.inter/ml-100k.item, nor a GroupLens folder with u.data/u.item"
        )
    interactions["label"] = (interactions["rating"] >= POSITIVE_RATING).astype("int8")
    if users is not None:
        age = pd.to_numeric(users["age"], errors="coerce")
        decade = (age // 10 * 10).astype("Int64")
        # A missing or non-numeric age is a missing feature (None), not a "<NA>s" category.
        users = users.assign(age=[None if pd.isna(d) else f"{d}s" for d in decade])
    report = ValidationReport()
    items_ds = validate_items(Dataset.from_pandas(items, preserve_index=False), report)
    interactions_ds = validate_interactions(Dataset.from_pandas(interactions, preserve_index=False), items_ds)
    users_ds = validate_users(Dataset.from_pandas(users, preserve_index=False)) if users is not None else None
    return RecData("movielens-100k", items_ds, interactions_ds, users_ds, report)
