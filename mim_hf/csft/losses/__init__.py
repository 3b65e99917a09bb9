"""Contrastive losses for C-SFT (stage 2): InfoNCE with space-time negatives, multi-level.

- ``InfoNCELoss``: cosine InfoNCE with in-batch, cross-device (``gather_across_devices``),
  hard and queue (``queue_size``) negatives, false negatives masked by item id.
- ``MultiLevelInfoNCE``: weighted InfoNCE over fused item, text, image and cross-modal levels.
- ``EmbeddingQueue``: the FIFO of earlier candidates (time negatives).
- ``gather_with_grad``: all-gather keeping the gradient of the local slice (space negatives).
- ``anchor_distance``: mean ``1 - cos`` to the start encoder's embeddings (the anchor guard).
"""

from .anchor import anchor_distance
from .distributed import data_parallel_world, gather_with_grad
from .infonce import ContrastiveLogits, InfoNCELoss
from .multilevel import DEFAULT_WEIGHTS, LEVELS, MultiLevelInfoNCE
from .queue import EmbeddingQueue

__all__ = [
    "anchor_distance",
    "ContrastiveLogits",
    "DEFAULT_WEIGHTS",
    "EmbeddingQueue",
    "InfoNCELoss",
    "LEVELS",
    "MultiLevelInfoNCE",
    "data_parallel_world",
    "gather_with_grad",
]
