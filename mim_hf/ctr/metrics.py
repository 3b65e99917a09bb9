"""CTR metrics: AUC, GAUC, logloss, and the per-popularity-bucket table.

All functions take 1-D array-likes (lists, numpy arrays, CPU torch tensors) and are
vectorised with numpy: AUC is computed from average ranks (ties share the mean of their
ranks, as ``sklearn.metrics.roc_auc_score`` does), GAUC computes every user's AUC in one
sort without a Python loop over users.

``CTRMetrics`` wraps the same functions as an ``evaluate.Metric`` defined in code (no Hub
download): ``CTRMetrics().compute(predictions=probs, references=labels, user_ids=ids)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

POPULARITY_BUCKETS = ("cold", "long_tail", "head")


# ---------------------------------------------------------------- input checks
def _as_1d(values: Any, name: str) -> np.ndarray:
    """Array-like -> 1-D numpy array (torch tensors are detached and moved to CPU)."""
    if hasattr(values, "detach"):  # torch tensor without importing torch here
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def _check_labels(labels: Any) -> np.ndarray:
    """Labels -> int64 array of 0/1; anything else is a ValueError naming the bad value."""
    array = _as_1d(labels, "labels")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"labels must be numeric 0/1, got dtype {array.dtype}")
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        first = array[np.flatnonzero(bad)[0]].item()
        raise ValueError(
            f"labels must be 0 or 1; found {int(bad.sum())} other value(s), first {first!r}"
        )
    return array.astype(np.int64)


def _check_scores(scores: Any, name: str = "scores") -> np.ndarray:
    """Scores -> float64 array; NaN or infinite values are a ValueError."""
    array = _as_1d(scores, name)
    if array.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float64)
    finite = np.isfinite(array)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{name} must be finite; {int((~finite).sum())} value(s) are NaN/inf "
            f"(first at position {first}: {array[first]})"
        )
    return array


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return next(iter(lengths.values()))


# ---------------------------------------------------------------- rank helpers
def _average_ranks_within_groups(group_codes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """1-based rank of each score inside its group; tied scores get their mean rank.

    group_codes: (N,) int64, scores: (N,) float64 -> (N,) float64.
    """
    n = len(scores)
    order = np.lexsort((scores, group_codes))  # by group, then by score
    sorted_groups = group_codes[order]
    sorted_scores = scores[order]
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = sorted_groups[1:] != sorted_groups[:-1]
    new_tie = new_group.copy()
    new_tie[1:] |= sorted_scores[1:] != sorted_scores[:-1]
    # start position (in sorted order) of every element's group and tie block
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    tie_starts = np.flatnonzero(new_tie)
    tie_ends = np.append(tie_starts[1:], n)  # exclusive
    tie_id = np.cumsum(new_tie) - 1
    # ranks tie_start+1 .. tie_end (relative to group start) average to (start + 1 + end) / 2
    mean_position = (tie_starts + 1 + tie_ends) / 2.0
    ranks_sorted = mean_position[tie_id] - group_start
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def _grouped_auc(group_codes: np.ndarray, labels: np.ndarray, scores: np.ndarray, n_groups: int):
    """Per-group Mann-Whitney AUC.

    Returns (auc (G,) float64 with NaN where a group has one class, n_pos (G,), n_neg (G,)).
    """
    ranks = _average_ranks_within_groups(group_codes, scores)
    n_pos = np.bincount(group_codes, weights=labels, minlength=n_groups)
    n_all = np.bincount(group_codes, minlength=n_groups).astype(np.float64)
    n_neg = n_all - n_pos
    positive_rank_sum = np.bincount(group_codes, weights=ranks * labels, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc_per_group = (positive_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc_per_group[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc_per_group, n_pos, n_neg


# ---------------------------------------------------------------- public metrics
def auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (ties count one half, as sklearn).

    labels: (N,) in {0, 1}; scores: (N,) finite floats (probabilities or logits; only their
    order matters). Returns a float in [0, 1]. Raises ValueError when only one class is
    present (AUC is undefined) or on bad input.
    """
    labels = _check_labels(labels)
    scores = _check_scores(scores)
    _check_same_length(labels=labels, scores=scores)
    if len(labels) == 0:
        raise ValueError("auc of an empty input is undefined")
    value, n_pos, n_neg = _grouped_auc(np.zeros(len(labels), dtype=np.int64), labels, scores, 1)
    if n_pos[0] == 0 or n_neg[0] == 0:
        raise ValueError(
            f"auc is undefined with one class: {int(n_pos[0])} positive(s), {int(n_neg[0])} negative(s)"
        )
    return float(value[0])


