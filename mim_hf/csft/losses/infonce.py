r"""InfoNCE over cosine similarities with space (cross-device) and time (queue) negatives.

For anchor :math:`i` (a trigger item's embedding) with positive :math:`p_i` (its target
item's embedding), both L2-normalised inside the loss, and the candidate set
:math:`C_i = [\text{positives of all ranks (space)},\ \text{hard negatives of } i,\ \text{queue (time)}]`:

.. math::

    \ell_i = -\log \frac{\exp(\cos(a_i, p_i)/\tau)}
                        {\sum_{c \in C_i,\ c \text{ not masked}} \exp(\cos(a_i, c)/\tau)}

A candidate is **masked** (logit :math:`-\infty`) when it is not anchor :math:`i`'s own
positive column and its item id

* equals the anchor's positive item id (a duplicate of the true target: in the batch, on
  another process, in the queue or among the hard negatives -- not a negative), or
* equals the anchor's own item id (the trigger item itself: through a shared encoder its
  content is trivially similar to the anchor; pushing it away would teach the encoder that an
  item is unlike itself), or
* is negative (an empty queue slot, or a pair excluded by ``pair_mask``).

The positive column is never masked, so a row whose candidates are all masked has loss
:math:`\log 1 = 0` (zero gradient) -- defined, never NaN -- and still counts in the mean.

**Reduction (exact under data parallelism).** Each process computes :math:`\ell_i` for its
own ``B`` anchors and returns :math:`\frac{W}{N}\sum_{i \in \text{local}} \ell_i`, with
:math:`W` the world size and :math:`N` the number of valid anchors over all processes (taken
from the gathered ids, no extra collective). The mean of the returned values over processes
-- what DDP's gradient averaging optimises -- is therefore exactly the mean of
:math:`\ell_i` over the whole global batch; with equal valid counts it is the local mean.
Remote candidates are detached (see ``gather_with_grad``), so each process back-propagates
through its own anchors and its own positives only: the averaged gradient equals the
global-batch gradient for anchors and hard negatives, while a positive receives gradient only
from the anchors on its own process (the terms from other processes' anchors are dropped --
the price of a gather without a backward all-reduce; tested in
``tests/test_losses_distributed.py``).

**Sampling-bias (logQ) correction.** In-batch and queue candidates are the targets of other
pairs, so an item turns up as a negative in proportion to how often it is a target: popular
items are over-sampled and a plain in-batch loss pushes them down. With
``candidate_log_prior`` (:math:`\log q_c`, the log probability that item :math:`c` is drawn as
a target) every in-batch and queue logit becomes :math:`\cos(a_i, c)/\tau - \log q_c`, the
correction of Yi et al. (RecSys 2019) that makes the sampled softmax estimate the full one.
Hard negatives are chosen differently and are left uncorrected.

``symmetric=True`` adds the reverse direction (each positive picks its anchor among the
anchors of all processes, same masking; no hard negatives or queue there, those are
target-side candidates) and returns the average of both directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import data_parallel_world, gather_with_grad
from .queue import EmbeddingQueue

# CLIP's cap on the learnable logit scale (temperature >= 0.01) keeps training stable.
_MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class ContrastiveLogits:
    """Masked logits of one direction of the loss.

    Attributes:
        logits: ``(B, C)`` float32, ``cos / temperature``, masked candidates at ``-inf``;
            columns ordered [positives of all ranks ``W*B``, hard negatives ``H``, queue ``Q``].
        positive_index: ``(B,)`` int64, column of each anchor's true positive
            (``rank * B + row``).
        anchor_mask: ``(B,)`` bool, anchors that count in the loss (``pair_mask``).
        num_valid_anchors_global: 0-d int64, valid anchors over all processes (``N``).
        world_size: ``W`` used in the reduction (1 without gathering).
        candidate_embeds: ``(W*B, D)`` gathered normalised positives (local rows with grad).
        candidate_item_ids: ``(W*B,)`` gathered positive ids, ``-1`` for excluded pairs.
    """

    logits: torch.Tensor
    positive_index: torch.Tensor
    anchor_mask: torch.Tensor
    num_valid_anchors_global: torch.Tensor
    world_size: int
    candidate_embeds: torch.Tensor
    candidate_item_ids: torch.Tensor

    def loss(self) -> torch.Tensor:
        """Scalar loss with the reduction described in the module docstring."""
        # Fused log-softmax: -inf logits contribute exp(-inf) = 0 to value and gradient.
        row_losses = F.cross_entropy(self.logits, self.positive_index, reduction="none")
        row_losses = torch.where(self.anchor_mask, row_losses, torch.zeros_like(row_losses))
        # clamp: no valid anchor anywhere -> 0 / 1 = 0 with a connected graph, not 0 / 0.
        return row_losses.sum() * self.world_size / self.num_valid_anchors_global.clamp(min=1)


class InfoNCELoss(nn.Module):
    """InfoNCE with in-batch, cross-device, hard and queue negatives (see module docstring).

    Args:
        temperature: :math:`\\tau` (initial value when learnable), >= 0.01.
        learnable_temperature: learn :math:`\\log(1/\\tau)` as a parameter (clamped so that
            :math:`\\tau \\ge 0.01`).
        gather_across_devices: add the positives of every data-parallel process as
            candidates (space negatives). No-op when torch.distributed is not initialised or
            has world size 1 (plain in-batch loss).
        queue_size: > 0 keeps a FIFO of that many earlier positives (time negatives),
            enqueued after each forward in training mode (``loss.train()``); the queue is
            created on the first forward (its width is the embedding width then).
        symmetric: also compute the positive -> anchor direction and average both.
        catalogue_size: optional; only to warn once if ``queue_size`` exceeds it.
        embed_dim: optional embedding width; creates the queue now instead of on the first
            forward. Not needed to resume: ``load_state_dict`` creates the queue from the
            saved shape.
        candidate_log_prior: optional ``(num_items,)`` float, :math:`\\log q` per item index:
            turns on the logQ correction (module docstring). Every finite; derived from the
            training data, so it is not part of ``state_dict``.

    State: ``state_dict()`` holds ``logit_scale`` (when learnable) and the queue buffers
    (``queue.embeds``, ``queue.item_ids``, ``queue.write_pointer``, ``queue.num_filled``),
    all plain tensors (safetensors-friendly).
    """

    def __init__(
        self,
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
        if candidate_log_prior is not None:
            candidate_log_prior = torch.as_tensor(candidate_log_prior, dtype=torch.float32)
            if candidate_log_prior.dim() != 1 or not torch.isfinite(candidate_log_prior).all():
                raise ValueError("candidate_log_prior must be a 1-d tensor of finite log probabilities per item "
                                 f"index, got shape {tuple(candidate_log_prior.shape)}")
        self.register_buffer("candidate_log_prior", candidate_log_prior, persistent=False)
        if not temperature >= 0.01:
            raise ValueError(f"temperature must be >= 0.01 (the logit scale is capped at 100), got {temperature!r}")
        if not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0, got {queue_size!r}")
        self.learnable_temperature = learnable_temperature
        self.gather_across_devices = gather_across_devices
        self.queue_size = queue_size
        self.symmetric = symmetric
        self.catalogue_size = catalogue_size
        initial_logit_scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if learnable_temperature:
            self.logit_scale = nn.Parameter(initial_logit_scale)
        else:
            self.register_buffer("logit_scale", initial_logit_scale, persistent=False)
        self.queue: EmbeddingQueue | None = None
        if embed_dim is not None:
            self.init_queue(embed_dim)

    @property
    def temperature(self) -> float:
        """Current temperature :math:`\\tau` (after the clamp)."""
        return float(1.0 / self.logit_scale.detach().clamp(max=_MAX_LOGIT_SCALE).exp())

    def init_queue(self, dim: int, device: torch.device | None = None) -> EmbeddingQueue | None:
        """Create the queue for ``dim``-d embeddings if enabled and not yet created.

        ``device`` defaults to the loss's own device; the first forward passes the
        embeddings' device, so a queue created lazily lives where the embeddings are.
        Returns the queue, or None when ``queue_size == 0``.
        """
        if self.queue_size > 0 and self.queue is None:
            self.queue = EmbeddingQueue(self.queue_size, dim, catalogue_size=self.catalogue_size)
            self.queue.to(self.logit_scale.device if device is None else device)
        return self.queue

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Resuming into a fresh loss: build the queue from the saved width before the
        # children are loaded (nn.Module loads the parent first, then its children).
        saved_queue = state_dict.get(prefix + "queue.embeds")
        if self.queue is None and saved_queue is not None and self.queue_size > 0:
            self.init_queue(saved_queue.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        anchor_item_ids: torch.Tensor,
        positive_item_ids: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
        hard_negative_ids: torch.Tensor | None = None,
        hard_negative_mask: torch.Tensor | None = None,
        pair_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the scalar loss.

        Args:
            anchors: ``(B, D)`` trigger-side embeddings (normalised here).
            positives: ``(B, D)`` target-side embeddings (normalised here).
            anchor_item_ids: ``(B,)`` int64 item index of each anchor, >= 0.
            positive_item_ids: ``(B,)`` int64 item index of each positive, >= 0.
            hard_negatives: optional ``(B, H, D)``, row ``i``'s own hard negatives.
            hard_negative_ids: ``(B, H)`` int64 ids of ``hard_negatives`` (required with them).
            hard_negative_mask: optional ``(B, H)`` bool, False = padding slot (masked).
            pair_mask: optional ``(B,)`` bool, False = pair excluded as anchor and candidate
                (e.g. a side without an image at the image level).
        """
        view = self.similarity_logits(
            anchors, positives, anchor_item_ids, positive_item_ids,
            hard_negatives, hard_negative_ids, hard_negative_mask, pair_mask,
        )
        loss = view.loss()
        if self.symmetric:
            reverse = self.similarity_logits(
                positives, anchors, positive_item_ids, anchor_item_ids,
                pair_mask=pair_mask, use_queue=False,
            )
            loss = 0.5 * (loss + reverse.loss())
        if self.training and self.queue is not None:
            # Enqueue after the loss: this step's candidates become later steps' negatives.
            kept = view.candidate_item_ids >= 0
            self.queue.enqueue(view.candidate_embeds[kept], view.candidate_item_ids[kept])
        return loss

    def similarity_logits(
        self,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        anchor_item_ids: torch.Tensor,
        positive_item_ids: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
        hard_negative_ids: torch.Tensor | None = None,
        hard_negative_mask: torch.Tensor | None = None,
        pair_mask: torch.Tensor | None = None,
        use_queue: bool = True,
    ) -> ContrastiveLogits:
        """Masked logits of the anchor -> candidate direction (same args as ``forward``).

        Does not touch the queue's contents (only reads them when ``use_queue``).
        """
        _check_inputs(anchors, positives, anchor_item_ids, positive_item_ids,
                      hard_negatives, hard_negative_ids, hard_negative_mask, pair_mask)
        batch_size, dim = anchors.shape
        device = anchors.device
        anchor_item_ids, positive_item_ids = anchor_item_ids.long(), positive_item_ids.long()
        if hard_negative_ids is not None:
            hard_negative_ids = hard_negative_ids.long()
        if pair_mask is None:
            pair_mask = torch.ones(batch_size, dtype=torch.bool, device=device)
        # float32 similarities: cos/0.05 reaches 20, too coarse for logsumexp in bf16.
        anchors = F.normalize(anchors.float(), dim=-1)
        positives = F.normalize(positives.float(), dim=-1)

        world_size, rank = data_parallel_world() if self.gather_across_devices else (1, 0)
        local_candidate_ids = torch.where(pair_mask, positive_item_ids, torch.full_like(positive_item_ids, -1))
        if world_size > 1:
            candidate_ids = gather_with_grad(local_candidate_ids, check_sizes=True)
            candidate_embeds = gather_with_grad(positives, check_sizes=False)
        else:
            candidate_ids, candidate_embeds = local_candidate_ids, positives

        # Scale the (B, D) anchors rather than the (B, C) logits: one small op instead of a big one.
        scaled_anchors = anchors * self.logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp()
        positive_index = torch.arange(batch_size, device=device) + rank * batch_size
        # Space (+ hard) block: small, masked densely.
        near_logits, near_ids = scaled_anchors @ candidate_embeds.T, candidate_ids.expand(batch_size, -1)
        near_logits = near_logits - self._log_prior(candidate_ids)
        if hard_negatives is not None:
            hard_negatives = F.normalize(hard_negatives.float(), dim=-1)
            if hard_negative_mask is not None:
                hard_negative_ids = torch.where(hard_negative_mask, hard_negative_ids,
                                                torch.full_like(hard_negative_ids, -1))
            near_logits = torch.cat([near_logits, torch.einsum("bd,bhd->bh", scaled_anchors, hard_negatives)], 1)
            near_ids = torch.cat([near_ids, hard_negative_ids], 1)
        masked = (
            (near_ids == positive_item_ids[:, None])
            | (near_ids == anchor_item_ids[:, None])
            | (near_ids < 0)
        )
        masked[torch.arange(batch_size, device=device), positive_index] = False
        logit_blocks = [near_logits.masked_fill(masked, float("-inf"))]
        # Time block: large (B, Q); only slots holding an anchor's own ids need masking, found sparsely.
        if use_queue and self.init_queue(dim, device) is not None and len(self.queue) > 0:
            queue_embeds, queue_ids = self.queue.candidates()
            queue_ids = queue_ids.to(device)
            # clone: the queue is overwritten in place after this forward, before backward.
            queue_logits = scaled_anchors @ queue_embeds.to(device).clone().T - self._log_prior(queue_ids)
            row_ids = torch.cat([positive_item_ids, anchor_item_ids])
            suspect_slots = (torch.isin(queue_ids, row_ids) | (queue_ids < 0)).nonzero().squeeze(1)
            if suspect_slots.numel() > 0:
                suspect_ids = queue_ids[suspect_slots]
                hits = (
                    (suspect_ids == positive_item_ids[:, None])
                    | (suspect_ids == anchor_item_ids[:, None])
                    | (suspect_ids < 0)
                )
                hit_rows, hit_columns = hits.nonzero(as_tuple=True)
                queue_logits = queue_logits.index_put(
                    (hit_rows, suspect_slots[hit_columns]), torch.tensor(float("-inf"), device=device)
                )
            logit_blocks.append(queue_logits)
        logits = torch.cat(logit_blocks, dim=1) if len(logit_blocks) > 1 else logit_blocks[0]
        return ContrastiveLogits(
            logits=logits,
            positive_index=positive_index,
            anchor_mask=pair_mask,
            num_valid_anchors_global=(candidate_ids >= 0).sum(),
            world_size=world_size,
            candidate_embeds=candidate_embeds,
            candidate_item_ids=candidate_ids,
        )

    def _log_prior(self, item_ids: torch.Tensor) -> torch.Tensor | float:
        """``(C,)`` log q of the candidates (0 for masked ``-1`` slots), or 0. without the correction."""
        if self.candidate_log_prior is None:
            return 0.0
        if item_ids.numel() and int(item_ids.max()) >= len(self.candidate_log_prior):
            raise ValueError(f"item id {int(item_ids.max())} has no entry in candidate_log_prior "
                             f"({len(self.candidate_log_prior)} items)")
        return torch.where(item_ids >= 0, self.candidate_log_prior[item_ids.clamp(min=0)], 0.0)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature:.4g}, learnable_temperature={self.learnable_temperature}, "
            f"gather_across_devices={self.gather_across_devices}, queue_size={self.queue_size}, "
            f"symmetric={self.symmetric}, logq_correction={self.candidate_log_prior is not None}"
        )


