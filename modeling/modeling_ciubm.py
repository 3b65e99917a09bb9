"""CiUBM: content-interest-aware user behaviour modelling for CTR (Stage 3 of MIM).

One model, one file, top to bottom: feature embedding, DIN attention unit, content
similarity / content-interest / histogram blocks, SIM top-k search, then
``CiUBMPreTrainedModel`` and ``CiUBMForCTR``. Imports only torch and transformers so it can be
uploaded as Hub remote code next to ``configuration_ciubm.py``.

Content embeddings are inputs: they come frozen from the Representation Center, looked up by
the collator; the model holds no copy of the center, so checkpoints stay small.

Padding and unknown IDs share row 0 of every embedding table. Padded behaviours get exactly
zero attention weight (masked softmax, then multiplied by the mask), their IDs are replaced by
0 before look-up, so whatever sits at padded positions cannot change the output, provided
padded content vectors are finite (the collator writes zeros there).
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

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


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to `mask`; rows with no valid entry give all zeros.

    scores: (B, L) float; mask: (B, L) bool -> (B, L) weights summing to 1 (or 0 if empty).
    """
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    # multiplying by the mask zeroes the uniform weights of an all-padding row (no NaN)
    return torch.softmax(scores, dim=-1) * mask


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
    item features (B, ..., G) are averaged over their non-zero values.
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

    @staticmethod
    def _check_ids(name: str, ids: torch.Tensor, size: int):
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
            raise ValueError(
                f"{name} holds index {int(ids.max()) if int(ids.max()) >= size else int(ids.min())} "
                f"outside the vocabulary [0, {size})"
            )

    @staticmethod
    def _features_of(kind: str, features: dict | None, expected) -> dict:
        features = {} if features is None else dict(features)
        if set(features) != set(expected):
            raise ValueError(
                f"{kind} features {sorted(features)} do not match the config's {sorted(expected)}"
            )
        return features

    def embed_users(self, user_ids: torch.Tensor, user_features: dict | None) -> torch.Tensor:
        """user_ids (B,), user_features name -> (B,) -> (B, user_dim)."""
        features = self._features_of("user", user_features, self.user_feature_embeddings.keys())
        self._check_ids("user_ids", user_ids, self.user_id_embeddings.num_embeddings)
        parts = [self.user_id_embeddings(user_ids)]
        for name, table in self.user_feature_embeddings.items():
            self._check_ids(f"user feature {name!r}", features[name], table.num_embeddings)
            parts.append(table(features[name]))
        return torch.cat(parts, dim=-1)

    def embed_items(self, item_ids: torch.Tensor, item_features: dict | None, what: str) -> torch.Tensor:
        """item_ids (*S), item_features name -> (*S) or (*S, G) if multi-valued -> (*S, item_dim)."""
        features = self._features_of(what, item_features, self.item_feature_embeddings.keys())
        self._check_ids(f"{what} ids", item_ids, self.item_id_embeddings.num_embeddings)
        parts = [self.item_id_embeddings(item_ids)]
        for name, table in self.item_feature_embeddings.items():
            values = features[name]
            self._check_ids(f"{what} feature {name!r}", values, table.num_embeddings)
            if name in self.multi_valued_item_features:
                if values.dim() != item_ids.dim() + 1:
                    raise ValueError(
                        f"multi-valued {what} feature {name!r} must have shape {tuple(item_ids.shape)} + (G,), "
                        f"got {tuple(values.shape)}"
                    )
                present = (values != 0).unsqueeze(-1).to(table.weight.dtype)
                # row 0 is zero, so the sum only counts real values; divide by their number
                parts.append(table(values).sum(-2) / present.sum(-2).clamp_min(1.0))
            else:
                if values.shape != item_ids.shape:
                    raise ValueError(
                        f"{what} feature {name!r} must have shape {tuple(item_ids.shape)}, got {tuple(values.shape)}"
                    )
                parts.append(table(values))
        return torch.cat(parts, dim=-1)


