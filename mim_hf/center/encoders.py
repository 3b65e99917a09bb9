"""Which encoder made a center's embeddings (its fingerprint) and how items are encoded for one."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mim_hf.encoder.fingerprint import encoder_fingerprint  # noqa: F401  (the center's import path)


def encoder_levels(encoder: torch.nn.Module) -> tuple[str, ...]:
    """Embedding levels an encoder produces: item and text, plus image with a vision tower."""
    has_vision = getattr(encoder, "vision_model", None) is not None
    return ("item_embeds", "text_embeds") + (("image_embeds",) if has_vision else ())


def encode_levels(encoder, processor, items, levels: Sequence[str], batch_size: int = 64,
                  show_progress: bool = True, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Encode ``items`` (``datasets.Dataset`` with an ``item_id`` column) for a center.

    Runs ``mim_hf.encoder.encoding.encode_items`` and keeps only the embedding ``levels``: returns
    level -> (N, embed_dim) float32 tensor, in the items' order (rows of items without an
    image are zero in ``image_embeds``).
    """
    from mim_hf.encoder.encoding import encode_items

    if "item_id" not in items.column_names:
        raise ValueError(f"items must have an 'item_id' column, got columns {items.column_names}")
    embeddings = encode_items(encoder, processor, items, batch_size=batch_size, levels=tuple(levels),
                              show_progress=show_progress, device=device)
    return {level: embeddings[level] for level in levels}
