"""Cached towers for C-SFT (``cached_towers: true``): the frozen towers run once over the catalogue.

With the towers frozen (no LoRA), an item's pooled tower outputs -- what the projections read
(``MIMContentEncoder.pool_text`` / ``pool_image``) -- never change during training. They are
computed once for every catalogue row (eval mode, no grad, in batches of the same processor
inputs the uncached loop feeds the encoder) and kept in memory; each step then gathers the
batch's rows and runs only the projections and fusion (``encoder(text_pooled=..., image_pooled=...)``),
so a full epoch over all training pairs takes seconds on a CPU.

The cache is saved as safetensors with two fingerprints in its metadata: ``towers`` (the tower
weights and pooling settings) and ``catalogue`` (item ids, their text columns, image bytes and
the processor's settings). A run that finds a cache file reuses it only when both match;
otherwise :func:`load_or_build` raises a ``ValueError`` naming which one differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CACHE_NAME = "tower_cache.safetensors"


def _digest(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()


def towers_fingerprint(encoder) -> str:
    """Hash of the tower weights/configs and the pooling settings (what the pooled outputs depend on)."""
    from mim_hf.encoder.fingerprint import encoder_fingerprint

    towers = [encoder_fingerprint(tower) for tower in (encoder.text_model, encoder.vision_model) if tower is not None]
    return _digest(towers, encoder.config.text_pooling, encoder.config.vision_pooling)


def catalogue_fingerprint(items, records: list[dict], processor) -> str:
    """Hash of the catalogue as the processor reads it: item ids, text columns, image bytes, settings."""
    from datasets import Image

    parts = [list(map(str, items["item_id"])), records, processor.to_dict(),
             processor.tokenizer.name_or_path, len(processor.tokenizer)]
    if processor.image_processor is not None:
        parts.append(processor.image_processor.to_dict())
        if processor.image_field in items.column_names:
            raw = items.select_columns([processor.image_field]).cast_column(processor.image_field, Image(decode=False))
            parts.append(b"".join((value or {}).get("bytes") or str((value or {}).get("path")).encode()
                                  for value in raw[processor.image_field]))
    return _digest(*parts)


class TowerCache:
    """Pooled tower outputs of every catalogue row.

    ``text``: (N, H_text) float32; ``image``: (N, H_vision) (zeros where ``image_mask`` is False)
    or None for a text-only encoder; ``image_mask``: (N,) bool or None.
    """

    def __init__(self, text: torch.Tensor, image: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                 fingerprints: dict[str, str] | None = None):
        self.text, self.image, self.image_mask = text, image, image_mask
        self.fingerprints = dict(fingerprints or {})

    def __len__(self) -> int:
        return int(self.text.shape[0])

    @classmethod
    @torch.no_grad()
    def build(cls, encoder, encoder_inputs, num_rows: int, batch_size: int, device) -> "TowerCache":
        """Run the towers once: ``encoder_inputs(rows)`` gives the processor output for catalogue
        ``rows`` (``PairBatches.encoder_inputs``); eval mode, no grad, ``batch_size`` rows at a time."""
        was_training = encoder.training
        encoder.eval()
        text, image, image_mask = [], [], []
        try:
            for start in range(0, num_rows, batch_size):
                inputs = {k: v.to(device) for k, v in encoder_inputs(torch.arange(start, min(start + batch_size, num_rows))).items()}
                text.append(encoder.pool_text(inputs["input_ids"], inputs.get("attention_mask"),
                                              inputs.get("token_type_ids")).float().cpu())
                if encoder.vision_model is not None:
                    mask = inputs["image_mask"].bool()
                    rows = torch.zeros(len(mask), encoder.vision_projection.in_features)
                    if "pixel_values" in inputs and bool(mask.any()):
                        rows[mask.cpu()] = encoder.pool_image(inputs["pixel_values"][mask]).float().cpu()
                    image.append(rows)
                    image_mask.append(mask.cpu())
        finally:
            encoder.train(was_training)
        if encoder.vision_model is None:
            return cls(torch.cat(text))
        return cls(torch.cat(text), torch.cat(image), torch.cat(image_mask))

    def inputs(self, rows: torch.Tensor, device) -> dict:
        """Forward kwargs (``text_pooled``, and ``image_pooled`` + ``image_mask`` with images) for ``rows``."""
        inputs = {"text_pooled": self.text[rows].to(device)}
        if self.image is not None:
            mask = self.image_mask[rows]
            inputs["image_mask"] = mask.to(device)
            if bool(mask.any()):
                inputs["image_pooled"] = self.image[rows][mask].to(device)
        return inputs

    @torch.no_grad()
    def embed(self, encoder, batch_size: int, device, level: str = "item_embeds") -> torch.Tensor:
        """(N, embed_dim) float32 CPU embeddings of every catalogue row from the heads alone (eval mode)."""
        was_training = encoder.training
        encoder.eval()
        try:
            out = [getattr(encoder(**self.inputs(torch.arange(start, min(start + batch_size, len(self))), device),
                                   return_dict=True), level).float().cpu()
                   for start in range(0, len(self), batch_size)]
        finally:
            encoder.train(was_training)
        return torch.cat(out)

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache (atomically: a temporary file, then renamed) with its fingerprints."""
        tensors = {"text": self.text.contiguous()}
        if self.image is not None:
            tensors.update(image=self.image.contiguous(), image_mask=self.image_mask.to(torch.uint8).contiguous())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(tensors, str(temporary), metadata=self.fingerprints)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TowerCache":
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
        mask = tensors.get("image_mask")
        return cls(tensors["text"], tensors.get("image"), mask.bool() if mask is not None else None, metadata)


