"""Encoder fingerprint: a content hash of what defines an encoder's outputs.

A center records the fingerprint of the encoder that built it; ``upsert`` and CTR loading
compare fingerprints to refuse embeddings from another encoder.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import torch

from mim_hf.modeling.modeling_mim_encoder import has_injected_adapters

# Config keys that change on save/load, with the library version or with training settings, but
# not what the encoder computes (weights' dtype is hashed with the weights themselves). The LoRA
# settings describe how an encoder was trained: once merged, two encoders with equal weights
# compute the same whatever rank trained them.
VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "_commit_hash", "architectures", "auto_map", "dtype",
    "torch_dtype", "return_dict", "output_hidden_states", "output_attentions", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "_experts_implementation",
    "lora_r", "lora_alpha", "lora_dropout", "lora_text_target_modules", "lora_vision_target_modules",
})


def _without_volatile_keys(config: Any) -> Any:
    if isinstance(config, dict):
        return {str(k): _without_volatile_keys(v) for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    if isinstance(config, (list, tuple)):
        return [_without_volatile_keys(v) for v in config]
    return config


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of an encoder: its config (if any, minus ``VOLATILE_CONFIG_KEYS``) and every
    tensor of its state_dict, taken as the merged encoder's when LoRA layers are injected.

    Two encoders with the same fingerprint produce the same embeddings, so a CTR model can
    record the fingerprint of the center it was trained with and refuse a different one. It is
    the same before ``save_pretrained`` and after ``from_pretrained``, and before and after
    ``merge_adapters`` (a center built while LoRA is injected accepts the saved merged encoder).
    Returns ``"sha256:<64 hex chars>"``.
    """
    if has_injected_adapters(model):
        from mim_hf.encoder.lora import merge_adapters

        model = merge_adapters(copy.deepcopy(model))  # the same merge as before a save, on a copy
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


__all__ = ["encoder_fingerprint", "VOLATILE_CONFIG_KEYS"]
