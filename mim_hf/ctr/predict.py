"""Load a trained CTR model (one loader, local or Hub) and score samples with it.

    bundle = load_ctr_model("runs/ctr/model")          # or a Hub repo id: "org/ciubm-ml100k"
    probs = predict(bundle, samples, items=prepared.items)

:func:`load_ctr_model` opens the model, opens the Representation Center its config names (or
the one you pass), checks the center's encoder fingerprint and dim against the config, and
attaches the center's content table to the model (``set_content_table``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from mim_hf.ctr.collator import CTRCollator, center_content_table
from mim_hf.ctr.train import CTRTensorSplit, quiet_transformers_bars, open_center, predict_split


@dataclasses.dataclass
class CTRBundle:
    """What scoring needs: the model (eval mode, content table attached), its vocabularies (from
    its config) and its center (or None for plain DIN)."""

    model: Any
    vocabs: dict[str, list[str]]
    center: Any = None

    def collator(self, items=None, max_len: int | None = None) -> CTRCollator:
        """A ``CTRCollator`` for this model: side features from its config, content rows from its
        center, ``max_len`` as in training unless given; ``items`` (the catalogue) for item features."""
        config = self.model.config
        return CTRCollator(self.vocabs, items=items, center=self.center,
                           max_len=max_len or getattr(config, "behavior_max_len", 50),
                           user_features=tuple(config.user_feature_sizes), item_features=tuple(config.item_feature_sizes))


def load_ctr_model(model: str | os.PathLike, center=None, *, revision: str | None = None,
                   token: str | None = None, load_center: bool = True) -> CTRBundle:
    """A trained ``CiUBMForCTR`` with its vocabularies and Representation Center, checked.

    ``model``: a directory written by ``save_pretrained`` (``run`` writes ``output_dir/model``) or
    a Hub repo id (``push_ctr_model``; ``revision``/``token`` apply, and the center comes from the
    Hub repo and revision its config pins). ``center``: a ``RepresentationCenter`` or a center
    directory; None = the one recorded in the model config. Plain DIN needs none;
    ``load_center=False`` skips it (then attach a table yourself). Raises ``ValueError`` when the
    center's encoder fingerprint or dim differs from the recorded one, or none can be found.
    """
    if not Path(model).is_dir():
        from mim_hf.ctr.hub import load_ctr_from_hub  # a Hub repo id

        return load_ctr_from_hub(str(model), revision=revision, token=token, load_center=load_center, center=center)
    from mim_hf.modeling.modeling_ciubm import CiUBMForCTR

    with quiet_transformers_bars():
        loaded = CiUBMForCTR.from_pretrained(str(model)).eval()
    if center is None and load_center:
        center = recorded_center_path(model, loaded.config.center_repo)
    return attach_center(loaded, center, str(model), load_center)


def recorded_center_path(model_dir: str | os.PathLike, center_repo: str | None) -> Path | None:
    """The center directory a local model's config records: ``center_repo`` relative to the model
    folder (as training writes it) or absolute (older models). Raises ``ValueError`` naming both
    when it does not exist (pass ``center=`` / ``--center`` then)."""
    if center_repo is None:
        return None
    path = Path(model_dir) / center_repo  # an absolute center_repo stays as it is
    if not path.is_dir():
        raise ValueError(f"CTR model {str(model_dir)!r} records center {center_repo!r} (looked for {path}), which does "
                         "not exist here; pass the center directory (center= / --center DIR)")
    return path


def attach_center(model, center, name: str, load_center: bool = True) -> CTRBundle:
    """The bundle of a loaded ``model``: ``center`` (object or directory) checked against its config
    and its content table attached. Shared by the local and the Hub loader."""
    config = model.config
    vocabs = dict(config.vocabularies or {})
    if not vocabs:
        raise ValueError(f"CTR model {name!r} has no vocabularies in its config; it cannot map raw ids to rows")
    if not load_center:
        return CTRBundle(model, vocabs, None)
    if center is None:
        if model.needs_content_inputs:
            raise ValueError(f"CTR model {name!r} (mode {config.mode!r}, base {config.base!r}) reads content but names "
                             "no center: pass center=")
        return CTRBundle(model, vocabs, None)
    if isinstance(center, (str, os.PathLike)):
        center = open_center(center)
    if config.center_fingerprint is not None:
        center.check_fingerprint(config.center_fingerprint, config.content_dim if model.needs_content_inputs else None)
    elif model.needs_content_inputs:
        raise ValueError(f"{name}: the model config records no center_fingerprint to check {center} against")
    if model.needs_content_inputs:
        model.set_content_table(center_content_table(center, getattr(config, "center_level", "item_embeds")))
    return CTRBundle(model, vocabs, center)


def predict(model, samples, center=None, items=None, batch_size: int = 4096, *, show_progress: bool = False,
            fallbacks: dict | None = None) -> np.ndarray:
    """Click probabilities, float64 (N,), of CTR samples scored by a trained model.

    ``model``: a :class:`CTRBundle` or what :func:`load_ctr_model` takes (``center`` is passed on).
    ``samples``: a ``datasets.Dataset`` with the columns of ``PreparedData.samples`` (``user_id``,
    ``item_id``, ``behavior_item_ids``, the model's ``user_*`` features; ``label`` is optional).
    ``items``: the item catalogue (``PreparedData.items``), required when the model uses item side
    features. Unknown users/items map to the unknown row, as in training; ``fallbacks`` (a dict,
    optional) is updated with those counts (the collator's ``stats``). ``show_progress``: a tqdm
    bar over the batches.
    """
    from tqdm.auto import tqdm

    bundle = model if isinstance(model, CTRBundle) else load_ctr_model(model, center)
    if bundle.model.config.item_feature_sizes and items is None:
        raise ValueError("this model uses item side features: pass items= (the item catalogue)")
    if "label" not in samples.column_names:  # the collator reads labels when present; scoring needs none
        samples = samples.add_column("label", [0] * len(samples))
    collator = bundle.collator(items)
    probs = []
    for start in tqdm(range(0, len(samples), batch_size), desc="scoring", unit="batch", disable=not show_progress):
        batch = samples.select(range(start, min(start + batch_size, len(samples))))
        probs.append(predict_split(bundle.model, CTRTensorSplit.collate(collator, batch), batch_size))
    if fallbacks is not None:
        for key, count in collator.stats.items():
            fallbacks[key] = fallbacks.get(key, 0) + count
    return np.concatenate(probs) if probs else np.empty(0, dtype=np.float64)


__all__ = ["CTRBundle", "load_ctr_model", "predict", "recorded_center_path"]
