"""Vocabularies: raw ids (strings) -> contiguous indices, index 0 reserved for padding/unknown.

Built from the training split only, saved as JSON and reloaded with models.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

UNKNOWN_TOKEN = "[UNK]"


class Vocabulary:
    """An ordered set of tokens; ``encode`` maps a whole batch at once.

    ``tokens[0]`` is always ``"[UNK]"`` (padding and unknown share index 0), so
    ``len(vocab)`` counts it. Unknown values encode to 0 and are counted in
    ``unknown_count`` (cumulative over calls).
    """

    def __init__(self, tokens: Iterable[str], name: str = ""):
        tokens = [str(t) for t in tokens]
        if tokens and tokens[0] == UNKNOWN_TOKEN:
            tokens = tokens[1:]
        if UNKNOWN_TOKEN in tokens:
            raise ValueError(f"vocabulary {name!r}: token {UNKNOWN_TOKEN!r} is reserved for index 0")
        index = pd.Index(tokens)
        if index.has_duplicates:
            raise ValueError(f"vocabulary {name!r} has duplicate tokens, e.g. {index[index.duplicated()][:5].tolist()}")
        self.name = name
        self.tokens = [UNKNOWN_TOKEN] + tokens
        self._index = index
        self.unknown_count = 0

    @classmethod
    def build(cls, values: Iterable, name: str = "") -> "Vocabulary":
        """Vocabulary of the distinct values (flattening lists), in sorted order."""
        flat = pd.Series(values if isinstance(values, pd.Series) else list(values), dtype=object)
        first = flat.dropna().iloc[0] if flat.notna().any() else None
        if isinstance(first, (list, tuple, np.ndarray)):  # multi-valued feature (e.g. genres)
            flat = flat.explode()
        tokens = sorted(flat.dropna().astype(str).unique())
        if UNKNOWN_TOKEN in tokens:  # as data it would silently merge with the unknown row
            raise ValueError(f"vocabulary {name!r}: the value {UNKNOWN_TOKEN!r} is reserved for index 0 "
                             "(unknown/padding); expected data values other than it")
        return cls(tokens, name=name)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token) -> bool:
        return str(token) in self._index

    def encode(self, values: Iterable, counts: np.ndarray | None = None) -> np.ndarray:
        """Indices (int64) of ``values``; unknown or missing values give 0 and are counted.

        ``counts`` (optional, one int per value): how many occurrences each value stands for when a
        caller encodes distinct values once and expands them; the unknown count uses them."""
        values = pd.Index(pd.Series(list(values), dtype=object).astype(str))
        positions = self._index.get_indexer(values)
        unknown = positions < 0
        self.unknown_count += int(unknown.sum() if counts is None else counts[unknown].sum())
        return np.where(unknown, 0, positions + 1).astype(np.int64)

    def decode(self, indices: Iterable[int]) -> list[str]:
        return [self.tokens[int(i)] for i in indices]

    def to_dict(self) -> dict:
        return {"name": self.name, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        return cls(data["tokens"], name=data.get("name", ""))

    def __repr__(self) -> str:
        return f"Vocabulary({self.name!r}, size={len(self)})"
