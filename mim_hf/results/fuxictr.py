"""FuxiCTR's DIN (``model_zoo/LongCTR/DIN``, its own model class and its own ``fit``) on our samples.

The adapter turns a prepared split into FuxiCTR's inputs and back:

* feature map: ``user_id`` and every user side feature (``source: user``), ``item_id`` and every
  item side feature (``source: item``) with our vocabulary sizes; index 0 is our "unknown" row
  and FuxiCTR's ``padding_idx`` (a fixed zero vector). Multi-valued item features (genres) are
  FuxiCTR ``sequence`` features mean-pooled by its ``MaskedAveragePooling``.
* batches: ``(batch_dict, item_dict, mask)`` as its LongCTR data loader yields them; the item
  dict holds the behaviours then the target, flattened to ``B * (L + 1)`` rows; the integer codes
  come from our :class:`~mim_hf.ctr.collator.CTRCollator` (same vocabularies, truncation, mask).
* training: ``model.fit`` (FuxiCTR's loop: early stopping on its valid AUC with
  ``early_stop_patience``, learning-rate decay on plateau, best weights reloaded at the end).
* scoring: ``model.predict`` on valid and test, then OUR metrics
  (:func:`mim_hf.ctr.metrics.evaluate_by_bucket`) on its predictions.

Settings map onto FuxiCTR's arguments: ``learning_rate``, ``id_embed_dim`` -> ``embedding_dim``,
``dropout`` -> ``net_dropout``, ``weight_decay`` -> an L2 ``net_regularizer`` and
``embedding_regularizer`` (FuxiCTR has no decoupled weight decay).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mim_hf.common.loop import torch_threads
from mim_hf.ctr.metrics import evaluate_by_bucket


def import_din():
    """(fuxictr module, its DIN class); a clear error when the ``results`` extra is missing."""
    try:
        import fuxictr
        from model_zoo.LongCTR.DIN.DIN import DIN
    except ImportError as error:
        raise ImportError(f"FuxiCTR is not installed ({error}); pip install 'mim-hf[results]' "
                          "(fuxictr==2.3.10) to run the 'fuxictr_din' row") from error
    return fuxictr, DIN


def feature_map(collator, root: str, embedding_dim: int):
    """A FuxiCTR ``FeatureMap`` for the features ``collator`` encodes, ``embedding_dim`` wide."""
    from fuxictr.features import FeatureMap

    fmap = FeatureMap("mim_hf", root)
    sizes = collator.config_kwargs()
    fmap.features["user_id"] = {"type": "categorical", "source": "user", "vocab_size": len(collator.vocabs["user_id"]),
                                "padding_idx": 0}
    for name, size in sizes["user_feature_sizes"].items():
        fmap.features[name] = {"type": "categorical", "source": "user", "vocab_size": size, "padding_idx": 0}
    fmap.features["item_id"] = {"type": "categorical", "source": "item", "vocab_size": len(collator.vocabs["item_id"]),
                                "padding_idx": 0}
    for name, size in sizes["item_feature_sizes"].items():
        spec = {"type": "categorical", "source": "item", "vocab_size": size, "padding_idx": 0}
        if name in sizes["multi_valued_item_features"]:
            spec.update(type="sequence", feature_encoder="layers.MaskedAveragePooling()")
        fmap.features[name] = spec
    fmap.labels = ["label"]
    fmap.num_fields, fmap.default_emb_dim = len(fmap.features), embedding_dim
    return fmap


class FuxiBatches:
    """A collated split as FuxiCTR batches ``(batch_dict, item_dict, mask)``; shuffled per pass when
    ``shuffle`` (its own generator seeded by ``seed`` and the pass number)."""

    def __init__(self, split, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.tensors, self.n = split.tensors, len(split)
        self.batch_size, self.shuffle, self.seed, self.passes = batch_size, shuffle, seed, 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.passes))
            self.passes += 1
        else:
            order = torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            yield self.batch(order[start:start + self.batch_size])

    def batch(self, index: torch.Tensor):
        t = self.tensors
        batch_dict = {"user_id": t["user_ids"][index].long(), "label": t["labels"][index].float()}
        batch_dict.update({name: values[index].long() for name, values in t["user_features"].items()})
        item_dict = {"item_id": _behaviours_then_target(t["behavior_item_ids"][index], t["target_item_ids"][index])}
        for name, target in t.get("target_item_features", {}).items():
            item_dict[name] = _behaviours_then_target(t["behavior_item_features"][name][index], target[index])
        return batch_dict, item_dict, t["behavior_mask"][index].float()


def _behaviours_then_target(behaviours: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, L, *) behaviours and (B, *) target -> (B * (L + 1), *) rows, target last per sample."""
    rows = torch.cat([behaviours, target.unsqueeze(1)], dim=1).long()
    return rows.flatten(0, 1)


