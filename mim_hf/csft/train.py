"""Stage 2, C-SFT: fine-tune the content encoder so that items a user engages with in sequence
come close -- content similarity becomes *interest* similarity.

Data: ``PreparedData.pairs["train"]`` (trigger -> later positive target, training period only).
Each epoch the pairs are shuffled (seeded by ``seed`` and the epoch); a batch of ``B`` pairs
is encoded as its unique items once (trigger, target and hard-negative rows together).

Encoder: a stage-1 encoder directory (``encoder_path``: ``save_pretrained`` of a merged
``MIMContentEncoder`` + its processor, as the pre-training stage writes it) or raw towers
(``text_model`` / ``vision_model``, built by ``build_content_encoder`` with a new projection).
LoRA goes on the towers (base weights frozen); projections and fusion train fully. Or ``cached_towers``
(``lora_r: 0``): frozen towers run once (:mod:`mim_hf.csft.cache`), steps train projections + fusion only.

Loss: ``MultiLevelInfoNCE`` (item, text, image, cross levels with ``level_weights``) with
in-batch negatives, *space* negatives (``gather_across_devices``: the targets of every
data-parallel process; with one process it is the plain in-batch loss), *time* negatives
(``queue_size`` > 0: a FIFO of earlier targets, one queue per level) and optional *hard*
negatives (``hard_negatives`` > 0; none by default), from one of two sources:
``hard_negative_source="field"``: items from the training catalogue sharing a value of
``hard_negative_field`` with the target (e.g. a genre); ``"user_negatives"``: items the pair's
user was shown in the training split and did not click (CTR label 0; on MovieLens, rated < 4) --
the distinction a CTR model's content branch must read, which in-batch negatives (other pairs',
mostly popular, targets) never show. A pair whose user has no such item gets masked slots
(counted in ``metrics["hard_negative_masked_pairs"]``). A candidate with
the pair's own target or trigger id -- a duplicate target in the batch or queue -- is masked by
the loss, never a false negative. On a text-only catalogue the encoder's item embedding *is*
its text embedding, so the item and text levels see the same vectors (the multi-level loss is
then the single-level loss weighted ``item + text``, with one queue per level); the image and
cross levels need images and are skipped.

Evaluation: recall@{1,10,50} and MRR of the true target among **all** catalogue items (trigger
excluded, see :mod:`mim_hf.csft.retrieval`), on ``pairs["valid"]`` at step 0 (the starting encoder)
and every ``eval_every`` steps; the trainable weights with the best valid recall@10 are kept
and restored at the end. Each evaluation encodes the catalogue once and scores valid and test
from it; the test numbers of the step that valid selects are the final test metrics (test
never selects anything), reported next to the start's and the popularity reference. Every process evaluates the whole valid set (identical
numbers, so all agree on the best step without a collective).

Outputs under ``output_dir``: ``config.json``, ``checkpoints/step_N`` (model, optimizer,
scheduler, RNG, progress, loss queues, best weights), ``encoder/`` (``adapters/`` LoRA + head,
processor files, ``csft_encoder.json`` naming the start; with ``merge_adapters`` also the
merged ``config.json`` + ``model.safetensors`` that ``AutoModel.from_pretrained`` and the
Representation Center load) and ``metrics.json``.

Determinism: same seed, same machine, CPU -> same metrics (shuffles, hard negatives and LoRA
dropout are seeded per epoch / step; resume restores optimizer, queues and best weights). Multi-process runs differ from
single-process ones (different batches).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mim_hf.common.checkpoints import restore_checkpoint, save_checkpoint, start_run
from mim_hf.common.config import config_field, write_json_atomic
from mim_hf.common.loop import EpochShuffleSampler, TrainingProgress, hold_output_dir, torch_threads, train_batches
from mim_hf.csft.pairs import check_pair_source, train_pairs_for

STAGE_NAME = "csft"
ENCODER_INFO_NAME = "csft_encoder.json"
SELECTION_METRIC = "valid_recall@10"
HARD_NEGATIVE_SOURCES = ("field", "user_negatives")


@dataclass
class CSFTConfig:
    """Every knob of C-SFT (stage 2)."""

    # --resume may ask for more steps: the learning rate is constant after warm-up, so the run goes
    # on as if the larger max_steps had been set from the start (exactly so when the checkpoint's
    # max_steps is a multiple of eval_every; otherwise its extra last evaluation stays in the history).
    RESUME_MAY_GROW = ("max_steps",)

    data_dir: str = config_field("", "prepared-data directory (PreparedData.save / `mim-hf data prepare`)")
    output_dir: str = config_field("runs/csft", "where config, checkpoints, encoder/ and metrics.json go")
    encoder_path: str | None = config_field(None, "stage-1 encoder directory (save_pretrained + processor); "
                                            "None = build from text_model/vision_model")
    text_model: str = config_field("sentence-transformers/all-MiniLM-L6-v2", "text tower id/path (without encoder_path)")
    vision_model: str | None = config_field(None, "vision tower id/path, None = text-only (without encoder_path)")
    embed_dim: int = config_field(256, "shared embedding size of a new encoder (without encoder_path)")
    lora_r: int = config_field(8, "LoRA rank on the towers (0 = no LoRA: towers frozen; needed by cached_towers)")
    lora_alpha: int = config_field(16, "LoRA alpha")
    lora_dropout: float = config_field(0.05, "LoRA dropout")
    lora_last_layers: int = config_field(2, "LoRA only on the towers' last N layers (peft layers_to_transform; "
                                         "0 = all); backward then stops there, a large saving on CPU")
    seed: int = config_field(0, "seed of shuffles, dropout, hard-negative sampling and new weights")
    batch_size: int = config_field(32, "pairs per step per process")
    learning_rate: float = config_field(1e-3, "AdamW learning rate (LoRA, projections, fusion)")
    weight_decay: float = config_field(0.0, "AdamW weight decay")
    warmup_steps: int = config_field(0, "linear warm-up steps, then constant learning rate")
    max_steps: int = config_field(100, "optimizer steps (pairs are re-shuffled each epoch)")
    max_train_pairs: int = config_field(0, "use only the first N train pairs (0 = all)")
    level_weights: dict[str, float] = config_field({"item": 1.0, "text": 0.5, "image": 0.5, "cross": 0.25},
                                       "loss weight per level (item, text, image, cross); 0 = off")
    temperature: float = config_field(0.05, "InfoNCE temperature")
    learnable_temperature: bool = config_field(False, "learn the temperature (floored at 0.01)")
    symmetric: bool = config_field(False, "also contrast target -> trigger and average")
    queue_size: int = config_field(0, "time negatives: FIFO of earlier targets per level (0 = off; a "
                                    "large queue hurt MovieLens at lr 1e-3: stale negatives)")
    logq_correction: bool = config_field(False, "sampling-bias correction: subtract log(train-target frequency) "
                                         "from every in-batch/queue candidate's logit")
    gather_across_devices: bool = config_field(True, "space negatives: targets of all processes (no-op with one)")
    hard_negatives: int = config_field(0, "hard negatives per pair (same hard_negative_field value), 0 = none")
    hard_negative_field: str = config_field("", "item column for hard negatives (e.g. genres, category) when "
                                            "hard_negative_source is 'field'")
    hard_negative_source: str = config_field("field", "'field': same hard_negative_field value as the target; "
                                             "'user_negatives': items the pair's user did not click in train")
    pair_source: str = config_field("behaviour", "train pairs: 'behaviour' (the prepared ones), 'id_aligned' "
                                    "(nearest earlier positive by a trained DIN's item-ID cosine) or 'cooccurrence'")
    id_model_path: str | None = config_field(None, "pair_source 'id_aligned': CTR model directory trained on data_dir")
    cooccurrence_window: int = config_field(5, "pair_source 'cooccurrence': items within N consecutive train positives "
                                            "of a user co-occur")
    cooccurrence_pairs_per_item: int = config_field(20, "pair_source 'cooccurrence': top co-counted partners per item")
    cached_towers: bool = config_field(False, "frozen towers run once over the catalogue; steps train projections "
                                       "+ fusion on their cached pooled outputs (CPU epochs). Needs lora_r: 0")
    tower_cache_path: str | None = config_field(None, "cached_towers: cache file (None = output_dir/tower_cache."
                                                "safetensors); reused if made by the same towers + catalogue")
    anchor_weight: float = config_field(0.0, "guard: weight of mean (1 - cos) to the start encoder's item "
                                        "embeddings of the batch (0 = off)")
    early_stopping_patience: int = config_field(0, "stop after N evaluations without a better valid recall@10 (0 = off)")
    eval_every: int = config_field(50, "evaluate on valid pairs every N steps (and at the last step)")
    eval_batch_size: int = config_field(128, "items per forward pass when encoding the catalogue")
    checkpoint_every: int = config_field(100, "checkpoint every N steps (0 = never)")
    keep_checkpoints: int = config_field(2, "newest checkpoints kept")
    merge_adapters: bool = config_field(True, "also write the merged encoder (loadable without peft)")
    show_progress: bool = config_field(True, "tqdm bars on the main process")
    num_threads: int = config_field(0, "torch threads for this run (0 = leave as is); the previous count is restored after")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not self.data_dir:
            raise ValueError("data_dir is required (a directory written by `mim-hf data prepare`)")
        for name in ("batch_size", "max_steps", "eval_every", "eval_batch_size", "lora_alpha", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("max_train_pairs", "checkpoint_every", "queue_size", "hard_negatives", "warmup_steps",
                     "num_threads", "lora_last_layers", "lora_r", "early_stopping_patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if bool(self.cached_towers) == bool(self.lora_r):
            raise ValueError(f"cached_towers={self.cached_towers} with lora_r={self.lora_r}: cached towers are frozen "
                             "(set lora_r: 0); LoRA needs running towers (lora_r >= 1 with cached_towers: false)")
        if not (isinstance(self.anchor_weight, (int, float)) and 0 <= self.anchor_weight < math.inf):
            raise ValueError(f"anchor_weight must be a finite number >= 0, got {self.anchor_weight!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.hard_negative_source not in HARD_NEGATIVE_SOURCES:
            raise ValueError(f"hard_negative_source must be one of {HARD_NEGATIVE_SOURCES}, "
                             f"got {self.hard_negative_source!r}")
        if self.hard_negatives and self.hard_negative_source == "field" and not self.hard_negative_field:
            raise ValueError(f"hard_negatives={self.hard_negatives} needs hard_negative_field (an item column)")
        check_pair_source(self)
        if self.encoder_path is None and not self.text_model:
            raise ValueError("give encoder_path (a stage-1 encoder) or text_model (raw towers)")


# The quickstart's synthetic world (tiny towers, images): smaller steps, all four levels.
SYNTHETIC_OVERRIDES = {"batch_size": 32, "max_steps": 60, "eval_every": 30, "checkpoint_every": 60,
                       "queue_size": 256, "lora_last_layers": 0, "eval_batch_size": 64}


class BestWeights:
    """The trainable weights (LoRA + head) of the best evaluation so far and that evaluation's
    valid + test metrics; checkpointable."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.metrics: dict = {}

    def capture(self, encoder, metrics: dict) -> None:
        self.tensors = {name: p.detach().cpu().clone() for name, p in encoder.named_parameters() if p.requires_grad}
        self.metrics = metrics

    def restore(self, encoder) -> None:
        if not self.tensors:
            return
        _, unexpected = encoder.load_state_dict(self.tensors, strict=False)
        if unexpected:
            raise ValueError(f"best weights hold keys the encoder lacks: {unexpected[:5]}")

    def state_dict(self) -> dict:
        return {"tensors": dict(self.tensors), "metrics_json": json.dumps(self.metrics)}

    def load_state_dict(self, state: dict) -> None:
        self.tensors, self.metrics = dict(state["tensors"]), json.loads(state["metrics_json"])


