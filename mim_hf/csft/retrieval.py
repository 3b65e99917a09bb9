"""Retrieval evaluation of C-SFT: rank the whole catalogue for each trigger, find the true target.

For a (trigger -> target) pair the query is the trigger item's embedding; every catalogue item
is scored (cosine for content, training popularity for the reference) and the target's rank is
read off. Reported: ``recall@k`` (share of pairs whose target ranks in the top ``k``), ``mrr``
(mean of 1 / rank) and ``n`` (pairs evaluated).

Ranking rules (shared by content and popularity, so the two are comparable):

* the **trigger item itself is excluded** from its own ranking (``exclude_rows``): its cosine to
  itself is 1, so keeping it would push every target down by one place for free and measure
  nothing about interest;
* **ties** are broken by catalogue row (a lower row ranks first): rank = 1 + number of items
  with a higher score, plus items with an equal score and a lower row. Deterministic, and the
  same order as a stable descending sort;
* a pair whose target is its excluded trigger cannot be ranked -> ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_KS = (1, 10, 50)


def _as_rows(values, name: str, n_queries: int) -> torch.Tensor:
    rows = torch.as_tensor(np.asarray(values), dtype=torch.int64)
    if rows.shape != (n_queries,):
        raise ValueError(f"{name} must have shape ({n_queries},), got {tuple(rows.shape)}")
    return rows


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    return tuple(int(k) for k in ks)


def target_ranks(
    score_chunk,
    n_queries: int,
    n_catalogue: int,
    target_rows,
    exclude_rows=None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """1-based rank of each query's target among the whole catalogue (module rules).

    Args:
        score_chunk: ``f(start, stop) -> FloatTensor (stop - start, N)``, scores of queries
            ``start:stop`` against all ``N`` catalogue rows (higher = ranked first).
        n_queries / n_catalogue: ``Q`` and ``N``.
        target_rows: ``(Q,)`` catalogue row of each query's true target.
        exclude_rows: optional ``(Q,)`` catalogue row left out of query ``q``'s ranking
            (the trigger item); ``-1`` = nothing excluded.
        chunk_size: queries scored at a time (memory ``chunk_size * N`` floats).
    Returns:
        ``(Q,)`` int64 ranks in ``1 .. N``.
    """
    target_rows = _as_rows(target_rows, "target_rows", n_queries)
    exclude_rows = (torch.full((n_queries,), -1, dtype=torch.int64) if exclude_rows is None
                    else _as_rows(exclude_rows, "exclude_rows", n_queries))
    for name, rows, low in (("target_rows", target_rows, 0), ("exclude_rows", exclude_rows, -1)):
        if n_queries and (int(rows.min()) < low or int(rows.max()) >= n_catalogue):
            bad = rows[(rows < low) | (rows >= n_catalogue)][0].item()
            raise ValueError(f"{name} holds row {bad}, outside the catalogue of {n_catalogue} rows")
    clash = (target_rows == exclude_rows).nonzero().flatten()
    if clash.numel():
        raise ValueError(f"{clash.numel()} queries exclude their own target row (first: query {int(clash[0])}, "
                         f"row {int(target_rows[clash[0]])}); a target cannot be ranked when excluded")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    ranks = torch.empty(n_queries, dtype=torch.int64)
    columns = torch.arange(n_catalogue)
    for start in range(0, n_queries, chunk_size):
        stop = min(start + chunk_size, n_queries)
        scores = score_chunk(start, stop)
        targets = target_rows[start:stop]
        target_scores = scores.gather(1, targets[:, None])
        ahead = (scores > target_scores) | ((scores == target_scores) & (columns[None, :] < targets[:, None]))
        excluded = exclude_rows[start:stop]
        has_excluded = excluded >= 0
        # An excluded row counted as ahead is taken back out (it never competes).
        excluded_ahead = torch.zeros(stop - start, dtype=torch.bool)
        if bool(has_excluded.any()):
            excluded_ahead[has_excluded] = ahead[has_excluded].gather(1, excluded[has_excluded][:, None]).squeeze(1)
        ranks[start:stop] = 1 + ahead.sum(1) - excluded_ahead.long()
    return ranks


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``(Q,)`` 1-based ranks -> ``{"recall@k": ..., "mrr": ..., "n": Q}`` (0.0 metrics when Q = 0)."""
    ks = _check_ks(ks)
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    n = int(ranks.numel())
    metrics = {f"recall@{k}": float((ranks <= k).double().mean()) if n else 0.0 for k in ks}
    metrics["mrr"] = float((1.0 / ranks).mean()) if n else 0.0
    metrics["n"] = n
    return metrics


