r"""Multi-level InfoNCE for C-SFT: the same trigger -> target pairs, contrasted per level.

.. math::

    L = w_\text{item} L(\text{item}_t, \text{item}_g)
      + w_\text{text} L(\text{text}_t, \text{text}_g)
      + w_\text{image} L(\text{image}_t, \text{image}_g)
      + w_\text{cross} \tfrac12 \big[L(\text{text}_t, \text{image}_g) + L(\text{image}_t, \text{text}_g)\big]

with :math:`t` the trigger side, :math:`g` the target side and each :math:`L` an
``InfoNCELoss`` (its own temperature parameter when learnable, and its own queue when
``queue_size > 0``: candidates of different levels live in different spaces).

Image-bearing levels only use pairs where the images they need exist (``image_mask``):
``image`` needs both images, ``text -> image`` the target's, ``image -> text`` the trigger's.
Excluded pairs are neither anchors nor candidates (``pair_mask``). When either side has no
``image_embeds`` at all (a text-only catalogue) the ``image`` and ``cross`` levels are
skipped and left out of the returned per-level dict. Skipping depends only on that
structure, never on batch contents, so every data-parallel process runs the same collectives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .infonce import InfoNCELoss

LEVELS = ("item", "text", "image", "cross")
DEFAULT_WEIGHTS = {"item": 1.0, "text": 0.5, "image": 0.5, "cross": 0.25}
# Each level's InfoNCE module: (anchor field on the trigger side, positive field on the target side).
_DIRECTIONS = {
    "item": ("item_embeds", "item_embeds"),
    "text": ("text_embeds", "text_embeds"),
    "image": ("image_embeds", "image_embeds"),
    "cross_text_to_image": ("text_embeds", "image_embeds"),
    "cross_image_to_text": ("image_embeds", "text_embeds"),
}


def _level_of(direction: str) -> str:
    return "cross" if direction.startswith("cross") else direction


def _field(outputs: Any, name: str) -> torch.Tensor | None:
    """Read ``name`` from a ModelOutput / dict / plain object; None when absent."""
    if outputs is None:
        return None
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


class MultiLevelInfoNCE(nn.Module):
    """Weighted sum of InfoNCE over item, text, image and cross-modal levels.

    Args:
        weights: level -> weight, keys among ``("item", "text", "image", "cross")``; a level
            left out or weighted 0 is not computed. Default ``DEFAULT_WEIGHTS``.
        temperature, learnable_temperature, gather_across_devices, queue_size, symmetric,
        catalogue_size, embed_dim, candidate_log_prior: passed to every level's ``InfoNCELoss``.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        gather_across_devices: bool = False,
        queue_size: int = 0,
        symmetric: bool = False,
        catalogue_size: int | None = None,
        embed_dim: int | None = None,
        candidate_log_prior: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = sorted(set(weights) - set(LEVELS))
        if unknown:
            raise ValueError(f"unknown loss levels {unknown}; expected keys among {list(LEVELS)}")
        for level, weight in weights.items():
            if not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"weight of level {level!r} must be a number >= 0, got {weight!r}")
        self.weights = {level: float(w) for level, w in weights.items() if w > 0}
        if not self.weights:
            raise ValueError(f"all level weights are 0 or missing: {weights}")
        self.directions = nn.ModuleDict({
            direction: InfoNCELoss(
                temperature=temperature,
                learnable_temperature=learnable_temperature,
                gather_across_devices=gather_across_devices,
                queue_size=queue_size,
                symmetric=symmetric,
                catalogue_size=catalogue_size,
                embed_dim=embed_dim,
                candidate_log_prior=candidate_log_prior,
            )
            for direction in _DIRECTIONS
            if _level_of(direction) in self.weights
        })

    def forward(
        self,
        trigger_outputs: Any,
        target_outputs: Any,
        trigger_item_ids: torch.Tensor,
        target_item_ids: torch.Tensor,
        hard_negative_outputs: Any | None = None,
        hard_negative_ids: torch.Tensor | None = None,
        hard_negative_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return ``(total_loss, per_level_losses)``.

        Args:
            trigger_outputs / target_outputs: encoder outputs for the ``B`` trigger and target
                items (ModelOutput, dict or object) with ``item_embeds`` and ``text_embeds``
                ``(B, D)``, and optionally ``image_embeds`` ``(B, D)`` (None for text-only)
                and ``image_mask`` ``(B,)`` bool (all True when absent).
            trigger_item_ids / target_item_ids: ``(B,)`` int64 item indices (>= 0).
            hard_negative_outputs: optional encoder outputs of ``B * H`` hard-negative items,
                fields ``(B, H, D)`` or flat ``(B * H, D)`` (row-major per anchor).
            hard_negative_ids: ``(B, H)`` int64, required with ``hard_negative_outputs``.
            hard_negative_mask: optional ``(B, H)`` bool, False = padding slot.

        Returns:
            ``total_loss``: 0-d tensor, ``sum(weight * level_loss)``.
            ``per_level_losses``: level -> unweighted loss as a float (for logging), only for
            the levels computed.
        """
        if trigger_item_ids.shape != target_item_ids.shape:
            raise ValueError(f"trigger_item_ids {tuple(trigger_item_ids.shape)} and target_item_ids "
                             f"{tuple(target_item_ids.shape)} must have the same shape (B,)")
        if (hard_negative_outputs is None) != (hard_negative_ids is None):
            raise ValueError("hard_negative_outputs and hard_negative_ids must be given together")
        has_images = _field(trigger_outputs, "image_embeds") is not None and \
            _field(target_outputs, "image_embeds") is not None
        trigger_has_image = self._image_mask(trigger_outputs, trigger_item_ids.shape)
        target_has_image = self._image_mask(target_outputs, target_item_ids.shape)
        pair_masks = {
            "item": None,
            "text": None,
            "image": None if not has_images else trigger_has_image & target_has_image,
            "cross_text_to_image": None if not has_images else target_has_image,
            "cross_image_to_text": None if not has_images else trigger_has_image,
        }

        direction_losses: dict[str, torch.Tensor] = {}
        for direction, loss_fn in self.directions.items():
            anchor_field, positive_field = _DIRECTIONS[direction]
            if "image_embeds" in (anchor_field, positive_field) and not has_images:
                continue
            anchors = _field(trigger_outputs, anchor_field)
            positives = _field(target_outputs, positive_field)
            if anchors is None or positives is None:
                raise ValueError(f"level {_level_of(direction)!r} needs trigger {anchor_field} and "
                                 f"target {positive_field}; one of them is missing")
            hard = self._hard_negatives(hard_negative_outputs, positive_field, hard_negative_ids,
                                        hard_negative_mask)
            direction_losses[direction] = loss_fn(
                anchors, positives, trigger_item_ids, target_item_ids,
                pair_mask=pair_masks[direction], **hard,
            )

        level_losses: dict[str, torch.Tensor] = {}
        for level in self.weights:
            parts = [loss for direction, loss in direction_losses.items() if _level_of(direction) == level]
            if parts:
                level_losses[level] = torch.stack(parts).mean()
        total = sum(self.weights[level] * loss for level, loss in level_losses.items())
        return total, {level: float(loss.detach()) for level, loss in level_losses.items()}

    @staticmethod
    def _image_mask(outputs: Any, shape: torch.Size) -> torch.Tensor | None:
        image_embeds = _field(outputs, "image_embeds")
        if image_embeds is None:
            return None
        image_mask = _field(outputs, "image_mask")
        if image_mask is None:
            return torch.ones(shape, dtype=torch.bool, device=image_embeds.device)
        if image_mask.shape != shape:
            raise ValueError(f"image_mask must be {tuple(shape)}, got {tuple(image_mask.shape)}")
        return image_mask.bool()

    @staticmethod
    def _hard_negatives(hard_outputs, field, hard_ids, hard_mask) -> dict[str, torch.Tensor | None]:
        """Hard-negative kwargs for one direction: candidates come from the target-side field."""
        if hard_outputs is None:
            return {}
        embeds = _field(hard_outputs, field)
        if embeds is None:
            raise ValueError(f"hard_negative_outputs lacks {field}, needed as hard-negative candidates")
        batch_size, num_hard = hard_ids.shape
        if embeds.dim() == 2:  # flat encoder output of the B*H items
            if embeds.shape[0] != batch_size * num_hard:
                raise ValueError(f"flat hard-negative {field} must have B*H = {batch_size * num_hard} rows "
                                 f"for hard_negative_ids {tuple(hard_ids.shape)}, got {tuple(embeds.shape)}")
            embeds = embeds.reshape(batch_size, num_hard, -1)
        mask = hard_mask
        if field == "image_embeds":
            image_mask = _field(hard_outputs, "image_mask")
            if image_mask is not None:  # a hard negative without an image is no image candidate
                image_mask = image_mask.reshape(batch_size, num_hard).bool()
                mask = image_mask if mask is None else mask & image_mask
        return {"hard_negatives": embeds, "hard_negative_ids": hard_ids, "hard_negative_mask": mask}