class CiUBMTargetAttention(nn.Module):
    """DIN activation unit: score_i = MLP([q, k_i, q - k_i, q * k_i]) (+ bias_i), then pooling.

    Pooling is a masked softmax over behaviours (`"softmax"`, default: bounded interest vector
    whatever the sequence length, and an additive bias acts as a log-weight) or DIN's
    unnormalised weighted sum (`"sum"`). The first MLP layer is applied without building the
    (B, L, 4D) concatenation: W[q, k, q-k, q*k] = (W_q + W_d) q + (W_k - W_d + W_p diag(q)) k,
    one batched matmul over behaviours; the result equals the textbook form.
    """

    def __init__(self, embed_dim: int, hidden_sizes: list, hidden_act: str, normalization: str):
        super().__init__()
        if not hidden_sizes:
            raise ValueError("attention_hidden_sizes must name at least one hidden layer")
        self.embed_dim = embed_dim
        self.normalization = normalization
        self.input_layer = nn.Linear(4 * embed_dim, hidden_sizes[0])
        self.activation = ACT2FN[hidden_act]
        # a constant added to every score cancels in a softmax: no output bias there
        self.score_layers = CiUBMMLP(
            hidden_sizes[0], hidden_sizes[1:], 1, hidden_act, dropout=0.0, output_bias=normalization == "sum"
        )

    def forward(self, query, keys, mask, score_bias=None):
        """query (B, D), keys (B, L, D), mask (B, L) bool, score_bias (B, L) or None ->
        (interest (B, D), weights (B, L))."""
        w_query, w_key, w_diff, w_prod = self.input_layer.weight.split(self.embed_dim, dim=1)  # (H, D) each
        query_part = F.linear(query, w_query + w_diff, self.input_layer.bias)  # (B, H)
        key_matrix = (w_key - w_diff).t().unsqueeze(0) + query.unsqueeze(2) * w_prod.t().unsqueeze(0)  # (B, D, H)
        hidden = torch.baddbmm(query_part.unsqueeze(1), keys, key_matrix)  # (B, L, H)
        scores = self.score_layers(self.activation(hidden)).squeeze(-1)  # (B, L)
        if score_bias is not None:
            scores = scores + score_bias
        if self.normalization == "softmax":
            weights = masked_softmax(scores, mask)
        else:
            weights = scores * mask
        interest = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
        return interest, weights


def content_cosine_similarity(target_content: torch.Tensor, behavior_content: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the target with each behaviour: (B, C), (B, L, C) -> (B, L) in [-1, 1].

    Norms are computed separately so the (B, L, C) tensor is never copied; all-zero vectors
    (content missing from the center) get similarity 0.
    """
    dots = torch.bmm(behavior_content, target_content.unsqueeze(2)).squeeze(2)
    norms = torch.linalg.vector_norm(behavior_content, dim=-1) * torch.linalg.vector_norm(
        target_content, dim=-1, keepdim=True
    )
    return dots / norms.clamp_min(1e-8)


class CiUBMContentInterest(nn.Module):
    """(a) Content-interest vector: behaviour content pooled by softmax(similarity / temperature).

    similarity (B, L), behavior_content (B, L, C), mask (B, L) -> (pooled (B, C), weights (B, L)).
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, similarity, behavior_content, mask):
        weights = masked_softmax(similarity / self.temperature, mask)
        pooled = torch.bmm(weights.unsqueeze(1).to(behavior_content.dtype), behavior_content).squeeze(1)
        return pooled, weights


class CiUBMSimilarityHistogram(nn.Module):
    """(c) Fraction of the (valid) behaviours whose similarity falls in each of n equal bins over [-1, 1].

    similarity (B, L), mask (B, L) -> (B, n_bins); an all-padding row gives zeros.
    """

    def __init__(self, n_bins: int):
        super().__init__()
        self.n_bins = n_bins

    def forward(self, similarity, mask):
        # NaN at padded positions becomes some bin index, but its count weight is mask = 0
        bins = ((similarity.detach() + 1.0) * (self.n_bins / 2.0)).floor().long().clamp(0, self.n_bins - 1)
        valid = mask.to(similarity.dtype)
        counts = torch.zeros(similarity.shape[0], self.n_bins, dtype=similarity.dtype, device=similarity.device)
        counts.scatter_add_(1, bins, valid)
        return counts / valid.sum(1, keepdim=True).clamp_min(1.0)


class CiUBMBehaviorSearch(nn.Module):
    """SIM-style search stage: keep the top-k valid behaviours by content similarity.

    similarity (B, L), mask (B, L) -> indices (B, k) into the sequence, with k = min(top_k, L);
    rows with fewer than k valid behaviours also return padded positions (still masked).
    """

    def __init__(self, top_k: int):
        super().__init__()
        self.top_k = top_k

    def forward(self, similarity, mask):
        k = min(self.top_k, similarity.shape[1])
        return similarity.masked_fill(~mask, float("-inf")).topk(k, dim=1).indices


