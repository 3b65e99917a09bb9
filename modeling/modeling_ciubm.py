"""CiUBM: content-interest-aware user behaviour modelling for CTR (Stage 3 of MIM).

One model, one file, top to bottom: feature embedding, DIN attention unit, content
similarity / content-interest / histogram blocks, SIM top-k search, the two ways behaviour
content can come in, then ``CiUBMPreTrainedModel`` and ``CiUBMForCTR``. Imports only torch and
transformers so it can be uploaded as Hub remote code next to ``configuration_ciubm.py``.

Content embeddings are inputs: they come frozen from the Representation Center, either as
dense tensors looked up by the collator (``target_content_embeds`` (B, C),
``behavior_content_embeds`` (B, L, C)) or as row numbers into a content table passed with the
batch (``content_table`` (N, C), ``target_content_rows`` (B,), ``behavior_content_rows`` (B, L)),
which never builds a (B, L, C) tensor. The model holds no copy of the center, so checkpoints
stay small.

Padding and unknown IDs share row 0 of every embedding table. Padded behaviours get exactly
zero attention weight (masked softmax, then multiplied by the mask), their IDs, side features
and content rows are replaced by 0 before look-up, so whatever sits at padded positions cannot
change the output, provided padded content vectors are finite (the collator writes zeros;
non-finite content anywhere raises a ValueError).
"""

import os
import warnings
import weakref
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
    item features (..., G) are averaged over their non-zero values. Inputs are assumed valid
    (`CiUBMForCTR.forward` checks them once per batch).
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

    def embed_items(self, item_ids: torch.Tensor, item_features: dict) -> torch.Tensor:
        """item_ids (*S), item_features name -> (*S) or (*S, G) if multi-valued -> (*S, item_dim)."""
        parts = [self.item_id_embeddings(item_ids)]
        for name, table in self.item_feature_embeddings.items():
            values = item_features[name]
            if name in self.multi_valued_item_features:
                present = (values != 0).unsqueeze(-1).to(table.weight.dtype)
                # row 0 is zero, so the sum only counts real values; divide by their number
                parts.append(table(values).sum(-2) / present.sum(-2).clamp_min(1.0))
            else:
                parts.append(table(values))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


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
            scores = self.score_layers(self.activation(hidden)).squeeze(-1)  # (B, L)
        if score_bias is not None:
            scores = scores + score_bias
        if self.normalization == "softmax":
            weights = masked_softmax(scores, mask)
        else:
            weights = scores * mask
        interest = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
        return interest, weights


COSINE_EPS = 1e-8  # norms below it count as it: cosines stay bounded, zero vectors get 0