def build_start_encoder(config: CSFTConfig):
    """The starting encoder (towers frozen; LoRA on them unless ``lora_r`` is 0) and its processor."""
    from mim_hf.encoder.build import build_content_encoder, build_content_processor
    from mim_hf.encoder.lora import apply_lora, freeze_towers

    lora = {"lora_r": config.lora_r, "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout} if config.lora_r else {}
    if config.encoder_path is not None:
        from mim_hf.encoder.build import load_encoder_and_processor

        encoder, processor = load_encoder_and_processor(config.encoder_path)
        for key, value in lora.items():
            setattr(encoder.config, key, value)
    else:
        encoder = build_content_encoder(config.text_model, config.vision_model, embed_dim=config.embed_dim,
                                        lora=False, **lora)
        processor = build_content_processor(config.text_model, config.vision_model)
    if not config.lora_r:
        return freeze_towers(encoder), processor
    return apply_lora(encoder, last_layers=config.lora_last_layers), processor


def load_csft_encoder(directory):
    """``output_dir/encoder`` -> ``(encoder, processor)``: the merged encoder when present,
    else the start encoder (from ``csft_encoder.json``) with the saved adapters loaded."""
    from mim_hf.encoder.build import load_encoder_and_processor
    from mim_hf.encoder.lora import load_adapters
    from mim_hf.common.config import config_from_dict

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return load_encoder_and_processor(directory)
    info_file = directory / ENCODER_INFO_NAME
    if not info_file.is_file():
        raise ValueError(f"{directory}: neither a merged encoder (config.json) nor C-SFT adapters ({ENCODER_INFO_NAME})")
    config = config_from_dict(CSFTConfig, json.loads(info_file.read_text())["start"])
    encoder, processor = build_start_encoder(config)
    return load_adapters(encoder, directory / "adapters").eval(), processor


class PairBatches:
    """Turns batches of pair positions into encoder inputs for their unique items.

    Holds the catalogue rows of every train pair, the item records (text columns kept in
    memory; images read per batch) and, for hard negatives, item rows grouped by field value.
    """

    def __init__(self, prepared, processor, encoder, config: CSFTConfig):
        from mim_hf.modeling.processing_mim_encoder import rows_to_records
        from mim_hf.csft.retrieval import catalogue_index, pair_rows

        self.items = prepared.items
        self.processor = processor
        self.index = catalogue_index(self.items["item_id"])
        train_pairs, self.pair_stats = train_pairs_for(prepared, config)
        if config.max_train_pairs:
            train_pairs = train_pairs.select(range(min(config.max_train_pairs, len(train_pairs))))
        self.trigger_rows, self.target_rows = (torch.as_tensor(r) for r in pair_rows(train_pairs, self.index))
        # Text columns live in memory (cheap); images are read per batch.
        text_columns = [c for c in self.items.column_names if c != processor.image_field]
        self.records = rows_to_records(self.items.select_columns(text_columns)[:])
        self.with_images = (getattr(encoder, "vision_model", None) is not None
                            and processor.image_field in self.items.column_names)
        self.num_hard = config.hard_negatives
        self.hard_source = config.hard_negative_source
        self.seed = config.seed
        self.hard_fallbacks = 0  # field source: targets without a same-value pool (whole train catalogue)
        self.hard_masked_pairs = 0  # user source: pairs whose user has no unclicked train item (slots masked)
        if self.num_hard and self.hard_source == "user_negatives":
            self._build_user_pools(prepared, train_pairs["user_id"])
        elif self.num_hard:
            self._build_hard_pools(prepared, config.hard_negative_field)

    def __len__(self) -> int:
        return int(self.trigger_rows.numel())

    def _build_hard_pools(self, prepared, field: str) -> None:
        if field not in self.items.column_names:
            raise ValueError(f"hard_negative_field {field!r} is not an item column; columns: {self.items.column_names}")
        train_items = {str(i) for i in prepared.train_item_ids}
        values_of_row = []
        pools: dict[str, list[int]] = {}
        for row, (item_id, value) in enumerate(zip(self.items["item_id"], self.items[field])):
            values = [str(v) for v in value] if isinstance(value, (list, tuple)) else ([] if value is None else [str(value)])
            values_of_row.append(values)
            if str(item_id) in train_items:  # hard negatives come from the training catalogue only
                for v in values:
                    pools.setdefault(v, []).append(row)
        self.hard_values = values_of_row
        self.hard_pools = {v: np.asarray(rows) for v, rows in pools.items()}
        self.train_rows = np.asarray(sorted(self.index[i] for i in train_items if i in self.index))

    def _build_user_pools(self, prepared, pair_users) -> None:
        """Per train pair (its user in ``pair_users``), the catalogue rows that user saw in the train
        split with label 0, as CSR pools."""
        from mim_hf.csft.retrieval import catalogue_rows

        train = prepared.samples["train"]
        missing = [c for c in ("user_id", "item_id", "label") if c not in train.column_names]
        if missing:
            raise ValueError(f"hard_negative_source='user_negatives' needs train samples with {missing}")
        samples = train.select_columns(["user_id", "item_id", "label"]).with_format("numpy")[:]
        unclicked = samples["label"] == 0
        users = samples["user_id"][unclicked].astype(str)
        rows = catalogue_rows(samples["item_id"][unclicked], self.index, "train samples column 'item_id'")
        user_names, user_codes = np.unique(users, return_inverse=True)
        order = np.argsort(user_codes, kind="stable")
        self.user_pool_rows = rows[order]
        counts = np.bincount(user_codes, minlength=len(user_names))
        self.user_pool_offsets = np.concatenate([[0], np.cumsum(counts)])
        pair_users = np.asarray(pair_users).astype(str)
        if not len(user_names):  # no unclicked train sample at all: every slot is masked
            self.pair_user = torch.full((len(pair_users),), -1, dtype=torch.int64)
            return
        slot = np.searchsorted(user_names, pair_users)
        known = (slot < len(user_names)) & (user_names[np.minimum(slot, len(user_names) - 1)] == pair_users)
        # -1 = the pair's user has no unclicked train item: its hard-negative slots are masked.
        self.pair_user = torch.as_tensor(np.where(known, slot, -1))

    def hard_negative_rows(self, target_rows: torch.Tensor, step: int,
                           positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, H)`` hard-negative rows for a batch (seeded by seed and step) and a ``(B, H)`` bool
        mask (False = padding slot) or None when every slot is real.

        ``field`` source: rows sharing a field value with each target. ``user_negatives``: rows the
        pair's user did not click in train (``positions``, the batch's pair positions, required).
        """
        rng = np.random.default_rng([self.seed, step])
        if self.hard_source == "user_negatives":
            if positions is None:
                raise ValueError("hard_negative_source='user_negatives' needs the batch's pair positions")
            users = self.pair_user[positions].numpy()
            has_pool = users >= 0  # every known user has >= 1 unclicked item (pools are built from them)
            self.hard_masked_pairs += int((~has_pool).sum())
            if not has_pool.any():
                return target_rows[:, None].repeat(1, self.num_hard), torch.zeros(len(users), self.num_hard, dtype=torch.bool)
            pool = np.where(has_pool, users, 0)  # masked pairs draw from pool 0; their rows are replaced below
            start = self.user_pool_offsets[pool]
            size = self.user_pool_offsets[pool + 1] - start
            picks = start[:, None] + (rng.random((len(users), self.num_hard)) * size[:, None]).astype(np.int64)
            rows = np.where(has_pool[:, None], self.user_pool_rows[picks],
                            target_rows.numpy()[:, None])  # masked slots reuse the target row: nothing extra to encode
            mask = None if has_pool.all() else torch.as_tensor(np.repeat(has_pool[:, None], self.num_hard, 1))
            return torch.as_tensor(rows), mask
        out = np.empty((len(target_rows), self.num_hard), dtype=np.int64)
        for i, row in enumerate(target_rows.tolist()):
            values = self.hard_values[row]
            pool = self.hard_pools.get(values[rng.integers(len(values))]) if values else None
            if pool is None or len(pool) < 2:
                pool = self.train_rows
                self.hard_fallbacks += 1
            out[i] = rng.choice(pool, size=self.num_hard)
        return torch.as_tensor(out), None

    def encoder_inputs(self, rows: torch.Tensor) -> dict:
        """Catalogue rows ``(M,)`` (unique) -> processor output for those items."""
        records = [self.records[r] for r in rows.tolist()]
        if self.with_images:
            images = self.items.select_columns([self.processor.image_field])[rows.tolist()][self.processor.image_field]
            records = [{**rec, self.processor.image_field: img} for rec, img in zip(records, images)]
        return dict(self.processor(records))


def _select_outputs(output, positions: torch.Tensor) -> dict:
    """Rows ``positions`` of every encoder output field that is present."""
    return {name: getattr(output, name)[positions] for name in ("item_embeds", "text_embeds", "image_embeds", "image_mask")
            if getattr(output, name, None) is not None}


def target_log_prior(batches: PairBatches) -> torch.Tensor:
    """``(num_catalogue_rows,)`` log frequency of each item as a train target (floor: one count): in-batch
    candidates are other pairs' targets, drawn with exactly this frequency."""
    counts = torch.bincount(batches.target_rows, minlength=len(batches.items)).double().clamp(min=1)
    return (counts / counts.sum()).log().float()


