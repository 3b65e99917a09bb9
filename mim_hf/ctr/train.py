"""Stage 3 training: ``CiUBMForCTR`` (modes din / content_feature / ciubm) on prepared CTR samples.

    config = load_config(CTRTrainConfig, "training/configs/ctr_ml100k_temporal_ciubm_csft.yaml")
    metrics = run(config)                 # or: accelerate launch training/train_ctr.py --config ...

What happens:
1. ``PreparedData.load(data_dir)``; the Representation Center at ``center_path`` is opened
   (content modes, or base "sim"); its fingerprint, dim, path and version go into the model
   config, the center itself is NOT copied into the model.
2. Every split is collated ONCE by :class:`~mim_hf.ctr.collator.CTRCollator` into int64 tensors
   kept in memory (:class:`CTRTensorSplit`); content enters as rows of the center's content
   table, which the model holds (``set_content_table``; not saved with it).
3. AdamW with gradient clipping (the rate optionally cut by ``lr_decay_on_plateau`` after an evaluation
   without improvement); the valid split is evaluated every ``eval_every`` steps (default:
   each epoch); the best model by valid AUC is saved with ``save_pretrained`` to
   ``output_dir/model``; training stops after ``patience`` evaluations without improvement.
4. The best model is reloaded and scored on valid and test: AUC, GAUC, logloss, n, overall and
   per popularity bucket (cold / long_tail / head, counted on the training period), written to
   ``output_dir/metrics.json`` with the history, config, timings and fallback counts.

Unknown users/items (and unseen side-feature values) map to row 0 of their table; under
``unknown_row_policy="zero"`` that row is a fixed zero vector, and ``unknown_id_dropout`` replaces
a fraction of training IDs by 0 so the network learns what "unknown" looks like (item-cold
valid/test targets are all unknown). The same policy applies to every mode, DIN included.

Checkpoints (every ``checkpoint_every`` steps, see :mod:`mim_hf.common.checkpoints`): model, optimizer,
progress (with the running train loss), RNG states and the best model so far (``model/``, which a
resume puts back as it was at the checkpointed step). ``run(config, resume=True)`` continues from
the newest one.

Determinism: same seed, same machine, CPU -> same metrics, and a run killed and resumed gives the
uninterrupted run's metrics and weights exactly (shuffling uses its own generator per epoch, so a
resumed run sees the same batches; tests/test_reliability_resume.py). Multi-process runs are not
bit-identical to single-process ones (different batch composition per process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from mim_hf.ctr.collator import CTRCollator, center_content_table
from mim_hf.ctr.metrics import evaluate_by_bucket
from mim_hf.common.checkpoints import restore_checkpoint, restore_folder, save_checkpoint, start_run
from mim_hf.common.config import config_field, write_json_atomic
from mim_hf.common.loop import EpochShuffleSampler, TrainingProgress, hold_output_dir, torch_threads, train_batches

MODES = ("din", "content_feature", "ciubm")
_COLLATE_CHUNK_ROWS = 8192


@dataclass
class CTRTrainConfig:
    """Every knob of a CTR training run (YAML / CLI ``--field value``)."""

    data_dir: str = config_field("", "prepared-data directory written by PreparedData.save (one protocol)")
    output_dir: str = config_field("runs/ctr", "where config.json, checkpoints/, model/ and metrics.json go")
    mode: str = config_field("ciubm", "model variant: din | content_feature | ciubm")
    base: str = config_field("din", "behaviour stage: din (all behaviours) | sim (top-k by content similarity)")
    center_path: str | None = config_field(None, "Representation Center directory (required unless mode=din and base=din)")
    center_level: str = config_field("item_embeds", "which embedding level of the center to use")
    user_features: list[str] | None = config_field(None, "user side features (sample columns); None = every user_* column with a vocabulary")
    item_features: list[str] | None = config_field(None, "item side features; None = every item_* column with a vocabulary and a catalogue column")
    max_len: int = config_field(50, "behaviours kept per sample (most recent)")
    id_embed_dim: int = config_field(16, "width of every ID / side-feature embedding")
    content_proj_dim: int = config_field(32, "width content vectors are projected to before fusion")
    attention_hidden_sizes: list[int] = config_field([64, 32], "hidden layers of the DIN attention MLP")
    fusion_hidden_sizes: list[int] = config_field([200, 80], "hidden layers of the fusion MLP")
    dropout: float = config_field(0.1, "dropout in the fusion MLP")
    unknown_row_policy: str = config_field("zero", "row 0 of user/item ID tables: zero (fixed) | trained")
    unknown_id_dropout: float = config_field(0.1, "training probability of replacing a user/item ID by the unknown row 0")
    model_overrides: dict = config_field({}, "any other CiUBMConfig field, e.g. {content_temperature: 0.05, sim_top_k: 20}")
    seed: int = config_field(0, "seed of init, shuffling and dropout")
    batch_size: int = config_field(1024, "training samples per step (per process)")
    eval_batch_size: int = config_field(4096, "samples per forward pass in evaluation")
    learning_rate: float = config_field(1e-3, "AdamW learning rate")
    lr_decay_on_plateau: float = config_field(1.0, "multiply the learning rate by this after each evaluation without "
                                              "a better valid AUC (1 = constant; FuxiCTR's fit uses 0.1)")
    weight_decay: float = config_field(0.0, "AdamW decoupled weight decay")
    max_grad_norm: float = config_field(10.0, "gradient-norm clip (0 = off)")
    epochs: int = config_field(5, "passes over the train split (upper bound; early stopping may end sooner)")
    max_steps: int = config_field(0, "optimizer steps upper bound (0 = epochs decide)")
    eval_every: int = config_field(0, "evaluate valid every N steps (0 = at the end of each epoch)")
    patience: int = config_field(2, "stop after this many evaluations without a better valid AUC (0 = never stop early)")
    checkpoint_every: int = config_field(0, "save a resumable checkpoint every N steps (0 = at each evaluation)")
    keep_checkpoints: int = config_field(2, "newest checkpoints kept")
    show_progress: bool = config_field(True, "tqdm progress bar (main process only)")
    num_threads: int = config_field(0, "torch intra-op threads (0 = leave as is)")

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what is expected."""
        if not self.data_dir:
            raise ValueError("data_dir is required: a directory written by `mim-hf data prepare` / PreparedData.save")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.base not in ("din", "sim"):
            raise ValueError(f"base must be 'din' or 'sim', got {self.base!r}")
        if needs_center(self) and not self.center_path:
            raise ValueError(
                f"mode={self.mode!r}, base={self.base!r} needs content embeddings: set center_path to a "
                "Representation Center directory (mim-hf center build ...)"
            )
        positive = {"max_len": self.max_len, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                    "id_embed_dim": self.id_embed_dim, "content_proj_dim": self.content_proj_dim,
                    "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("epochs", "max_steps", "eval_every", "patience", "checkpoint_every", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("epochs and max_steps are both 0: nothing would be trained")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 < self.lr_decay_on_plateau <= 1.0:
            raise ValueError(f"lr_decay_on_plateau must be in (0, 1], got {self.lr_decay_on_plateau}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(f"weight_decay and max_grad_norm must be >= 0, got {self.weight_decay}, {self.max_grad_norm}")


def needs_center(config: CTRTrainConfig) -> bool:
    return config.mode != "din" or config.base == "sim"


# ------------------------------------------------------------------------------------------
# Collate once
# ------------------------------------------------------------------------------------------
class CTRTensorSplit(torch.utils.data.Dataset):
    """One split collated once into tensors; ``__getitems__(indices)`` returns a model-ready batch.

    Holds the collator's output for all N samples (ids (N,), (N, L), features, content rows,
    labels), every chunk padded to ``collator.max_len``. A batch also carries
    ``sample_index`` (B,), popped before the model.
    """

    def __init__(self, tensors: dict[str, Any]):
        self.tensors = tensors
        self.length = int(tensors["user_ids"].shape[0])

    @classmethod
    def collate(cls, collator: CTRCollator, samples, chunk_rows: int = _COLLATE_CHUNK_ROWS) -> "CTRTensorSplit":
        """Run ``collator`` over ``samples`` (a datasets.Dataset) in chunks and concatenate."""
        if len(samples) == 0:
            raise ValueError("cannot train or evaluate on an empty split (0 samples)")
        columns = ["user_id", "item_id", "behavior_item_ids", "label", *collator.user_features]
        missing = [c for c in columns if c not in samples.column_names]
        if missing:
            raise ValueError(f"samples lack columns {missing}; columns: {samples.column_names}")
        samples = samples.select_columns(columns)
        chunks = [collator(samples[start:start + chunk_rows]) for start in range(0, len(samples), chunk_rows)]
        # a fixed width: the attention path (packed or padded) and the ID-dropout draws of a training
        # run then depend on max_len only, not on the longest history in the data
        return cls(_concat_batches(chunks, collator.max_len))

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices) -> dict[str, Any]:
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = _index_batch(self.tensors, index)
        batch["sample_index"] = index
        return batch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])


