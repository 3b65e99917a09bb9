"""Score request files and rank items for a user with a trained CTR model.

    bundle = load_ctr_model("runs/ctr/model")
    prepared = PreparedData.load("data/synthetic/temporal")
    samples = request_samples(read_table("requests.jsonl"), bundle, prepared)   # histories filled in
    probs = predict(bundle, samples, items=prepared.items)
    top = recommend(bundle, prepared, "u3", k=10)        # [(item_id, probability), ...] best first

A user's **history** is what the prepared data knows of them: their positive interactions (label
1) in every split, oldest first (the collator keeps the ``max_len`` most recent), and their
``user_*`` side features from their latest sample. Candidates of :func:`recommend` default to
every item of the center (or, for a model without one, of the catalogue) the user has not
interacted with; items the model's ID vocabulary lacks (cold items) are scored through their
content, as in the item-cold protocol.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


def read_table(path: str | Path, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A request / candidates file as a DataFrame: JSON Lines (``.jsonl``/``.json``), CSV/TSV or
    Parquet, or ``.txt`` (one item id per line, column ``item_id``). ``columns`` must be present
    (ValueError naming the file, the missing columns and the ones it has). Ids are read as strings.
    In CSV/TSV a ``behavior_item_ids`` cell is a space-separated list of item ids."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{str(path)!r}: unknown file type {suffix!r}; expected one of {TABLE_SUFFIXES}")
    ids = {"user_id": str, "item_id": str}
    try:
        if suffix in (".jsonl", ".json"):
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=ids)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix == ".txt":
            lines = [line.strip() for line in path.read_text().splitlines()]
            frame = pd.DataFrame({"item_id": [line for line in lines if line]})
        else:
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
            if "behavior_item_ids" in frame:
                frame["behavior_item_ids"] = [cell.split() for cell in frame["behavior_item_ids"]]
    except ValueError as err:
        raise ValueError(f"{str(path)!r} cannot be read as {suffix} ({' '.join(str(err).split())})") from None
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise ValueError(f"{str(path)!r} lacks column(s) {missing}; it has {list(frame.columns)}")
    for name in ("user_id", "item_id"):
        if name in frame:
            frame[name] = frame[name].astype(str)
    return frame


@dataclasses.dataclass
class UserHistory:
    """One user as the prepared data knows them."""

    behavior_item_ids: list[str]  # positives, oldest first
    seen_item_ids: set[str]  # every item the user interacted with (any label)
    features: dict  # user_* columns of the latest sample


def user_histories(prepared, user_ids) -> dict[str, UserHistory]:
    """:class:`UserHistory` of each of ``user_ids`` that appears in ``prepared``'s samples (the others
    are left out: the caller decides what a user without history means)."""
    wanted = set(map(str, user_ids))
    frames = []
    for split in prepared.samples.values():
        columns = [c for c in split.column_names if c.startswith("user_") or c in ("item_id", "label", "timestamp")]
        frame = split.select_columns(columns).to_pandas()
        frame["user_id"] = frame["user_id"].astype(str)
        frames.append(frame[frame["user_id"].isin(wanted)])
    rows = pd.concat(frames).sort_values("timestamp", kind="stable")
    feature_columns = [c for c in rows.columns if c.startswith("user_") and c != "user_id"]
    histories = {}
    for user, group in rows.groupby("user_id", sort=False):
        latest = group.iloc[-1]
        histories[user] = UserHistory(
            behavior_item_ids=group.loc[group["label"] == 1, "item_id"].astype(str).tolist(),
            seen_item_ids=set(group["item_id"].astype(str)),
            features={name: latest[name] for name in feature_columns})
    return histories


def _missing(value) -> bool:
    """A cell with no value: absent from a JSON line (NaN), None, or an empty CSV cell."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return False
    return value is None or value == "" or bool(pd.isna(value))


