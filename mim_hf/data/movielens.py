"""MovieLens-100k, offline.

Two sources are understood:

* RecBole's atomic files (``ml-100k.inter``, ``ml-100k.item``, ``ml-100k.user``) as they ship
  inside PyPI's ``recbole==1.2.1`` wheel. With no ``source`` the wheel is fetched once with
  ``pip download --no-deps`` into the cache directory and read in place (nothing installed).
* A GroupLens ``ml-100k`` folder (``u.data``, ``u.item``, ``u.user``).

Label = ``rating >= 4``. Expected: 943 users, 1,682 items, 100,000 interactions.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
from datasets import Dataset

from .tables import RecData, ValidationReport, validate_interactions, validate_items

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


def _read_atomic(text: str) -> pd.DataFrame:
    """RecBole atomic file: tab-separated, header 'name:type'."""
    frame = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def _from_atomic(inter: str, item: str, user: str | None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    inter_f, item_f = _read_atomic(inter), _read_atomic(item)
    items = pd.DataFrame({
        "item_id": item_f["item_id"],
        "title": item_f["movie_title"].map(natural_title),
        "genres": item_f["class"].map(lambda s: s.split()),
        "year": pd.to_numeric(item_f["release_year"], errors="coerce").astype("Int64"),
    })
    interactions = pd.DataFrame({
        "user_id": inter_f["user_id"],
        "item_id": inter_f["item_id"],
        "timestamp": pd.to_numeric(inter_f["timestamp"]).astype("int64"),
        "rating": pd.to_numeric(inter_f["rating"]).astype("float32"),
    })
    users = None
    if user is not None:
        user_f = _read_atomic(user)
        users = user_f[["user_id", "age", "gender", "occupation"]].copy()
    return items, interactions, users


def _from_grouplens(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    data = pd.read_csv(folder / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"], dtype=str)
    raw_items = pd.read_csv(folder / "u.item", sep="|", header=None, encoding="latin-1", dtype=str, keep_default_na=False)
    flags = raw_items.iloc[:, 5:5 + len(GROUPLENS_GENRES)].astype(int).to_numpy()
    genres = [[g for g, on in zip(GROUPLENS_GENRES, row) if on] for row in flags]
    year_in_title = raw_items[1].str.extract(r"\((\d{4})\)\s*$")[0]
    items = pd.DataFrame({
        "item_id": raw_items[0],
        "title": raw_items[1].str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True).map(natural_title),
        "genres": genres,
        "year": pd.to_numeric(year_in_title, errors="coerce").astype("Int64"),
    })
    interactions = pd.DataFrame({
        "user_id": data["user_id"],
        "item_id": data["item_id"],
        "timestamp": pd.to_numeric(data["timestamp"]).astype("int64"),
        "rating": pd.to_numeric(data["rating"]).astype("float32"),
    })
    users = None
    if (folder / "u.user").exists():
        users = pd.read_csv(folder / "u.user", sep="|", header=None, dtype=str,
                            names=["user_id", "age", "gender", "occupation", "zip_code"])[["user_id", "age", "gender", "occupation"]]
    return items, interactions, users


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
            read = lambda name: wheel.read(WHEEL_PREFIX + name).decode("utf-8")  # noqa: E731
            items, interactions, users = _from_atomic(read("ml-100k.inter"), read("ml-100k.item"), read("ml-100k.user"))
    elif (path / "ml-100k.inter").exists():
        user_file = path / "ml-100k.user"
        items, interactions, users = _from_atomic(
            (path / "ml-100k.inter").read_text(), (path / "ml-100k.item").read_text(),
            user_file.read_text() if user_file.exists() else None,
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
        users = users.assign(age=(age // 10 * 10).astype("Int64").astype(str) + "s")
    report = ValidationReport()
    items_ds = validate_items(Dataset.from_pandas(items, preserve_index=False), report)
    interactions_ds = validate_interactions(Dataset.from_pandas(interactions, preserve_index=False), items_ds)
    users_ds = Dataset.from_pandas(users, preserve_index=False) if users is not None else None
    return RecData("movielens-100k", items_ds, interactions_ds, users_ds, report)
