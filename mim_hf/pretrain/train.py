"""Stage 1 -- pre-training the content encoder: domain adaptation + modal alignment.

Objectives (weighted terms; a weight of 0 disables the term):

* ``mlm_weight`` -- masked-language modelling on item titles through the text tower, with a
  small head (dense + GELU + LayerNorm) whose decoder is tied to the tower's word embeddings.
* ``simcse_weight`` -- dropout-noise contrastive views: two forward passes of each title in
  training mode (different dropout masks) are each other's positive (SimCSE), InfoNCE.
* ``image_text_weight`` -- CLIP-style image <-> title alignment (items that have an image).
* ``title_attributes_weight`` -- title <-> attributes alignment (processor views ``"title"``
  and ``"attributes"``), for text-only catalogues such as MovieLens.

Contrastive terms use :class:`mim_hf.csft.losses.InfoNCELoss` (symmetric, in-batch and
cross-device negatives, duplicates masked). Only training-split items are trained on; alignment
recall@K is measured on held-out items before, during and after. Output: ``encoder/`` (LoRA
merged, + processor), ``adapters/`` (``mim_hf.encoder.lora.save_adapters``), ``metrics.json``.

Checkpoints (:mod:`mim_hf.common.checkpoints`) hold the objectives module (encoder + MLM head +
temperature), AdamW, the scheduler, progress, the loss sums and the RNG states; batches come from
``(seed, epoch)`` and MLM masks from ``(seed, step)``, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mim_hf.encoder.build import build_content_encoder, resolve_model_path
from mim_hf.encoder.lora import apply_lora, merge_adapters, save_adapters, trainable_parameter_counts
from mim_hf.csft.losses import InfoNCELoss
from mim_hf.modeling.processing_mim_encoder import MIMContentProcessor
from mim_hf.common.checkpoints import restore_checkpoint, save_checkpoint, start_run
from mim_hf.common.config import config_field, write_json_atomic
from mim_hf.common.loop import EpochShuffleSampler, TrainingProgress, hold_output_dir, torch_threads, train_batches
from mim_hf.pretrain.views import CachedViews, ItemViews, alignment_recall, split_items

OBJECTIVES = ("mlm", "simcse", "image_text", "title_attributes")


@dataclasses.dataclass
class PretrainConfig:
    """Every knob of stage-1 pre-training (YAML file and/or ``--field value`` on the command line)."""

    data_dir: str = config_field("", "prepared-data directory written by PreparedData.save (mim-hf data prepare)")
    output_dir: str = config_field("runs/pretrain", "where config.json, checkpoints/, encoder/, adapters/ and metrics.json go")
    seed: int = config_field(0, "seed of initialisation, batching, masking and the evaluation hold-out")
    # ---- towers -----------------------------------------------------------------------------
    text_model: str | None = config_field(
        "sentence-transformers/all-MiniLM-L6-v2",
        "pretrained text tower (Hub id or local path; known ids resolve to offline copies); null with text_tower_config")
    text_tower_config: dict[str, Any] = config_field(
        {}, "build a randomly initialised text tower from this config instead (needs model_type; vocab_size "
            "defaults to the tokenizer's size)")
    tokenizer: str | None = config_field(None, "tokenizer source (id/path); default: text_model")
    vision_model: str | None = config_field(None, "pretrained vision tower (id/path) or null for none")
    vision_tower_config: dict[str, Any] = config_field(
        {}, "build a randomly initialised vision tower from this config instead (needs model_type)")
    image_processor_config: dict[str, Any] = config_field(
        {}, "image processor as {image_processor_type: <transformers class>, ...kwargs}; default: vision_model's")
    embed_dim: int = config_field(256, "shared content-embedding size")
    text_pooling: str = config_field("mean", "text pooling: mean, cls or pooler")
    fusion_type: str = config_field("gated", "text+image fusion: gated or mean")
    lora: bool = config_field(True, "adapt the towers with LoRA (else the towers train fully)")
    lora_r: int = config_field(8, "LoRA rank")
    lora_alpha: int = config_field(16, "LoRA scaling numerator")
    lora_dropout: float = config_field(0.05, "dropout on the LoRA input path")
    lora_text_target_modules: list[str] = config_field([], "text-tower modules LoRA adapts; [] = the architecture default")
    lora_vision_target_modules: list[str] = config_field([], "vision-tower modules LoRA adapts; [] = the architecture default")
    lora_last_layers: int = config_field(0, "LoRA only on the towers' last N layers (peft layers_to_transform; "
                                         "0 = all); backward then stops there")
    max_length: int = config_field(32, "maximum tokens per text (special tokens included)")
    attribute_fields: list[str] = config_field([], "attribute columns of the 'attributes' view; [] = all non-title/image/id columns")
    # ---- objectives -------------------------------------------------------------------------
    mlm_weight: float = config_field(0.0, "weight of masked-language modelling on titles (0 = off)")
    mlm_probability: float = config_field(0.15, "fraction of title tokens masked for MLM (at least one per title)")
    simcse_weight: float = config_field(0.0, "weight of dropout-noise (SimCSE) title contrastive views (0 = off)")
    image_text_weight: float = config_field(0.0, "weight of image <-> title contrastive alignment (0 = off)")
    title_attributes_weight: float = config_field(1.0, "weight of title <-> attributes contrastive alignment (0 = off)")
    temperature: float = config_field(0.05, "InfoNCE temperature (initial value when learnable)")
    learnable_temperature: bool = config_field(False, "learn the InfoNCE temperature")
    # ---- optimisation -----------------------------------------------------------------------
    batch_size: int = config_field(64, "items per step per process")
    learning_rate: float = config_field(1e-3, "AdamW peak learning rate")
    weight_decay: float = config_field(0.01, "AdamW weight decay")
    warmup_steps: int = config_field(10, "linear warm-up steps, then linear decay to 0")
    max_steps: int = config_field(0, "optimisation steps; 0 = epochs x batches per epoch")
    epochs: int = config_field(1, "passes over the training items (when max_steps is 0)")
    # ---- evaluation / bookkeeping -----------------------------------------------------------
    eval_every: int = config_field(0, "evaluate held-out alignment every N steps (0 = before and after only)")
    eval_batch_size: int = config_field(128, "items per forward pass in evaluation")
    eval_min_items: int = config_field(50, "if fewer catalogue items are outside train_item_ids, also hold out "
                                           "eval_holdout_fraction of the train items from pre-training")
    eval_holdout_fraction: float = config_field(0.1, "fraction of train items withheld for evaluation when needed")
    checkpoint_every: int = config_field(0, "save a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = config_field(2, "newest checkpoints kept")
    cached_towers: bool = config_field(False, "frozen towers run once over the items' views; steps train the "
                                       "projections on their cached pooled outputs (CPU epochs). Needs lora: false, "
                                       "mlm_weight: 0 and simcse_weight: 0")
    show_progress: bool = config_field(True, "tqdm progress bar (main process only)")
    num_threads: int = config_field(0, "torch CPU threads for this run (0 = leave as is); the previous count is restored after")

    def __post_init__(self):
        if bool(self.text_model) == bool(self.text_tower_config):
            raise ValueError(
                f"give exactly one of text_model ({self.text_model!r}) and text_tower_config "
                f"({self.text_tower_config!r}); set text_model: null to build a tower from a config")
        if self.text_tower_config and not self.tokenizer:
            raise ValueError("text_tower_config needs a tokenizer source (tokenizer: <id or path>)")
        for name in ("text_tower_config", "vision_tower_config"):
            value = getattr(self, name)
            if value and "model_type" not in value:
                raise ValueError(f"{name} {value!r} has no model_type (e.g. model_type: bert / vit)")
        if self.vision_model and self.vision_tower_config:
            raise ValueError("give at most one of vision_model and vision_tower_config")
        if self.vision_tower_config and not self.image_processor_config:
            raise ValueError("vision_tower_config needs image_processor_config "
                             "(e.g. {image_processor_type: ViTImageProcessorPil, size: {height: 32, width: 32}})")
        weights = {f"{name}_weight": getattr(self, f"{name}_weight") for name in OBJECTIVES}
        for name, value in weights.items():
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not any(weights.values()):
            raise ValueError(f"every objective weight is 0 ({weights}); enable at least one")
        if self.image_text_weight > 0 and not (self.vision_model or self.vision_tower_config):
            raise ValueError(f"image_text_weight={self.image_text_weight} needs a vision tower "
                             "(vision_model or vision_tower_config)")
        positive_ints = ("batch_size", "eval_batch_size", "embed_dim", "lora_r", "max_length", "keep_checkpoints")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_steps", "epochs", "eval_every", "checkpoint_every", "warmup_steps", "num_threads",
                     "eval_min_items", "lora_last_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("max_steps and epochs are both 0; set one of them")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability!r}")
        if not 0 < self.eval_holdout_fraction < 1:
            raise ValueError(f"eval_holdout_fraction must be in (0, 1), got {self.eval_holdout_fraction!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.cached_towers and (self.lora or self.mlm_weight or self.simcse_weight):
            raise ValueError(f"cached_towers keeps the towers frozen and runs them once, so it needs lora: false "
                             f"(got {self.lora}), mlm_weight: 0 (got {self.mlm_weight}) and simcse_weight: 0 "
                             f"(got {self.simcse_weight}): those train or re-run the towers")


# ---- building the encoder and processor ---------------------------------------------------------
def _tower_from_config(tower_config: dict, vocab_size: int | None = None) -> transformers.PreTrainedModel:
    """A randomly initialised tower from a config dict (``model_type`` + fields)."""
    fields = dict(tower_config)
    model_type = fields.pop("model_type")
    if vocab_size is not None:
        given = fields.setdefault("vocab_size", vocab_size)
        if given < vocab_size:
            raise ValueError(f"text_tower_config vocab_size={given} is smaller than the tokenizer's {vocab_size} tokens")
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
    except ValueError as error:
        raise ValueError(f"tower config model_type={model_type!r} is not a transformers model type: {error}") from None
    return transformers.AutoModel.from_config(config)


def _image_processor(config: PretrainConfig):
    """The image processor named by ``image_processor_config`` or the vision model's; None if text-only."""
    if config.image_processor_config:
        fields = dict(config.image_processor_config)
        class_name = fields.pop("image_processor_type", None)
        processor_class = getattr(transformers, str(class_name), None)
        if not (isinstance(processor_class, type)
                and issubclass(processor_class, transformers.image_processing_utils.BaseImageProcessor)):
            raise ValueError(f"image_processor_config image_processor_type={class_name!r} is not a transformers "
                             "image processor class (e.g. ViTImageProcessorPil, CLIPImageProcessorPil)")
        return processor_class(**fields)
    if config.vision_model:
        return transformers.AutoImageProcessor.from_pretrained(resolve_model_path(config.vision_model))
    return None