def train_and_evaluate(prepared, collator, settings: dict, architecture: dict, seed: int, epochs: int,
                       patience: int, batch_size: int = 1024, eval_batch_size: int = 4096,
                       max_grad_norm: float = 10.0, return_predictions: bool = False, num_threads: int = 0) -> dict:
    """Train FuxiCTR's DIN on ``prepared``'s train split and score valid and test with our metrics.

    ``settings``: learning_rate, id_embed_dim, dropout, weight_decay. ``architecture``:
    ``attention_hidden_sizes`` and ``fusion_hidden_sizes`` (the widths our DIN uses). ``num_threads``:
    torch intra-op threads for this call only (0 = leave as is), as our CTR training's field.
    Returns ``{"valid": by-bucket metrics, "test": ..., "training": {...}}`` (and, when
    ``return_predictions``, ``"predictions": {"valid": probs, "test": probs}`` in split order).
    """
    from mim_hf.ctr.train import CTRTensorSplit

    fuxictr, DIN = import_din()
    from fuxictr.pytorch.torch_utils import seed_everything

    started = time.perf_counter()
    with torch_threads(num_threads):
        splits = {name: CTRTensorSplit.collate(collator, prepared.samples[name]) for name in ("train", "valid", "test")}
        seed_everything(seed)
        weight_decay = float(settings.get("weight_decay", 0.0))
        with tempfile.TemporaryDirectory(prefix="fuxictr_din_") as root:
            fmap = feature_map(collator, root, int(settings["id_embed_dim"]))
            model = DIN(fmap, model_id="DIN", gpu=0 if torch.cuda.is_available() else -1, model_root=root,
                        dnn_hidden_units=list(architecture["fusion_hidden_sizes"]),
                        attention_hidden_units=list(architecture["attention_hidden_sizes"]),
                        embedding_dim=int(settings["id_embed_dim"]), net_dropout=float(settings["dropout"]),
                        learning_rate=float(settings["learning_rate"]), optimizer="adam", loss="binary_crossentropy",
                        embedding_regularizer=weight_decay or None, net_regularizer=weight_decay or None,
                        early_stop_patience=patience, metrics=["AUC"], monitor="AUC", verbose=0)
            Path(model.checkpoint).parent.mkdir(parents=True, exist_ok=True)
            train = FuxiBatches(splits["train"], batch_size, shuffle=True, seed=seed)
            level = logging.getLogger().level
            logging.getLogger().setLevel(logging.WARNING)  # fit() logs every evaluation at INFO
            try:
                model.fit(train, epochs=epochs, validation_data=FuxiBatches(splits["valid"], eval_batch_size),
                          max_gradient_norm=max_grad_norm)
            finally:
                logging.getLogger().setLevel(level)
            results, predictions = {}, {}
            for name in ("valid", "test"):
                probs = predictions[name] = model.predict(FuxiBatches(splits[name], eval_batch_size))
                samples = prepared.samples[name]
                results[name] = evaluate_by_bucket(np.asarray(samples["label"]), probs, np.asarray(samples["user_id"]),
                                                   np.asarray(samples["popularity_bucket"]))
        results["training"] = {"library": f"fuxictr {fuxictr.__version__}", "steps": int(model._total_steps),
                               "steps_per_epoch": len(train), "stopped_early": bool(model._stop_training),
                               "best_valid_auc": float(model._best_metric),
                               "num_parameters": sum(p.numel() for p in model.parameters()),
                               "features": list(fmap.features), "num_threads": torch.get_num_threads()}
        results["timings_s"] = {"total": round(time.perf_counter() - started, 3)}
        if return_predictions:
            results["predictions"] = predictions
        return results
