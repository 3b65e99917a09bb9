"""Several content channels in one center: each center's item embedding, unit-normalised,
concatenated and scaled by 1/sqrt(k), so the cosine of two combined rows is the mean of the k
channels' cosines. CiUBM and the content-as-feature model read such a center like any other
(their content width is the sum of the channels'). Used to give CiUBM both the C-SFT embedding
and the frozen encoder's (issue 19's "two content channels")."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence

import numpy as np

from mim_hf.center.layout import DEFAULT_LEVEL
from mim_hf.center.store import RepresentationCenter


def concat_centers(centers: Sequence[RepresentationCenter], path: str | os.PathLike, *, dtype: str = "float16",
                   overwrite: bool = False) -> RepresentationCenter:
    """Write the center of ``centers``' concatenated ``item_embeds`` at ``path``, rows in the first
    center's order. Every center must hold exactly the first one's items (matched by id, not by
    row), else ``ValueError`` naming the center and the counts. A zero row (an item without
    content) stays zero in its channel. Only the ``item_embeds`` level is written."""
    if len(centers) < 2:
        raise ValueError(f"concat_centers needs at least 2 centers, got {len(centers)}")
    ids = centers[0].item_ids()
    channels = []
    for center in centers:
        rows = center.rows_for(ids)
        missing = int((rows < 0).sum())
        if missing or center.num_items != len(ids):
            raise ValueError(f"center {center.root} holds {center.num_items} items and lacks {missing} of the first "
                             f"center's {len(ids)}: every channel must cover the same items")
        embeds = np.asarray(center.embeddings(DEFAULT_LEVEL), dtype=np.float32)[rows]
        norms = np.linalg.norm(embeds, axis=1, keepdims=True)
        channels.append(np.divide(embeds, norms, out=np.zeros_like(embeds), where=norms > 0) / math.sqrt(len(centers)))
    fingerprint = "sha256:" + hashlib.sha256("+".join(c.fingerprint for c in centers).encode()).hexdigest()
    return RepresentationCenter.build(
        ids, {DEFAULT_LEVEL: np.concatenate(channels, axis=1)}, path,
        encoder_name=" ⊕ ".join(str(c.metadata["encoder_name"]) for c in centers), encoder_fingerprint=fingerprint,
        dtype=dtype, overwrite=overwrite,
        extra_metadata={"channels": [{"path": str(c.root), "encoder_fingerprint": c.fingerprint, "embed_dim": c.embed_dim}
                                     for c in centers]})