def build_encoder_and_processor(config: PretrainConfig):
    """Config -> (``MIMContentEncoder`` with LoRA if ``config.lora``, ``MIMContentProcessor``).

    Towers come from pretrained folders/ids or, for ``*_tower_config``, random initialisation
    (seeded by the caller)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path(config.tokenizer or config.text_model))
    text_tower = config.text_model or _tower_from_config(config.text_tower_config, vocab_size=len(tokenizer))
    vision_tower = config.vision_model or (
        _tower_from_config(config.vision_tower_config) if config.vision_tower_config else None)
    encoder = build_content_encoder(
        text_tower, vision_tower, embed_dim=config.embed_dim, lora=False, text_pooling=config.text_pooling,
        fusion_type=config.fusion_type, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout, lora_text_target_modules=config.lora_text_target_modules or None,
        lora_vision_target_modules=config.lora_vision_target_modules or None)
    if config.lora:
        apply_lora(encoder, last_layers=config.lora_last_layers)
    processor = MIMContentProcessor(
        tokenizer, _image_processor(config) if vision_tower is not None else None, max_length=config.max_length,
        attribute_fields=config.attribute_fields or None)
    return encoder, processor


# ---- objectives ---------------------------------------------------------------------------------
class MaskedLanguageModelHead(nn.Module):
    """Hidden states (M, H) -> vocabulary logits (M, V): dense + GELU + LayerNorm, then a decoder
    tied to the tower's word embeddings (passed at call time, so no weight is stored twice)."""

    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden_states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layer_norm(F.gelu(self.dense(hidden_states)))
        return hidden_states @ word_embeddings.T + self.bias