class CiUBMPreTrainedModel(PreTrainedModel):
    """Weight init and loading glue shared by the CiUBM models."""

    config_class = CiUBMConfig
    base_model_prefix = "ciubm"
    main_input_name = "target_item_ids"

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
                init.normal_(module.weight, mean=0.0, std=std)
                module.weight[0].zero_()
        elif isinstance(module, CiUBMForCTR) and module.similarity_scale is not None:
            init.constant_(module.similarity_scale, self.config.similarity_scale_init)


class CiUBMForCTR(CiUBMPreTrainedModel):
    """Click-through-rate model: DIN ID branch + content-interest branch + fusion MLP.

    Modes (`config.mode`): "din" uses IDs and side features only; "content_feature" adds the
    projected target content and mean behaviour content as features; "ciubm" adds (a) the
    content-interest vector, (b) similarity in the ID attention logits and (c) the similarity
    histogram (each switchable). `config.base="sim"` first keeps the top-k behaviours by
    content similarity.
    """

    def __init__(self, config: CiUBMConfig):
        super().__init__(config)
        self.embeddings = CiUBMFeatureEmbedding(config)
        item_dim, user_dim = self.embeddings.item_dim, self.embeddings.user_dim
        self.id_attention = CiUBMTargetAttention(
            item_dim, config.attention_hidden_sizes, config.hidden_act, config.attention_normalization
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
        self.similarity_histogram = (
            CiUBMSimilarityHistogram(config.histogram_n_bins) if full and config.similarity_histogram else None
        )
        # learnable weight of content similarity inside the ID attention logits (part b)
        self.similarity_scale = (
            nn.Parameter(torch.empty(())) if full and config.similarity_in_attention else None
        )
        fusion_dim = user_dim + 2 * item_dim  # user, target item, ID interest
        if config.mode == "content_feature":
            fusion_dim += 2 * config.content_proj_dim  # target content, mean behaviour content
        elif full:
            fusion_dim += config.content_proj_dim  # target content
            fusion_dim += config.content_proj_dim if self.content_interest is not None else 0
            fusion_dim += config.histogram_n_bins if self.similarity_histogram is not None else 0
        self.fusion = CiUBMMLP(fusion_dim, config.fusion_hidden_sizes, 1, config.hidden_act, config.dropout)
        self.post_init()

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, user_ids, target_item_ids, behavior_item_ids, behavior_mask,
                      target_content_embeds, behavior_content_embeds, labels):
        batch_size = user_ids.shape[0]
        if user_ids.dim() != 1 or target_item_ids.shape != (batch_size,):
            raise ValueError(
                f"user_ids and target_item_ids must both be (batch_size,), got {tuple(user_ids.shape)} "
                f"and {tuple(target_item_ids.shape)}"
            )
        if behavior_item_ids.dim() != 2 or behavior_item_ids.shape[0] != batch_size:
            raise ValueError(f"behavior_item_ids must be ({batch_size}, L), got {tuple(behavior_item_ids.shape)}")
        if behavior_mask.shape != behavior_item_ids.shape:
            raise ValueError(
                f"behavior_mask shape {tuple(behavior_mask.shape)} != behavior_item_ids shape "
                f"{tuple(behavior_item_ids.shape)}"
            )
        if self.needs_content_inputs:
            if target_content_embeds is None or behavior_content_embeds is None:
                raise ValueError(
                    f"mode={self.config.mode!r}, base={self.config.base!r} needs target_content_embeds "
                    "(B, C) and behavior_content_embeds (B, L, C) from the Representation Center"
                )
            for name, tensor in (("target_content_embeds", target_content_embeds),
                                 ("behavior_content_embeds", behavior_content_embeds)):
                if tensor.shape[-1] != self.config.content_dim:
                    raise ValueError(
                        f"{name} has content dim {tensor.shape[-1]} but config.content_dim is "
                        f"{self.config.content_dim} (was the center built with another encoder?)"
                    )
            if target_content_embeds.shape != (batch_size, self.config.content_dim):
                raise ValueError(
                    f"target_content_embeds must be ({batch_size}, {self.config.content_dim}), "
                    f"got {tuple(target_content_embeds.shape)}"
                )
            expected = (*behavior_item_ids.shape, self.config.content_dim)
            if behavior_content_embeds.shape != expected:
                raise ValueError(
                    f"behavior_content_embeds must be {expected}, got {tuple(behavior_content_embeds.shape)}"
                )
        if labels is not None:
            if labels.shape != (batch_size,):
                raise ValueError(f"labels must be ({batch_size},), got {tuple(labels.shape)}")
            bad = (labels != 0) & (labels != 1)
            if bool(bad.any()):
                raise ValueError(f"labels must be 0 or 1, got {labels[bad][0].item()!r}")

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
        target_content_embeds: torch.FloatTensor | None = None,
        behavior_content_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CiUBMOutput:
        r"""Score (user, target item, behaviour sequence) samples.

        Args:
            user_ids (`(B,)` long): user vocabulary index, 0 = unknown.
            target_item_ids (`(B,)` long): item vocabulary index, 0 = unknown.
            behavior_item_ids (`(B, L)` long): past items; any value at padded positions.
            behavior_mask (`(B, L)` bool): True at real behaviours.
            user_features (`dict[str, (B,)]`): one tensor per `config.user_feature_sizes` key.
            target_item_features (`dict[str, (B,) | (B, G)]`): per `config.item_feature_sizes` key
                ((B, G) for multi-valued features, 0-padded).
            behavior_item_features (`dict[str, (B, L) | (B, L, G)]`): same for behaviours.
            target_content_embeds (`(B, C)` float): content embedding of the target item; ignored
                (may be None) in mode "din" with base "din".
            behavior_content_embeds (`(B, L, C)` float): content of the behaviours (finite at padding).
            labels (`(B,)` 0/1, optional): clicks; gives `loss`.

        Returns:
            [`CiUBMOutput`] with logits/probs `(B,)` and `loss` when labels are given.
        """
        if kwargs:
            raise TypeError(f"CiUBMForCTR.forward got unexpected inputs {sorted(kwargs)}")
        behavior_mask = behavior_mask.bool()
        self._check_inputs(user_ids, target_item_ids, behavior_item_ids, behavior_mask,
                           target_content_embeds, behavior_content_embeds, labels)
        behavior_item_features = dict(behavior_item_features or {})
        # padded IDs never reach a table row other than 0
        behavior_item_ids = behavior_item_ids.masked_fill(~behavior_mask, 0)

        similarity = None
        if self.needs_content_inputs:
            dtype = self.dtype
            target_content_embeds = target_content_embeds.to(dtype)
            behavior_content_embeds = behavior_content_embeds.to(dtype)
            similarity = content_cosine_similarity(target_content_embeds, behavior_content_embeds)

        selected = None
        if self.behavior_search is not None and behavior_item_ids.shape[1] > self.config.sim_top_k:
            selected = self.behavior_search(similarity, behavior_mask)  # (B, k)
            behavior_item_ids = behavior_item_ids.gather(1, selected)
            behavior_mask = behavior_mask.gather(1, selected)
            similarity = similarity.gather(1, selected)
            behavior_content_embeds = behavior_content_embeds.gather(
                1, selected.unsqueeze(-1).expand(-1, -1, behavior_content_embeds.shape[-1])
            )
            behavior_item_features = {
                name: values.gather(1, selected if values.dim() == 2 else
                                    selected.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
                for name, values in behavior_item_features.items()
            }

        user_repr = self.embeddings.embed_users(self._drop_to_unknown(user_ids), user_features)
        target_repr = self.embeddings.embed_items(
            self._drop_to_unknown(target_item_ids), target_item_features, "target item"
        )
        behavior_repr = self.embeddings.embed_items(
            self._drop_to_unknown(behavior_item_ids), behavior_item_features, "behavior item"
        )

        score_bias = None
        if self.similarity_scale is not None:
            score_bias = self.similarity_scale * similarity
        id_interest, id_weights = self.id_attention(target_repr, behavior_repr, behavior_mask, score_bias)

        fusion_inputs = [user_repr, target_repr, id_interest]
        content_weights = None
        if self.config.mode == "content_feature":
            valid = behavior_mask.unsqueeze(1).to(behavior_content_embeds.dtype)  # (B, 1, L)
            mean_content = torch.bmm(valid, behavior_content_embeds).squeeze(1) / valid.sum(-1).clamp_min(1.0)
            fusion_inputs += [self.content_projection(target_content_embeds), self.content_projection(mean_content)]
        elif self.config.mode == "ciubm":
            fusion_inputs.append(self.content_projection(target_content_embeds))
            if self.content_interest is not None:
                pooled_content, content_weights = self.content_interest(
                    similarity, behavior_content_embeds, behavior_mask
                )
                fusion_inputs.append(self.content_projection(pooled_content))
            if self.similarity_histogram is not None:
                fusion_inputs.append(self.similarity_histogram(similarity, behavior_mask))

        logits = self.fusion(torch.cat(fusion_inputs, dim=-1)).squeeze(-1)
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


# save_pretrained then writes auto_map and copies this file and configuration_ciubm.py
CiUBMForCTR.register_for_auto_class("AutoModel")

__all__ = ["CiUBMPreTrainedModel", "CiUBMForCTR", "CiUBMOutput"]
