"""Turn prepared CTR sample rows (raw string ids) into ``CiUBMForCTR`` input tensors.

Rows are those of ``PreparedData.samples[split]``: ``user_id``, ``item_id``, ``label``,
``behavior_item_ids`` (most recent last) and ``user_*`` side features. Item side features
(e.g. ``item_genres``, ``item_year``) come from an item table built once from the items
``Dataset`` (the whole catalogue), so a target and the same item as a behaviour always get the
same features. Content enters as integer rows of the model's content table: row r + 1 holds
the Representation Center's row r (:func:`center_content_table` builds that table once, and
``CiUBMForCTR.set_content_table`` attaches it), row 0 is zeros (padding, and items the center
lacks).

Sequences keep the ``max_len`` most recent behaviours and are RIGHT-padded to the batch's
longest history (capped by ``max_len``): real behaviours at positions ``0 .. n-1`` (oldest
first), padding after them with id 0, content row 0 and ``behavior_mask`` False. The model
ignores order, so the side only matters for reading tensors.

Nothing is dropped silently: unknown users/items/feature values map to index 0 and items
without content to row 0, and every such fallback is counted in ``collator.stats``. Malformed
input raises instead: a row without ``user_id`` / ``item_id`` / ``behavior_item_ids`` / a user
feature, "label" in some rows only, a label other than 0/1 (NaN included), a history that is not
a list (ValueError / TypeError naming the row or item). Everything the model reads is checked
here, so its forward needs no checks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np
import pandas as pd
import torch

from mim_hf.data.vocab import Vocabulary

ContentRows = Callable[[list], np.ndarray]


def center_content_table(center, level: str = "item_embeds") -> torch.Tensor:
    """The content table that :class:`CTRCollator` rows index: (center.num_items + 1, C) float32,
    row 0 = zeros, row r + 1 = the center's row r (of embedding ``level``)."""
    embeds = torch.from_numpy(np.array(center.embeddings(level), dtype=np.float32))
    return torch.cat([embeds.new_zeros(1, embeds.shape[1]), embeds])


def _as_vocabulary(name: str, vocab: Any) -> Any:
    """Vocabulary objects pass through; a token list (as stored in ``CiUBMConfig.vocabularies``) is wrapped."""
    if hasattr(vocab, "encode"):
        return vocab
    if isinstance(vocab, (list, tuple)):
        return Vocabulary(vocab, name=name)
    raise TypeError(f"vocabulary {name!r} must be a Vocabulary or a token list, got {type(vocab).__name__}")