def load_or_build(path, encoder, encoder_inputs, items, records, processor, batch_size: int, device,
                  save: bool = True) -> TowerCache:
    """The cache at ``path`` when its fingerprints match this encoder and catalogue, else (no file)
    a new one built by :meth:`TowerCache.build` and, with ``save``, written there. A file made by
    another encoder or catalogue is a ``ValueError`` naming what differs."""
    expected = {"towers": towers_fingerprint(encoder), "catalogue": catalogue_fingerprint(items, records, processor)}
    path = Path(path)
    if path.is_file():
        cache = TowerCache.load(path)
        differ = [name for name in expected if cache.fingerprints.get(name) != expected[name]]
        if differ:
            described = "; ".join(f"{name}: file {cache.fingerprints.get(name)}, run {expected[name]}" for name in differ)
            raise ValueError(f"tower cache {path} was made for different {' and '.join(differ)} ({described}); "
                             "delete it (or set tower_cache_path elsewhere) to rebuild it for this run")
        if len(cache) != len(items):  # fingerprints cover the ids; a row-count mismatch means a damaged file
            raise ValueError(f"tower cache {path} has {len(cache)} rows, the catalogue {len(items)} items")
        return cache
    cache = TowerCache.build(encoder, encoder_inputs, len(items), batch_size, device)
    cache.fingerprints = expected
    if save:
        cache.save(path)
    return cache


def run_tower_cache(config, accelerator, encoder, batches, processor, items, device) -> TowerCache:
    """A C-SFT run's cache (``config.tower_cache_path`` or ``output_dir/tower_cache.safetensors``): the main
    process builds (or reuses) and saves it first, then the other processes read it."""
    with accelerator.main_process_first():
        return load_or_build(config.tower_cache_path or Path(config.output_dir) / CACHE_NAME, encoder.to(device),
                             batches.encoder_inputs, items, batches.records, processor, config.eval_batch_size, device,
                             save=accelerator.is_main_process)


__all__ = ["CACHE_NAME", "TowerCache", "catalogue_fingerprint", "load_or_build", "run_tower_cache", "towers_fingerprint"]
