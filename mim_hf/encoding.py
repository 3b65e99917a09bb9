"""Batch encoding of an item catalogue with a `MIMContentEncoder` (used by the Representation Center)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mim_hf.modeling.modeling_mim_encoder import has_injected_adapters
from mim_hf.modeling.processing_mim_encoder import rows_to_records

ENCODER_LEVELS = ("item_embeds", "text_embeds", "image_embeds")
# Opt-in approximate inference schemes -> what they do (recorded by callers that store embeddings:
# embeddings from a quantised tower differ from fp32 ones, so they must not share a fingerprint).
QUANTIZATION_SCHEMES = {
    "int8": "dynamic int8 (fbgemm): text-tower nn.Linear weights int8 per output channel, "
            "activations quantised per batch at run time; CPU only",
}


def _select_rows(items, indices: list[int]) -> list[dict]:
    """Rows ``indices`` of a datasets.Dataset / dict of lists / sequence of dicts, as dicts."""
    if hasattr(items, "select") and hasattr(items, "column_names"):  # datasets.Dataset: decodes only these rows
        return rows_to_records(items[indices])
    return [items[i] for i in indices]


def _text_columns(items, processor):
    """Rows without the image column (cheap to materialise for building texts)."""
    if hasattr(items, "select_columns") and hasattr(items, "column_names"):
        keep = [c for c in items.column_names if c != processor.image_field]
        return rows_to_records(items.select_columns(keep)[:])
    return items


def _pad_batch(tokenized: Mapping[str, list], indices: list[int], pad_token_id: int, padding_side: str) -> dict:
    """Token lists of rows ``indices`` -> LongTensors (B, longest row) padded like the tokenizer would."""
    rows = [tokenized["input_ids"][i] for i in indices]
    width = max(len(ids) for ids in rows)
    batch = {}
    for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key not in tokenized:
            continue
        tensor = torch.full((len(indices), width), fill, dtype=torch.long)
        for row, i in enumerate(indices):
            values = tokenized[key][i]
            if padding_side == "left":
                tensor[row, width - len(values):] = torch.tensor(values, dtype=torch.long)
            else:
                tensor[row, : len(values)] = torch.tensor(values, dtype=torch.long)
        batch[key] = tensor
    return batch


def quantize_int8(encoder):
    """A copy of ``encoder`` whose text tower's ``nn.Linear`` layers are dynamic int8 (approximate).

    Weights become int8 with one scale per output channel; activations are quantised per batch
    at run time (fbgemm kernels, CPU only). Embeddings drift from fp32 ones (see the benchmark
    for MovieLens: cosine to fp32 and neighbour agreement), so this is opt-in, never the default.
    Uses ``torch.ao.nn.quantized.dynamic.Linear``: PyTorch 2.13 marks quantized-tensor dtypes as
    deprecated (it warns once), and torchao's replacement is not a dependency here.

    Args:
        encoder: a ``MIMContentEncoder`` without injected LoRA layers (merge them first).
    Returns:
        a new encoder (the input is untouched) in eval mode.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    if has_injected_adapters(encoder):
        raise ValueError("quantize='int8' needs plain towers; merge LoRA first (mim_hf.lora.merge_adapters)")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantize='int8' needs the fbgemm engine; this torch has "
                         f"{torch.backends.quantized.supported_engines}")
    quantized = copy.deepcopy(encoder).eval().to("cpu")
    tower = quantized.text_model
    targets = [(name, module) for name, module in tower.named_modules() if type(module) is torch.nn.Linear]
    with warnings.catch_warnings():
        # The quantized-dtype deprecation notice (PyTorch 2.13) is documented above, not repeated per layer.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        for name, module in targets:
            module.qconfig = per_channel_dynamic_qconfig
            parent_name, _, child = name.rpartition(".")
            parent = tower.get_submodule(parent_name) if parent_name else tower
            setattr(parent, child, DynamicInt8Linear.from_float(module))
    return quantized


