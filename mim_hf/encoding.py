"""Batch encoding of an item catalogue with a `MIMContentEncoder` (used by the Representation Center)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mim_hf.modeling.processing_mim_encoder import rows_to_records

ENCODER_LEVELS = ("item_embeds", "text_embeds", "image_embeds")


def _select_rows(items, indices: list[int]) -> list[dict]:
    """Rows ``indices`` of a datasets.Dataset / dict of lists / sequence of dicts, as dicts."""
    if hasattr(items, "select") and hasattr(items, "column_names"):  # datasets.Dataset: decodes only these rows
        return rows_to_records(items[indices])
    return [items[i] for i in indices]


def _text_columns(items, processor):
    """Rows without the image column (cheap to materialise for building texts to sort by)."""
    if hasattr(items, "select_columns") and hasattr(items, "column_names"):
        keep = [c for c in items.column_names if c != processor.image_field]
        return rows_to_records(items.select_columns(keep)[:])
    return items


def encode_items(
    encoder,
    processor,
    items,
    *,
    batch_size: int = 64,
    levels: Sequence[str] = ("item_embeds",),
    view: str = "full",
    sort_by_length: bool = True,
    show_progress: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Encode every item with ``encoder`` and return embeddings in the items' original order.

    Args:
        encoder: a ``MIMContentEncoder`` (put in eval mode here; LoRA merged or not).
        processor: its ``MIMContentProcessor``.
        items: ``datasets.Dataset``, dict of equal-length lists, or sequence of dicts with the
            processor's title / attribute / image columns. N rows.
        batch_size: rows per forward pass.
        levels: which outputs to return, from ``("item_embeds", "text_embeds", "image_embeds")``.
            ``"image_embeds"`` needs a vision tower.
        view: processor text view ("full", "title", "attributes").
        sort_by_length: batch rows of similar text length together (less padding); the output
            order is the input order either way.
        show_progress: tqdm progress bar over batches.
        device: where to run (default: the encoder's device).
    Returns:
        ``{level: FloatTensor (N, embed_dim)}`` on CPU, float32, L2-normalised rows; with
        ``"image_embeds"`` also ``"image_mask"``: BoolTensor (N,) (rows without image are zeros).
    Padding is dynamic (per batch, to its longest text); runs under ``torch.inference_mode``.
    """
    unknown = [level for level in levels if level not in ENCODER_LEVELS]
    if unknown or not levels:
        raise ValueError(f"levels {list(levels)!r} invalid; choose from {ENCODER_LEVELS}")
    if "image_embeds" in levels and getattr(encoder, "vision_model", None) is None:
        raise ValueError("level 'image_embeds' requested but the encoder has no vision tower")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(items, Mapping) and not hasattr(items, "__len__"):
        items = list(items)
    if isinstance(items, Mapping):
        items = rows_to_records(items)
    n_items = len(items)
    embed_dim = encoder.config.embed_dim
    results = {level: torch.zeros(n_items, embed_dim, dtype=torch.float32) for level in levels}
    if "image_embeds" in levels:
        results["image_mask"] = torch.zeros(n_items, dtype=torch.bool)
    if n_items == 0:
        return results

    order = list(range(n_items))
    if sort_by_length:
        # Character length of the text is a cheap, monotone-enough proxy for token length.
        counts_before = dict(processor.fallback_counts)
        texts = processor.build_texts(_text_columns(items, processor), view=view)
        processor.fallback_counts = counts_before  # texts are rebuilt (and counted) per batch below
        order.sort(key=lambda i: len(texts[i]), reverse=True)

    device = torch.device(device) if device is not None else encoder.device
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            starts = range(0, n_items, batch_size)
            for start in tqdm(starts, disable=not show_progress, desc="encoding items", unit="batch"):
                batch_indices = order[start : start + batch_size]
                inputs = processor(_select_rows(items, batch_indices), view=view)
                inputs = {key: value.to(device) for key, value in inputs.items()}
                output = encoder(**inputs, return_dict=True)
                index = torch.tensor(batch_indices, dtype=torch.long)
                for level in levels:
                    values = getattr(output, level)
                    if values is None:  # no image in this batch -> zero rows
                        continue
                    results[level][index] = values.float().cpu()
                if "image_mask" in results:
                    results["image_mask"][index] = output.image_mask.cpu()
    finally:
        encoder.train(was_training)
    return results


__all__ = ["encode_items", "ENCODER_LEVELS"]
