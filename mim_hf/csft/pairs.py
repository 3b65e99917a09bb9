"""Where C-SFT's train pairs come from (``CSFTConfig.pair_source``).

- ``"behaviour"`` (default): ``prepared.pairs["train"]``, each train positive with its
  ``pair_window`` most recent earlier positives (:func:`mim_hf.data.prepare.prepare`).
- ``"id_aligned"``: each of those train positive targets gets **one** trigger, the earlier positive
  (from its behaviour sequence) whose trained CTR item-ID embedding is the most cosine-similar to
  the target's -- pairs built the way Kuaishou's QARM builds them, so content learns the structure
  the ID embeddings learned on warm items and carries it to cold ones.
- ``"cooccurrence"``: items liked by the same users within ``window`` consecutive train positives,
  each item paired with its ``max_pairs_per_item`` partners of highest co-count (distinct users).

Every builder reads only the **train split's positives**: no valid/test interaction and, under
``item-cold``, no held-out item can enter a pair (train samples hold training items only). Each
returns ``(pairs, stats)``: a ``datasets.Dataset`` with the columns and features of
``prepared.pairs["train"]`` (so :class:`mim_hf.csft.train.PairBatches` takes it unchanged) and a
dict of counts, including what was skipped and why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

PAIR_SOURCES = ("behaviour", "id_aligned", "cooccurrence")
PAIR_COLUMNS = ["user_id", "trigger_item_id", "target_item_id", "trigger_timestamp", "target_timestamp"]
SCORE_CHUNK = 1 << 18  # candidate embeddings gathered at a time (bounded memory on large logs)


def check_pair_source(config) -> None:
    """Raise ``ValueError`` naming the field when ``config``'s pair-source fields disagree."""
    if config.pair_source not in PAIR_SOURCES:
        raise ValueError(f"pair_source must be one of {PAIR_SOURCES}, got {config.pair_source!r}")
    if config.pair_source == "id_aligned" and not config.id_model_path:
        raise ValueError("pair_source='id_aligned' needs id_model_path (the model/ folder of a CTR model trained "
                         "by training/train_ctr.py on the same prepared data, mode 'din')")
    if config.id_model_path and config.pair_source != "id_aligned":
        raise ValueError(f"id_model_path={config.id_model_path!r} is only read with pair_source='id_aligned', "
                         f"got pair_source={config.pair_source!r}")
    _check_cooccurrence(config.cooccurrence_window, config.cooccurrence_pairs_per_item,
                        names=("cooccurrence_window", "cooccurrence_pairs_per_item"))


