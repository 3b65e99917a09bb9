"""The anchor guard of C-SFT: how far embeddings moved from the start encoder's."""

import torch


def anchor_distance(embeds: torch.Tensor, start_embeds: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cosine`` between L2-normalised embeddings (B, D) and the start encoder's of the same
    items (B, D); 0 when they agree. Keeps C-SFT close to the content semantics its start encoded."""
    return (1.0 - (embeds * start_embeds).sum(-1)).mean()