def retrieval_metrics(
    query_embeds: torch.Tensor,
    catalogue_embeds: torch.Tensor,
    target_rows,
    ks: Sequence[int] = DEFAULT_KS,
    exclude_rows=None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k and MRR of each query's target among the whole catalogue, by cosine.

    Args:
        query_embeds: ``(Q, D)`` trigger embeddings (normalised here).
        catalogue_embeds: ``(N, D)`` embeddings of every catalogue item (normalised here).
        target_rows: ``(Q,)`` catalogue row of each query's true target.
        ks: cut-offs for ``recall@k``.
        exclude_rows: optional ``(Q,)`` catalogue row to leave out of query ``q``'s ranking,
            normally the trigger item's own row (see module docstring); ``-1`` = none.
        chunk_size: queries scored at a time.
    Returns:
        ``{"recall@1": ..., "recall@10": ..., "recall@50": ..., "mrr": ..., "n": Q}``.
    """
    ks = _check_ks(ks)
    if query_embeds.dim() != 2 or catalogue_embeds.dim() != 2 or query_embeds.shape[1] != catalogue_embeds.shape[1]:
        raise ValueError(f"query_embeds (Q, D) and catalogue_embeds (N, D) must share D, got "
                         f"{tuple(query_embeds.shape)} and {tuple(catalogue_embeds.shape)}")
    queries = F.normalize(query_embeds.detach().float().cpu(), dim=-1)
    catalogue = F.normalize(catalogue_embeds.detach().float().cpu(), dim=-1)
    ranks = target_ranks(lambda a, b: queries[a:b] @ catalogue.T, queries.shape[0], catalogue.shape[0],
                         target_rows, exclude_rows, chunk_size)
    return metrics_from_ranks(ranks, ks)


def catalogue_index(catalogue_item_ids: Sequence[str]) -> dict[str, int]:
    """Item id -> catalogue row; duplicate ids are an error (a row must be unambiguous)."""
    index: dict[str, int] = {}
    for row, item_id in enumerate(catalogue_item_ids):
        item_id = str(item_id)
        if item_id in index:
            raise ValueError(f"catalogue item_id {item_id!r} appears twice (rows {index[item_id]} and {row})")
        index[item_id] = row
    return index


def catalogue_rows(item_ids: Sequence, index: Mapping[str, int], what: str) -> np.ndarray:
    """Item ids -> int64 array of their catalogue rows; an id absent from the catalogue raises
    ``ValueError`` naming it and ``what`` (where the ids come from)."""
    try:
        return np.fromiter((index[str(i)] for i in item_ids), dtype=np.int64, count=len(item_ids))
    except KeyError as missing:
        raise ValueError(f"{what} references item_id {missing.args[0]!r}, absent from the "
                         f"catalogue ({len(index)} items)") from None


def pair_rows(pairs, index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (``trigger_item_id`` / ``target_item_id`` columns) -> ``(trigger_rows, target_rows)``
    int64 arrays of catalogue rows; an id absent from the catalogue raises naming it."""
    # [:] materialises a datasets column at once (iterating it decodes row by row, ~100x slower).
    return tuple(catalogue_rows(pairs[column][:], index, f"pairs column {column!r}")
                 for column in ("trigger_item_id", "target_item_id"))


def _pair_sets(pairs) -> dict[str, object] | None:
    """A mapping of split name -> pairs table (DatasetDict / dict of Datasets), else None."""
    if isinstance(pairs, Mapping) and pairs and all(hasattr(v, "column_names") for v in pairs.values()):
        return dict(pairs)
    return None


def evaluate_pairs(
    encoder,
    processor,
    items,
    pairs,
    ks: Sequence[int] = DEFAULT_KS,
    level: str = "item_embeds",
    batch_size: int = 64,
    show_progress: bool = False,
    device=None,
    catalogue_embeds: torch.Tensor | None = None,
) -> dict:
    """Encode the catalogue once and score trigger -> target retrieval.

    Args:
        encoder / processor: a ``MIMContentEncoder`` and its ``MIMContentProcessor``.
        items: the catalogue (``datasets.Dataset`` or dict of lists with ``item_id`` and the
            processor's content columns), ``N`` rows.
        pairs: one pairs table (``trigger_item_id``, ``target_item_id`` columns) or a mapping
            ``split -> pairs table`` (e.g. ``PreparedData.pairs``).
        ks, level: cut-offs and which encoder output is the embedding (``"item_embeds"``).
        batch_size / show_progress / device: passed to ``encode_items``.
        catalogue_embeds: optional precomputed ``(N, D)`` embeddings (skips encoding).
    Returns:
        metrics dict (see :func:`retrieval_metrics`), or ``{split: metrics}`` for a mapping.
    """
    from mim_hf.encoder.encoding import encode_items

    index = catalogue_index(items["item_id"])
    pair_sets = _pair_sets(pairs)
    rows = {name: pair_rows(table, index) for name, table in (pair_sets or {"": pairs}).items()}
    if catalogue_embeds is None:
        catalogue_embeds = encode_items(encoder, processor, items, batch_size=batch_size, levels=(level,),
                                        show_progress=show_progress, device=device)[level]
    if catalogue_embeds.shape[0] != len(index):
        raise ValueError(f"catalogue_embeds has {catalogue_embeds.shape[0]} rows, the catalogue {len(index)} items")
    results = {name: retrieval_metrics(catalogue_embeds[torch.as_tensor(triggers)], catalogue_embeds, targets,
                                       ks, exclude_rows=triggers)
               for name, (triggers, targets) in rows.items()}
    return results if pair_sets is not None else results[""]


def popularity_retrieval(
    train_item_counts: Mapping[str, int],
    pairs,
    catalogue_item_ids: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict:
    """The non-content reference: every trigger gets the same ranking, by training popularity.

    Args:
        train_item_counts: item id -> number of positive training interactions (ids absent
            count 0; ids outside the catalogue raise).
        pairs: one pairs table or a mapping ``split -> pairs table``.
        catalogue_item_ids: the ``N`` catalogue ids, in row order (ties between equally
            popular items are broken by this order, lower row first).
        ks: cut-offs.
    Returns:
        metrics dict like :func:`retrieval_metrics` (the trigger is excluded the same way), or
        ``{split: metrics}`` for a mapping.
    """
    index = catalogue_index(catalogue_item_ids)
    scores = torch.zeros(len(index), dtype=torch.float64)
    for item_id, count in train_item_counts.items():
        if str(item_id) not in index:
            raise ValueError(f"train_item_counts has item_id {item_id!r}, absent from the catalogue ({len(index)} items)")
        scores[index[str(item_id)]] = float(count)
    pair_sets = _pair_sets(pairs)
    results = {}
    for name, table in (pair_sets or {"": pairs}).items():
        triggers, targets = pair_rows(table, index)
        ranks = target_ranks(lambda a, b: scores[None, :].expand(b - a, -1), len(targets), len(index),
                             targets, triggers)
        results[name] = metrics_from_ranks(ranks, ks)
    return results if pair_sets is not None else results[""]


def train_item_counts(samples) -> dict[str, int]:
    """Positive interactions per item in a CTR samples table (``item_id``, ``label``), e.g.
    ``PreparedData.samples["train"]`` -> ``{item_id: count}`` (items without a positive omitted)."""
    item_ids = np.asarray(samples["item_id"][:], dtype=object)
    positive = np.asarray(samples["label"][:]) == 1
    unique, counts = np.unique(item_ids[positive].astype(str), return_counts=True)
    return {str(i): int(c) for i, c in zip(unique, counts)}


__all__ = [
    "DEFAULT_KS", "catalogue_index", "evaluate_pairs", "metrics_from_ranks", "pair_rows", "popularity_retrieval",
    "retrieval_metrics", "target_ranks", "train_item_counts",
]
