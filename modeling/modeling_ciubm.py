"""CiUBM: content-interest-aware user behaviour modelling for CTR (Stage 3 of MIM).

Top to bottom: feature embedding, DIN attention unit, then ``CiUBMPreTrainedModel`` and
``CiUBMForCTR``; the content blocks (similarity, content interest, histograms, content -> ID
generator, SIM search) are in ``ciubm_content.py``. Imports only torch and transformers so it can
be uploaded as Hub remote code next to ``configuration_ciubm.py`` and ``ciubm_content.py``.

Content comes frozen from the Representation Center as one table (N, C) that the model holds
as a non-persistent buffer (``set_content_table``: checkpoints stay small, row norms are
computed once); batches carry integer rows into it (``target_content_rows`` (B,),
``behavior_content_rows`` (B, L)), which ``mim_hf.ctr.CTRCollator`` maps from item ids.

Padding and unknown IDs share row 0 of every embedding table. Padded behaviours get exactly
zero attention weight (masked softmax, then multiplied by the mask), so whatever the collator
writes at padded positions (zeros) cannot change the output. ``forward`` checks nothing by
default (no host sync); ``config.check_inputs=True`` turns range checks on for debugging.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .ciubm_content import (
    CiUBMBehaviorSearch,
    CiUBMContentInterest,
    CiUBMContentToID,
    CiUBMSimilarityHistogram,
    CiUBMSimTier,
    compute_dtype,
    content_cosine_similarity,
    masked_softmax,
    pool_rows,
    table_inverse_norms,
    unit_rows,
)
from .configuration_ciubm import CiUBMConfig


@dataclass
class CiUBMOutput(ModelOutput):
    """Output of [`CiUBMForCTR`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): mean binary cross-entropy with
            logits, returned when `labels` is given.
        logits (`torch.FloatTensor` of shape `(batch_size,)`): click logit per sample.
        probs (`torch.FloatTensor` of shape `(batch_size,)`): `sigmoid(logits)`.
        id_attention_weights (`torch.FloatTensor` of shape `(batch_size, kept_len)`): weight
            of each behaviour in the ID interest (0 at padding).
        content_attention_weights (`torch.FloatTensor` of shape `(batch_size, kept_len)`,
            *optional*): weight of each behaviour in the content interest vector.
        selected_behavior_indices (`torch.LongTensor` of shape `(batch_size, sim_top_k)`,
            *optional*): positions kept by the SIM search stage (base="sim" only).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    probs: torch.FloatTensor | None = None
    id_attention_weights: torch.FloatTensor | None = None
    content_attention_weights: torch.FloatTensor | None = None
    selected_behavior_indices: torch.LongTensor | None = None


