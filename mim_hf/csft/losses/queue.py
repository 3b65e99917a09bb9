"""Time negatives: a FIFO queue of candidate embeddings from earlier steps (MoCo style).

The queue holds ``size`` rows of detached, L2-normalised candidate embeddings ``(size, dim)`` and the item
id of each row ``(size,)``. ``enqueue`` writes the newest rows at the write pointer and wraps
around, overwriting the oldest; ``candidates()`` returns the filled rows for the loss. Empty
slots carry item id ``-1`` and are never returned.

Queue larger than the catalogue: allowed. Once full, items appear several times (older,
staler copies); the loss masks every copy of an anchor's own positive/trigger item by id, so
no false negative survives, and the other items are merely weighted by how often they
appear. Because this usually means a mis-set ``size``, the queue warns once (at
construction) when ``catalogue_size`` is given and ``size > catalogue_size``; it does not
silently shrink itself.

State (``embeds``, ``item_ids``, ``write_pointer``, ``num_filled``) is registered as buffers,
so ``state_dict()`` is a flat dict of plain tensors that ``safetensors.torch.save_file`` can
write, and ``load_state_dict`` resumes the queue exactly.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingQueue(nn.Module):
    """FIFO of ``size`` detached ``dim``-d candidate embeddings with their item ids.

    Args:
        size: number of rows kept (> 0).
        dim: embedding width.
        catalogue_size: optional number of items in the catalogue; only used to warn once
            when ``size`` exceeds it (see module docstring).
        dtype: storage dtype of the embeddings (float32 by default, also under mixed
            precision, so a resumed run sees the same numbers).
    """

    def __init__(
        self,
        size: int,
        dim: int,
        catalogue_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"queue size must be a positive int, got {size!r}")
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"queue dim must be a positive int, got {dim!r}")
        if catalogue_size is not None and size > catalogue_size:
            warnings.warn(
                f"EmbeddingQueue size {size} exceeds the catalogue size {catalogue_size}: "
                f"items will sit in the queue several times (copies of an anchor's own "
                f"positive are masked by id; others count once per copy)",
                stacklevel=2,
            )
        self.size = size
        self.dim = dim
        self.register_buffer("embeds", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("item_ids", torch.full((size,), -1, dtype=torch.int64))
        # 1-element tensors rather than Python ints, so they travel with state_dict().
        self.register_buffer("write_pointer", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("num_filled", torch.zeros(1, dtype=torch.int64))

    def __len__(self) -> int:
        return int(self.num_filled.item())

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(embeds (n, dim), item_ids (n,))`` of the ``n`` filled rows.

        Slots fill in order 0, 1, ... until the queue is full, so the filled rows are a
        prefix; their order is storage order (use ``ordered_candidates`` for age order).
        """
        n = len(self)
        return self.embeds[:n], self.item_ids[:n]

    def ordered_candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the filled rows oldest first: ``(embeds (n, dim), item_ids (n,))``."""
        n = len(self)
        if n < self.size:
            return self.embeds[:n], self.item_ids[:n]
        order = torch.roll(torch.arange(self.size, device=self.item_ids.device), -int(self.write_pointer.item()))
        return self.embeds[order], self.item_ids[order]

    @torch.no_grad()
    def enqueue(self, embeds: torch.Tensor, item_ids: torch.Tensor) -> None:
        """Append ``embeds (n, dim)`` with ``item_ids (n,)``, newest last; detached and
        L2-normalised.

        When ``n >= size`` only the last ``size`` rows are kept. Rows overwrite the oldest
        slots, wrapping around the end of the buffer.
        """
        if embeds.dim() != 2 or embeds.shape[1] != self.dim:
            raise ValueError(f"enqueue expects embeds of shape (n, {self.dim}), got {tuple(embeds.shape)}")
        if item_ids.shape != (embeds.shape[0],):
            raise ValueError(
                f"enqueue expects item_ids of shape ({embeds.shape[0]},), got {tuple(item_ids.shape)}"
            )
        n = embeds.shape[0]
        if n == 0:
            return
        if n > self.size:
            embeds, item_ids, n = embeds[-self.size :], item_ids[-self.size :], self.size
        start = int(self.write_pointer.item())
        slots = (torch.arange(n, device=self.item_ids.device) + start) % self.size
        # Stored unit-length: the loss reads queue rows as cosine candidates.
        self.embeds[slots] = F.normalize(embeds.detach().float(), dim=-1).to(self.embeds.dtype)
        self.item_ids[slots] = item_ids.to(torch.int64)
        self.write_pointer.fill_((start + n) % self.size)
        self.num_filled.fill_(min(self.size, len(self) + n))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A queue saved with another size/dim cannot resume exactly: say so with the shapes.
        saved = state_dict.get(prefix + "embeds")
        if saved is not None and tuple(saved.shape) != tuple(self.embeds.shape):
            raise ValueError(
                f"queue state has embeds of shape {tuple(saved.shape)}, this queue expects "
                f"{tuple(self.embeds.shape)} (size, dim)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