def run(config: CSFTConfig, resume: bool = False, accelerator: Accelerator | None = None) -> dict:
    """Train C-SFT; returns (and writes) the metrics dict described in the module docstring.
    Holds the lock on ``output_dir`` while it runs."""
    config.validate()
    with torch_threads(config.num_threads), hold_output_dir(config.output_dir):
        return _train(config, resume, accelerator)


def _train(config: CSFTConfig, resume: bool, accelerator: Accelerator | None) -> dict:
    from mim_hf.data import PreparedData
    from mim_hf.csft.losses import MultiLevelInfoNCE, anchor_distance
    from mim_hf.encoder.lora import save_adapters
    from mim_hf.encoder.lora import merge_adapters as merge_lora
    from mim_hf.modeling.modeling_mim_encoder import has_injected_adapters
    from mim_hf.csft.retrieval import evaluate_pairs, popularity_retrieval, train_item_counts
    from mim_hf.encoder.encoding import encode_items
    from mim_hf.csft.cache import run_tower_cache

    timings: dict[str, float] = {}
    started = time.perf_counter()
    accelerator = accelerator or Accelerator()
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    main = accelerator.is_main_process
    checkpoint = start_run(accelerator, config, resume)

    prepared = PreparedData.load(config.data_dir)
    encoder, processor = build_start_encoder(config)
    batches = PairBatches(prepared, processor, encoder, config)
    global_batch = config.batch_size * accelerator.num_processes
    if len(batches) < global_batch:
        raise ValueError(f"{len(batches)} train pairs in {config.data_dir} cannot fill one batch of "
                         f"{config.batch_size} x {accelerator.num_processes} process(es)")
    eval_pairs = {split: prepared.pairs[split] for split in ("valid", "test")}
    device = accelerator.device
    cache, cache_started = None, time.perf_counter()
    if config.cached_towers:
        cache = run_tower_cache(config, accelerator, encoder, batches, processor, prepared.items, device)
        timings["tower_cache"] = time.perf_counter() - cache_started

    def catalogue_embeds() -> torch.Tensor:  # (N, D) item embeddings of the catalogue by the current weights
        model = accelerator.unwrap_model(encoder_model)
        return (cache.embed(model, config.eval_batch_size, device) if cache is not None else
                encode_items(model, processor, prepared.items, batch_size=config.eval_batch_size,
                             levels=("item_embeds",), show_progress=False, device=device)["item_embeds"])

    loss_fn = MultiLevelInfoNCE(
        weights=config.level_weights, temperature=config.temperature,
        learnable_temperature=config.learnable_temperature, gather_across_devices=config.gather_across_devices,
        queue_size=config.queue_size, symmetric=config.symmetric, catalogue_size=len(prepared.items),
        embed_dim=encoder.config.embed_dim, candidate_log_prior=target_log_prior(batches) if config.logq_correction else None,
    ).to(device)
    parameters = [p for p in encoder.parameters() if p.requires_grad] + list(loss_fn.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0)
    encoder_model, optimizer, scheduler = accelerator.prepare(encoder, optimizer, scheduler)
    progress, best = TrainingProgress(), BestWeights()
    checkpoint_state = {"model": encoder_model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress,
                        "best_weights": best, "loss": loss_fn}

    retrieval: dict = {}
    started_eval = time.perf_counter()
    retrieval["popularity"] = popularity_retrieval(train_item_counts(prepared.samples["train"]), eval_pairs,
                                                   prepared.items["item_id"])
    start_embeds = catalogue_embeds()  # before a resume loads trained weights; the anchor's reference
    retrieval["start"] = evaluate_pairs(None, processor, prepared.items, eval_pairs, catalogue_embeds=start_embeds)
    timings["start_eval"] = time.perf_counter() - started_eval
    # The loss holds the time-negative queues, which differ per process unless they are gathered.
    resumed_from = restore_checkpoint(accelerator, checkpoint, checkpoint_state, per_process=("loss",))
    if progress.step == 0 and not progress.history:
        progress.record({"loss": None, "levels": {}, SELECTION_METRIC: retrieval["start"]["valid"]["recall@10"],
                         "valid": retrieval["start"]["valid"]}, key=SELECTION_METRIC)
        best.capture(accelerator.unwrap_model(encoder_model), retrieval["start"])

    bar = tqdm(total=config.max_steps, initial=progress.step, desc="C-SFT", unit="step",
               disable=not (config.show_progress and accelerator.is_local_main_process))
    window_loss, window_levels, window_steps = 0.0, {}, 0
    train_time = eval_time = 0.0
    encoder_model.train()
    loss_fn.train()
    sampler = EpochShuffleSampler(len(batches), config.seed)

    def epoch_loader(epoch: int):
        sampler.set_epoch(epoch)
        return accelerator.prepare(DataLoader(list(sampler), batch_size=config.batch_size, drop_last=True,
                                              collate_fn=torch.as_tensor))

    def patience_spent() -> bool:
        return 0 < config.early_stopping_patience <= progress.evals_without_improvement

    for positions in train_batches(accelerator, progress, epoch_loader,
                                   stop=lambda: progress.step >= config.max_steps or patience_spent()):
        step_started = time.perf_counter()
        positions = positions.cpu()
        trigger_rows, target_rows = batches.trigger_rows[positions], batches.target_rows[positions]
        parts = [trigger_rows, target_rows]
        hard_rows = hard_mask = None
        if batches.num_hard:
            hard_rows, hard_mask = batches.hard_negative_rows(target_rows, progress.step, positions)
            parts.append(hard_rows.flatten())
        unique_rows, inverse = torch.unique(torch.cat(parts), return_inverse=True)
        inputs = (cache.inputs(unique_rows, device) if cache is not None  # cached: only the heads run
                  else {k: v.to(device) for k, v in batches.encoder_inputs(unique_rows).items()})
        # Dropout masks from (seed, step, rank) alone: a resumed run draws the same ones even
        # though building data loaders and evaluating consumed global random numbers.
        torch.manual_seed(hash((config.seed, progress.step, accelerator.process_index)) % (2**63))
        output = encoder_model(**inputs, return_dict=True)
        size = len(positions)
        inverse = inverse.to(device)
        hard_kwargs = {}
        if hard_rows is not None:
            hard_kwargs = {"hard_negative_outputs": _select_outputs(output, inverse[2 * size:]),
                           "hard_negative_ids": hard_rows.to(device)}
            if hard_mask is not None:
                hard_kwargs["hard_negative_mask"] = hard_mask.to(device)
        loss, levels = loss_fn(_select_outputs(output, inverse[:size]), _select_outputs(output, inverse[size:2 * size]),
                               trigger_rows.to(device), target_rows.to(device), **hard_kwargs)
        if config.anchor_weight:
            anchor = anchor_distance(output.item_embeds, start_embeds[unique_rows].to(device))
            loss = loss + config.anchor_weight * anchor
            levels["anchor"] = float(anchor.detach())
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.advance()
        window_loss += float(loss.detach())
        for level, value in levels.items():
            window_levels[level] = window_levels.get(level, 0.0) + value
        window_steps += 1
        train_time += time.perf_counter() - step_started
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"C-SFT loss became {float(loss.detach())} at step {progress.step}; "
                                     f"lower learning_rate ({config.learning_rate}) or raise temperature")

        if progress.step % config.eval_every == 0 or progress.step == config.max_steps:
            eval_started = time.perf_counter()
            # Test is scored from the same catalogue encoding (cheap) but only read for the
            # step that valid selects: the final metrics need no second encoding.
            scored = evaluate_pairs(None, processor, prepared.items, eval_pairs, catalogue_embeds=catalogue_embeds())
            valid = scored["valid"]
            improved = progress.record({
                "loss": window_loss / window_steps,
                "levels": {k: v / window_steps for k, v in window_levels.items()},
                SELECTION_METRIC: valid["recall@10"], "valid": valid,
            }, key=SELECTION_METRIC)
            if improved:
                best.capture(accelerator.unwrap_model(encoder_model), scored)
            window_loss, window_levels, window_steps = 0.0, {}, 0
            encoder_model.train()
            eval_time += time.perf_counter() - eval_started
            if main:
                bar.write(f"step {progress.step} (epoch {progress.epoch}): loss {progress.history[-1]['loss']:.4f}, "
                          f"valid recall@10 {valid['recall@10']:.4f} (best {progress.best_metric:.4f} "
                          f"at step {progress.best_step})")
        if config.checkpoint_every and progress.step % config.checkpoint_every == 0:
            save_checkpoint(accelerator, config, progress.step, checkpoint_state, per_process=("loss",))
        if progress.step >= config.max_steps or patience_spent():
            break
    bar.close()
    timings["train"], timings["periodic_eval"] = train_time, eval_time

    model = accelerator.unwrap_model(encoder_model)
    best.restore(model)
    model.eval()
    retrieval["final"] = best.metrics  # valid + test of the restored (best) weights, scored at best_step

    save_started = time.perf_counter()
    encoder_dir = output_dir / "encoder"
    if main:
        if has_injected_adapters(model):
            save_adapters(model, encoder_dir / "adapters")
        processor.save_pretrained(encoder_dir)
        start = {k: getattr(config, k) for k in ("encoder_path", "text_model", "vision_model", "embed_dim",
                                                 "lora_r", "lora_alpha", "lora_dropout", "lora_last_layers", "seed")}
        (encoder_dir / ENCODER_INFO_NAME).write_text(json.dumps({"start": start, "best_step": progress.best_step},
                                                                indent=2))
        if has_injected_adapters(model) and config.merge_adapters:
            merge_lora(model)
        if not has_injected_adapters(model):  # merged, or frozen towers (cached_towers)
            model.save_pretrained(encoder_dir)
    accelerator.wait_for_everyone()
    timings["save"] = time.perf_counter() - save_started
    timings["total"] = time.perf_counter() - started

    metrics = {
        "stage": STAGE_NAME,
        "dataset": prepared.name,
        "protocol": prepared.config.protocol,
        "start_encoder": config.encoder_path or {"text_model": config.text_model, "vision_model": config.vision_model},
        "levels": sorted({level for entry in progress.history for level in entry.get("levels", {})}),
        "num_train_pairs": len(batches),
        "pair_source": {"name": config.pair_source, **batches.pair_stats},
        "num_processes": accelerator.num_processes,
        "steps": progress.step,
        "epochs_completed": progress.epoch,
        "best_step": progress.best_step,
        "stopped_early": progress.step < config.max_steps,
        "temperature": {name: f.temperature for name, f in loss_fn.directions.items()},
        "hard_negative_fallbacks": batches.hard_fallbacks,
        "hard_negative_masked_pairs": batches.hard_masked_pairs,
        "processor_fallbacks": {k: v for k, v in processor.fallback_counts.items() if v},
        "resumed_from": str(resumed_from) if resumed_from else None,
        "retrieval": retrieval,
        "history": progress.history,
        "timings_s": timings,
    }
    if main:
        write_json_atomic(output_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics


__all__ = ["CSFTConfig", "SYNTHETIC_OVERRIDES", "BestWeights", "build_start_encoder", "load_csft_encoder", "run"]