class CiUBMMLP(nn.Module):
    """Linear -> activation -> dropout blocks, then a linear output layer.

    (..., input_dim) -> (..., output_dim).
    """

    def __init__(
        self, input_dim: int, hidden_sizes: list, output_dim: int, hidden_act: str, dropout: float,
        output_bias: bool = True,
    ):
        super().__init__()
        layers = []
        for hidden_size in hidden_sizes:
            layers += [nn.Linear(input_dim, hidden_size), ACT2FN[hidden_act], nn.Dropout(dropout)]
            input_dim = hidden_size
        layers.append(nn.Linear(input_dim, output_dim, bias=output_bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden_states)


class CiUBMFeatureEmbedding(nn.Module):
    """ID and side-feature embeddings of users and items (concatenated per entity).

    Row 0 of every table is the padding/unknown row. Side-feature tables keep row 0 at zero
    (padding_idx); the user/item ID tables follow `config.unknown_row_policy`. Multi-valued
    item features (..., G) are averaged over their non-zero values. Inputs are assumed valid
    (the collator checks them).
    """

    def __init__(self, config: CiUBMConfig):
        super().__init__()
        dim = config.id_embed_dim
        id_padding_idx = 0 if config.unknown_row_policy == "zero" else None
        self.user_id_embeddings = nn.Embedding(config.n_users, dim, padding_idx=id_padding_idx)
        self.item_id_embeddings = nn.Embedding(config.n_items, dim, padding_idx=id_padding_idx)
        self.user_feature_embeddings = nn.ModuleDict(
            {name: nn.Embedding(size, dim, padding_idx=0) for name, size in config.user_feature_sizes.items()}
        )
        self.item_feature_embeddings = nn.ModuleDict(
            {name: nn.Embedding(size, dim, padding_idx=0) for name, size in config.item_feature_sizes.items()}
        )
        self.multi_valued_item_features = set(config.multi_valued_item_features)
        self.user_dim = dim * (1 + len(config.user_feature_sizes))
        self.item_dim = dim * (1 + len(config.item_feature_sizes))

    def embed_users(self, user_ids: torch.Tensor, user_features: dict) -> torch.Tensor:
        """user_ids (B,), user_features name -> (B,) -> (B, user_dim)."""
        parts = [self.user_id_embeddings(user_ids)]
        parts += [table(user_features[name]) for name, table in self.user_feature_embeddings.items()]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def embed_items(self, item_ids: torch.Tensor, item_features: dict, generated_ids=None) -> torch.Tensor:
        """item_ids (*S), item_features name -> (*S) or (*S, G) if multi-valued -> (*S, item_dim).
        generated_ids: None, or (positions (M,), vectors (M, dim)) that replace the ID embedding at
        those flat positions of a 1-D ``item_ids`` (the content -> ID generator's output)."""
        parts = [self.item_id_embeddings(item_ids)]
        if generated_ids is not None:
            positions, vectors = generated_ids
            parts[0] = parts[0].index_copy(0, positions, vectors.to(parts[0].dtype))
        for name, table in self.item_feature_embeddings.items():
            values = item_features[name]
            if name in self.multi_valued_item_features:
                present = (values != 0).unsqueeze(-1).to(table.weight.dtype)
                # row 0 is zero, so the sum only counts real values; divide by their number
                parts.append(table(values).sum(-2) / present.sum(-2).clamp_min(1.0))
            else:
                parts.append(table(values))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


class CiUBMDice(nn.Module):
    """Dice, DIN's data-adaptive activation: p = sigmoid(batch-norm(h)) gates h against alpha * h
    (alpha learned per unit, from 0). Rows (N, H) are real behaviours only, so the batch statistics
    never see padding; a training batch of fewer than two rows uses the running statistics."""

    def __init__(self, width: int, eps: float = 1e-9, momentum: float = 0.01):
        super().__init__()
        self.norm = nn.BatchNorm1d(width, affine=False, eps=eps, momentum=momentum)
        self.alpha = nn.Parameter(torch.zeros(width))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.training and hidden.shape[0] < 2:
            normed = F.batch_norm(hidden, self.norm.running_mean, self.norm.running_var, eps=self.norm.eps)
        else:
            normed = self.norm(hidden)
        gate = torch.sigmoid(normed)
        return gate * hidden + (1 - gate) * self.alpha * hidden


class CiUBMTargetAttention(nn.Module):
    """DIN activation unit: score_i = MLP([q, k_i, q - k_i, q * k_i]) (+ bias_i), then pooling.

    Pooling is a masked softmax over behaviours (`"softmax"`, default: bounded interest vector
    whatever the sequence length, and an additive bias acts as a log-weight) or DIN's
    unnormalised weighted sum (`"sum"`). The first MLP layer is applied without building the
    (B, L, 4D) concatenation: W[q, k, q-k, q*k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q * k);
    the result equals the textbook form. Two ways to run it, same scores at real behaviours:
    padded: one (L, D) x (D, H) product per sample with the query folded into the matrix
    (~D + c multiply-adds per hidden unit and position, c = the activation/score work);
    packed (CPU only): the MLP on real behaviours only, first layer as one (V, 3D) x (3D, H)
    product (~3D + c per real behaviour). Packing is chosen when the fraction of real
    behaviours is below (D + c) / (3D + c) (c = 32: 0.6 at D=16, 0.45 at D=48; measured
    crossovers on one CPU thread ~0.6 at D=16, H=64 and ~0.4-0.45 at D=48, H=32, see
    `benchmarks/bench_ctr.py --density-sweep`), or below `packing_max_density` when that is
    set (tests force a path). A (V, 2D) first layer with the query term gathered per row was
    tried: faster on one thread, but its extra scatter-add backward is slow on two.
    """

    # per-hidden-unit work common to both paths, in multiply-adds per position (fitted on CPU)
    packing_shared_cost = 32
    # None: the cost rule above; a number: pack when density <= it (1.0 always, -1.0 never)
    packing_max_density = None

    def packing_density_limit(self) -> float:
        """Largest fraction of real behaviours at which the packed path is used."""
        if self.packing_max_density is not None:
            return self.packing_max_density
        c = self.packing_shared_cost
        return (self.embed_dim + c) / (3 * self.embed_dim + c)

    def __init__(self, embed_dim: int, hidden_sizes: list, hidden_act: str, normalization: str,
                 activation: str | None = None):
        super().__init__()
        if not hidden_sizes:
            raise ValueError("attention_hidden_sizes must name at least one hidden layer")
        self.embed_dim = embed_dim
        self.normalization = normalization
        self.input_layer = nn.Linear(4 * embed_dim, hidden_sizes[0])
        # the first hidden layer's activation (`attention_activation`); deeper layers keep hidden_act
        self.activation = CiUBMDice(hidden_sizes[0]) if activation == "dice" else ACT2FN[activation or hidden_act]
        # a constant added to every score cancels in a softmax: no output bias there
        self.score_layers = CiUBMMLP(
            hidden_sizes[0], hidden_sizes[1:], 1, hidden_act, dropout=0.0, output_bias=normalization == "sum"
        )

    def forward(self, query, keys, mask, score_bias=None, score_gain=None):
        """query (B, D), keys (B, L, D), mask (B, L) bool, score_bias and score_gain (B, L) or None ->
        (interest (B, D), weights (B, L)); the logits are score * score_gain + score_bias."""
        batch_size, seq_len, dim = keys.shape
        w_query, w_key, w_diff, w_prod = self.input_layer.weight.split(dim, dim=1)  # (H, D) each
        valid = mask.reshape(-1).nonzero().squeeze(1) if keys.device.type == "cpu" else None
        if valid is not None and valid.numel() <= self.packing_density_limit() * mask.numel():
            valid_keys = keys.reshape(-1, dim).index_select(0, valid)  # (V, D)
            valid_queries = query.index_select(0, torch.div(valid, seq_len, rounding_mode="floor"))  # (V, D)
            pair = torch.cat([valid_keys, valid_queries * valid_keys, valid_queries], dim=1)  # (V, 3D)
            weight = torch.cat([w_key - w_diff, w_prod, w_query + w_diff], dim=1)  # (H, 3D)
            hidden = F.linear(pair, weight, self.input_layer.bias)  # (V, H)
            valid_scores = self.score_layers(self.activation(hidden)).squeeze(-1)
            scores = valid_scores.new_zeros(batch_size * seq_len).index_copy(0, valid, valid_scores)
            scores = scores.view(batch_size, seq_len)
        else:
            # one (L, D) x (D, H) product per sample with the query folded into the matrix
            query_part = F.linear(query, w_query + w_diff, self.input_layer.bias)  # (B, H)
            key_matrix = (w_key - w_diff).t().unsqueeze(0) + query.unsqueeze(2) * w_prod.t().unsqueeze(0)  # (B, D, H)
            hidden = torch.baddbmm(query_part.unsqueeze(1), keys, key_matrix)  # (B, L, H)
            if isinstance(self.activation, CiUBMDice):  # statistics over real behaviours only
                activated = hidden.new_zeros(hidden.shape)
                activated[mask] = self.activation(hidden[mask])
            else:
                activated = self.activation(hidden)
            scores = self.score_layers(activated).squeeze(-1)  # (B, L)
        if score_gain is not None:
            scores = scores * score_gain
        if score_bias is not None:
            scores = scores + score_bias
        if self.normalization == "softmax":
            weights = masked_softmax(scores, mask)
        else:
            weights = scores * mask
        interest = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
        return interest, weights


class CiUBMPreTrainedModel(PreTrainedModel):
    """Weight init and loading glue shared by the CiUBM models."""

    config_class = CiUBMConfig
    base_model_prefix = "ciubm"
    main_input_name = "target_item_ids"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` reading safetensors weights only.

        ``use_safetensors`` defaults to True, so a pickle-based ``pytorch_model.bin`` is never
        opened (a local folder holding only such files is a ``ValueError``); pass
        ``use_safetensors=False`` to opt out. (Same rule as ``MIMContentEncoder``; repeated here
        because each modeling file must stand alone as Hub remote code.)
        """
        kwargs.setdefault("use_safetensors", True)
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if kwargs["use_safetensors"] and os.path.isdir(folder):
            names = os.listdir(folder)
            if not any(name.endswith((".safetensors", ".safetensors.index.json")) for name in names):
                pickled = sorted(name for name in names
                                 if name.endswith((".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".pkl")))
                if pickled:
                    raise ValueError(
                        f"{folder} holds weights only as {pickled} (pickle), which are not loaded; expected "
                        "model.safetensors (re-save with save_pretrained, or pass use_safetensors=False if you "
                        "trust the file)")
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # the unknown/padding row starts at zero whatever the policy; "zero" keeps it there
            if not getattr(module.weight, "_is_hf_initialized", False):
                embedding_std = self.config.embedding_initializer_range
                init.normal_(module.weight, mean=0.0, std=std if embedding_std is None else embedding_std)
                module.weight[0].zero_()
        elif isinstance(module, CiUBMDice):
            init.zeros_(module.alpha)
            init.zeros_(module.norm.running_mean)
            init.ones_(module.norm.running_var)
        elif isinstance(module, CiUBMForCTR) and module.similarity_scale is not None:
            init.constant_(module.similarity_scale, self.config.similarity_scale_init)
        elif isinstance(module, CiUBMForCTR) and module.similarity_gates is not None:
            # b1 = 1, b3 = 0 and b2 / temperature = the "bias" mode's initial scale: both modes start equal
            gates = [1.0, self.config.similarity_scale_init * self.config.content_temperature, 0.0]
            module.similarity_gates.copy_(torch.tensor(gates, dtype=module.similarity_gates.dtype))


class CiUBMForCTR(CiUBMPreTrainedModel):
    """Click-through-rate model: DIN ID branch + content-interest branch + fusion MLP.

    Modes (`config.mode`): "din" uses IDs and side features only; "content_feature" adds the
    projected target content and mean behaviour content as features; "ciubm" adds (a) the
    content-interest vector, (b) similarity in the ID attention logits and (c) the similarity
    histogram (each switchable). `config.base="sim"` first keeps the top-k behaviours by
    content similarity. Modes that read content need `set_content_table` before `forward`.
    """

    def __init__(self, config: CiUBMConfig):
        super().__init__(config)
        self.embeddings = CiUBMFeatureEmbedding(config)
        item_dim, user_dim = self.embeddings.item_dim, self.embeddings.user_dim
        self.id_attention = CiUBMTargetAttention(
            item_dim, config.attention_hidden_sizes, config.hidden_act, config.attention_normalization,
            config.attention_activation,
        )
        full = config.mode == "ciubm"
        self.uses_content = config.mode != "din"
        self.needs_content_inputs = self.uses_content or config.base == "sim"
        self.behavior_search = CiUBMBehaviorSearch(config.sim_top_k) if config.base == "sim" else None
        self.content_projection = (
            nn.Linear(config.content_dim, config.content_proj_dim) if self.uses_content else None
        )
        self.content_interest = (
            CiUBMContentInterest(config.content_temperature) if full and config.content_interest_vector else None
        )
        self.similarity_histogram = None
        if full and config.similarity_histogram:
            self.similarity_histogram = (
                CiUBMSimTier(config.histogram_n_bins, config.content_proj_dim) if config.histogram_kind == "simtier"
                else CiUBMSimilarityHistogram(config.histogram_n_bins))
        # content similarity inside the ID attention logits (part b): "bias" adds scale * cos;
        # "aware" gives b1 * score + b2 * cos / t + b3 * score * cos / t (gates b1, b2, b3)
        in_attention = full and config.similarity_in_attention
        self.similarity_scale = (
            nn.Parameter(torch.empty(())) if in_attention and config.similarity_attention == "bias" else None
        )
        self.similarity_gates = (
            nn.Parameter(torch.empty(3)) if in_attention and config.similarity_attention == "aware" else None
        )
        self.content_to_id = (
            CiUBMContentToID(config.content_dim, config.id_embed_dim) if self.uses_content and config.content_to_id
            else None
        )
        # the similarity feeds the search and parts (a)-(c); "content_feature" alone never needs it
        self.uses_similarity = config.base == "sim" or any(
            part is not None for part in (self.content_interest, self.similarity_histogram, self.similarity_scale,
                                          self.similarity_gates)
        )
        fusion_dim = user_dim + 2 * item_dim  # user, target item, ID interest
        if config.mode == "content_feature":
            fusion_dim += 2 * config.content_proj_dim  # target content, mean behaviour content
        elif full:
            fusion_dim += config.content_proj_dim  # target content
            fusion_dim += config.content_proj_dim if self.content_interest is not None else 0
            if self.similarity_histogram is not None:
                fusion_dim += config.content_proj_dim if config.histogram_kind == "simtier" else config.histogram_n_bins
        self.fusion = CiUBMMLP(fusion_dim, config.fusion_hidden_sizes, 1, config.hidden_act, config.dropout)
        # the frozen content table and its inverse row norms: never saved (checkpoints stay small)
        self.register_buffer("content_table", None, persistent=False)
        self.register_buffer("content_inverse_norms", None, persistent=False)
        self.post_init()

    def set_content_table(self, table) -> "CiUBMForCTR":
        """Attach the frozen content table (N, config.content_dim) that `*_content_rows` index.

        Row r holds the content of the item the collator maps to row r; row 0 is the padding /
        no-content row (zeros). Stored in the model's dtype and device as non-persistent buffers
        (moved by `.to()`, not written by `save_pretrained`), with its inverse row norms computed
        here once. Returns the model. ValueError for a wrong shape or non-finite values.
        """
        table = torch.as_tensor(table).detach()
        dim = self.config.content_dim
        if table.dim() != 2 or table.shape[0] == 0 or table.shape[1] != dim or not table.is_floating_point():
            raise ValueError(f"content table must be a float (N, {dim}) tensor with N >= 1 (config.content_dim = "
                             f"{dim}), got {table.dtype} {tuple(table.shape)}")
        finite = torch.isfinite(table).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(f"content table row {int((~finite).nonzero()[0])} holds NaN/inf; content must be finite")
        table = table.to(device=self.device, dtype=self.dtype)
        self.register_buffer("content_table", table, persistent=False)
        self.register_buffer("content_inverse_norms", table_inverse_norms(table), persistent=False)
        return self

    def _drop_to_unknown(self, ids: torch.Tensor) -> torch.Tensor:
        """In training, replace IDs by the unknown row 0 with prob unknown_id_dropout."""
        if not self.training or self.config.unknown_id_dropout == 0.0:
            return ids
        drop = torch.rand(ids.shape, device=ids.device) < self.config.unknown_id_dropout
        return ids.masked_fill(drop, 0)

    def forward(
        self,
        user_ids: torch.LongTensor,
        target_item_ids: torch.LongTensor,
        behavior_item_ids: torch.LongTensor,
        behavior_mask: torch.BoolTensor,
        user_features: dict | None = None,
        target_item_features: dict | None = None,
        behavior_item_features: dict | None = None,
        target_content_rows: torch.LongTensor | None = None,
        behavior_content_rows: torch.LongTensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CiUBMOutput:
        r"""Score (user, target item, behaviour sequence) samples, as `mim_hf.ctr.CTRCollator` emits them.

        Args:
            user_ids (`(B,)` int): user vocabulary index, 0 = unknown; B >= 1.
            target_item_ids (`(B,)` int): item vocabulary index, 0 = unknown.
            behavior_item_ids (`(B, L)` int): past items (L may be 0), 0 at padded positions.
            behavior_mask (`(B, L)` bool): True at real behaviours.
            user_features (`dict[str, (B,)]`): one tensor per `config.user_feature_sizes` key.
            target_item_features (`dict[str, (B,) | (B, G)]`): per `config.item_feature_sizes` key
                ((B, G) for multi-valued features, 0-padded).
            behavior_item_features (`dict[str, (B, L) | (B, L, G')]`): same for behaviours, 0 at padding.
            target_content_rows (`(B,)` int): the target's row in the content table (`set_content_table`);
                unused (may be None) in mode "din" with base "din".
            behavior_content_rows (`(B, L)` int): each behaviour's row, 0 at padded positions.
            labels (`(B,)` 0/1, optional): clicks; gives `loss`.
            kwargs: ignored (e.g. `num_items_in_batch` from `transformers.Trainer`).

        Inputs are not checked here (no host sync: the forward runs under `torch.compile` and on
        accelerators without stalls); the collator checks the data. `config.check_inputs=True`
        checks ranges and finiteness here too, for debugging (ValueError naming the input).

        Returns:
            [`CiUBMOutput`] with logits/probs `(B,)` and `loss` when labels are given.
        """
        user_features, target_item_features = user_features or {}, target_item_features or {}
        behavior_item_features = behavior_item_features or {}
        behavior_mask = behavior_mask.bool()
        table = None
        if self.needs_content_inputs:
            if self.content_table is None:
                raise ValueError(f"mode={self.config.mode!r}, base={self.config.base!r} reads content: call "
                                 "model.set_content_table(table) first (mim_hf.ctr.predict.load_ctr_model does)")
            if target_content_rows is None or behavior_content_rows is None:
                raise ValueError(f"mode={self.config.mode!r}, base={self.config.base!r} needs target_content_rows (B,) "
                                 "and behavior_content_rows (B, L) (CTRCollator(..., center=...) emits them)")
            table = self.content_table
        if self.config.check_inputs:
            _check_inputs(self, user_ids, target_item_ids, behavior_item_ids, user_features, target_item_features,
                          behavior_item_features, target_content_rows, behavior_content_rows, labels)

        # computed once, reused by the search, the content interest, the logit bias and the histogram
        similarity = target_content = None
        if table is not None:
            target_content = table.index_select(0, target_content_rows)
            if self.uses_similarity:
                target_unit = unit_rows(target_content.to(compute_dtype(table)))
                similarity = content_cosine_similarity(
                    target_unit, table, self.content_inverse_norms, behavior_content_rows).to(table.dtype)

        selected = None
        if self.behavior_search is not None and behavior_item_ids.shape[1] > self.config.sim_top_k:
            selected = self.behavior_search(similarity, behavior_mask)  # (B, k)
            behavior_item_ids = behavior_item_ids.gather(1, selected)
            behavior_mask = behavior_mask.gather(1, selected)
            similarity = similarity.gather(1, selected)
            behavior_content_rows = behavior_content_rows.gather(1, selected)
            behavior_item_features = {
                name: values.gather(1, selected if values.dim() == 2 else
                                    selected.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
                for name, values in behavior_item_features.items()
            }

        user_repr = self.embeddings.embed_users(self._drop_to_unknown(user_ids), user_features)
        # behaviours then targets, flat, in one look-up per table (one embedding backward instead of
        # two); both parts of the result are contiguous slices: no copy on the way in or out
        batch_size, seq_len = behavior_item_ids.shape
        target_item_ids = self._drop_to_unknown(target_item_ids)
        item_ids = torch.cat([self._drop_to_unknown(behavior_item_ids).reshape(-1), target_item_ids])
        item_features = {
            name: _behaviors_then_target(behavior_item_features[name], target_item_features[name])
            for name in self.config.item_feature_sizes
        }
        generated_ids = None
        if self.content_to_id is not None:
            # unknown (or dropped) IDs of items that have content get an ID embedding made from it
            content_rows = torch.cat([behavior_content_rows.reshape(-1), target_content_rows])
            positions = ((item_ids == 0) & (content_rows > 0)).nonzero().squeeze(1)
            generated_ids = (positions, self.content_to_id(table, content_rows.index_select(0, positions)))
        item_repr = self.embeddings.embed_items(item_ids, item_features, generated_ids)  # (B * L + B, item_dim)
        behavior_repr = item_repr[: batch_size * seq_len].view(batch_size, seq_len, item_repr.shape[-1])
        target_repr = item_repr[batch_size * seq_len:]

        score_bias = score_gain = None
        if self.similarity_scale is not None:
            score_bias = self.similarity_scale * similarity
        elif self.similarity_gates is not None:
            scaled = similarity / self.config.content_temperature
            score_gain = self.similarity_gates[0] + self.similarity_gates[2] * scaled
            score_bias = self.similarity_gates[1] * scaled
        id_interest, id_weights = self.id_attention(target_repr, behavior_repr, behavior_mask, score_bias, score_gain)

        fusion_inputs = [user_repr, target_repr, id_interest]
        content_weights = None
        if self.config.mode == "content_feature":
            valid = behavior_mask.to(table.dtype)
            mean_content = pool_rows(table, behavior_content_rows, valid) / valid.sum(-1, keepdim=True).clamp_min(1.0)
            fusion_inputs += [self.content_projection(target_content), self.content_projection(mean_content)]
        elif self.config.mode == "ciubm":
            fusion_inputs.append(self.content_projection(target_content))
            if self.content_interest is not None:
                pooled_content, content_weights = self.content_interest(similarity, behavior_mask, table,
                                                                        behavior_content_rows)
                fusion_inputs.append(self.content_projection(pooled_content))
            if self.similarity_histogram is not None:
                fusion_inputs.append(self.similarity_histogram(similarity, behavior_mask))

        logits = self.fusion(torch.cat(fusion_inputs, dim=-1)).squeeze(-1)
        if self.config.check_inputs and not bool(torch.isfinite(logits).all()):
            raise ValueError("finite inputs gave non-finite logits: content vectors too large for "
                             f"{self.dtype} (norms overflow), or diverged weights")
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return CiUBMOutput(
            loss=loss,
            logits=logits,
            probs=torch.sigmoid(logits),
            id_attention_weights=id_weights,
            content_attention_weights=content_weights,
            selected_behavior_indices=selected,
        )


def _check_inputs(model, user_ids, target_item_ids, behavior_item_ids, user_features, target_item_features,
                  behavior_item_features, target_content_rows, behavior_content_rows, labels) -> None:
    """`config.check_inputs`: every index inside its table, labels 0/1 (one host sync), else
    ValueError naming the input and the bad value. For debugging; the collator checks the data."""
    config = model.config
    checks = [("user_ids", user_ids, config.n_users), ("target_item_ids", target_item_ids, config.n_items),
              ("behavior_item_ids", behavior_item_ids, config.n_items)]
    checks += [(f"user_features[{name!r}]", user_features[name], size)
               for name, size in config.user_feature_sizes.items()]
    for name, size in config.item_feature_sizes.items():
        checks += [(f"target_item_features[{name!r}]", target_item_features[name], size),
                   (f"behavior_item_features[{name!r}]", behavior_item_features[name], size)]
    if model.content_table is not None:
        rows = model.content_table.shape[0]
        checks += [("target_content_rows", target_content_rows, rows),
                   ("behavior_content_rows", behavior_content_rows, rows)]
    bounds = [torch.stack([v.min(), v.max()]).long() if v.numel() else torch.zeros(2, dtype=torch.long, device=v.device)
              for _, v, _ in checks]
    for (name, _, size), (low, high) in zip(checks, torch.stack(bounds).tolist()):
        if low < 0 or high >= size:
            raise ValueError(f"{name} holds index {high if high >= size else low} outside [0, {size})")
    if labels is not None and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"labels must be 0 or 1, got {labels[(labels != 0) & (labels != 1)][0].item()!r}")


def _behaviors_then_target(behaviors: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """behaviours (B, L) or (B, L, G'), target (B,) or (B, G) -> (B * L + B,) or (B * L + B, max(G, G')):
    the behaviours flattened, then the targets."""
    if behaviors.dim() == 3:
        if target.shape[-1] != behaviors.shape[-1]:
            # multi-valued lists of different widths: 0 is the padding value the mean ignores
            width = max(target.shape[-1], behaviors.shape[-1])
            target = F.pad(target, (0, width - target.shape[-1]))
            behaviors = F.pad(behaviors, (0, width - behaviors.shape[-1]))
        return torch.cat([behaviors.reshape(-1, behaviors.shape[-1]), target])
    return torch.cat([behaviors.reshape(-1), target])


# save_pretrained then writes auto_map and copies this file and configuration_ciubm.py
CiUBMForCTR.register_for_auto_class("AutoModel")

__all__ = ["CiUBMPreTrainedModel", "CiUBMForCTR", "CiUBMOutput"]
