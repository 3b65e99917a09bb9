"""Paired comparisons: a model's AUC minus DIN-ID's on matched (fold, seed) runs, with a 95 % interval.

Each (fold, seed) pair is one observation: both models saw the same prepared split and the same
seed, so their difference removes the split-to-split variation. The interval is a percentile
bootstrap of the mean difference, resampling the (fold, seed) pairs with replacement.
"""

from __future__ import annotations

import numpy as np


def paired_difference(model_auc: dict, base_auc: dict, n_boot: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> dict:
    """Mean of ``model_auc[k] - base_auc[k]`` over the keys both hold, with a bootstrap interval.

    ``model_auc`` / ``base_auc``: ``{(fold, seed): auc}``. Keys only one side holds are not
    compared; they are counted in ``unmatched``. Returns ``{"auc_diff", "ci_low", "ci_high",
    "n_pairs", "unmatched", "level"}``; with one pair the interval is that single difference.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    keys = sorted(set(model_auc) & set(base_auc))
    keys = [k for k in keys if model_auc[k] is not None and base_auc[k] is not None]
    if not keys:
        raise ValueError(f"no matched (fold, seed) run with an AUC on both sides: model has {sorted(model_auc)}, "
                         f"baseline has {sorted(base_auc)}")
    diffs = np.array([model_auc[k] - base_auc[k] for k in keys], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(n_boot, len(diffs)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"auc_diff": float(diffs.mean()), "ci_low": float(low), "ci_high": float(high), "n_pairs": len(keys),
            "unmatched": len(set(model_auc) ^ set(base_auc)), "level": level}