def request_samples(frame: pd.DataFrame, bundle, prepared=None, stats: Counter | None = None):
    """A ``datasets.Dataset`` that :func:`~mim_hf.ctr.predict.predict` scores, from request rows
    (``user_id``, ``item_id``; optional ``behavior_item_ids`` and ``user_*`` features).

    A row without a history or a user feature takes it from ``prepared`` (see
    :func:`user_histories`). A row whose history is found nowhere (no ``prepared``, or a user it
    does not know) is scored with an empty history and counted in ``stats["rows_without_history"]``;
    its missing features map to the unknown row (counted by the collator). Without ``prepared``,
    a request with no ``behavior_item_ids`` or feature column at all is a ValueError naming them."""
    from datasets import Dataset

    stats = Counter() if stats is None else stats
    missing = [c for c in ("user_id", "item_id") if c not in frame.columns]
    if missing:
        raise ValueError(f"request rows lack column(s) {missing}; they have {list(frame.columns)}")
    features = list(bundle.model.config.user_feature_sizes)
    absent = [c for c in ("behavior_item_ids", *features) if c not in frame.columns]
    if absent and prepared is None:
        raise ValueError(f"request rows lack {absent}: add them to the file or pass the prepared data "
                         "(--data-dir) to take each user's history and features from it")
    frame = frame.copy()
    for column in absent:
        frame[column] = None
    gaps = {column: frame[column].map(_missing).to_numpy() for column in ("behavior_item_ids", *features)}
    rows_with_gaps = np.logical_or.reduce(list(gaps.values()))
    histories = user_histories(prepared, frame.loc[rows_with_gaps, "user_id"].unique()) if prepared is not None else {}
    users = frame["user_id"].tolist()
    for column, gap in gaps.items():
        values = frame[column].tolist()
        for row in np.flatnonzero(gap):
            known = histories.get(users[row])
            if column == "behavior_item_ids":
                values[row] = known.behavior_item_ids if known else []
            else:
                values[row] = str(known.features.get(column, "")) if known else ""
        frame[column] = values
    unfilled = gaps["behavior_item_ids"] & ~frame["user_id"].isin(list(histories)).to_numpy()
    stats["rows_without_history"] += int(unfilled.sum())
    frame["behavior_item_ids"] = [[str(i) for i in h] for h in frame["behavior_item_ids"]]
    for column in features:
        frame[column] = frame[column].astype(str)
    return Dataset.from_pandas(frame[["user_id", "item_id", "behavior_item_ids", *features]], preserve_index=False)


def _scorable(bundle, item_ids: list[str]) -> np.ndarray:
    """Per item: does the model know its ID, or (content models) the center its content?"""
    known = np.isin(np.asarray(item_ids, dtype=object), np.asarray(bundle.vocabs["item_id"][1:], dtype=object))
    if bundle.center is not None and bundle.model.needs_content_inputs:
        known |= np.asarray(bundle.center.rows_for(item_ids)) >= 0
    return known


def recommend(bundle, prepared, user_id: str, k: int = 10, candidates=None, batch_size: int = 4096,
              stats: Counter | None = None) -> list[tuple[str, float]]:
    """The ``k`` best candidates for ``user_id`` as ``[(item_id, click probability), ...]``, best first.

    ``prepared``: the prepared data holding the user's history. ``candidates``: item ids (default:
    every center item, or for a model without one every catalogue item, the user has not
    interacted with). Cold candidates (unknown to the model's item vocabulary) are scored through
    their content. Raises ``ValueError`` for a user the prepared data does not know (no history to
    rank by), ``k < 1``, and given candidates the model can score neither by ID nor by content
    (named); such items of the default pool are left out and counted in ``stats["unscorable_skipped"]``.
    A known user without positives is ranked anyway (``stats["empty_history"]``: 1). ``stats``
    (optional Counter) also receives ``candidates`` and ``cold_candidates`` counts.
    """
    from mim_hf.ctr.predict import predict

    stats = Counter() if stats is None else stats
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    user_id = str(user_id)
    history = user_histories(prepared, [user_id]).get(user_id)
    if history is None:
        example = prepared.samples["train"][0]["user_id"] if len(prepared.samples["train"]) else None
        raise ValueError(f"user {user_id!r} has no interactions in the prepared data, so there is no history to rank "
                         f"by (known users look like {example!r})")
    stats["empty_history"] += int(not history.behavior_item_ids)  # ranked anyway: by ID, features and content
    default_pool = candidates is None
    if default_pool:
        pool = bundle.center.item_ids() if bundle.center is not None else prepared.items["item_id"]
        candidates = [str(i) for i in pool if str(i) not in history.seen_item_ids]
    candidates = list(dict.fromkeys(str(i) for i in candidates))  # unique, order kept
    scorable = _scorable(bundle, candidates) if candidates else np.zeros(0, dtype=bool)
    unscorable = [item for item, ok in zip(candidates, scorable) if not ok]
    if default_pool:  # e.g. catalogue items an ID-only model never saw: left out, counted
        stats["unscorable_skipped"] += len(unscorable)
        candidates, unscorable = [item for item, ok in zip(candidates, scorable) if ok], []
    if not candidates:
        raise ValueError(f"no candidates left to rank for user {user_id!r}")
    if unscorable:
        raise ValueError(f"{len(unscorable)} candidate item(s) are unknown to the model and have no content in its "
                         f"center, e.g. {unscorable[:5]}")
    stats["candidates"] += len(candidates)
    stats["cold_candidates"] += int(np.sum(~np.isin(np.asarray(candidates, dtype=object),
                                                     np.asarray(bundle.vocabs["item_id"][1:], dtype=object))))
    frame = pd.DataFrame({"user_id": user_id, "item_id": candidates})
    frame["behavior_item_ids"] = [history.behavior_item_ids] * len(frame)
    for name, value in history.features.items():
        frame[name] = str(value)
    probs = predict(bundle, request_samples(frame, bundle), items=prepared.items, batch_size=batch_size)
    order = np.argsort(-probs, kind="stable")[:k]
    return [(candidates[i], float(probs[i])) for i in order]


__all__ = ["UserHistory", "read_table", "recommend", "request_samples", "user_histories"]