@contextlib.contextmanager
def _attention_implementation(tower, implementation: str | None):
    """Run ``tower`` with ``implementation`` inside the block, restoring its own afterwards."""
    current = getattr(getattr(tower, "config", None), "_attn_implementation", None)
    if implementation is None or implementation == current or not hasattr(tower, "set_attn_implementation"):
        yield
        return
    tower.set_attn_implementation(implementation)
    try:
        yield
    finally:
        tower.set_attn_implementation(current)


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
    attn_implementation: str | None = "auto",
    quantize: str | None = None,
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
        sort_by_length: batch rows of similar token length together (less padding); the output
            order is the input order either way.
        show_progress: tqdm progress bar over batches.
        device: where to run (default: the encoder's device).
        attn_implementation: text-tower attention for this call, restored afterwards. ``"auto"``:
            ``"eager"`` on CPU (short item texts: faster than SDPA's CPU kernel there, same result
            to ~1e-7), the tower's own elsewhere; ``None``: the tower's own; or any transformers name.
        quantize: ``None`` (exact fp32, the default) or ``"int8"``: run a dynamic-int8 copy of the
            text tower (:func:`quantize_int8`; approximate, CPU only, see ``QUANTIZATION_SCHEMES``).
            It quantises a copy on every call (about a second for MiniLM); to encode more than once,
            call ``quantize_int8(encoder)`` once and pass the result with ``quantize=None``.
    Returns:
        ``{level: FloatTensor (N, embed_dim)}`` on CPU, float32, L2-normalised rows; with
        ``"image_embeds"`` also ``"image_mask"``: BoolTensor (N,) (rows without image are zeros).
    All texts are built and tokenised once (one fast-tokenizer call); each batch is padded to its
    longest row; runs under ``torch.inference_mode``.
    """
    unknown = [level for level in levels if level not in ENCODER_LEVELS]
    if unknown or not levels:
        raise ValueError(f"levels {list(levels)!r} invalid; choose from {ENCODER_LEVELS}")
    if "image_embeds" in levels and getattr(encoder, "vision_model", None) is None:
        raise ValueError("level 'image_embeds' requested but the encoder has no vision tower")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if quantize is not None and quantize not in QUANTIZATION_SCHEMES:
        raise ValueError(f"quantize={quantize!r} is not supported; expected None or one of {list(QUANTIZATION_SCHEMES)}")
    if attn_implementation is not None and not isinstance(attn_implementation, str):
        raise TypeError(f"attn_implementation must be a str or None, got {type(attn_implementation).__name__}")
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

    device = torch.device(device) if device is not None else encoder.device
    if quantize is not None:
        if device.type != "cpu":
            raise ValueError(f"quantize={quantize!r} runs on CPU only, got device {device}")
        encoder = quantize_int8(encoder)
    if attn_implementation == "auto":
        attn_implementation = "eager" if device.type == "cpu" else None

    # One fast-tokenizer call for the whole catalogue (counts empty titles / truncations once).
    texts = processor.build_texts(_text_columns(items, processor), view=view)
    tokenized = processor.tokenize(texts, padding=False, return_tensors=None)
    order = list(range(n_items))
    if sort_by_length:
        order.sort(key=lambda i: len(tokenized["input_ids"][i]), reverse=True)
    pad_token_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    padding_side = getattr(processor.tokenizer, "padding_side", "right")
    with_images = processor.image_processor is not None

    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode(), _attention_implementation(encoder.text_model, attn_implementation):
            starts = range(0, n_items, batch_size)
            for start in tqdm(starts, disable=not show_progress, desc="encoding items", unit="batch"):
                batch_indices = order[start : start + batch_size]
                inputs = _pad_batch(tokenized, batch_indices, pad_token_id, padding_side)
                if with_images:
                    rows = _select_rows(items, batch_indices)
                    pixel_values, image_mask = processor.process_images([r.get(processor.image_field) for r in rows])
                    inputs["image_mask"] = image_mask
                    if pixel_values is not None:
                        inputs["pixel_values"] = pixel_values
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


__all__ = ["encode_items", "quantize_int8", "ENCODER_LEVELS", "QUANTIZATION_SCHEMES"]