def _gauc_parts(user_ids, labels, scores) -> tuple[float | None, int, int]:
    """(GAUC or None when no user has both classes, users used, users skipped); inputs checked."""
    users = _as_1d(user_ids, "user_ids")
    labels = _check_labels(labels)
    scores = _check_scores(scores)
    _check_same_length(user_ids=users, labels=labels, scores=scores)
    if len(labels) == 0:
        return None, 0, 0
    _, user_codes = np.unique(users, return_inverse=True)
    user_codes = user_codes.reshape(-1).astype(np.int64)
    n_users = int(user_codes.max()) + 1
    auc_per_user, n_pos, n_neg = _grouped_auc(user_codes, labels, scores, n_users)
    used = ~np.isnan(auc_per_user)
    n_used = int(used.sum())
    if n_used == 0:
        return None, 0, n_users
    weights = (n_pos + n_neg)[used]
    value = float(np.sum(auc_per_user[used] * weights) / np.sum(weights))
    return value, n_used, n_users - n_used


def gauc(user_ids, labels, scores, return_counts: bool = False):
    """Group AUC (DIN paper; FuxiCTR's ``gAUC``): per-user AUC averaged with weights.

    GAUC = sum_u n_u * AUC_u / sum_u n_u, where n_u is the user's number of samples
    (impressions), over users whose samples contain both a positive and a negative;
    users with a single class are skipped (their AUC is undefined), as FuxiCTR does.

    user_ids: (N,) any hashable ids (strings or ints); labels: (N,) in {0, 1};
    scores: (N,) finite floats. Returns a float, or with ``return_counts=True`` the tuple
    ``(gauc, n_users_used, n_users_skipped)``. Raises ValueError when no user has both
    classes.
    """
    value, n_used, n_skipped = _gauc_parts(user_ids, labels, scores)
    if value is None:
        raise ValueError(
            f"gauc is undefined: none of the {n_skipped} user(s) has both a positive and a negative"
        )
    return (value, n_used, n_skipped) if return_counts else value


