"""Configuration of the MIM content encoder (Stage 1 / Stage 2 item encoder).

Self-contained: imports only ``transformers`` so it can be uploaded as Hub remote code.
"""

import math

import transformers
from transformers import AutoConfig, PreTrainedConfig

try:  # SubConfigSpec arrived in transformers 5.20; as Hub remote code this file meets any version
    from transformers.configuration_utils import SubConfigSpec
except ImportError as error:
    raise ImportError(
        f"MIMContentEncoderConfig needs transformers >= 5.20 (for SubConfigSpec); this environment has "
        f"transformers {transformers.__version__}: pip install -U 'transformers>=5.20'"
    ) from error

# LoRA target sub-module names per tower architecture (``model_type`` of the tower config).
# These are the attention query/value projections (or the MLP for ConvNeXt, which has no
# attention), the usual LoRA targets for each family.
DEFAULT_LORA_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "clip_text_model": ["q_proj", "v_proj"],
    "clip_vision_model": ["q_proj", "v_proj"],
    "siglip_text_model": ["q_proj", "v_proj"],
    "siglip_vision_model": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],  # transformers 5 names ViT-family attention projections q_proj/v_proj
    "deit": ["q_proj", "v_proj"],
    "dinov2": ["q_proj", "v_proj"],
    "convnext": ["pwconv1", "pwconv2"],
    "convnextv2": ["pwconv1", "pwconv2"],
}

FUSION_TYPES = ("gated", "mean")
TEXT_POOLING_TYPES = ("mean", "cls", "pooler")
VISION_POOLING_TYPES = ("pooler", "mean")


def default_lora_target_modules(model_type: str) -> list[str] | None:
    """Return the default LoRA target module names for a tower ``model_type`` (None if unknown)."""
    targets = DEFAULT_LORA_TARGET_MODULES.get(model_type)
    return list(targets) if targets is not None else None


class MIMContentEncoderConfig(PreTrainedConfig):
    r"""Configuration of [`MIMContentEncoder`]: a text tower, an optional vision tower, one
    projection per tower into a shared ``embed_dim`` and a fusion into one item embedding.

    Args:
        text_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the text tower (any transformers text encoder); a dict must carry its
            ``model_type`` (defaults to a BERT config when omitted).
        vision_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the vision tower (CLIP/SigLIP vision, ViT, ConvNeXt, ...); ``None`` for a
            text-only encoder.
        embed_dim (`int`, defaults to 256):
            Size of the shared content-embedding space all levels are projected to.
        fusion_type (`str`, defaults to `"gated"`):
            How text and image embeddings become the item embedding: ``"gated"`` (a learned
            per-dimension sigmoid gate over both) or ``"mean"`` (their average). Items without an
            image fall back to the text embedding.
        text_pooling (`str`, defaults to `"mean"`):
            Text tower pooling: ``"mean"`` (attention-masked mean of token states), ``"cls"``
            (first token) or ``"pooler"`` (the tower's ``pooler_output``).
        vision_pooling (`str`, defaults to `"pooler"`):
            Vision tower pooling: ``"pooler"`` uses ``pooler_output`` when the tower returns one
            (CLIP/SigLIP/ViT/ConvNeXt pooled output) else the mean of ``last_hidden_state``;
            ``"mean"`` always averages ``last_hidden_state`` (over tokens, or over H, W for
            convolutional feature maps).
        projection_dropout (`float`, defaults to 0.0):
            Dropout applied to pooled tower outputs before projection (a source of noise views).
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialiser of projection and fusion weights.
        lora_r (`int`, defaults to 8):
            LoRA rank applied to both towers.
        lora_alpha (`int`, defaults to 16):
            LoRA scaling numerator (update scaled by ``lora_alpha / lora_r``).
        lora_dropout (`float`, defaults to 0.05):
            Dropout on the LoRA input path.
        lora_text_target_modules (`list[str]`, *optional*):
            Text-tower module names LoRA adapts; ``None`` = the default for the tower's
            architecture (e.g. ``query``/``value`` for BERT-like towers).
        lora_vision_target_modules (`list[str]`, *optional*):
            Vision-tower module names LoRA adapts; ``None`` = the architecture default
            (``q_proj``/``v_proj`` for CLIP/SigLIP, ``query``/``value`` for ViT,
            ``pwconv1``/``pwconv2`` for ConvNeXt).
    """

    model_type = "mim_content_encoder"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True),
    }

    text_config: PreTrainedConfig | dict | None = None
    vision_config: PreTrainedConfig | dict | None = None
    embed_dim: int = 256
    fusion_type: str = "gated"
    text_pooling: str = "mean"
    vision_pooling: str = "pooler"
    projection_dropout: float | int = 0.0
    initializer_range: float = 0.02
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float | int = 0.05
    lora_text_target_modules: list[str] | None = None
    lora_vision_target_modules: list[str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name, value, allowed in (
            ("fusion_type", self.fusion_type, FUSION_TYPES),
            ("text_pooling", self.text_pooling, TEXT_POOLING_TYPES),
            ("vision_pooling", self.vision_pooling, VISION_POOLING_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; expected one of {allowed}")
        for name in ("embed_dim", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, low, high in (("projection_dropout", 0.0, 1.0), ("lora_dropout", 0.0, 1.0),
                                ("initializer_range", 0.0, math.inf), ("lora_alpha", 0.0, math.inf)):
            value = getattr(self, name)
            # NaN fails both comparisons, so it is refused too.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
                raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")
        for name in ("lora_text_target_modules", "lora_vision_target_modules"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or not all(isinstance(m, str) for m in value)):
                raise ValueError(f"{name} must be a list of module names (str) or None, got {value!r}")
        # Resolve architecture defaults now so config.json records the modules actually adapted.
        if self.lora_text_target_modules is None:
            self.lora_text_target_modules = default_lora_target_modules(self.text_config.model_type)
        if self.vision_config is not None and self.lora_vision_target_modules is None:
            self.lora_vision_target_modules = default_lora_target_modules(self.vision_config.model_type)


MIMContentEncoderConfig.register_for_auto_class("AutoConfig")

__all__ = ["MIMContentEncoderConfig", "DEFAULT_LORA_TARGET_MODULES", "default_lora_target_modules"]