def _concat_batches(batches: list[dict], width: int, key: str = "") -> dict:
    """Concatenate collated chunks; behaviour tensors (dim 1 = sequence) are 0-padded to ``width``."""
    first = batches[0]
    if isinstance(first, dict):
        return {name: _concat_batches([b[name] for b in batches], width, key or name) for name in first}
    if key.startswith("behavior_"):
        batches = [F.pad(b, (0, 0) * (b.dim() - 2) + (0, width - b.shape[1])) for b in batches]
    return torch.cat(batches)


def _index_batch(tensors, index: torch.Tensor):
    if isinstance(tensors, dict):
        return {key: _index_batch(value, index) for key, value in tensors.items()}
    return tensors[index]


def _batch_as_is(batch):
    """DataLoader collate_fn: ``__getitems__`` already built the batch."""
    return batch


# ------------------------------------------------------------------------------------------
# Features, collator, model
# ------------------------------------------------------------------------------------------
def infer_features(prepared, config: CTRTrainConfig) -> tuple[list[str], list[str]]:
    """(user_features, item_features): the configured ones, or every usable side feature."""
    columns = prepared.samples["train"].column_names
    item_columns = prepared.items.column_names
    if config.user_features is None:
        user = [c for c in columns if c.startswith("user_") and c != "user_id" and c in prepared.vocabs]
    else:
        user = list(config.user_features)
    if config.item_features is None:
        item = [c for c in columns if c.startswith("item_") and c != "item_id" and c in prepared.vocabs
                and c[len("item_"):] in item_columns]
    else:
        item = list(config.item_features)
    for name in user + item:
        if name not in prepared.vocabs:
            raise ValueError(f"feature {name!r} has no vocabulary in the prepared data; available: {sorted(prepared.vocabs)}")
    return user, item


