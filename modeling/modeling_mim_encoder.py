"""MIM content encoder: text tower (+ optional vision tower) -> projections -> fusion.

Self-contained: imports only ``torch`` and ``transformers`` so it can be uploaded as Hub
remote code. LoRA (peft) is applied from outside (``mim_hf.encoder.lora``).
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_mim_encoder import MIMContentEncoderConfig
from .processing_mim_encoder import MIMContentProcessor, has_saved_processor, rows_to_records

logger = logging.get_logger(__name__)

ENCODER_LEVELS = ("item_embeds", "text_embeds", "image_embeds")


def tower_output_dim(tower_config: PreTrainedConfig) -> int:
    """Width of a tower's pooled output, read from its config.

    ConvNeXt-style configs carry per-stage ``hidden_sizes`` (the last stage is the output);
    transformer towers carry ``hidden_size``.
    """
    hidden_sizes = getattr(tower_config, "hidden_sizes", None)
    if hidden_sizes:
        return int(hidden_sizes[-1])
    hidden_size = getattr(tower_config, "hidden_size", None)
    if hidden_size is None:
        raise ValueError(
            f"cannot tell the output width of tower config {type(tower_config).__name__} "
            "(no `hidden_size` or `hidden_sizes`)"
        )
    return int(hidden_size)


def has_injected_adapters(module: nn.Module) -> bool:
    """True if peft LoRA layers were injected into ``module`` (they wrap a ``base_layer``)."""
    return any(hasattr(sub, "base_layer") and hasattr(sub, "lora_A") for sub in module.modules())


@dataclass
class MIMContentEncoderOutput(ModelOutput):
    """Output of [`MIMContentEncoder`].

    Args:
        text_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`):
            L2-normalised projection of the pooled text-tower output.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`, *optional*):
            L2-normalised projection of the pooled vision-tower output; rows whose
            ``image_mask`` is False are zeros. ``None`` when no ``pixel_values`` were given.
        item_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`):
            L2-normalised fused item embedding; equals ``text_embeds`` for rows without image.
        image_mask (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            Which rows had an image (all False when no ``pixel_values`` were given).
    """

    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    item_embeds: torch.FloatTensor | None = None
    image_mask: torch.BoolTensor | None = None


class MIMGatedFusion(nn.Module):
    """Per-dimension gate ``g = sigmoid(W [t; v] + b)``; fused = ``g * t + (1 - g) * v``.

    Input: text and image embeddings (B, D) each; output (B, D) (not normalised).
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * embed_dim, embed_dim)

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(torch.cat([text_embeds, image_embeds], dim=-1)))
        return gate * text_embeds + (1.0 - gate) * image_embeds


class MIMMeanFusion(nn.Module):
    """Average of text and image embeddings (B, D) -> (B, D); no parameters."""

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return 0.5 * (text_embeds + image_embeds)


class MIMContentEncoderPreTrainedModel(PreTrainedModel):
    config_class = MIMContentEncoderConfig
    base_model_prefix = "mim_content_encoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # Towers initialise themselves (their own _init_weights); we only own projections/fusion.
        if isinstance(module, MIMContentEncoder):
            std = self.config.initializer_range
            for projection in (module.text_projection, module.vision_projection):
                if projection is not None:
                    nn.init.normal_(projection.weight, mean=0.0, std=std)
            if isinstance(module.fusion, MIMGatedFusion):
                nn.init.normal_(module.fusion.gate.weight, mean=0.0, std=std)
                nn.init.zeros_(module.fusion.gate.bias)


class MIMContentEncoder(MIMContentEncoderPreTrainedModel):
    """Encode items (text, optional image) into L2-normalised content embeddings.

    Inputs (see :meth:`forward`): token ids (B, L) and optionally pixel values (B, C, H, W)
    with a per-row ``image_mask`` (B,). Outputs a [`MIMContentEncoderOutput`] with text,
    image and fused item embeddings, each (B, embed_dim).
    """

    def __init__(
        self,
        config: MIMContentEncoderConfig,
        text_model: PreTrainedModel | None = None,
        vision_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.text_model = text_model if text_model is not None else AutoModel.from_config(config.text_config)
        if config.vision_config is None and vision_model is not None:
            raise ValueError("a vision_model was given but config.vision_config is None; set vision_config")
        if config.vision_config is not None:
            self.vision_model = (
                vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
            )
        else:
            self.vision_model = None

        text_dim = self._checked_tower_dim("text", self.text_model, config.text_config)
        self.text_projection = nn.Linear(text_dim, config.embed_dim, bias=False)
        if self.vision_model is not None:
            vision_dim = self._checked_tower_dim("vision", self.vision_model, config.vision_config)
            self.vision_projection = nn.Linear(vision_dim, config.embed_dim, bias=False)
            self.fusion = MIMGatedFusion(config.embed_dim) if config.fusion_type == "gated" else MIMMeanFusion()
        else:
            self.vision_projection = None
            self.fusion = None
        self.projection_dropout = nn.Dropout(config.projection_dropout)
        # The item-row -> inputs recipe (not a module): saved with the model, loaded with it, used by encode().
        self.processor: MIMContentProcessor | None = None
        self.post_init()

    @staticmethod
    def _checked_tower_dim(name: str, tower: nn.Module, tower_config: PreTrainedConfig) -> int:
        """Output width of a tower; a tower whose own config disagrees with ours is an error."""
        expected = tower_output_dim(tower_config)
        actual_config = getattr(tower, "config", None)
        if actual_config is not None:
            actual = tower_output_dim(actual_config)
            if actual != expected:
                raise ValueError(
                    f"{name} tower outputs width {actual} ({type(tower).__name__}) but "
                    f"config.{name}_config says {expected}; build the config from the tower's config"
                )
        return expected

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` reading safetensors weights only, plus the processor.

        ``use_safetensors`` defaults to True here, so a pickle-based ``pytorch_model.bin`` is never
        opened (a local folder holding only such files is a ``ValueError``); pass
        ``use_safetensors=False`` to opt out. A local folder that holds a saved processor gives
        ``model.processor`` (else it stays None). Everything else is ``PreTrainedModel.from_pretrained``.
        """
        kwargs.setdefault("use_safetensors", True)
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if kwargs["use_safetensors"] and os.path.isdir(folder):
            names = os.listdir(folder)
            if not any(name.endswith((".safetensors", ".safetensors.index.json")) for name in names):
                pickled = sorted(name for name in names if name.endswith((".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".pkl")))
                if pickled:
                    raise ValueError(
                        f"{folder} holds weights only as {pickled} (pickle), which are not loaded; expected "
                        "model.safetensors (re-save with save_pretrained, or pass use_safetensors=False if you trust the file)"
                    )
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if has_saved_processor(folder):  # a local folder written with its processor
            model.processor = MIMContentProcessor.from_pretrained(folder)
        return model

    @classmethod
    def from_towers(
        cls,
        text_model: str | os.PathLike | PreTrainedModel,
        vision_model: str | os.PathLike | PreTrainedModel | None = None,
        embed_dim: int = 256,
        tower_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "MIMContentEncoder":
        """Build an encoder around pretrained towers (new projections/fusion, towers kept).

        Args:
            text_model: a local path / Hub id loadable by ``AutoModel.from_pretrained``, or a
                loaded text ``PreTrainedModel``.
            vision_model: same for a vision-only model (e.g. ``CLIPVisionModel``, ``ViTModel``,
                ``ConvNextModel``), or None for a text-only encoder.
            embed_dim: shared embedding size.
            tower_kwargs: extra kwargs for ``AutoModel.from_pretrained`` of string towers
                (``trust_remote_code`` defaults to False: a tower's remote code runs only if you pass True).
            **config_kwargs: other [`MIMContentEncoderConfig`] fields (fusion_type, lora_r, ...).
        Returns:
            a `MIMContentEncoder` whose config embeds both towers' configs.
        LoRA is not applied here (modeling files import only torch/transformers): use
        ``mim_hf.encoder.build.build_content_encoder`` or ``mim_hf.encoder.lora.apply_lora``.
        """
        tower_kwargs = {"trust_remote_code": False, **(tower_kwargs or {})}

        def load(tower):
            if tower is None or isinstance(tower, PreTrainedModel):
                return tower
            if isinstance(tower, (str, os.PathLike)):
                return AutoModel.from_pretrained(tower, **tower_kwargs)
            raise TypeError(f"tower must be a path/id or a PreTrainedModel, got {type(tower).__name__}")

        text_tower, vision_tower = load(text_model), load(vision_model)
        config = MIMContentEncoderConfig(
            text_config=text_tower.config.to_dict(),
            vision_config=vision_tower.config.to_dict() if vision_tower is not None else None,
            embed_dim=embed_dim,
            **config_kwargs,
        )
        return cls(config, text_model=text_tower, vision_model=vision_tower)

    def _pool_text(self, tower_output, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool text tower output to (B, H) according to ``config.text_pooling``."""
        if self.config.text_pooling == "pooler":
            pooled = getattr(tower_output, "pooler_output", None)
            if pooled is None:
                raise ValueError("text_pooling='pooler' but the text tower returns no pooler_output")
            return pooled
        hidden = tower_output.last_hidden_state
        if self.config.text_pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def _pool_vision(self, tower_output) -> torch.Tensor:
        """Pool vision tower output to (B, H) according to ``config.vision_pooling``."""
        pooled = getattr(tower_output, "pooler_output", None)
        if self.config.vision_pooling == "pooler" and pooled is not None:
            # Some towers return (B, C, 1, 1) pooled maps.
            return pooled.flatten(1)
        hidden = tower_output.last_hidden_state
        # Convolutional towers return (B, C, H, W) maps; transformer towers (B, T, H).
        return hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1)

    @staticmethod
    def _check_width(name: str, pooled: torch.Tensor, projection: nn.Linear) -> None:
        if pooled.shape[-1] != projection.in_features:
            raise ValueError(
                f"{name} tower returned width {pooled.shape[-1]} but the {name} projection expects "
                f"{projection.in_features}; the tower does not match config.{name}_config"
            )

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, pixel_values, image_mask) -> None:
        """Shapes, dtypes and value ranges of ``forward``'s inputs, checked before any tower runs so a
        bad batch is a ``ValueError``/``TypeError`` naming the input, not an index error deep in torch."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape (batch_size >= 1, seq_len >= 1), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        vocab_size = getattr(self.config.text_config, "vocab_size", None)
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            raise ValueError(f"input_ids hold ids in [{low}, {high}]; expected 0 <= id < vocab_size={vocab_size} "
                             "(is the tokenizer the text tower's?)")
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(input_ids.shape)):
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"{name} must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got {shape}")
        if token_type_ids is not None:
            type_vocab_size = getattr(self.config.text_config, "type_vocab_size", None)
            if int(token_type_ids.min()) < 0 or (type_vocab_size is not None and int(token_type_ids.max()) >= type_vocab_size):
                raise ValueError(f"token_type_ids must lie in [0, {type_vocab_size}), got values in "
                                 f"[{int(token_type_ids.min())}, {int(token_type_ids.max())}]")
        if pixel_values is None:
            if image_mask is not None and bool(torch.as_tensor(image_mask).any()):
                raise ValueError("image_mask marks rows with an image but no pixel_values were given")
            return
        if self.vision_model is None:
            raise ValueError("pixel_values given but this encoder has no vision tower (config.vision_config is None)")
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            raise TypeError("pixel_values must be a floating-point tensor (B, C, H, W), got "
                            f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have shape (B, C, H, W), got {tuple(pixel_values.shape)}")
        channels = getattr(self.config.vision_config, "num_channels", None)
        if channels is not None and pixel_values.shape[1] != channels:
            raise ValueError(f"pixel_values have {pixel_values.shape[1]} channels; the vision tower expects {channels}")
        if not bool(torch.isfinite(pixel_values).all()):
            row = int((~torch.isfinite(pixel_values)).flatten(1).any(dim=1).nonzero()[0])
            raise ValueError(f"pixel_values row {row} holds NaN or inf; expected finite pixel values")

    def pool_text(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
    ) -> torch.FloatTensor:
        """Token ids (B, L) -> pooled text-tower output (B, H), what ``forward(text_pooled=...)`` takes."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tower_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            tower_inputs["token_type_ids"] = token_type_ids
        return self._pool_text(self.text_model(**tower_inputs, return_dict=True), attention_mask)

    def pool_image(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Pixel values (B, C, H, W) -> pooled vision-tower output (B, H): what the vision projection reads."""
        if self.vision_model is None:
            raise ValueError("pixel_values given but this encoder has no vision tower (config.vision_config is None)")
        return self._pool_vision(self.vision_model(pixel_values=pixel_values, return_dict=True))

    def project_text(self, pooled: torch.FloatTensor) -> torch.FloatTensor:
        """Pooled text output (B, H) -> unnormalised text embeddings (B, embed_dim)."""
        self._check_width("text", pooled, self.text_projection)
        return self.text_projection(self.projection_dropout(pooled))

    def project_image(self, pooled: torch.FloatTensor) -> torch.FloatTensor:
        """Pooled vision output (B, H) -> unnormalised image embeddings (B, embed_dim)."""
        if self.vision_projection is None:
            raise ValueError("image input given but this encoder has no vision tower (config.vision_config is None)")
        self._check_width("vision", pooled, self.vision_projection)
        return self.vision_projection(self.projection_dropout(pooled))

    def encode_text(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
    ) -> torch.FloatTensor:
        """Token ids (B, L) -> unnormalised projected text embeddings (B, embed_dim)."""
        return self.project_text(self.pool_text(input_ids, attention_mask, token_type_ids))

    def encode_image(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Pixel values (B, C, H, W) -> unnormalised projected image embeddings (B, embed_dim)."""
        return self.project_image(self.pool_image(pixel_values))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_mask: torch.BoolTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        return_dict: bool | None = True,
        text_pooled: torch.FloatTensor | None = None,
        image_pooled: torch.FloatTensor | None = None,
    ) -> MIMContentEncoderOutput | tuple:
        """Encode a batch of items.

        Args:
            input_ids: (B, L) token ids of the item text.
            attention_mask: (B, L) 1 for real tokens (all ones if None).
            pixel_values: (B, C, H, W) images, or None for text only. Rows without an image may
                hold anything (e.g. zeros): the vision tower only sees rows with ``image_mask``.
            image_mask: (B,) bool, True where the item has an image (all True if None while
                ``pixel_values`` is given).
            token_type_ids: (B, L) optional segment ids for BERT-like towers.
            return_dict: return a `MIMContentEncoderOutput` (else a tuple of its fields).
            text_pooled: (B, H) precomputed ``pool_text`` outputs instead of ``input_ids`` (the
                towers do not run: a cache of frozen towers).
            image_pooled: with ``text_pooled``: (number of True in ``image_mask``, H) precomputed
                ``pool_image`` outputs of the rows that have an image, or None for text only.
        Returns:
            `MIMContentEncoderOutput` with text_embeds, image_embeds (None without pixels),
            item_embeds, all (B, embed_dim) and L2-normalised, and image_mask (B,).
        """
        if text_pooled is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids (or text_pooled, precomputed pooled tower outputs)")
            if image_pooled is not None:
                raise ValueError("image_pooled is only read together with text_pooled")
            self._check_inputs(input_ids, attention_mask, token_type_ids, pixel_values, image_mask)
        elif input_ids is not None or pixel_values is not None:
            raise ValueError("give either token ids / pixel_values or text_pooled / image_pooled, not both")
        reference = input_ids if text_pooled is None else text_pooled
        batch_size, device = reference.shape[0], reference.device
        if text_pooled is None:
            text_pooled = self.pool_text(input_ids, attention_mask, token_type_ids)
        text_embeds = nn.functional.normalize(self.project_text(text_pooled), dim=-1)

        image_embeds = None
        if pixel_values is None and image_pooled is None:
            image_mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
            item_embeds = text_embeds
        else:
            if pixel_values is not None and pixel_values.shape[0] != batch_size:
                raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but input_ids has {batch_size}")
            if image_mask is None:
                image_mask = torch.ones(batch_size, dtype=torch.bool, device=device)
            image_mask = image_mask.to(device=device, dtype=torch.bool)
            if image_mask.shape != (batch_size,):
                raise ValueError(f"image_mask must have shape ({batch_size},), got {tuple(image_mask.shape)}")
            if image_pooled is not None and image_pooled.shape[0] != int(image_mask.sum()):
                raise ValueError(f"image_pooled has {image_pooled.shape[0]} rows but image_mask marks "
                                 f"{int(image_mask.sum())} rows with an image")
            image_embeds = text_embeds.new_zeros(batch_size, self.config.embed_dim)
            item_embeds = text_embeds
            if bool(image_mask.any()):
                # Run the vision tower only on rows that have an image; others keep zeros.
                if image_pooled is None:
                    image_pooled = self.pool_image(pixel_values[image_mask])
                present = nn.functional.normalize(self.project_image(image_pooled), dim=-1)
                image_embeds = image_embeds.index_put((image_mask.nonzero(as_tuple=True)[0],), present)
                fused = nn.functional.normalize(self.fusion(text_embeds[image_mask], present), dim=-1)
                item_embeds = text_embeds.index_put((image_mask.nonzero(as_tuple=True)[0],), fused)

        output = MIMContentEncoderOutput(
            text_embeds=text_embeds, image_embeds=image_embeds, item_embeds=item_embeds, image_mask=image_mask
        )
        return output if return_dict is not False else output.to_tuple()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save config + weights (+ the remote-code files via ``auto_map``) and ``self.processor``.

        The processor (tokenizer, image processor, ``processor_config.json``) is what turns item rows
        into inputs, so it travels with the weights: ``mim-hf center build``, ``encode()`` and
        ``AutoProcessor.from_pretrained(dir, trust_remote_code=True)`` need it. Without one (an
        encoder built from configs) a warning says how to add it.

        Refuses while peft LoRA layers are injected: their weights would not load into plain
        towers. Merge them first (``mim_hf.encoder.lora.merge_adapters``) or save the adapters alone
        (``mim_hf.encoder.lora.save_adapters``).
        """
        if has_injected_adapters(self):
            raise ValueError(
                "this encoder still holds injected LoRA layers; call mim_hf.encoder.lora.merge_adapters(encoder) "
                "before save_pretrained, or mim_hf.encoder.lora.save_adapters(encoder, dir) to save adapters only"
            )
        # The processor first, so that save_pretrained(..., push_to_hub=True) uploads it too.
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        elif not has_saved_processor(save_directory):
            logger.warning(f"{save_directory}: saved without a processor (encoder.processor is None); set "
                           "encoder.processor = MIMContentProcessor(tokenizer, ...) before saving, or call "
                           "processor.save_pretrained on the same folder")
        super().save_pretrained(save_directory, *args, **kwargs)

    def encode(
        self,
        items_or_titles,
        batch_size: int = 32,
        show_progress_bar: bool = False,
        level: str = "item_embeds",
        processor: MIMContentProcessor | None = None,
        view: str = "full",
    ) -> torch.FloatTensor:
        """Items -> L2-normalised embeddings (N, embed_dim), float32 on CPU, in input order.

        Args:
            items_or_titles: str (a title), dict (an item row: title / attribute / image columns),
                a list of either, a dict of equal-length lists (every value a list), or a
                ``datasets.Dataset``. A single str or row gives a (embed_dim,) vector.
            batch_size: rows per forward pass.
            show_progress_bar: tqdm bar over batches.
            level: ``"item_embeds"`` (fused, default), ``"text_embeds"`` or ``"image_embeds"``
                (``"item"`` / ``"text"`` / ``"image"`` also work).
            processor: defaults to ``self.processor`` (loaded by ``from_pretrained`` from the folder).
            view: processor text view (``"full"``, ``"title"``, ``"attributes"``).
        """
        processor = processor if processor is not None else self.processor
        if processor is None:
            raise ValueError("encode() needs a processor: pass processor=..., set encoder.processor, or load the "
                             "encoder from a folder saved with its processor")
        level = f"{level}_embeds" if level in ("item", "text", "image") else level
        if isinstance(items_or_titles, Mapping):  # one row, unless every value is a list (a dict of columns)
            single = not all(isinstance(value, (list, tuple)) for value in items_or_titles.values())
        else:
            single = isinstance(items_or_titles, str)
        items = [items_or_titles] if single else items_or_titles
        if not isinstance(items, Mapping) and not hasattr(items, "column_names"):  # titles -> rows
            items = [{processor.title_field: item} if isinstance(item, str) else item for item in items]
        embeds = encode_items(self, processor, items, batch_size=batch_size, levels=(level,),
                              view=view, show_progress=show_progress_bar)[level]
        return embeds[0] if single else embeds


def _text_columns(items, processor: MIMContentProcessor) -> list[dict]:
    """Item rows without the image column (cheap to materialise for building texts)."""
    if hasattr(items, "select_columns") and hasattr(items, "column_names"):  # datasets.Dataset
        return rows_to_records(items.select_columns([c for c in items.column_names if c != processor.image_field])[:])
    return items


def _select_rows(items, indices: list[int]) -> list[dict]:
    """Rows ``indices`` of a ``datasets.Dataset`` (decodes only these rows) or a list of dicts."""
    if hasattr(items, "select") and hasattr(items, "column_names"):
        return rows_to_records(items[indices])
    return [items[i] for i in indices]


def encode_items(
    encoder: MIMContentEncoder,
    processor: MIMContentProcessor,
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

    All texts are built and tokenised once (one fast-tokenizer call); rows are batched by token
    length (less padding) and each batch is padded to its longest row (``tokenizer.pad``); runs
    under ``torch.inference_mode`` in eval mode (the encoder's mode is restored afterwards).

    Args:
        encoder: a ``MIMContentEncoder`` (LoRA merged or not).
        processor: its ``MIMContentProcessor``.
        items: ``datasets.Dataset``, dict of equal-length lists, or sequence of dicts with the
            processor's title / attribute / image columns. N rows.
        batch_size: rows per forward pass.
        levels: which outputs to return, from ``ENCODER_LEVELS``; ``"image_embeds"`` needs a vision tower.
        view: processor text view ("full", "title", "attributes").
        sort_by_length: batch rows of similar token length together; the output order is the input order either way.
        show_progress: tqdm progress bar over batches.
        device: where to run (default: the encoder's device).
    Returns:
        ``{level: FloatTensor (N, embed_dim)}`` on CPU, float32, L2-normalised rows; with
        ``"image_embeds"`` also ``"image_mask"``: BoolTensor (N,) (rows without image are zeros).
    """
    unknown = [level for level in levels if level not in ENCODER_LEVELS]
    if unknown or not levels:
        raise ValueError(f"levels {list(levels)!r} invalid; choose from {ENCODER_LEVELS}")
    if "image_embeds" in levels and getattr(encoder, "vision_model", None) is None:
        raise ValueError("level 'image_embeds' requested but the encoder has no vision tower")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(items, Mapping) and not hasattr(items, "__len__"):
        items = list(items)
    if isinstance(items, Mapping):
        items = rows_to_records(items)
    n_items = len(items)
    results = {level: torch.zeros(n_items, encoder.config.embed_dim, dtype=torch.float32) for level in levels}
    if "image_embeds" in levels:
        results["image_mask"] = torch.zeros(n_items, dtype=torch.bool)
    if n_items == 0:
        return results
    device = torch.device(device) if device is not None else encoder.device
    if torch.device(encoder.device).type != device.type:
        raise ValueError(f"device {device} but the encoder is on {encoder.device}; move it first (encoder.to(device))")

    # One fast-tokenizer call for the whole catalogue (counts empty titles / truncations once).
    tokenized = processor.tokenize(processor.build_texts(_text_columns(items, processor), view=view),
                                   padding=False, return_tensors=None)
    order = list(range(n_items))
    if sort_by_length:
        order.sort(key=lambda i: len(tokenized["input_ids"][i]), reverse=True)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            starts = range(0, n_items, batch_size)
            for start in logging.tqdm(starts, disable=not show_progress, desc="encoding items", unit="batch"):
                batch_indices = order[start : start + batch_size]
                inputs = dict(processor.tokenizer.pad(
                    {key: [values[i] for i in batch_indices] for key, values in tokenized.items()}, return_tensors="pt"))
                if processor.image_processor is not None:
                    rows = _select_rows(items, batch_indices)
                    pixel_values, inputs["image_mask"] = processor.process_images([r.get(processor.image_field) for r in rows])
                    if pixel_values is not None:
                        inputs["pixel_values"] = pixel_values
                output = encoder(**{key: value.to(device) for key, value in inputs.items()}, return_dict=True)
                index = torch.tensor(batch_indices, dtype=torch.long)
                for level in levels:
                    values = getattr(output, level)
                    if values is not None:  # None: no image in this batch -> rows stay zero
                        results[level][index] = values.float().cpu()
                if "image_mask" in results:
                    results["image_mask"][index] = output.image_mask.cpu()
    finally:
        encoder.train(was_training)
    return results


MIMContentEncoder.register_for_auto_class("AutoModel")

__all__ = [
    "ENCODER_LEVELS",
    "encode_items",
    "MIMContentEncoder",
    "MIMContentEncoderOutput",
    "MIMContentEncoderPreTrainedModel",
    "tower_output_dim",
    "has_injected_adapters",
]