class CTRCollator:
    """Callable ``collator(rows) -> dict`` of ``CiUBMForCTR.forward`` keyword arguments.

    Args:
        vocabs: name -> ``Vocabulary`` (or token list, index 0 = unknown); needs ``user_id``,
            ``item_id`` and one entry per side feature used.
        items: the item catalogue (``datasets.Dataset`` or mapping of columns) with ``item_id``
            and, for each item feature ``item_<col>``, a column ``<col>``; needed when
            ``item_features`` is non-empty.
        center: where content rows come from: the Representation Center (an object with
            ``.rows_for(item_ids)``) or a callable ``item_ids -> rows`` (int array, -1 = no content);
            None for ID-only models (mode "din", base "din").
        max_len: behaviours kept per sample (the most recent ones); a batch is padded to its
            longest kept history, not to ``max_len``.
        user_features: sample columns used as user side features, e.g. ``("user_gender",)``.
        item_features: item side features, e.g. ``("item_genres", "item_year")``; list-valued
            columns in the catalogue are multi-valued (padded with 0 to their longest list).

    Output, all int64 but the mask (B = len(rows), L = longest kept history, at least 1, G = values
    per multi-valued feature): user_ids (B,), target_item_ids (B,), behavior_item_ids (B, L),
    behavior_mask (B, L) bool, user_features {name: (B,)}, target_item_features {name: (B,) | (B, G)},
    behavior_item_features {name: (B, L) | (B, L, G)}, target_content_rows (B,) and
    behavior_content_rows (B, L) when a center is given, labels (B,) when rows hold "label".
    """

    def __init__(
        self,
        vocabs: Mapping[str, Any],
        items=None,
        center: Any = None,
        max_len: int = 50,
        user_features: Sequence[str] = (),
        item_features: Sequence[str] = (),
    ):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.user_features = list(user_features)
        self.item_features = list(item_features)
        needed = ["user_id", "item_id", *self.user_features, *self.item_features]
        missing = [name for name in needed if name not in vocabs]
        if missing:
            raise ValueError(f"vocabs lack {missing}; available: {sorted(vocabs)}")
        self.vocabs = {name: _as_vocabulary(name, vocabs[name]) for name in needed}
        if center is None or callable(center) and not hasattr(center, "rows_for"):
            self.rows_for = center
        elif hasattr(center, "rows_for"):
            self.rows_for = center.rows_for
        else:
            raise TypeError(f"center must have .rows_for(item_ids) or be callable, got {type(center).__name__}")
        self.max_len = int(max_len)
        self.multi_valued_item_features: list[str] = []
        self._item_index = None
        self._item_tables: dict[str, np.ndarray] = {}
        if self.item_features:
            if items is None:
                raise ValueError(f"item_features {self.item_features} need the items table (items=...)")
            self._build_item_tables(items)
        self.stats: Counter = Counter()

    # ------------------------------------------------------------------ item feature table
    def _build_item_tables(self, items) -> None:
        """Encode each item feature once: row r of a table = features of catalogue item r; last row = zeros."""
        columns = items.column_names if hasattr(items, "column_names") else list(items)
        item_ids = [str(i) for i in items["item_id"]]
        self._item_index = pd.Index(item_ids)
        if self._item_index.has_duplicates:
            raise ValueError(f"items table has duplicate item_id, e.g. {self._item_index[self._item_index.duplicated()][:3].tolist()}")
        for feature in self.item_features:
            column = feature[len("item_"):] if feature.startswith("item_") else feature
            if column not in columns:
                raise ValueError(f"item feature {feature!r} needs column {column!r} in the items table; columns: {columns}")
            values = list(items[column])
            vocab = self.vocabs[feature]
            if any(isinstance(v, (list, tuple, np.ndarray)) for v in values):
                lists = [[] if v is None else list(v) for v in values]
                width = max(1, max(len(v) for v in lists))
                table = np.zeros((len(lists) + 1, width), dtype=np.int64)
                lengths = np.array([len(v) for v in lists])
                codes = vocab.encode(list(chain.from_iterable(lists)))
                rows = np.repeat(np.arange(len(lists)), lengths)
                cols = np.arange(len(codes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
                table[rows, cols] = codes
                self.multi_valued_item_features.append(feature)
            else:
                table = np.zeros(len(values) + 1, dtype=np.int64)
                table[:-1] = vocab.encode(values)
            self._item_tables[feature] = table

    def _item_feature_rows(self, item_ids, counts: np.ndarray | None = None) -> np.ndarray:
        """Row of each id in the item tables; ids absent from the catalogue get the all-zero last row.
        ``counts`` (optional, one per id): how many batch positions each (distinct) id stands for."""
        rows = self._item_index.get_indexer(item_ids)
        absent = rows < 0
        if absent.any():
            self.stats["items_missing_from_table"] += int(absent.sum() if counts is None else counts[absent].sum())
        return np.where(absent, len(self._item_index), rows)

    def config_kwargs(self) -> dict:
        """Vocabulary-derived ``CiUBMConfig`` arguments (sizes, multi-valued names, token lists)."""
        return {
            "vocabularies": {name: list(vocab.tokens) for name, vocab in self.vocabs.items()},
            "user_feature_sizes": {name: len(self.vocabs[name]) for name in self.user_features},
            "item_feature_sizes": {name: len(self.vocabs[name]) for name in self.item_features},
            "multi_valued_item_features": list(self.multi_valued_item_features),
        }

    # ------------------------------------------------------------------ batch
    def _encode(self, name: str, values: list, count_as: str, counts: np.ndarray | None = None) -> np.ndarray:
        """Vocabulary codes of ``values``, unknowns counted in ``stats[count_as]``; ``counts`` (optional,
        one per value): how many batch positions each (distinct) value stands for."""
        codes = self.vocabs[name].encode(values, counts)
        unknown = codes == 0
        self.stats[count_as] += int(unknown.sum() if counts is None else counts[unknown].sum())
        return codes

    def _content_rows(self, item_ids: list[str], counts: np.ndarray) -> torch.Tensor:
        """Content-table rows (N,) int64 of (distinct) ``item_ids`` (0 = no content, counted in
        ``stats["content_missing"]``); ``counts`` (N,): batch positions each id stands for."""
        rows = np.asarray(self.rows_for(item_ids))
        if rows.shape != (len(item_ids),) or rows.dtype.kind not in "iu":
            raise ValueError(f"content rows of {len(item_ids)} ids must be an integer array of shape "
                             f"({len(item_ids)},), got {rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64) + 1  # -1 (no content) -> row 0
        self.stats["content_missing"] += int(counts[rows == 0].sum())
        return torch.from_numpy(rows)

    def _columns_of(self, rows) -> tuple[dict[str, list], int]:
        """The batch as columns (name -> list, one value per row) and its size, checked: every row has
        the required keys, "label" is in all rows or none, behaviour histories are lists (or None).
        ValueError / TypeError otherwise. A dict of columns (a batched ``Dataset`` slice) is used as
        it is: no per-row dicts are built."""
        required = ["user_id", "item_id", "behavior_item_ids", *self.user_features]
        if isinstance(rows, Mapping):  # a batched Dataset slice: columns -> lists
            lengths = {key: len(values) for key, values in rows.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"batched columns must have equal lengths, got {lengths}")
            batch_size = next(iter(lengths.values()), 0)
            if batch_size and (missing := [key for key in required if key not in rows]):
                raise ValueError(f"row 0 lacks {missing}; every row needs {required} (and 'label' to train)")
            columns = {key: list(rows[key]) for key in [*required, "label"] if key in rows}
        elif isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
            raise TypeError(f"rows must be a list of dicts or a dict of columns, got {type(rows).__name__}")
        else:
            batch_size = len(rows)
            labelled = batch_size > 0 and isinstance(rows[0], Mapping) and "label" in rows[0]
            for index, row in enumerate(rows):
                if not isinstance(row, Mapping):
                    raise TypeError(f"row {index} must be a dict of columns, got {type(row).__name__}")
                missing = [key for key in required if key not in row]
                if missing:
                    raise ValueError(f"row {index} lacks {missing}; every row needs {required} (and 'label' to train)")
                if ("label" in row) != labelled:
                    raise ValueError(f"row {index} {'lacks' if labelled else 'has'} 'label' but row 0 "
                                     f"{'has' if labelled else 'lacks'} one: give a label in every row or in none")
            columns = {key: [row[key] for row in rows] for key in [*required, "label"][:len(required) + labelled]}
        if batch_size == 0:
            raise ValueError("cannot collate an empty batch")
        for index, history in enumerate(columns["behavior_item_ids"]):
            if history is not None and (isinstance(history, (str, bytes)) or not isinstance(history, (Sequence, np.ndarray))):
                raise TypeError(f"row {index}: behavior_item_ids must be a list of item ids (or None), "
                                f"got {type(history).__name__} {history!r}")
        return columns, batch_size

    def __call__(self, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence]) -> dict[str, Any]:
        columns, batch_size = self._columns_of(rows)
        max_len = self.max_len
        user_ids = list(map(str, columns["user_id"]))
        target_ids = list(map(str, columns["item_id"]))
        full_histories = [() if history is None else history for history in columns["behavior_item_ids"]]
        full_lengths = np.fromiter(map(len, full_histories), dtype=np.int64, count=batch_size)
        lengths = np.minimum(full_lengths, max_len)
        width = max(1, int(lengths.max()))  # the batch's longest kept history, not max_len
        flat_history = list(map(str, chain.from_iterable(
            history[-max_len:] if length > max_len else history for history, length in zip(full_histories, full_lengths))))
        # histories repeat a few thousand items: look each distinct one up once, then expand
        history_index, distinct_history = pd.factorize(np.asarray(flat_history, dtype=object), use_na_sentinel=False)
        distinct_counts = np.bincount(history_index, minlength=len(distinct_history))
        # right padding: sample b's behaviours at positions 0..lengths[b]-1
        row_of = np.repeat(np.arange(batch_size), lengths)
        pos_of = np.arange(len(flat_history)) - np.repeat(np.cumsum(lengths) - lengths, lengths)

        self.stats["samples"] += batch_size
        self.stats["behaviors"] += len(flat_history)
        self.stats["truncated_samples"] += int((full_lengths > max_len).sum())
        batch: dict[str, Any] = {
            "user_ids": torch.from_numpy(self._encode("user_id", user_ids, "unknown_users")),
            "target_item_ids": torch.from_numpy(self._encode("item_id", target_ids, "unknown_target_items")),
        }
        behavior_ids = np.zeros((batch_size, width), dtype=np.int64)
        behavior_ids[row_of, pos_of] = self._encode("item_id", list(distinct_history), "unknown_behavior_items",
                                                    distinct_counts)[history_index]
        batch["behavior_item_ids"] = torch.from_numpy(behavior_ids)
        batch["behavior_mask"] = torch.arange(width).unsqueeze(0) < torch.from_numpy(lengths).unsqueeze(1)
        batch["user_features"] = {
            name: torch.from_numpy(self._encode(name, columns[name], f"unknown_{name}"))
            for name in self.user_features
        }
        if self.item_features:
            target_rows = self._item_feature_rows(target_ids)
            history_rows = self._item_feature_rows(distinct_history, distinct_counts)[history_index]
            batch["target_item_features"], batch["behavior_item_features"] = {}, {}
            for name, table in self._item_tables.items():
                batch["target_item_features"][name] = torch.from_numpy(table[target_rows])
                behavior_values = np.zeros((batch_size, width, *table.shape[1:]), dtype=np.int64)
                behavior_values[row_of, pos_of] = table[history_rows]
                batch["behavior_item_features"][name] = torch.from_numpy(behavior_values)
        if self.rows_for is not None:
            rows = self._content_rows(target_ids + list(distinct_history), np.concatenate(
                [np.ones(batch_size, dtype=np.int64), distinct_counts]))
            batch["target_content_rows"] = rows[:batch_size]
            behavior_rows = torch.zeros(batch_size, width, dtype=torch.int64)
            behavior_rows[torch.from_numpy(row_of), torch.from_numpy(pos_of)] = rows[batch_size:][
                torch.from_numpy(history_index)]
            batch["behavior_content_rows"] = behavior_rows
        if "label" in columns:
            labels = [label.item() if isinstance(label, torch.Tensor) and label.numel() == 1 else label
                      for label in columns["label"]]
            # bools and integral floats are 0/1; NaN, None, strings and other numbers are not
            bad = [(index, label) for index, label in enumerate(labels)
                   if isinstance(label, (str, bytes)) or not isinstance(label, (int, float, np.number)) or label not in (0, 1)]
            if bad:
                raise ValueError(f"label must be 0 or 1, got {bad[0][1]!r} in row {bad[0][0]}"
                                 + (f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""))
            batch["labels"] = torch.tensor([int(label) for label in labels], dtype=torch.int64)
        return batch


__all__ = ["CTRCollator", "ContentRows", "center_content_table"]
