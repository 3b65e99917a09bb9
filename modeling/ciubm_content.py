"""CiUBM's content blocks: cosine similarity against the frozen content table, the content-interest
vector, the similarity histograms (bin fractions, SimTier), the content -> ID generator and the
SIM-style search. Imports only torch, so it travels as Hub remote code with ``modeling_ciubm.py``.
"""

import torch
from torch import nn
from torch.nn import functional as F


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to `mask`; rows with no valid entry give all zeros.

    scores: (B, L) float; mask: (B, L) bool -> (B, L) weights summing to 1 (or 0 if empty).
    """
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    # multiplying by the mask zeroes the uniform weights of an all-padding row (no NaN)
    return torch.softmax(scores, dim=-1) * mask


COSINE_EPS = 1e-8  # norms below it count as it: cosines stay bounded, zero vectors get 0


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """(..., C) -> the rows divided by max(|row|, COSINE_EPS) (zero rows stay zero)."""
    return vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def table_inverse_norms(table: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N,) float32 1 / |row|, and 0 for rows of norm below COSINE_EPS (they count as zero
    vectors: similarity 0, and no 1/eps that a half-precision cast would turn into inf)."""
    norms = torch.linalg.vector_norm(table, dim=-1, dtype=torch.float32)
    return torch.where(norms >= COSINE_EPS, norms.clamp_min(COSINE_EPS).reciprocal(), 0.0)


def compute_dtype(table: torch.Tensor) -> torch.dtype:
    """float32 for half-precision tables (sums and norms in float32), else the table dtype."""
    return torch.float32 if table.dtype in (torch.float16, torch.bfloat16) else table.dtype


def content_cosine_similarity(target_unit: torch.Tensor, table: torch.Tensor, inverse_norms: torch.Tensor,
                              rows: torch.LongTensor, chunk_elements: int = 1 << 18) -> torch.Tensor:
    """Cosine of the target with each behaviour: unit target (B, C), content table (N, C), its
    `table_inverse_norms` (N,), behaviour rows (B, L) -> (B, L) in [-1, 1] (0 for zero rows).
    One (1, C) x (C, L) product per sample, a few samples at a time: each gathered block holds about
    `chunk_elements` values and is read back from cache (3-4x faster than one (B, L, C) gather)."""
    step = max(1, chunk_elements // max(1, rows.shape[1] * table.shape[1]))
    dots = [torch.bmm(target_unit[start:start + step].unsqueeze(1),
                      F.embedding(rows[start:start + step], table).to(target_unit.dtype).transpose(1, 2)).squeeze(1)
            for start in range(0, max(rows.shape[0], 1), step)]  # an empty batch: one empty block
    return torch.cat(dots) * inverse_norms[rows].to(target_unit.dtype)


def pool_rows(table: torch.Tensor, rows: torch.LongTensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, C) = sum_l weights[b, l] * table[rows[b, l]]: one fused gather-and-sum per sample."""
    if rows.shape[1] == 0:  # embedding_bag cannot split empty bags out of a 2-D input
        return table.new_zeros(rows.shape[0], table.shape[1])
    return F.embedding_bag(rows, table, per_sample_weights=weights.to(table.dtype), mode="sum")


class CiUBMContentInterest(nn.Module):
    """(a) Content-interest vector: behaviour content pooled by softmax(similarity / temperature).

    similarity (B, L), mask (B, L), content table (N, C), behaviour rows (B, L) ->
    (pooled (B, C), weights (B, L)).
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, similarity, mask, table, rows):
        weights = masked_softmax(similarity / self.temperature, mask)
        return pool_rows(table, rows, weights), weights


def similarity_bin_counts(similarity, mask, n_bins: int) -> torch.Tensor:
    """How many valid behaviours fall in each of n equal bins over [-1, 1]: similarity (B, L),
    mask (B, L) -> (B, n_bins) counts (padded positions count 0). Bins are read from detached
    similarities: no gradient flows through the binning."""
    bins = ((similarity.detach() + 1.0) * (n_bins / 2.0)).floor().long().clamp(0, n_bins - 1)
    counts = torch.zeros(similarity.shape[0], n_bins, dtype=similarity.dtype, device=similarity.device)
    return counts.scatter_add_(1, bins, mask.to(similarity.dtype))


class CiUBMSimilarityHistogram(nn.Module):
    """(c) Fraction of the (valid) behaviours whose similarity falls in each of n equal bins over [-1, 1].

    similarity (B, L), mask (B, L) -> (B, n_bins); an all-padding row gives zeros.
    """

    def __init__(self, n_bins: int):
        super().__init__()
        self.n_bins = n_bins

    def forward(self, similarity, mask):
        counts = similarity_bin_counts(similarity, mask, self.n_bins)
        return counts / mask.to(similarity.dtype).sum(1, keepdim=True).clamp_min(1.0)


class CiUBMSimTier(nn.Module):
    """(c') SimTier: the same histogram, each bin a learned vector weighted by log(1 + count).

    similarity (B, L), mask (B, L) -> (B, dim) = sum_b log(1 + count_b) * E_b (a bias-free linear
    map of the log-counts); an all-padding row gives zeros. With 20 bins each bin is 0.1 wide.
    """

    def __init__(self, n_bins: int, dim: int):
        super().__init__()
        self.n_bins = n_bins
        self.bin_embeddings = nn.Linear(n_bins, dim, bias=False)

    def forward(self, similarity, mask):
        return self.bin_embeddings(torch.log1p(similarity_bin_counts(similarity, mask, self.n_bins)))


class CiUBMContentToID(nn.Module):
    """Content -> ID generator: an item's ID embedding predicted from its content, used where the ID
    row is unknown (a cold item, or an ID dropped by `unknown_id_dropout` in training, which is how
    it learns: end to end, through the click loss, on warm items).

    table (N, C), rows (M,) -> (M, id_dim); a one-hidden-layer MLP, run once per distinct row.
    """

    def __init__(self, content_dim: int, id_dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(content_dim, 4 * id_dim), nn.ReLU(), nn.Linear(4 * id_dim, id_dim))

    def forward(self, table, rows):
        unique, inverse = rows.unique(return_inverse=True)
        return self.layers(table.index_select(0, unique))[inverse]


class CiUBMBehaviorSearch(nn.Module):
    """SIM-style search stage: keep the top-k valid behaviours by content similarity.

    similarity (B, L), mask (B, L) bool -> indices (B, k) into the sequence (in no particular
    order), with k = min(top_k, L); rows with fewer than k valid behaviours also return padded
    positions (still masked): padded positions score `search_padding_value` = -2, below every cosine.
    """

    search_padding_value = -2.0

    def __init__(self, top_k: int):
        super().__init__()
        self.top_k = top_k

    def forward(self, similarity, mask):
        k = min(self.top_k, similarity.shape[1])
        scores = similarity.masked_fill(~mask, self.search_padding_value)
        # unsorted: the model is order-invariant over behaviours, and a partial selection is cheaper
        return scores.topk(k, dim=1, sorted=False).indices