def logloss(labels: Sequence[int], probs: Sequence[float], eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` against ``labels``.

    labels: (N,) in {0, 1}; probs: (N,) in [0, 1] (probabilities, not logits; clipped to
    [eps, 1 - eps] so a confident mistake costs -log(eps), not infinity). Returns a float.
    """
    labels = _check_labels(labels)
    probs = _check_scores(probs, "probs")
    _check_same_length(labels=labels, probs=probs)
    if len(labels) == 0:
        raise ValueError("logloss of an empty input is undefined")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    outside = (probs < 0.0) | (probs > 1.0)
    if outside.any():
        first = probs[np.flatnonzero(outside)[0]].item()
        raise ValueError(
            f"probs must lie in [0, 1] (pass sigmoid(logits)); {int(outside.sum())} value(s) "
            f"outside, first {first}"
        )
    probs = np.clip(probs, eps, 1.0 - eps)
    return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log1p(-probs)))


def _summary(labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> dict[str, Any]:
    """Metrics of one slice; AUC/GAUC/logloss are None where undefined (one class, empty)."""
    n = int(len(labels))
    n_pos = int(labels.sum())
    two_classes = 0 < n_pos < n
    gauc_value, n_used, n_skipped = _gauc_parts(users, labels, probs)
    return {
        "auc": auc(labels, probs) if two_classes else None,
        "gauc": gauc_value,
        "logloss": logloss(labels, probs) if n else None,
        "n": n,
        "n_pos": n_pos,
        "gauc_users": n_used,
        "gauc_skipped_users": n_skipped,
    }


def evaluate_by_bucket(labels, probs, user_ids, buckets) -> dict[str, dict[str, Any]]:
    """The results-table rows: metrics overall and per item-popularity bucket.

    labels: (N,) in {0, 1}; probs: (N,) in [0, 1]; user_ids: (N,); buckets: (N,) strings in
    {"cold", "long_tail", "head"} (popularity of the target item, counted on the training
    period). Returns ``{"overall": m, "cold": m, "long_tail": m, "head": m}`` where each
    ``m`` has ``auc``, ``gauc``, ``logloss`` (None where undefined: empty slice or one
    class), ``n``, ``n_pos``, ``gauc_users`` and ``gauc_skipped_users``.
    """
    labels = _check_labels(labels)
    probs = _check_scores(probs, "probs")
    users = _as_1d(user_ids, "user_ids")
    bucket_array = _as_1d(buckets, "buckets").astype(str)
    _check_same_length(labels=labels, probs=probs, user_ids=users, buckets=bucket_array)
    unknown = ~np.isin(bucket_array, POPULARITY_BUCKETS)
    if unknown.any():
        raise ValueError(
            f"buckets must be one of {POPULARITY_BUCKETS}; found {sorted(set(bucket_array[unknown]))}"
        )
    results = {"overall": _summary(labels, probs, users)}
    for bucket in POPULARITY_BUCKETS:
        in_bucket = bucket_array == bucket
        results[bucket] = _summary(labels[in_bucket], probs[in_bucket], users[in_bucket])
    return results


# ---------------------------------------------------------------- evaluate integration
def _build_ctr_metric_class():
    """Define ``CTRMetrics``; built on first access so ``import mim_hf.ctr.metrics`` stays fast."""
    import datasets
    import evaluate

    class CTRMetrics(evaluate.Metric):
        """``evaluate`` metric for CTR: AUC, GAUC, logloss (optionally per popularity bucket).

        Instantiate directly (no Hub access): ``CTRMetrics()`` takes ``predictions``
        (probabilities in [0, 1]), ``references`` (0/1) and ``user_ids`` (strings); with
        ``CTRMetrics(config_name="by_bucket")`` also ``popularity_bucket`` (strings) and
        returns :func:`evaluate_by_bucket`'s nested dict. ``add_batch`` accumulates across
        an evaluation loop like any ``evaluate`` metric.
        """

        def _info(self):
            features = {
                "predictions": datasets.Value("float64"),
                "references": datasets.Value("int64"),
                "user_ids": datasets.Value("string"),
            }
            if self.config_name == "by_bucket":
                features["popularity_bucket"] = datasets.Value("string")
            elif self.config_name != "default":
                raise ValueError(
                    f"CTRMetrics config_name must be 'default' or 'by_bucket', got {self.config_name!r}"
                )
            return evaluate.MetricInfo(
                description="AUC, GAUC (sample-weighted per-user AUC, one-class users skipped) and logloss",
                citation="",
                inputs_description="predictions: probabilities; references: 0/1 labels; user_ids: strings",
                features=datasets.Features(features),
            )

        def _compute(self, predictions, references, user_ids, popularity_bucket=None):
            if self.config_name == "by_bucket":
                return evaluate_by_bucket(references, predictions, user_ids, popularity_bucket)
            labels = _check_labels(references)
            probs = _check_scores(predictions, "predictions")
            return _summary(labels, probs, _as_1d(user_ids, "user_ids"))

    return CTRMetrics


def __getattr__(name: str):
    # evaluate/datasets are imported only when CTRMetrics is asked for
    if name == "CTRMetrics":
        cls = _build_ctr_metric_class()
        globals()["CTRMetrics"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["auc", "gauc", "logloss", "evaluate_by_bucket", "CTRMetrics", "POPULARITY_BUCKETS"]