def _check_inputs(anchors, positives, anchor_item_ids, positive_item_ids,
                  hard_negatives, hard_negative_ids, hard_negative_mask, pair_mask) -> None:
    """Raise ValueError/TypeError naming the bad shape or value (see ``forward`` args)."""
    if anchors.dim() != 2 or positives.shape != anchors.shape:
        raise ValueError(
            f"anchors and positives must both be (B, D), got anchors {tuple(anchors.shape)} "
            f"and positives {tuple(positives.shape)}"
        )
    batch_size, dim = anchors.shape
    id_tensors = {"anchor_item_ids": anchor_item_ids, "positive_item_ids": positive_item_ids}
    for name, ids in id_tensors.items():
        if ids.shape != (batch_size,):
            raise ValueError(f"{name} must be ({batch_size},) to match anchors {tuple(anchors.shape)}, "
                             f"got {tuple(ids.shape)}")
    if (hard_negatives is None) != (hard_negative_ids is None):
        raise ValueError("hard_negatives and hard_negative_ids must be given together")
    if hard_negatives is not None:
        if hard_negatives.dim() != 3 or hard_negatives.shape[0] != batch_size or hard_negatives.shape[2] != dim:
            raise ValueError(f"hard_negatives must be ({batch_size}, H, {dim}), got {tuple(hard_negatives.shape)}")
        expected = tuple(hard_negatives.shape[:2])
        if tuple(hard_negative_ids.shape) != expected:
            raise ValueError(f"hard_negative_ids must be {expected} to match hard_negatives "
                             f"{tuple(hard_negatives.shape)}, got {tuple(hard_negative_ids.shape)}")
        if hard_negative_mask is not None and tuple(hard_negative_mask.shape) != expected:
            raise ValueError(f"hard_negative_mask must be {expected}, got {tuple(hard_negative_mask.shape)}")
        id_tensors["hard_negative_ids"] = hard_negative_ids
    for name, mask in {"hard_negative_mask": hard_negative_mask, "pair_mask": pair_mask}.items():
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if pair_mask is not None and pair_mask.shape != (batch_size,):
        raise ValueError(f"pair_mask must be ({batch_size},), got {tuple(pair_mask.shape)}")
    for name, ids in id_tensors.items():
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 tensor of item indices, got {ids.dtype}")
    # One reduction (one device sync) for all id checks.
    minimum = torch.stack([ids.min() for ids in id_tensors.values() if ids.numel()]).min() if batch_size else None
    if minimum is not None and int(minimum) < 0:
        bad = {name: ids[ids < 0][:5].tolist() for name, ids in id_tensors.items() if (ids < 0).any()}
        raise ValueError(f"item ids must be >= 0 (negative ids are reserved for masked slots), got {bad}")
