"""Label schemes: which rows are positives, and the negatives drawn for ``implicit`` labels.

* ``rating`` -- the log's own ``label`` (MovieLens: rating >= 4 -> 1, else 0); no row is added.
* ``implicit`` -- every interaction is a positive (label 1); for each one, ``neg_ratio`` items
  are drawn as negatives (label 0) at the positive's timestamp, in the positive's split.

The pool a negative is drawn from:

* ``item-cold``: the items of the positive's split (train items for a train positive, the
  held-out valid/test items for a valid/test positive), so no held-out item ever lands in a
  training row;
* ``temporal``: every item that exists at the positive's time, i.e. has an interaction (by
  anyone) at or before its timestamp -- the catalogue a deployed model could know then.

An item the user interacted with at any time, in any split, is never a negative. Draws are
uniform over the pool and rejected when the user touched the item (counted as
``rejected_draws``); the ``neg_ratio`` negatives of one positive are drawn independently, so a
small pool may repeat an item. A positive whose pool holds no item the user left untouched gets
no negative (counted as ``positives_without_negative``; common for the very first interactions
of a ``temporal`` log). The draws come from ``numpy.random.default_rng([seed, 1])``: the same
seed gives the same negatives.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LABEL_SCHEMES = ("rating", "implicit")


def draw_negatives(frame: pd.DataFrame, item_ids: np.ndarray, item_split: pd.Series | None, neg_ratio: int,
                   seed: int) -> tuple[pd.DataFrame, dict]:
    """Negatives for every row of ``frame`` (all positives under ``implicit``).

    Args:
        frame: the interactions with ``user_id``, ``item_id``, ``timestamp`` and ``split``.
        item_ids: the catalogue's ids.
        item_split: item id -> split under ``item-cold`` (the pools); ``None`` for ``temporal``.
    Returns:
        ``(negatives, counts)``: a frame of ``user_id``, ``item_id``, ``timestamp``, ``split``
        (one row per drawn negative, in the order of their positives) and
        ``{"drawn", "rejected_draws", "positives_without_negative"}``, each a {split: count}.
    """
    catalogue = pd.Index(np.asarray(item_ids, dtype=object))
    item_code = catalogue.get_indexer(frame["item_id"].to_numpy())
    user_code = pd.factorize(frame["user_id"])[0].astype(np.int64)
    n_items = len(catalogue)
    # The pool of row i is ordered[start[i] : start[i] + size[i]].
    if item_split is not None:
        split_of_item = item_split.reindex(catalogue).to_numpy()
        ordered = np.concatenate([np.flatnonzero(split_of_item == s) for s in ("train", "valid", "test")])
        block = {s: int((split_of_item == s).sum()) for s in ("train", "valid", "test")}
        block_start = {"train": 0, "valid": block["train"], "test": block["train"] + block["valid"]}
        rows_split = frame["split"].to_numpy()
        start = np.array([block_start[s] for s in rows_split], dtype=np.int64)
        size = np.array([block[s] for s in rows_split], dtype=np.int64)
    else:
        first_seen = pd.Series(frame["timestamp"].to_numpy()).groupby(item_code).min()
        ordered = first_seen.index.to_numpy()[np.argsort(first_seen.to_numpy(), kind="stable")]
        seen_times = np.sort(first_seen.to_numpy())
        start = np.zeros(len(frame), dtype=np.int64)
        size = np.searchsorted(seen_times, frame["timestamp"].to_numpy(), side="right").astype(np.int64)
    position = np.full(n_items, -1, dtype=np.int64)
    position[ordered] = np.arange(len(ordered))

    # What each user touched, as sorted keys: (user, item) for rejection, (user, pool position) to
    # count the touched items inside a pool.
    touched = np.unique(user_code * n_items + item_code)
    touched_users, touched_items = touched // n_items, touched % n_items
    touched_pos = np.sort(touched_users * n_items + position[touched_items])
    inside = (np.searchsorted(touched_pos, user_code * n_items + start + size, side="left")
              - np.searchsorted(touched_pos, user_code * n_items + start, side="left"))
    can_draw = size - inside > 0

    rng = np.random.default_rng([seed, 1])
    owner = np.repeat(np.flatnonzero(can_draw), neg_ratio)  # one entry per negative to draw
    drawn = np.empty(len(owner), dtype=np.int64)
    rejected = np.zeros(len(frame), dtype=np.int64)
    pending = np.arange(len(owner))
    while len(pending):
        rows = owner[pending]
        candidates = ordered[start[rows] + rng.integers(0, size[rows])]
        keys = user_code[rows] * n_items + candidates
        hit = touched[np.minimum(np.searchsorted(touched, keys), len(touched) - 1)] == keys
        drawn[pending[~hit]] = candidates[~hit]
        np.add.at(rejected, rows[hit], 1)
        pending = pending[hit]

    split = frame["split"].to_numpy()
    negatives = pd.DataFrame({
        "user_id": frame["user_id"].to_numpy()[owner],
        "item_id": catalogue.to_numpy()[drawn],
        "timestamp": frame["timestamp"].to_numpy()[owner],
        "split": split[owner],
    })
    per_split = {
        "drawn": pd.Series(split[owner]).value_counts(),
        "rejected_draws": pd.Series(rejected).groupby(split).sum(),
        "positives_without_negative": pd.Series(~can_draw).groupby(split).sum(),
    }
    counts = {name: {s: int(values.get(s, 0)) for s in ("train", "valid", "test")} for name, values in per_split.items()}
    return negatives, counts