def _check_cooccurrence(window, max_pairs_per_item, names=("window", "max_pairs_per_item")) -> None:
    """``ValueError`` naming the field unless window >= 2 and max_pairs_per_item >= 1 are ints."""
    for name, value, minimum in ((names[0], window, 2), (names[1], max_pairs_per_item, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def train_pairs_for(prepared, config) -> tuple[Dataset, dict]:
    """The train pairs ``config.pair_source`` asks for and their stats (``{}`` for ``"behaviour"``)."""
    check_pair_source(config)
    if config.pair_source == "id_aligned":
        return id_aligned_pairs(prepared, din_item_embeddings(config.id_model_path, prepared))
    if config.pair_source == "cooccurrence":
        return cooccurrence_pairs(prepared, window=config.cooccurrence_window,
                                  max_pairs_per_item=config.cooccurrence_pairs_per_item)
    return prepared.pairs["train"], {}


def id_aligned_pairs(prepared, item_embeddings) -> tuple[Dataset, dict]:
    """One pair per train positive target: trigger = its nearest earlier positive by item-ID cosine.

    Args:
        prepared: a ``PreparedData``.
        item_embeddings: ``(len(prepared.vocabs["item_id"]), d)`` array, row ``i`` the embedding of
            vocabulary token ``i`` (e.g. :func:`din_item_embeddings`).

    Candidates are the target's behaviour sequence (its ``max_len`` most recent strictly earlier
    positives, all train positives), the target's own id excluded as in ``prepare``; ties go to
    the most recent. Targets with no candidate are skipped and counted
    (``targets_without_earlier_positive``); ``trigger_is_most_recent`` counts pairs whose trigger
    is also the most recent candidate (what ``pair_window=1`` would have paired).
    """
    vocab_size = len(prepared.vocabs["item_id"])
    item_embeddings = np.asarray(item_embeddings, dtype=np.float32)
    if item_embeddings.ndim != 2 or item_embeddings.shape[0] != vocab_size:
        raise ValueError(f"item_embeddings has shape {item_embeddings.shape}; expected ({vocab_size}, d), one row per "
                         "token of the prepared item vocabulary (index 0 = [UNK])")
    table = _train_positives(prepared, ["user_id", "item_id", "timestamp", "behavior_item_ids", "behavior_timestamps"])
    histories = table.column("behavior_item_ids").combine_chunks()
    lengths = pc.list_value_length(histories).fill_null(0).to_numpy()
    history_items = pc.list_flatten(histories).to_numpy(zero_copy_only=False)
    history_times = pc.list_flatten(table.column("behavior_timestamps").combine_chunks()).to_numpy()
    target_items = table.column("item_id").to_numpy()
    owner = np.repeat(np.arange(len(target_items)), lengths)  # target of each history entry
    candidate = np.flatnonzero(history_items != target_items[owner])
    owner = owner[candidate]

    norms = np.linalg.norm(item_embeddings, axis=1, keepdims=True)
    unit = item_embeddings / np.maximum(norms, 1e-12)  # an all-zero row scores 0 against everything
    candidate_rows = _vocab_rows(prepared, history_items[candidate], "behaviour sequence")
    target_rows = _vocab_rows(prepared, target_items, "target")[owner]
    scores = np.empty(len(candidate), dtype=np.float32)
    for start in range(0, len(candidate), SCORE_CHUNK):
        part = slice(start, start + SCORE_CHUNK)
        scores[part] = np.einsum("nd,nd->n", unit[candidate_rows[part]], unit[target_rows[part]])
    # Per target, the last candidate after sorting by (target, score, position): best score, latest on ties.
    order = np.lexsort((candidate, scores, owner))
    best = order[np.append(owner[order][1:] != owner[order][:-1], True)]
    most_recent = np.append(owner[1:] != owner[:-1], True)  # candidates are in time order per target
    chosen = candidate[best]
    targets = owner[best]
    frame = pd.DataFrame({
        "user_id": table.column("user_id").to_numpy()[targets],
        "trigger_item_id": history_items[chosen],
        "target_item_id": target_items[targets],
        "trigger_timestamp": history_times[chosen],
        "target_timestamp": table.column("timestamp").to_numpy()[targets],
    })
    stats = {"train_positive_targets": len(target_items), "pairs": len(frame),
             "targets_without_earlier_positive": len(target_items) - len(frame),
             "trigger_is_most_recent": int((chosen == candidate[most_recent]).sum())}
    return _as_pairs(frame, prepared), stats


def din_item_embeddings(model_dir, prepared) -> np.ndarray:
    """``(n_items, id_embed_dim)`` float32 item-ID embedding table of a trained CTR model directory
    (``save_pretrained`` safetensors, e.g. ``runs/ctr_din/model``), rows in ``prepared``'s item
    vocabulary order. Raises ``ValueError`` when the directory holds no model or its item
    vocabulary is not ``prepared``'s (a model trained on other data or another protocol/fold)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"id_model_path {str(model_dir)!r} holds no trained CTR model (no config.json); expected the "
                         "model/ folder training/train_ctr.py writes, trained on the same prepared data")
    from mim_hf.ctr.predict import load_ctr_model

    bundle = load_ctr_model(path, load_center=False)
    model_tokens, data_tokens = list(bundle.vocabs["item_id"]), prepared.vocabs["item_id"].tokens
    if model_tokens != data_tokens:
        detail = (f"{len(model_tokens)} item tokens, the prepared data {len(data_tokens)}"
                  if len(model_tokens) != len(data_tokens) else
                  f"the same {len(data_tokens)} item tokens in another order or with other ids")
        raise ValueError(f"CTR model {str(model_dir)!r} was trained on another item vocabulary ({detail}; prepared "
                         f"{prepared.name!r}, protocol {prepared.config.protocol!r}); expected a model trained on "
                         "this prepared data")
    return bundle.model.embeddings.item_id_embeddings.weight.detach().float().cpu().numpy()


def cooccurrence_pairs(prepared, window: int = 5, max_pairs_per_item: int = 20) -> tuple[Dataset, dict]:
    """Pairs of items liked by the same users: each item (trigger) with its ``max_pairs_per_item``
    partners (targets) of highest co-count.

    Two items co-occur for a user when both are among ``window`` consecutive train positives of that
    user (time order); their co-count is the number of such users. Ties in co-count go to the lower
    target id, so the result is deterministic (no sampling). Both directions of a pair can appear.
    ``user_id`` and the timestamps name one user whose window held both (the latest such
    occurrence): evidence for the pair, and the user whose negatives ``user_negatives`` draws. The
    trigger may be later than the target (co-occurrence has no direction). Stats count the users
    with a single train positive (no partner) and the pairs dropped by ``max_pairs_per_item``.
    """
    _check_cooccurrence(window, max_pairs_per_item)
    positives = _train_positives(prepared, ["user_id", "item_id", "timestamp"]).to_pandas()
    # The train split is in time order; a stable sort by user keeps each user's positives in it.
    user_codes, user_names = pd.factorize(positives["user_id"], sort=True)
    item_codes, item_names = pd.factorize(positives["item_id"], sort=True)
    order = np.argsort(user_codes, kind="stable")
    users, items, times = user_codes[order], item_codes[order], positives["timestamp"].to_numpy()[order]
    firsts, seconds = [], []
    for gap in range(1, window):
        start = np.flatnonzero(users[:-gap] == users[gap:])
        firsts.append(start)
        seconds.append(start + gap)
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    keep = items[first] != items[second]
    first, second = first[keep], second[keep]
    low = np.where(items[first] < items[second], first, second)  # the occurrence of the lower item code
    high = first + second - low
    occurrences = pd.DataFrame({"low": items[low], "high": items[high], "user": users[first], "low_row": low,
                                "high_row": high, "latest": np.maximum(times[first], times[second])})
    occurrences = occurrences.sort_values(["low", "high", "user", "latest", "low_row"], kind="stable")
    per_user = occurrences.drop_duplicates(["low", "high", "user"], keep="last")  # one count per user
    counts = per_user.groupby(["low", "high"]).size().to_numpy()  # sorted by (low, high), as evidence
    evidence = per_user.sort_values(["low", "high", "latest", "user"], kind="stable").drop_duplicates(
        ["low", "high"], keep="last").reset_index(drop=True)  # same (low, high) order as counts
    evidence["count"] = counts
    forward = {"low": "trigger", "high": "target", "low_row": "trigger_row", "high_row": "target_row"}
    backward = {"high": "trigger", "low": "target", "high_row": "trigger_row", "low_row": "target_row"}
    directed = pd.concat([evidence.rename(columns=forward), evidence.rename(columns=backward)], ignore_index=True)
    directed = directed.sort_values(["trigger", "count", "target"], ascending=[True, False, True], kind="stable")
    kept = directed[directed.groupby("trigger", sort=False).cumcount().to_numpy() < max_pairs_per_item]
    frame = pd.DataFrame({
        "user_id": np.asarray(user_names, dtype=object)[kept["user"].to_numpy()],
        "trigger_item_id": np.asarray(item_names, dtype=object)[kept["trigger"].to_numpy()],
        "target_item_id": np.asarray(item_names, dtype=object)[kept["target"].to_numpy()],
        "trigger_timestamp": times[kept["trigger_row"].to_numpy()],
        "target_timestamp": times[kept["target_row"].to_numpy()],
    })
    positives_per_user = np.bincount(user_codes, minlength=len(user_names))
    stats = {"window": window, "max_pairs_per_item": max_pairs_per_item,
             "train_positives": len(positives), "users": len(user_names),
             "users_with_one_positive": int((positives_per_user == 1).sum()),
             "co_occurring_item_pairs": len(evidence), "pairs": len(frame),
             "pairs_over_max_per_item": len(directed) - len(frame),
             "trigger_items": int(kept["trigger"].nunique())}
    return _as_pairs(frame, prepared), stats


def _train_positives(prepared, columns: list[str]) -> pa.Table:
    """The train samples with label 1, ``columns`` only, in the split's (time) order."""
    train = prepared.samples["train"]
    missing = [c for c in [*columns, "label"] if c not in train.column_names]
    if missing:
        raise ValueError(f"train samples lack column(s) {missing}; expected a PreparedData from `mim-hf data prepare`")
    table = train.select_columns([*columns, "label"]).with_format("arrow")[:]
    return table.filter(pc.equal(table.column("label"), 1)).drop(["label"])


def _vocab_rows(prepared, item_ids: np.ndarray, what: str) -> np.ndarray:
    """Rows of ``item_ids`` in the prepared item vocabulary; an unknown id is an error (train
    positives are always in it)."""
    vocab = prepared.vocabs["item_id"]
    rows = vocab.encode(item_ids)
    unknown = np.flatnonzero(rows == 0)
    if len(unknown):
        raise ValueError(f"{what} item_id {item_ids[unknown[0]]!r} is absent from the prepared item vocabulary "
                         f"({len(vocab)} tokens); expected train positives only")
    return rows


def _as_pairs(frame: pd.DataFrame, prepared) -> Dataset:
    """``frame`` as a Dataset with the columns and features of ``prepared.pairs["train"]``."""
    features = prepared.pairs["train"].features
    return Dataset.from_pandas(frame[PAIR_COLUMNS].reset_index(drop=True), features=features, preserve_index=False)


__all__ = ["PAIR_SOURCES", "check_pair_source", "cooccurrence_pairs", "din_item_embeddings", "id_aligned_pairs",
           "train_pairs_for"]