def mask_title_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor,
                      mask_token_id: int, vocab_size: int, probability: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: (B, L) ids -> (masked ids (B, L), labels (B, L) with -100 where not predicted).

    Each maskable token (real, not special) is chosen with ``probability``; every row with a
    maskable token gets at least one (short titles would otherwise often get none). Chosen
    tokens become [MASK] 80 %, a random token 10 %, unchanged 10 %."""
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    draws = torch.rand(input_ids.shape, generator=generator)
    chosen = maskable & (draws < probability)
    # The maskable token with the smallest draw is forced in rows where nothing was chosen.
    forced = torch.where(maskable, draws, torch.full_like(draws, 2.0)).argmin(dim=1)
    needs_one = maskable.any(dim=1) & ~chosen.any(dim=1)
    chosen[needs_one, forced[needs_one]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    random_tokens = torch.randint(vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, masked)
    return masked, labels


class PretrainingObjectives(nn.Module):
    """The encoder plus what only pre-training needs (MLM head, contrastive loss).

    ``forward(batch)`` returns ``{"loss": weighted sum, <objective>: unweighted term, ...}``.
    Batch keys: ``item_index`` (B,), ``title_input_ids``/``title_attention_mask`` (B, L),
    optionally ``attributes_input_ids``/``attributes_attention_mask`` (B, L'),
    ``pixel_values`` (B, C, H, W) + ``image_mask`` (B,), ``mlm_input_ids``/``mlm_labels`` (B, L);
    with cached towers (:class:`mim_hf.pretrain.views.CachedViews`) ``title_pooled`` /
    ``attributes_pooled`` (B, H) and ``image_pooled`` (B, H_vision) instead of ids and pixels.
    """

    def __init__(self, encoder, weights: dict[str, float], temperature: float, learnable_temperature: bool,
                 vocab_size: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.weights = {name: float(weight) for name, weight in weights.items() if weight > 0}
        self.contrastive_loss = InfoNCELoss(temperature=temperature, learnable_temperature=learnable_temperature,
                                            gather_across_devices=True, symmetric=True)
        self.mlm_head = None
        if "mlm" in self.weights:
            tower_config = encoder.text_model.config
            embedding_width = encoder.text_model.get_input_embeddings().weight.shape[1]
            if embedding_width != tower_config.hidden_size:
                raise ValueError(f"MLM head ties to word embeddings of width {embedding_width}, but the tower's "
                                 f"hidden size is {tower_config.hidden_size}; set mlm_weight: 0 for this tower")
            self.mlm_head = MaskedLanguageModelHead(tower_config.hidden_size, vocab_size or tower_config.vocab_size,
                                                    getattr(tower_config, "layer_norm_eps", 1e-12))

    def _text(self, batch, view: str):
        if f"{view}_pooled" in batch:  # cached towers: only the projection runs
            return F.normalize(self.encoder.project_text(batch[f"{view}_pooled"]), dim=-1)
        return F.normalize(self.encoder.encode_text(batch[f"{view}_input_ids"], batch[f"{view}_attention_mask"]), dim=-1)

    def _images(self, batch, image_mask):
        if "image_pooled" in batch:
            return F.normalize(self.encoder.project_image(batch["image_pooled"][image_mask]), dim=-1)
        return F.normalize(self.encoder.encode_image(batch["pixel_values"][image_mask]), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        item_index = batch["item_index"]
        terms = {}
        if self.weights.keys() & {"simcse", "image_text", "title_attributes"}:
            title_embeds = self._text(batch, "title")
        if "simcse" in self.weights:
            # Second pass: same titles, fresh dropout masks -> the positive view.
            second_view = self._text(batch, "title")
            terms["simcse"] = self.contrastive_loss(title_embeds, second_view, item_index, item_index)
        if "title_attributes" in self.weights:
            attribute_embeds = self._text(batch, "attributes")
            terms["title_attributes"] = self.contrastive_loss(title_embeds, attribute_embeds, item_index, item_index)
        if "image_text" in self.weights:
            image_mask = batch["image_mask"]
            image_embeds = torch.zeros_like(title_embeds)
            if bool(image_mask.any()):
                present = self._images(batch, image_mask)
                image_embeds = image_embeds.index_put((image_mask.nonzero(as_tuple=True)[0],), present)
            # Items without an image are neither anchors nor candidates (pair_mask).
            terms["image_text"] = self.contrastive_loss(title_embeds, image_embeds, item_index, item_index,
                                                        pair_mask=image_mask)
        if "mlm" in self.weights:
            hidden = self.encoder.text_model(input_ids=batch["mlm_input_ids"],
                                             attention_mask=batch["title_attention_mask"]).last_hidden_state
            labels = batch["mlm_labels"]
            predicted = labels != -100
            logits = self.mlm_head(hidden[predicted], self.encoder.text_model.get_input_embeddings().weight)
            terms["mlm"] = F.cross_entropy(logits, labels[predicted])
        terms["loss"] = sum(self.weights[name] * value for name, value in terms.items())
        return terms


class LossMeter:
    """Running sums of the logged loss terms since the last evaluation (checkpointable)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach())
        self.count += 1

    def means_and_reset(self) -> dict[str, float]:
        means = {name: total / self.count for name, total in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return means

    def state_dict(self) -> dict:
        return {"sums": torch.tensor(list(self.sums.values()), dtype=torch.float64),
                "names": list(self.sums), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums = dict(zip(state["names"], state["sums"].tolist()))
        self.count = int(state["count"])


# ---- the stage ----------------------------------------------------------------------------------
def run(config: PretrainConfig, resume: bool = False, accelerator=None) -> dict:
    """Pre-train the content encoder; write ``output_dir/{config.json, checkpoints/, encoder/,
    adapters/, metrics.json}`` and return the metrics dict (also in metrics.json):
    ``{"alignment": {"before": {...}, "after": {...}, "task", "heldout"}, "history": [...],
    "timings_s": {...}, ...}``. Holds the lock on ``output_dir`` while it runs."""
    with torch_threads(config.num_threads), hold_output_dir(config.output_dir):
        return _pretrain(config, resume, accelerator)


def _pretrain(config: PretrainConfig, resume: bool, accelerator) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from mim_hf.data import PreparedData

    started = time.perf_counter()
    timings = {}
    if not config.data_dir:
        raise ValueError("data_dir is empty; point it at a directory written by `mim-hf data prepare`")
    if not Path(config.data_dir).is_dir():
        raise ValueError(f"data_dir {config.data_dir!r} does not exist; run `mim-hf data prepare --out ...` first")
    accelerator = accelerator or Accelerator()
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    checkpoint = start_run(accelerator, config, resume)

    prepared = PreparedData.load(config.data_dir)
    encoder, processor = build_encoder_and_processor(config)
    has_images = encoder.vision_model is not None and processor.image_field in prepared.items.column_names
    if config.image_text_weight > 0 and not has_images:
        raise ValueError(f"image_text_weight={config.image_text_weight} but the catalogue in {config.data_dir} has "
                         f"no {processor.image_field!r} column ({prepared.items.column_names})")
    weights = {name: getattr(config, f"{name}_weight") for name in OBJECTIVES}
    train_rows, eval_rows, heldout_info = split_items(prepared, config)
    views = ("title", "attributes") if weights["title_attributes"] > 0 else ("title",)
    train_views = ItemViews(prepared.items, train_rows, processor, views, with_images=weights["image_text"] > 0)
    candidate_view = "image" if has_images else "attributes"
    eval_views = ItemViews(prepared.items, eval_rows, processor, ("title", "attributes"), with_images=has_images)
    timings["load_s"] = time.perf_counter() - started

    collate = train_views.collate
    if config.cached_towers:  # frozen towers, run once here; the steps train the projections
        tick = time.perf_counter()
        for tower in (encoder.text_model, encoder.vision_model):
            if tower is not None:
                tower.requires_grad_(False)
        collate = CachedViews(encoder.to(accelerator.device), train_views, config.eval_batch_size,
                              accelerator.device).collate
        timings["tower_cache_s"] = time.perf_counter() - tick
    objectives = PretrainingObjectives(encoder, weights, config.temperature, config.learnable_temperature,
                                       vocab_size=len(processor.tokenizer))
    objectives.train()
    trainable = [p for p in objectives.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    sampler = EpochShuffleSampler(len(train_views), config.seed)
    # An explicit generator: DataLoader otherwise draws its base seed from the global RNG each epoch.
    dataloader = DataLoader(list(range(len(train_views))), batch_size=config.batch_size, sampler=sampler,
                            collate_fn=collate, generator=torch.Generator().manual_seed(config.seed))
    batches_per_epoch = math.ceil(len(train_views) / (config.batch_size * accelerator.num_processes))
    total_steps = config.max_steps or config.epochs * batches_per_epoch
    scheduler = transformers.get_scheduler("linear", optimizer, num_warmup_steps=min(config.warmup_steps, total_steps),
                                           num_training_steps=total_steps)
    objectives, optimizer, dataloader, scheduler = accelerator.prepare(objectives, optimizer, dataloader, scheduler)
    progress, meter = TrainingProgress(), LossMeter()
    checkpoint_state = {"model": objectives, "optimizer": optimizer, "scheduler": scheduler, "progress": progress,
                        "loss_meter": meter}
    unwrapped = accelerator.unwrap_model(objectives)
    tokenizer = processor.tokenizer
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def evaluate() -> dict:
        return alignment_recall(unwrapped.encoder, eval_views, candidate_view, config.eval_batch_size,
                                accelerator.device)

    resumed_from = restore_checkpoint(accelerator, checkpoint, checkpoint_state)
    tick = time.perf_counter()
    if not progress.history:  # fresh run: the "before" point
        progress.record({"losses": {}, "alignment": evaluate()})
    timings["eval_before_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    bar = tqdm(total=total_steps, initial=progress.step, desc="pre-training", unit="step",
               disable=not (config.show_progress and accelerator.is_main_process))
    for batch in train_batches(accelerator, progress, dataloader, stop=lambda: progress.step >= total_steps):
        if weights["mlm"] > 0:
            # Masks depend on (seed, step) only: a resumed run masks exactly like an uninterrupted one.
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + progress.step)
            masked, labels = mask_title_tokens(
                batch["title_input_ids"].cpu(), batch["title_attention_mask"].cpu(), special_ids,
                tokenizer.mask_token_id, len(tokenizer), config.mlm_probability, generator)
            batch["mlm_input_ids"], batch["mlm_labels"] = masked.to(accelerator.device), labels.to(accelerator.device)
        terms = objectives(batch)
        accelerator.backward(terms["loss"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        meter.add(terms)
        progress.advance()
        bar.update(1)
        bar.set_postfix(loss=f"{float(terms['loss'].detach()):.4f}")
        last = progress.step >= total_steps
        if last or (config.eval_every and progress.step % config.eval_every == 0):
            progress.record({"losses": meter.means_and_reset(), "learning_rate": scheduler.get_last_lr()[0],
                             "alignment": evaluate()})
        if last or (config.checkpoint_every and progress.step % config.checkpoint_every == 0):
            save_checkpoint(accelerator, config, progress.step, checkpoint_state)
        if last:
            break
    bar.close()
    timings["train_s"] = time.perf_counter() - tick

    metrics = {
        "stage": "pretrain",
        "data": {"name": prepared.name, "protocol": prepared.config.protocol, "train_items": len(train_views),
                 "heldout": {**heldout_info, "n": len(eval_views)}},
        "objective_weights": {name: weight for name, weight in weights.items()},
        "alignment": {"task": f"title->{candidate_view}", "before": progress.history[0]["alignment"],
                      "after": progress.history[-1]["alignment"],
                      "relevance": "a candidate with content identical to the query item's counts as a hit"},
        "history": progress.history,
        "steps": progress.step,
        "batches_per_epoch": batches_per_epoch,
        "trainable_parameters": trainable_parameter_counts(unwrapped.encoder),
        "processor_fallbacks": dict(processor.fallback_counts),
        "resumed_from": str(resumed_from) if resumed_from is not None else None,
    }
    tick = time.perf_counter()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        encoder = unwrapped.encoder
        if config.lora:
            save_adapters(encoder, output_dir / "adapters")
            merge_adapters(encoder)  # in place: the saved encoder loads without peft
        encoder.save_pretrained(output_dir / "encoder")
        processor.save_pretrained(output_dir / "encoder")
    timings["save_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - started
    metrics["timings_s"] = timings
    if accelerator.is_main_process:
        write_json_atomic(output_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics


__all__ = [
    "PretrainConfig", "PretrainingObjectives", "MaskedLanguageModelHead", "alignment_recall",
    "build_encoder_and_processor", "mask_title_tokens", "run", "split_items", "ItemViews", "CachedViews",
]