def open_center(path: str | os.PathLike):
    from mim_hf.center.store import RepresentationCenter

    if not Path(path).is_dir():
        raise ValueError(f"center_path {str(path)!r} is not a directory; build one with `mim-hf center build`")
    return RepresentationCenter.load(path)


def build_model_config(config: CTRTrainConfig, collator: CTRCollator, center):
    """``CiUBMConfig`` from the training config, the collator's vocabularies and the center's provenance."""
    from mim_hf.modeling.configuration_ciubm import CiUBMConfig

    center_fields = {}
    if center is not None:
        center_fields = {
            "content_dim": center.embed_dim,
            "center_fingerprint": center.fingerprint,
            # relative to output_dir/model, where the model is saved: no absolute local path in its config
            "center_repo": os.path.relpath(Path(center.root).resolve(), (Path(config.output_dir) / "model").resolve()),
            "center_revision": center.version,
            "center_level": config.center_level,
        }
    return CiUBMConfig(
        mode=config.mode, base=config.base, id_embed_dim=config.id_embed_dim,
        content_proj_dim=config.content_proj_dim, attention_hidden_sizes=list(config.attention_hidden_sizes),
        fusion_hidden_sizes=list(config.fusion_hidden_sizes), dropout=config.dropout,
        unknown_row_policy=config.unknown_row_policy, unknown_id_dropout=config.unknown_id_dropout,
        behavior_max_len=config.max_len,  # extra field: predict() collates like training did
        **collator.config_kwargs(), **center_fields, **dict(config.model_overrides),
    )


def collate_splits(collator: CTRCollator, prepared) -> tuple[dict, dict]:
    """({split: CTRTensorSplit}, {split: collator fallback counts}) for train/valid/test."""
    splits, fallbacks = {}, {}
    for name in ("train", "valid", "test"):
        collator.stats.clear()
        splits[name] = CTRTensorSplit.collate(collator, prepared.samples[name])
        fallbacks[name] = dict(collator.stats)
    return splits, fallbacks


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_split(model, split: CTRTensorSplit, batch_size: int, accelerator=None) -> np.ndarray:
    """Click probabilities (N,) of every sample of ``split``, in split order."""
    model.eval()
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=False, collate_fn=_batch_as_is)
    distributed = accelerator is not None and accelerator.num_processes > 1
    if distributed:  # each process scores a shard; gather_for_metrics drops the padding duplicates
        loader = accelerator.prepare_data_loader(loader)
    device = next(model.parameters()).device
    probs, order = [], []
    for batch in loader:
        index = batch.pop("sample_index")
        batch.pop("labels", None)
        batch = _to_device(batch, device)
        out = model(**batch).probs.float()
        if distributed:
            out, index = accelerator.gather_for_metrics((out, index.to(device)))
        probs.append(out.cpu())
        order.append(index.cpu())
    result = np.empty(len(split), dtype=np.float64)
    result[torch.cat(order).numpy()] = torch.cat(probs).numpy()
    return result


