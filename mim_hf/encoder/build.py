"""Build a content encoder + processor from tower names, resolving known ids to offline copies.

Id resolution lives here, not in ``modeling/``: the modeling files are Hub remote code and
may import only torch/transformers, and they should behave the same wherever they run.
"""

from __future__ import annotations

import os

from mim_hf.common.offline import OFFLINE_MODEL_PACKAGES, resolve_model_path
from mim_hf.encoder.lora import apply_lora
from mim_hf.modeling.modeling_mim_encoder import MIMContentEncoder
from mim_hf.modeling.processing_mim_encoder import MIMContentProcessor, has_saved_processor


def build_content_encoder(
    text_model="sentence-transformers/all-MiniLM-L6-v2",
    vision_model=None,
    embed_dim: int = 256,
    lora: bool = True,
    **config_kwargs,
) -> MIMContentEncoder:
    """Pretrained towers (ids, paths or loaded models) -> ``MIMContentEncoder`` with new
    projections/fusion and, if ``lora``, LoRA on both towers (base weights frozen).
    ``config_kwargs`` are ``MIMContentEncoderConfig`` fields (fusion_type, lora_r, ...).

    When both towers are given as ids/paths, ``encoder.processor`` is their default processor
    (:func:`build_content_processor`; replace it to change settings such as ``max_length``): it is
    saved with the encoder and used by ``encoder.encode``. Loaded tower objects leave it None."""
    def resolve(tower):
        return resolve_model_path(tower) if isinstance(tower, (str, os.PathLike)) else tower

    encoder = MIMContentEncoder.from_towers(resolve(text_model), resolve(vision_model), embed_dim=embed_dim,
                                            **config_kwargs)
    if all(tower is None or isinstance(tower, (str, os.PathLike)) for tower in (text_model, vision_model)):
        encoder.processor = build_content_processor(text_model, vision_model)
    return apply_lora(encoder) if lora else encoder


def build_content_processor(
    text_model="sentence-transformers/all-MiniLM-L6-v2", vision_model=None, **processor_kwargs
) -> MIMContentProcessor:
    """Tokenizer of ``text_model`` (+ image processor of ``vision_model``) -> ``MIMContentProcessor``."""
    vision_path = resolve_model_path(vision_model) if vision_model is not None else None
    return MIMContentProcessor.from_pretrained(resolve_model_path(text_model), vision_path, **processor_kwargs)


def load_encoder_and_processor(encoder_dir: str | os.PathLike):
    """A folder written by ``encoder.save_pretrained`` (LoRA merged; the processor is saved with it)
    -> (encoder in eval mode, its processor). A folder without either is a one-line ``ValueError``."""
    folder = str(encoder_dir)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{folder}: not a saved encoder folder (no config.json); pass the folder written "
                         "by encoder.save_pretrained(...) after merging LoRA")
    if not has_saved_processor(folder):
        raise ValueError(f"{folder}: the encoder's processor is missing (no tokenizer_config.json + "
                         "processor_config.json); add it with build_content_processor('<text model>').save_pretrained"
                         f"({folder!r}), or set encoder.processor before encoder.save_pretrained")
    encoder = MIMContentEncoder.from_pretrained(folder)
    return encoder.eval(), encoder.processor


__all__ = ["build_content_encoder", "build_content_processor", "load_encoder_and_processor", "resolve_model_path",
           "OFFLINE_MODEL_PACKAGES"]
