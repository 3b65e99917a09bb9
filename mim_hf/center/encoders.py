"""Which encoder made a center's embeddings (its fingerprint) and how items are encoded for one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch


# Config keys that change on save/load or with the library version but not what the encoder
# computes (weights' dtype is hashed with the weights themselves).
_VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "_commit_hash", "architectures", "auto_map", "dtype",
    "torch_dtype", "return_dict", "output_hidden_states", "output_attentions", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "_experts_implementation",
})


def _without_volatile_keys(config: Any) -> Any:
    if isinstance(config, dict):
        return {str(k): _without_volatile_keys(v) for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(config, (list, tuple)):
        return [_without_volatile_keys(v) for v in config]
    return config


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of an encoder: its config (if any) and every tensor of its state_dict.

    Two encoders with the same fingerprint produce the same embeddings, so a CTR model can
    record the fingerprint of the center it was trained with and refuse a different one.
    Config keys that do not change the computation (library version, load path,
    ``architectures``, ``auto_map``, output flags) are left out, so an encoder fingerprints the
    same before ``save_pretrained`` and after ``from_pretrained``.
    Returns ``"sha256:<64 hex chars>"``.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config_dict = _without_volatile_keys(config.to_dict())
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode("utf-8"))
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


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
