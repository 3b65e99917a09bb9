"""Hand-written, loop-based InfoNCE reference for the loss tests (slow, obviously correct)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_row_losses(anchors, positives, anchor_ids, positive_ids, temperature,
                         hard=None, hard_ids=None, queue=None, queue_ids=None,
                         pair_mask=None, rows=None, log_prior=None):
    """Return ``{row: loss}`` for each valid anchor row in ``rows`` (default: all).

    Candidates of row i: the positives of all valid rows, row i's hard negatives, the queue;
    a candidate other than p_i whose id equals positive_ids[i] or anchor_ids[i] is dropped.
    ``log_prior`` (per item id) is subtracted from every positive and queue term (logQ).
    """
    def prior(item_id):
        return 0.0 if log_prior is None else float(log_prior[int(item_id)])

    n = anchors.shape[0]
    valid = [True] * n if pair_mask is None else [bool(v) for v in pair_mask]
    out = {}
    for i in (range(n) if rows is None else rows):
        if not valid[i]:
            continue
        banned = {int(positive_ids[i]), int(anchor_ids[i])}
        terms = [F.cosine_similarity(anchors[i], positives[i], dim=0) / temperature - prior(positive_ids[i])]
        for j in range(n):
            if j != i and valid[j] and int(positive_ids[j]) not in banned:
                terms.append(F.cosine_similarity(anchors[i], positives[j], dim=0) / temperature
                             - prior(positive_ids[j]))
        if hard is not None:
            for h in range(hard.shape[1]):
                if int(hard_ids[i, h]) not in banned:
                    terms.append(F.cosine_similarity(anchors[i], hard[i, h], dim=0) / temperature)
        if queue is not None:
            for q in range(queue.shape[0]):
                if int(queue_ids[q]) >= 0 and int(queue_ids[q]) not in banned:
                    terms.append(F.cosine_similarity(anchors[i], queue[q], dim=0) / temperature
                                 - prior(queue_ids[q]))
        out[i] = torch.logsumexp(torch.stack(terms), dim=0) - terms[0]
    return out


def reference_infonce(*args, **kwargs):
    """Mean of ``reference_row_losses`` over the valid rows (0 when there are none)."""
    losses = list(reference_row_losses(*args, **kwargs).values())
    return torch.stack(losses).mean() if losses else torch.tensor(0.0)