def content_cosine_similarity(target_content: torch.Tensor, behavior_content: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the target with each behaviour: (B, C), (B, L, C) -> (B, L) in [-1, 1].

    cos(a, b) = a . b / (max(|a|, eps) max(|b|, eps)), eps = `COSINE_EPS`: all-zero vectors
    (content missing from the center) get similarity 0. The target is normalised first (B x C
    work), so the (B, L) result needs one division; behaviour norms are computed separately so
    the (B, L, C) tensor is never copied. The dots are one (1, C) x (C, L) product per sample: on
    CPU that orientation streams the behaviours at memory speed, (L, C) x (C, 1) runs about 3x
    slower.
    """
    dots = torch.bmm(_unit_rows(target_content).unsqueeze(1), behavior_content.transpose(1, 2)).squeeze(1)
    return dots / torch.linalg.vector_norm(behavior_content, dim=-1).clamp_min(COSINE_EPS)


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """(..., C) -> the rows divided by max(|row|, COSINE_EPS) (zero rows stay zero)."""
    return vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def table_inverse_norms(table: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N,) float32 1 / max(|row|, COSINE_EPS) (float32 whatever the table dtype, so the
    eps never underflows)."""
    return torch.linalg.vector_norm(table, dim=-1, dtype=torch.float32).clamp_min(COSINE_EPS).reciprocal()


def _index_dtype(*sizes: int) -> torch.dtype:
    """int32 when every index fits (half the memory traffic of int64 in sort and CSR build), else int64."""
    return torch.int32 if max(sizes) < 2**31 else torch.int64


def _dots_by_sorted_csr(table: torch.Tensor) -> bool:
    """Row dots by the sorted-CSR sampled product (CPU: each table row read once) or, elsewhere,
    by chunked gathers (accelerators read random rows at full speed and sort/CSR build would only
    add passes)."""
    return table.device.type == "cpu"


def _sorted_row_dots(table: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, sample: torch.Tensor):
    """The dots of `sampled_row_dots` in table-row order: (N, C), (B, C), (V,), (V,) ->
    (dots (V,) float32 or float64, sorted_rows (V,), order (V,) int64) with sorted_rows = rows[order]
    and dots[i] = table[sorted_rows[i]] . target[sample[order[i]]].

    A sampled dense-dense product (`torch.sparse.sampled_addmm`) over the CSR pattern "table row r
    meets sample b", rows sorted by table row so that each table row is read once however many
    samples hold it.
    """
    if table.dtype in (torch.float16, torch.bfloat16):  # sampled_addmm has no CPU kernel for them
        table, target = table.float(), target.float()
    n_rows, batch_size = table.shape[0], target.shape[0]
    index_dtype = _index_dtype(n_rows, batch_size, rows.numel())
    sorted_rows, order = torch.sort(rows.to(index_dtype), stable=True)
    sorted_sample = sample.to(index_dtype).index_select(0, order)
    crow = torch.zeros(n_rows + 1, dtype=index_dtype, device=rows.device)
    crow[1:] = torch.bincount(sorted_rows, minlength=n_rows).cumsum(0)
    values = torch.zeros(rows.numel(), dtype=table.dtype, device=table.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        pattern = torch.sparse_csr_tensor(crow, sorted_sample, values, size=(n_rows, batch_size),
                                          check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, table, target.t(), beta=0.0).values()
    return dots, sorted_rows, order


def sampled_row_dots(table: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """dots[i] = table[rows[i]] . target[sample[i]]: (N, C), (B, C), (V,) integer, (V,) integer -> (V,).

    On CPU a sampled dense-dense product over the pattern "table row r meets sample b" sorted by
    table row (each table row read once, see `_sorted_row_dots`); gathering table[rows] instead
    writes V*C floats and reads rows in random order (several times slower at L = 1000). On other
    devices, where gathers are cheap, a chunked gather and row-wise dot. No gradient flows (the
    table is frozen). Half-precision inputs are computed in float32 and returned in their dtype.
    """
    if not _dots_by_sorted_csr(table):
        return _gathered_row_dots(table, target, rows, sample).to(table.dtype)
    dots, _, order = _sorted_row_dots(table, target, rows, sample)
    return torch.empty_like(dots).index_copy_(0, order, dots).to(table.dtype)


def _gathered_row_dots(table, target, rows, sample, chunk_elements: int = 2**26) -> torch.Tensor:
    """`sampled_row_dots` by explicit gathers, at most `chunk_elements` gathered values at a time
    (float32 accumulation); for accelerators, where random row reads are cheap."""
    step = max(1, chunk_elements // max(table.shape[1], 1))
    accumulate = torch.float64 if table.dtype == torch.float64 else torch.float32
    out = torch.empty(rows.numel(), dtype=accumulate, device=table.device)
    for start in range(0, rows.numel(), step):
        part_rows, part_sample = rows[start:start + step], sample[start:start + step]
        out[start:start + step] = torch.linalg.vecdot(table.index_select(0, part_rows).to(accumulate),
                                                      target.index_select(0, part_sample).to(accumulate))
    return out


def table_cosine_similarity(
    target_content: torch.Tensor, table: torch.Tensor, table_inverse_norms: torch.Tensor, rows: torch.Tensor,
    mask: torch.Tensor, padding_value: float = 0.0,
) -> torch.Tensor:
    """`content_cosine_similarity(target_content, table[rows])` at the positions where `mask` is
    True, `padding_value` elsewhere, without building table[rows] and without computing padded
    positions.

    target_content (B, C), table (N, C), table_inverse_norms (N,) = `table_inverse_norms(table)`,
    rows (B, L) integer, mask (B, L) bool -> (B, L) in [-1, 1], table dtype (computed in float32
    for half-precision tables). The target is normalised first, so each real behaviour costs one
    dot, one gathered inverse norm and one product.
    """
    batch_size, seq_len = rows.shape
    flat_mask = mask.reshape(-1)
    valid = flat_mask.nonzero().squeeze(1)  # (V,) flat positions, sample-major
    valid_rows = rows.reshape(-1).index_select(0, valid)
    # sample of each valid position, straight from the per-sample counts (no division pass)
    index_dtype = _index_dtype(table.shape[0], batch_size, valid.numel())
    sample = torch.repeat_interleave(torch.arange(batch_size, dtype=index_dtype, device=rows.device),
                                     mask.sum(1), output_size=valid.numel())
    target_content = target_content.float() if target_content.dtype in (torch.float16, torch.bfloat16) else target_content
    target_unit = _unit_rows(target_content)
    if _dots_by_sorted_csr(table):
        # everything stays in table-row order until the one scatter into the (B, L) output
        dots, sorted_rows, order = _sorted_row_dots(table, target_unit, valid_rows, sample)
        inverse_norms = table_inverse_norms.index_select(0, sorted_rows)
        positions = valid.index_select(0, order)
    else:
        dots = _gathered_row_dots(table, target_unit, valid_rows, sample)
        inverse_norms = table_inverse_norms.index_select(0, valid_rows)
        positions = valid
    similarity = torch.full((batch_size * seq_len,), padding_value, dtype=table.dtype, device=table.device)
    similarity.index_copy_(0, positions, (dots * inverse_norms.to(dots.dtype)).to(table.dtype))
    return similarity.view(batch_size, seq_len)


class _DenseBehaviorContent:
    """Behaviour content given densely: target (B, C), behaviours (B, L, C), mask (B, L) bool."""

    def __init__(self, target: torch.Tensor, behaviors: torch.Tensor, mask: torch.Tensor):
        self.target, self.behaviors, self.mask = target, behaviors, mask

    def similarity(self, padding_value: float | None = None):
        """((B, L) cosine similarity of target and behaviours, with `padding_value` at padded
        positions unless it is None; non-finite flag: 0-dim bool, True when any similarity, padded
        positions included, is NaN/inf: content must be finite everywhere)."""
        similarity = content_cosine_similarity(self.target, self.behaviors)
        bad = _non_finite_flag(similarity)
        if padding_value is not None:
            similarity = similarity.masked_fill(~self.mask, padding_value)
        return similarity, bad

    def select(self, indices: torch.Tensor) -> "_DenseBehaviorContent":
        """Keep positions indices (B, k) of each sequence (a row copy, no (B, k, C) index tensor)."""
        batch_size, seq_len, dim = self.behaviors.shape
        offsets = torch.arange(batch_size, device=indices.device).unsqueeze(1) * seq_len
        kept = self.behaviors.reshape(-1, dim).index_select(0, (indices + offsets).reshape(-1))
        return _DenseBehaviorContent(self.target, kept.view(*indices.shape, dim), self.mask.gather(1, indices))

    def pool(self, weights: torch.Tensor) -> torch.Tensor:
        """weights (B, L) -> (B, C) = sum_l weights[b, l] * behaviours[b, l]."""
        return torch.bmm(weights.unsqueeze(1).to(self.behaviors.dtype), self.behaviors).squeeze(1)


class _TableBehaviorContent:
    """Behaviour content given as rows (B, L) of a frozen content table (N, C) with its
    `table_inverse_norms` (N,)."""

    def __init__(self, target: torch.Tensor, table: torch.Tensor, inverse_norms: torch.Tensor, rows: torch.Tensor,
                 mask: torch.Tensor):
        self.target, self.table, self.inverse_norms, self.rows, self.mask = target, table, inverse_norms, rows, mask

    def similarity(self, padding_value: float | None = None):
        """((B, L) cosine similarity at real behaviours, `padding_value` (None: 0) at padded
        positions, which are never computed; non-finite flag: 0-dim bool, True when a similarity
        is NaN/inf)."""
        similarity = table_cosine_similarity(self.target, self.table, self.inverse_norms, self.rows, self.mask,
                                             0.0 if padding_value is None else padding_value)
        return similarity, _non_finite_flag(similarity)

    def select(self, indices: torch.Tensor) -> "_TableBehaviorContent":
        return _TableBehaviorContent(self.target, self.table, self.inverse_norms, self.rows.gather(1, indices),
                                     self.mask.gather(1, indices))

    def pool(self, weights: torch.Tensor) -> torch.Tensor:
        if self.rows.shape[1] == 0:  # embedding_bag cannot split empty bags out of a 2-D input
            return self.table.new_zeros(self.rows.shape[0], self.table.shape[1])
        # one fused gather-and-sum per sample: the (B, L, C) rows are never written out
        return F.embedding_bag(self.rows, self.table, per_sample_weights=weights.to(self.table.dtype), mode="sum")


class CiUBMContentInterest(nn.Module):
    """(a) Content-interest vector: behaviour content pooled by softmax(similarity / temperature).

    similarity (B, L), mask (B, L), behaviour content (dense or table rows) ->
    (pooled (B, C), weights (B, L)).
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, similarity, mask, behavior_content):
        weights = masked_softmax(similarity / self.temperature, mask)
        return behavior_content.pool(weights), weights


class CiUBMSimilarityHistogram(nn.Module):
    """(c) Fraction of the (valid) behaviours whose similarity falls in each of n equal bins over [-1, 1].

    similarity (B, L), mask (B, L) -> (B, n_bins); an all-padding row gives zeros.
    """

    def __init__(self, n_bins: int):
        super().__init__()
        self.n_bins = n_bins

    def forward(self, similarity, mask):
        # padded positions fall in some bin, but their count weight is mask = 0
        bins = ((similarity.detach() + 1.0) * (self.n_bins / 2.0)).floor().long().clamp(0, self.n_bins - 1)
        valid = mask.to(similarity.dtype)
        counts = torch.zeros(similarity.shape[0], self.n_bins, dtype=similarity.dtype, device=similarity.device)
        counts.scatter_add_(1, bins, valid)
        return counts / valid.sum(1, keepdim=True).clamp_min(1.0)


class CiUBMBehaviorSearch(nn.Module):
    """SIM-style search stage: keep the top-k valid behaviours by content similarity.

    similarity (B, L), mask (B, L) bool or None -> indices (B, k) into the sequence (in no
    particular order), with k = min(top_k, L); rows with fewer than k valid behaviours also
    return padded positions (still masked). With `mask=None` the padded positions must already
    hold a value below every real similarity (`CiUBMForCTR` writes `search_padding_value` = -2
    there while computing the similarities, cosines lying in [-1, 1]): one pass over (B, L) less.
    """

    search_padding_value = -2.0

    def __init__(self, top_k: int):
        super().__init__()
        self.top_k = top_k

    def forward(self, similarity, mask=None):
        k = min(self.top_k, similarity.shape[1])
        scores = similarity if mask is None else similarity.masked_fill(~mask, float("-inf"))
        # unsorted: the model is order-invariant over behaviours, and a partial selection is cheaper
        return scores.topk(k, dim=1, sorted=False).indices


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
        # the similarity feeds the search and parts (a)-(c); "content_feature" alone never needs it
        self.uses_similarity = config.base == "sim" or any(
            part is not None for part in (self.content_interest, self.similarity_histogram, self.similarity_scale)
        )
        fusion_dim = user_dim + 2 * item_dim  # user, target item, ID interest
        if config.mode == "content_feature":
            fusion_dim += 2 * config.content_proj_dim  # target content, mean behaviour content
        elif full:
            fusion_dim += config.content_proj_dim  # target content
            fusion_dim += config.content_proj_dim if self.content_interest is not None else 0
            fusion_dim += config.histogram_n_bins if self.similarity_histogram is not None else 0
        self.fusion = CiUBMMLP(fusion_dim, config.fusion_hidden_sizes, 1, config.hidden_act, config.dropout)
        # (weak ref to the last content_table seen, (its version, dtype), its inverse row norms)
        self._content_table_cache = None
        self.post_init()

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, inputs: dict) -> dict:
        """Check every input once per batch and return them cleaned.

        Types and shapes are checked for free (metadata); values (ID ranges, mask and label
        values) with a few reductions and ONE host sync, and only when something is wrong is the
        offending value looked up for the message. Raises TypeError (not a tensor, wrong dtype) or
        ValueError (shape, range, value), naming the input, the bad value and what is expected.
        Returns the inputs with a bool mask, padded behaviour IDs / side features / content rows
        replaced by 0, feature dicts filled, and "content" = the behaviour content (or None).
        """
        config = self.config
        user_ids = _tensor("user_ids", inputs["user_ids"], "integer")
        if user_ids.dim() != 1 or user_ids.shape[0] == 0:
            raise ValueError(f"user_ids must be (batch_size,) with batch_size >= 1, got shape {tuple(user_ids.shape)}")
        batch_size = user_ids.shape[0]
        target_item_ids = _tensor("target_item_ids", inputs["target_item_ids"], "integer", (batch_size,))
        behavior_item_ids = _tensor("behavior_item_ids", inputs["behavior_item_ids"], "integer")
        if behavior_item_ids.dim() != 2 or behavior_item_ids.shape[0] != batch_size:
            raise ValueError(f"behavior_item_ids must be ({batch_size}, L), got {tuple(behavior_item_ids.shape)}")
        seq_shape = tuple(behavior_item_ids.shape)
        raw_mask = _tensor("behavior_mask", inputs["behavior_mask"], "any")
        if raw_mask.shape != seq_shape:
            raise ValueError(f"behavior_mask shape {tuple(raw_mask.shape)} != behavior_item_ids shape {seq_shape}")
        mask = raw_mask if raw_mask.dtype == torch.bool else raw_mask != 0

        checks = []  # (bad: 0-dim bool tensor, message: callable) evaluated with one sync below
        if raw_mask.dtype != torch.bool:
            checks.append(_value_check("behavior_mask", raw_mask, "0/1 (or bool)"))
        checks.append(_range_check("user_ids", user_ids, config.n_users))
        checks.append(_range_check("target_item_ids", target_item_ids, config.n_items))
        # any value allowed at padding: zeroed (one pass; `where` runs several times faster than a
        # product with the bool mask, which promotes it first)
        behavior_item_ids = torch.where(mask, behavior_item_ids, 0)
        checks.append(_range_check("behavior_item_ids (at unpadded positions)", behavior_item_ids, config.n_items))

        user_features = _feature_dict("user_features", inputs["user_features"], config.user_feature_sizes)
        target_features = _feature_dict("target_item_features", inputs["target_item_features"], config.item_feature_sizes)
        behavior_features = _feature_dict(
            "behavior_item_features", inputs["behavior_item_features"], config.item_feature_sizes
        )
        multi = set(config.multi_valued_item_features)
        for name, size in config.user_feature_sizes.items():
            values = _tensor(f"user_features[{name!r}]", user_features[name], "integer", (batch_size,))
            checks.append(_range_check(f"user_features[{name!r}]", values, size))
        for name, size in config.item_feature_sizes.items():
            tail = "G" if name in multi else None
            target_values = _tensor(f"target_item_features[{name!r}]", target_features[name], "integer",
                                    (batch_size,), tail)
            behavior_values = _tensor(f"behavior_item_features[{name!r}]", behavior_features[name], "integer",
                                      seq_shape, tail)
            behavior_values = torch.where(mask.unsqueeze(-1) if tail else mask, behavior_values, 0)
            behavior_features[name] = behavior_values
            checks.append(_range_check(f"target_item_features[{name!r}]", target_values, size))
            checks.append(_range_check(f"behavior_item_features[{name!r}] (at unpadded positions)", behavior_values, size))

        content = None
        if self.needs_content_inputs:
            content, content_checks = self._behavior_content(inputs, batch_size, seq_shape, mask)
            checks += content_checks
        labels = inputs["labels"]
        if labels is not None:
            labels = _tensor("labels", labels, "any", (batch_size,))
            checks.append(_value_check("labels", labels, "0 or 1"))

        bad = torch.stack([flag for flag, _ in checks])
        if bool(bad.any()):
            for flag, message in checks:
                if flag:
                    raise ValueError(message())
        return {
            "user_ids": user_ids, "target_item_ids": target_item_ids, "behavior_item_ids": behavior_item_ids,
            "behavior_mask": mask, "user_features": user_features, "target_item_features": target_features,
            "behavior_item_features": behavior_features, "content": content, "labels": labels,
        }

    def _behavior_content(self, inputs, batch_size, seq_shape, mask):
        """The behaviour content of the batch (dense or table rows) and its value checks."""
        dim = self.config.content_dim
        dense = inputs["target_content_embeds"] is not None or inputs["behavior_content_embeds"] is not None
        rows = (inputs["content_table"] is not None or inputs["target_content_rows"] is not None
                or inputs["behavior_content_rows"] is not None)
        needed = (f"mode={self.config.mode!r}, base={self.config.base!r} needs target_content_embeds (B, C) and "
                  "behavior_content_embeds (B, L, C), or content_table (N, C) with target_content_rows (B,) and "
                  "behavior_content_rows (B, L), from the Representation Center")
        if dense and rows:
            raise ValueError(f"give content either as embeddings or as table rows, not both. {needed}")
        if not rows:
            if inputs["target_content_embeds"] is None or inputs["behavior_content_embeds"] is None:
                raise ValueError(needed)
            target = _tensor("target_content_embeds", inputs["target_content_embeds"], "float")
            behaviors = _tensor("behavior_content_embeds", inputs["behavior_content_embeds"], "float")
            for name, tensor in (("target_content_embeds", target), ("behavior_content_embeds", behaviors)):
                if tensor.dim() and tensor.shape[-1] != dim:
                    raise ValueError(f"{name} has content dim {tensor.shape[-1]} but config.content_dim is {dim} "
                                     "(was the center built with another encoder?)")
            _tensor("target_content_embeds", target, "float", (batch_size, dim))
            _tensor("behavior_content_embeds", behaviors, "float", (*seq_shape, dim))
            target = target.to(self.dtype)
            # the target is checked here; behaviours through the similarities and logits they feed
            return (_DenseBehaviorContent(target, behaviors.to(self.dtype), mask),
                    [_finite_check("target_content_embeds", target)])
        if any(inputs[name] is None for name in ("content_table", "target_content_rows", "behavior_content_rows")):
            raise ValueError(needed)
        table = _tensor("content_table", inputs["content_table"], "float")
        if table.dim() != 2 or table.shape[0] == 0 or table.shape[1] != dim:
            raise ValueError(f"content_table must be (N, {dim}) with N >= 1 (config.content_dim = {dim}), "
                             f"got {tuple(table.shape)}")
        target_rows = _tensor("target_content_rows", inputs["target_content_rows"], "integer", (batch_size,))
        behavior_rows = _tensor("behavior_content_rows", inputs["behavior_content_rows"], "integer", seq_shape)
        behavior_rows = torch.where(mask, behavior_rows, 0)
        checks = [_range_check(name, rows, table.shape[0], "the rows of content_table") for name, rows in (
            ("target_content_rows", target_rows), ("behavior_content_rows (at unpadded positions)", behavior_rows))]
        table, inverse_norms = self._prepared_table(table)
        target = table.index_select(0, target_rows.clamp(0, table.shape[0] - 1))  # clamped: checked with the rest
        checks.append(_finite_check("content_table (at target_content_rows)", target))
        return _TableBehaviorContent(target, table, inverse_norms, behavior_rows, mask), checks

    def _prepared_table(self, table: torch.Tensor):
        """(table in the model dtype, detached; its `table_inverse_norms` (N,) float32). The norms are
        computed once per table object and version (an in-place change recomputes them); a weak
        reference, so the model never keeps a caller's table alive. A table made under
        `torch.inference_mode` has no version counter: its norms are computed on every call."""
        frozen = table.detach().to(self.dtype)
        if table.is_inference():  # made under inference_mode: no version counter, so no safe cache
            return frozen, table_inverse_norms(frozen)
        cache = self._content_table_cache
        if cache is None or cache[0]() is not table or cache[1] != (table._version, frozen.dtype):
            cache = (weakref.ref(table), (table._version, frozen.dtype), table_inverse_norms(frozen))
            self._content_table_cache = cache
        return frozen, cache[2]

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_content_table_cache"] = None  # a per-process cache of a caller's tensor: never pickled
        return state

    def _non_finite_error(self, content, similarity, logits) -> ValueError:
        """Explain non-finite similarities or logits: which content input holds NaN/inf, else the model."""
        if content is not None:
            if isinstance(content, _DenseBehaviorContent):
                named = (("target_content_embeds", content.target), ("behavior_content_embeds", content.behaviors))
            else:
                named = (("content_table", content.table),)
            for name, tensor in named:
                bad = ~torch.isfinite(tensor)
                if bool(bad.any()):
                    where = tuple(int(i) for i in bad.nonzero()[0])
                    return ValueError(
                        f"{name} holds {tensor[where].item()} at index {where[:-1]}: content embeddings must be "
                        "finite everywhere, padded positions included (the collator writes zeros there)"
                    )
        samples = (~torch.isfinite(logits)).nonzero().flatten()[:5].tolist()
        where = "the content similarity" if similarity is not None and not bool(torch.isfinite(similarity).all()) else (
            f"the logits of samples {samples}")
        return ValueError(
            f"finite inputs gave non-finite values in {where}: content vectors too large for "
            f"{self.dtype} (norms overflow), or diverged weights"
        )

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
        content_table: torch.FloatTensor | None = None,
        target_content_rows: torch.LongTensor | None = None,
        behavior_content_rows: torch.LongTensor | None = None,
        **kwargs,
    ) -> CiUBMOutput:
        r"""Score (user, target item, behaviour sequence) samples.

        Args:
            user_ids (`(B,)` int64/int32): user vocabulary index, 0 = unknown; B >= 1.
            target_item_ids (`(B,)` int64/int32): item vocabulary index, 0 = unknown.
            behavior_item_ids (`(B, L)` int64/int32): past items (L may be 0); any value at padded positions.
            behavior_mask (`(B, L)` bool, or 0/1 integers/floats): True at real behaviours.
            user_features (`dict[str, (B,)]`): one tensor per `config.user_feature_sizes` key.
            target_item_features (`dict[str, (B,) | (B, G)]`): per `config.item_feature_sizes` key
                ((B, G) for multi-valued features, 0-padded).
            behavior_item_features (`dict[str, (B, L) | (B, L, G')]`): same for behaviours; any
                value at padded positions.
            target_content_embeds (`(B, C)` float): content embedding of the target item; ignored
                (may be None) in mode "din" with base "din".
            behavior_content_embeds (`(B, L, C)` float): content of the behaviours (finite at padding).
            labels (`(B,)` 0/1, optional): clicks; gives `loss`.
            content_table (`(N, C)` float, optional): instead of the two content embeddings, a frozen
                content table (e.g. the Representation Center's rows; row norms are computed once per
                table object) with
            target_content_rows (`(B,)` int): the target's row in `content_table`, and
            behavior_content_rows (`(B, L)` int): each behaviour's row (any value at padded positions).
                Same outputs as passing `content_table[rows]` as embeddings, without building them.

        Returns:
            [`CiUBMOutput`] with logits/probs `(B,)` and `loss` when labels are given.

        Raises:
            TypeError / ValueError naming the input, the bad value and what is expected: a
            non-tensor or wrong dtype, a shape that disagrees with the batch, IDs / rows outside
            their table, labels other than 0/1, non-finite content.
        """
        if kwargs:
            raise TypeError(f"CiUBMForCTR.forward got unexpected inputs {sorted(kwargs)}")
        checked = self._check_inputs({
            "user_ids": user_ids, "target_item_ids": target_item_ids, "behavior_item_ids": behavior_item_ids,
            "behavior_mask": behavior_mask, "user_features": user_features,
            "target_item_features": target_item_features, "behavior_item_features": behavior_item_features,
            "target_content_embeds": target_content_embeds, "behavior_content_embeds": behavior_content_embeds,
            "content_table": content_table, "target_content_rows": target_content_rows,
            "behavior_content_rows": behavior_content_rows, "labels": labels,
        })
        behavior_mask, content, labels = checked["behavior_mask"], checked["content"], checked["labels"]
        behavior_item_ids = checked["behavior_item_ids"]
        behavior_item_features = checked["behavior_item_features"]

        # computed once, reused by the search, the content interest, the logit bias and the histogram
        searching = self.behavior_search is not None and behavior_item_ids.shape[1] > self.config.sim_top_k
        similarity = similarity_bad = None
        if self.uses_similarity:
            # searching: padded positions get a value below every cosine, so the search needs no mask
            # pass (everything downstream masks padded positions, whatever they hold)
            similarity, similarity_bad = content.similarity(
                self.behavior_search.search_padding_value if searching else None)
        full_similarity = similarity

        selected = None
        if searching:
            selected = self.behavior_search(similarity)  # (B, k)
            behavior_item_ids = behavior_item_ids.gather(1, selected)
            behavior_mask = behavior_mask.gather(1, selected)
            similarity = similarity.gather(1, selected)
            content = content.select(selected)
            behavior_item_features = {
                name: values.gather(1, selected if values.dim() == 2 else
                                    selected.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
                for name, values in behavior_item_features.items()
            }

        user_repr = self.embeddings.embed_users(self._drop_to_unknown(checked["user_ids"]), checked["user_features"])
        # behaviours then targets, flat, in one look-up per table (one embedding backward instead of
        # two); both parts of the result are contiguous slices: no copy on the way in or out
        batch_size, seq_len = behavior_item_ids.shape
        target_item_ids = self._drop_to_unknown(checked["target_item_ids"])
        item_ids = torch.cat([self._drop_to_unknown(behavior_item_ids).reshape(-1), target_item_ids])
        item_features = {
            name: _behaviors_then_target(behavior_item_features[name], checked["target_item_features"][name])
            for name in behavior_item_features
        }
        item_repr = self.embeddings.embed_items(item_ids, item_features)  # (B * L + B, item_dim)
        behavior_repr = item_repr[: batch_size * seq_len].view(batch_size, seq_len, item_repr.shape[-1])
        target_repr = item_repr[batch_size * seq_len:]

        score_bias = None
        if self.similarity_scale is not None:
            score_bias = self.similarity_scale * similarity
        id_interest, id_weights = self.id_attention(target_repr, behavior_repr, behavior_mask, score_bias)

        fusion_inputs = [user_repr, target_repr, id_interest]
        content_weights = None
        if self.config.mode == "content_feature":
            valid = behavior_mask.to(content.target.dtype)
            mean_content = content.pool(valid) / valid.sum(-1, keepdim=True).clamp_min(1.0)
            fusion_inputs += [self.content_projection(content.target), self.content_projection(mean_content)]
        elif self.config.mode == "ciubm":
            fusion_inputs.append(self.content_projection(content.target))
            if self.content_interest is not None:
                pooled_content, content_weights = self.content_interest(similarity, behavior_mask, content)
                fusion_inputs.append(self.content_projection(pooled_content))
            if self.similarity_histogram is not None:
                fusion_inputs.append(self.similarity_histogram(similarity, behavior_mask))

        logits = self.fusion(torch.cat(fusion_inputs, dim=-1)).squeeze(-1)
        non_finite = ~torch.isfinite(logits).all()
        if similarity_bad is not None:  # a NaN similarity can vanish in the histogram: check it too
            non_finite = non_finite | similarity_bad
        if bool(non_finite):
            raise self._non_finite_error(checked["content"], full_similarity, logits)
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


_DTYPE_KINDS = {
    "integer": ((torch.int64, torch.int32), "an int64 or int32 tensor"),
    "float": ((torch.float16, torch.bfloat16, torch.float32, torch.float64), "a floating-point tensor"),
}


def _tensor(name: str, value, kind: str, shape: tuple | None = None, tail: str | None = None) -> torch.Tensor:
    """Check that `value` is a tensor of the dtype kind ("integer", "float", "any") and, if given, of
    `shape` (plus one free trailing dim when `tail` names it); returns it. TypeError / ValueError."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if kind != "any" and value.dtype not in _DTYPE_KINDS[kind][0]:
        raise TypeError(f"{name} must be {_DTYPE_KINDS[kind][1]}, got {value.dtype}")
    if kind == "any" and value.dtype.is_complex:
        raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
    if shape is not None:
        actual = tuple(value.shape)
        if (actual[:-1] if tail else actual) != tuple(shape) or (tail and value.dim() != len(shape) + 1):
            expected = str(tuple(shape)) + (f" + ({tail},)" if tail else "")
            raise ValueError(f"{name} must have shape {expected}, got {actual}")
    return value


def _feature_dict(name: str, features, expected: dict) -> dict:
    """The feature dict (None = {}) with exactly the config's keys, else ValueError / TypeError."""
    if features is None:
        features = {}
    if not isinstance(features, dict):
        raise TypeError(f"{name} must be a dict of tensors, got {type(features).__name__}")
    if set(features) != set(expected):
        raise ValueError(f"{name} keys {sorted(features)} do not match the config's features {sorted(expected)}")
    return dict(features)


def _range_check(name: str, ids: torch.Tensor, size: int, of: str = "the vocabulary"):
    """(bad flag, message) for integer `ids` outside [0, size) (rows of `of`); no sync until the flag is read."""
    if ids.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=ids.device), None
    low, high = torch.aminmax(ids)

    def message():
        value = int(high) if int(high) >= size else int(low)
        return f"{name} holds index {value} outside {of} [0, {size})"

    return (low < 0) | (high >= size), message


def _value_check(name: str, values: torch.Tensor, expected: str):
    """(bad flag, message) for values other than 0 and 1 (NaN included)."""
    bad = (values != 0) & (values != 1)

    def message():
        return f"{name} must be {expected}, got {values[bad][0].item()!r}"

    return bad.any(), message


def _non_finite_flag(values: torch.Tensor) -> torch.Tensor:
    """0-dim bool: True when `values` (bounded when finite, e.g. cosines) holds NaN or inf.

    One summing pass instead of an elementwise isfinite and a reduction: the sum of bounded finite
    values cannot overflow (accumulated in float32 at least), while any NaN/inf makes it non-finite.
    """
    accumulate = torch.float64 if values.dtype == torch.float64 else torch.float32
    return ~torch.isfinite(values.sum(dtype=accumulate))


def _finite_check(name: str, values: torch.Tensor):
    """(bad flag, message) for NaN/inf anywhere in `values`."""
    finite = torch.isfinite(values)

    def message():
        where = tuple(int(i) for i in (~finite).nonzero()[0])
        return f"{name} holds {values[where].item()} at index {where}: content embeddings must be finite"

    return ~finite.all(), message


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