def _to_device(batch, device):
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch


def evaluate_split(model, split: CTRTensorSplit, samples, batch_size: int, accelerator=None) -> dict:
    """Overall + per-bucket AUC/GAUC/logloss/n of ``model`` on one split."""
    probs = predict_split(model, split, batch_size, accelerator)
    return evaluate_by_bucket(np.asarray(samples["label"]), probs, np.asarray(samples["user_id"]),
                              np.asarray(samples["popularity_bucket"]))


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_transformers_bars():
    """Hide transformers' per-save/load shard bars (one per evaluation would flood the log)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save_model_atomic(model, path: Path) -> None:
    """save_pretrained into a temporary sibling, then swap it in (a crash leaves the old model)."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers_bars():
        model.save_pretrained(str(tmp))
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def run(config: CTRTrainConfig, resume: bool = False, accelerator=None) -> dict:
    """Train, early-stop on valid AUC, evaluate the best model; returns the metrics.json dict.

    ``config.num_threads`` applies for this call only (the previous torch setting is restored).
    """
    config.validate()
    with torch_threads(config.num_threads), hold_output_dir(config.output_dir):
        return _train_and_evaluate(config, resume, accelerator)


def _train_and_evaluate(config: CTRTrainConfig, resume: bool, accelerator) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from mim_hf.data import PreparedData
    from mim_hf.modeling.modeling_ciubm import CiUBMForCTR

    timings: dict[str, float] = {}
    started = time.perf_counter()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    output_dir = Path(config.output_dir)
    checkpoint = start_run(accelerator, config, resume)
    set_seed(config.seed)

    # ---- data, center, tensors --------------------------------------------------------
    prepared = PreparedData.load(config.data_dir)
    center = open_center(config.center_path) if needs_center(config) else None
    content_table = center_content_table(center, config.center_level) if center is not None else None
    user_features, item_features = infer_features(prepared, config)
    collator = CTRCollator(prepared.vocabs, items=prepared.items, center=center, max_len=config.max_len,
                           user_features=user_features, item_features=item_features)
    timings["load"] = time.perf_counter() - started
    tick = time.perf_counter()
    splits, fallbacks = collate_splits(collator, prepared)
    if center is not None:
        fallbacks["center_catalogue_misses"] = int((center.rows_for([str(i) for i in prepared.items["item_id"]]) < 0).sum())
    timings["collate"] = time.perf_counter() - tick

    # ---- model, optimizer, loader -----------------------------------------------------
    model = CiUBMForCTR(build_model_config(config, collator, center))
    if content_table is not None:
        model.set_content_table(content_table)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    sampler = EpochShuffleSampler(len(splits["train"]), config.seed, generator="torch")
    # its own generator: creating an iterator (also when skipping batches on resume) would
    # otherwise draw from the global RNG and shift the dropout masks of a resumed run
    train_loader = torch.utils.data.DataLoader(splits["train"], batch_size=config.batch_size, sampler=sampler,
                                               collate_fn=_batch_as_is, num_workers=0,
                                               generator=torch.Generator().manual_seed(config.seed))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    progress = TrainingProgress()
    # running train-loss sum since the last evaluation travels in the checkpoint too
    progress.train_loss_sum, progress.train_loss_count = 0.0, 0
    checkpoint_state = {"model": model, "optimizer": optimizer, "progress": progress}
    restore_checkpoint(accelerator, checkpoint, checkpoint_state)

    steps_per_epoch = len(train_loader)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    if config.epochs:
        total_steps = min(total_steps, steps_per_epoch * config.epochs)
    eval_every = config.eval_every or steps_per_epoch
    checkpoint_every = config.checkpoint_every or eval_every
    best_dir = output_dir / "model"
    if accelerator.is_main_process:
        # model/ is written at each improvement, between checkpoints: the checkpoint carries its
        # copy, so a resumed run starts from the best model of the checkpointed step, and a fresh
        # run never finds an earlier run's model.
        if checkpoint is not None:
            restore_folder(checkpoint, "best_model", best_dir)
        elif best_dir.exists():
            shutil.rmtree(best_dir)
    accelerator.wait_for_everyone()
    stopped_early = progress.best_step is not None and config.patience and progress.evals_without_improvement >= config.patience
    bar = tqdm(total=total_steps, initial=progress.step, desc=f"ctr {config.mode}", unit="step",
               disable=not (config.show_progress and accelerator.is_main_process))

    def evaluate_and_maybe_stop() -> bool:
        valid = evaluate_split(model, splits["valid"], prepared.samples["valid"], config.eval_batch_size, accelerator)
        model.train()
        mean_loss = progress.train_loss_sum / progress.train_loss_count if progress.train_loss_count else None
        entry = {"train_loss": mean_loss,
                 "valid_auc": valid["overall"]["auc"], "valid_gauc": valid["overall"]["gauc"],
                 "valid_logloss": valid["overall"]["logloss"]}
        progress.train_loss_sum, progress.train_loss_count = 0.0, 0
        entry["learning_rate"] = optimizer.param_groups[0]["lr"]  # the rate the steps before this evaluation used
        improved = progress.record(entry, key="valid_auc", higher_is_better=True)
        progress.history[-1]["is_best"] = improved
        if not improved and config.lr_decay_on_plateau != 1.0:
            for group in optimizer.param_groups:  # saved with the optimizer state: a resumed run keeps it
                group["lr"] *= config.lr_decay_on_plateau
        if improved and accelerator.is_main_process:
            _save_model_atomic(accelerator.unwrap_model(model), best_dir)
        bar.set_postfix(valid_auc=f"{entry['valid_auc']:.4f}" if entry["valid_auc"] is not None else "n/a")
        return bool(config.patience) and progress.evals_without_improvement >= config.patience

    tick = time.perf_counter()
    model.train()
    for batch in train_batches(accelerator, progress, train_loader,
                               stop=lambda: progress.step >= total_steps or stopped_early):
        batch.pop("sample_index")
        loss = model(**batch).loss
        accelerator.backward(loss)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.train_loss_sum += float(loss.detach())
        progress.train_loss_count += 1
        progress.advance(steps_per_epoch)
        bar.update(1)
        done = progress.step >= total_steps
        if progress.step % eval_every == 0 or done:
            stopped_early = evaluate_and_maybe_stop() and not done
        if progress.step % checkpoint_every == 0 or done or stopped_early:
            save_checkpoint(accelerator, config, progress.step, checkpoint_state, folders={"best_model": best_dir})
        if done or stopped_early:
            break
    bar.close()
    timings["train"] = time.perf_counter() - tick

    # ---- final evaluation of the best model ----------------------------------------
    tick = time.perf_counter()
    accelerator.wait_for_everyone()
    if not best_dir.exists():
        raise RuntimeError(f"no best model under {best_dir}: valid AUC was undefined at every evaluation "
                           "(does the valid split hold both labels?)")
    with quiet_transformers_bars():
        best = CiUBMForCTR.from_pretrained(str(best_dir))
    if content_table is not None:
        best.set_content_table(content_table)
    best.to(accelerator.device)
    results = {name: evaluate_split(best, splits[name], prepared.samples[name], config.eval_batch_size, accelerator)
               for name in ("valid", "test")}
    timings["evaluate"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    metrics = {
        "protocol": prepared.config.protocol,
        "mode": config.mode,
        "dataset": prepared.name,
        "seed": config.seed,
        "test": results["test"],
        "valid": results["valid"],
        "history": progress.history,
        "config": dataclasses.asdict(config),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "fallbacks": fallbacks,
        "training": {
            "best_step": progress.best_step, "best_valid_auc": progress.best_metric, "steps": progress.step,
            "steps_per_epoch": steps_per_epoch, "stopped_early": bool(stopped_early),
            "resumed_from": str(checkpoint) if checkpoint else None,
            "num_parameters": sum(p.numel() for p in best.parameters()),
            "model_dir": str(best_dir), "device": str(accelerator.device), "num_processes": accelerator.num_processes,
        },
    }
    if accelerator.is_main_process:
        write_json_atomic(output_dir / "metrics.json", metrics)
    return metrics


__all__ = ["CTRTrainConfig", "CTRTensorSplit", "EpochShuffleSampler", "run", "evaluate_split", "predict_split"]
