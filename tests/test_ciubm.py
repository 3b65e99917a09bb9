"""Tests for the CiUBM CTR model (modeling/configuration_ciubm.py, modeling/modeling_ciubm.py)."""

import json

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel

import mim_hf  # noqa: F401  (registers the Auto classes)
from mim_hf.modeling.configuration_ciubm import CiUBMConfig
from mim_hf.modeling.modeling_ciubm import (
    CiUBMForCTR,
    CiUBMSimilarityHistogram,
    CiUBMTargetAttention,
    CiUBMBehaviorSearch,
    _gathered_row_dots,
    content_cosine_similarity,
    sampled_row_dots,
)
from mim_hf.modeling import modeling_ciubm

N_USERS, N_ITEMS, CONTENT_DIM = 9, 30, 8
MODES = ("din", "content_feature", "ciubm")


class CiUBMModelTester:
    """Tiny config + random inputs; item features: multi-valued genres and a year."""

    def __init__(self, batch_size=4, seq_len=6, seed=0):
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

    def get_config(self, **overrides):
        kwargs = dict(
            n_users=N_USERS, n_items=N_ITEMS,
            user_feature_sizes={"user_gender": 3},
            item_feature_sizes={"item_genres": 6, "item_year": 5},
            multi_valued_item_features=["item_genres"],
            id_embed_dim=4, content_dim=CONTENT_DIM, content_proj_dim=4,
            attention_hidden_sizes=[8, 4], fusion_hidden_sizes=[16, 8],
            histogram_n_bins=4, sim_top_k=3, dropout=0.0,
        )
        kwargs.update(overrides)
        return CiUBMConfig(**kwargs)

    def get_model(self, **overrides):
        torch.manual_seed(self.seed)
        return CiUBMForCTR(self.get_config(**overrides)).eval()

    def get_inputs(self, seq_len=None, with_labels=True):
        batch, length = self.batch_size, seq_len or self.seq_len
        g = torch.Generator().manual_seed(self.seed)
        lengths = torch.tensor([length, 1, 0, max(length - 2, 1)])[:batch]  # row 2: no behaviour at all
        mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
        inputs = {
            "user_ids": torch.randint(0, N_USERS, (batch,), generator=g),
            "target_item_ids": torch.randint(1, N_ITEMS, (batch,), generator=g),
            "behavior_item_ids": torch.randint(1, N_ITEMS, (batch, length), generator=g) * mask,
            "behavior_mask": mask,
            "user_features": {"user_gender": torch.randint(0, 3, (batch,), generator=g)},
            "target_item_features": {
                "item_genres": torch.randint(0, 6, (batch, 3), generator=g),
                "item_year": torch.randint(0, 5, (batch,), generator=g),
            },
            "behavior_item_features": {
                "item_genres": torch.randint(0, 6, (batch, length, 3), generator=g) * mask.unsqueeze(-1),
                "item_year": torch.randint(0, 5, (batch, length), generator=g) * mask,
            },
            "target_content_embeds": torch.randn(batch, CONTENT_DIM, generator=g),
            "behavior_content_embeds": torch.randn(batch, length, CONTENT_DIM, generator=g) * mask.unsqueeze(-1),
        }
        if with_labels:
            inputs["labels"] = torch.tensor([1, 0, 1, 0])[:batch]
        return inputs


tester = CiUBMModelTester()


@pytest.fixture(params=["packed", "per_sample"])
def attention_path(request, monkeypatch):
    """Run a test through both DIN-attention code paths: MLP on the real behaviours only
    ("packed", CPU with enough padding) and one (L, D) x (D, H) product per sample."""
    monkeypatch.setattr(CiUBMTargetAttention, "packing_max_density", 1.0 if request.param == "packed" else -1.0)
    return request.param


def with_padding_garbage(inputs, extra, seed=123):
    """Append `extra` padded positions and fill every padded position with random ids/features/content."""
    g = torch.Generator().manual_seed(seed)
    out = dict(inputs)
    mask = torch.cat([inputs["behavior_mask"], torch.zeros(len(inputs["behavior_mask"]), extra, dtype=torch.bool)], 1)
    pad = ~mask
    batch, length = mask.shape

    def fill(old, shape_tail, high):
        grown = torch.cat([old, torch.zeros(batch, extra, *shape_tail, dtype=old.dtype)], 1)
        garbage = torch.randint(1, high, grown.shape, generator=g).to(old.dtype) if high else torch.randn(
            grown.shape, generator=g) * 100
        keep = pad.view(batch, length, *([1] * len(shape_tail)))
        return torch.where(keep, garbage, grown)

    out["behavior_mask"] = mask
    out["behavior_item_ids"] = fill(inputs["behavior_item_ids"], (), N_ITEMS)
    out["behavior_item_features"] = {
        "item_genres": fill(inputs["behavior_item_features"]["item_genres"], (3,), 6),
        "item_year": fill(inputs["behavior_item_features"]["item_year"], (), 5),
    }
    out["behavior_content_embeds"] = fill(inputs["behavior_content_embeds"], (CONTENT_DIM,), None)
    return out


@pytest.mark.parametrize("base", ["din", "sim"])
@pytest.mark.parametrize("mode", MODES)
def test_output_shapes_and_loss(mode, base):
    model = tester.get_model(mode=mode, base=base)
    out = model(**tester.get_inputs())
    assert out.logits.shape == out.probs.shape == (4,)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    torch.testing.assert_close(out.probs, torch.sigmoid(out.logits))
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, torch.tensor([1.0, 0, 1, 0])))
    kept = min(3, tester.seq_len) if base == "sim" else tester.seq_len
    assert out.id_attention_weights.shape == (4, kept)
    assert (out.selected_behavior_indices is not None) == (base == "sim")
    assert (out.content_attention_weights is not None) == (mode == "ciubm")


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_exactly_the_mode_parameters(mode):
    model = tester.get_model(mode=mode).train()
    model(**tester.get_inputs()).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    names = set(grads)
    assert ("content_projection.weight" in names) == (mode != "din")
    assert ("similarity_scale" in names) == (mode == "ciubm")
    missing = [name for name, grad in grads.items() if grad is None or not torch.isfinite(grad).all()]
    assert missing == []
    no_signal = [name for name, grad in grads.items() if grad.abs().sum() == 0]
    assert no_signal == []
    # unknown/padding row of the ID tables stays untouched under the default "zero" policy
    assert grads["embeddings.item_id_embeddings.weight"][0].abs().sum() == 0


def test_din_mode_ignores_content():
    model = tester.get_model(mode="din")
    inputs = tester.get_inputs()
    with_content = model(**inputs).logits
    inputs.update(target_content_embeds=None, behavior_content_embeds=None)
    torch.testing.assert_close(model(**inputs).logits, with_content, atol=0, rtol=0)


def test_content_changes_output_in_content_modes():
    for mode in ("content_feature", "ciubm"):
        model = tester.get_model(mode=mode)
        inputs = tester.get_inputs()
        before = model(**inputs).logits
        inputs["target_content_embeds"] = torch.randn(4, CONTENT_DIM)
        assert not torch.allclose(model(**inputs).logits, before)


@pytest.mark.parametrize("base", ["din", "sim"])
@pytest.mark.parametrize("mode", MODES)
def test_padding_never_changes_output(mode, base, attention_path):
    model = tester.get_model(mode=mode, base=base, attention_normalization="softmax")
    inputs = tester.get_inputs()
    expected = model(**inputs).logits
    actual = model(**with_padding_garbage(inputs, extra=5)).logits
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_padding_invariance_with_din_sum_pooling(attention_path):
    model = tester.get_model(mode="ciubm", attention_normalization="sum")
    inputs = tester.get_inputs()
    torch.testing.assert_close(model(**with_padding_garbage(inputs, 4)).logits, model(**inputs).logits)


@pytest.mark.parametrize("mode", MODES)
def test_all_padding_sequences_are_finite(mode):
    model = tester.get_model(mode=mode).train()
    inputs = tester.get_inputs()
    inputs["behavior_mask"] = torch.zeros_like(inputs["behavior_mask"])
    out = model(**inputs)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert out.id_attention_weights.abs().sum() == 0


def test_attention_unit_equals_textbook_concatenation(attention_path):
    torch.manual_seed(0)
    unit = CiUBMTargetAttention(embed_dim=5, hidden_sizes=[7, 3], hidden_act="relu", normalization="softmax")
    query, keys = torch.randn(2, 5), torch.randn(2, 4, 5)
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    interest, weights = unit(query, keys, mask)
    q = query.unsqueeze(1).expand_as(keys)
    hidden = unit.input_layer(torch.cat([q, keys, q - keys, q * keys], dim=-1))
    scores = unit.score_layers(torch.relu(hidden)).squeeze(-1).masked_fill(~mask, float("-inf"))
    expected_weights = torch.softmax(scores, dim=-1)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(interest, (expected_weights.unsqueeze(-1) * keys).sum(1))


def test_packing_rule_packs_sparse_sequences_only():
    narrow = CiUBMTargetAttention(embed_dim=16, hidden_sizes=[64], hidden_act="relu", normalization="softmax")
    wide = CiUBMTargetAttention(embed_dim=48, hidden_sizes=[32], hidden_act="relu", normalization="softmax")
    # the padded path's per-position cost grows with D a third as fast as the packed path's per-row cost
    assert 0.55 < narrow.packing_density_limit() < 0.65 and 0.4 < wide.packing_density_limit() < 0.5
    narrow.packing_max_density = 1.0
    assert narrow.packing_density_limit() == 1.0


# ---------------------------------------------------------------- reference computation
def reference_logits(model, inputs):
    """CiUBMForCTR's logits recomputed the straightforward way, sample by sample, from the model's
    parameters: textbook DIN (concatenated [q, k, q-k, q*k] through the attention MLP), cosine
    similarity from explicit norms, SIM as an explicit sort, histogram by counting. Content comes
    dense or as `content_table` rows."""
    config, emb = model.config, model.embeddings
    inputs = dict(inputs)
    if "content_table" in inputs:
        table = inputs["content_table"]
        target_content = table[inputs["target_content_rows"]]
        behavior_content = table[inputs["behavior_content_rows"]]
    else:
        target_content, behavior_content = inputs.get("target_content_embeds"), inputs.get("behavior_content_embeds")
    multi = set(config.multi_valued_item_features)

    def item_vector(item_id, features):
        parts = [emb.item_id_embeddings.weight[item_id]]
        for name, table in emb.item_feature_embeddings.items():
            value = features[name]
            if name in multi:
                present = [v for v in value.tolist() if v != 0]
                parts.append(sum((table.weight[v] for v in present), torch.zeros(config.id_embed_dim))
                             / max(len(present), 1))
            else:
                parts.append(table.weight[value])
        return torch.cat(parts)

    def cosine(a, b):
        return float(a @ b) / max(float(a.norm() * b.norm()), 1e-8)

    unit = model.id_attention
    logits = []
    for b in range(len(inputs["user_ids"])):
        user = torch.cat([emb.user_id_embeddings.weight[inputs["user_ids"][b]]] + [
            table.weight[inputs["user_features"][name][b]] for name, table in emb.user_feature_embeddings.items()])
        target = item_vector(inputs["target_item_ids"][b], {k: v[b] for k, v in inputs["target_item_features"].items()})
        positions = [l for l in range(inputs["behavior_mask"].shape[1]) if inputs["behavior_mask"][b, l]]
        sims = {l: cosine(target_content[b], behavior_content[b, l]) for l in positions} if (
            target_content is not None and model.needs_content_inputs) else {}
        if config.base == "sim" and inputs["behavior_mask"].shape[1] > config.sim_top_k:
            positions = sorted(positions, key=lambda l: -sims[l])[:config.sim_top_k]
        keys = [item_vector(inputs["behavior_item_ids"][b, l], {k: v[b, l] for k, v in inputs["behavior_item_features"].items()})
                for l in positions]
        interest, content_pooled = torch.zeros_like(target), None
        if keys:
            k = torch.stack(keys)
            q = target.expand_as(k)
            scores = unit.score_layers(unit.activation(unit.input_layer(torch.cat([q, k, q - k, q * k], -1)))).squeeze(-1)
            if model.similarity_scale is not None:
                scores = scores + model.similarity_scale * torch.tensor([sims[l] for l in positions])
            weights = torch.softmax(scores, 0) if config.attention_normalization == "softmax" else scores
            interest = (weights.unsqueeze(-1) * k).sum(0)
        parts = [user, target, interest]
        project = model.content_projection
        if config.mode == "content_feature":
            mean = (sum((behavior_content[b, l] for l in positions), torch.zeros(config.content_dim))
                    / max(len(positions), 1))
            parts += [project(target_content[b]), project(mean)]
        elif config.mode == "ciubm":
            parts.append(project(target_content[b]))
            if model.content_interest is not None:
                pooled = torch.zeros(config.content_dim)
                if positions:
                    w = torch.softmax(torch.tensor([sims[l] for l in positions]) / config.content_temperature, 0)
                    pooled = sum(w[i] * behavior_content[b, l] for i, l in enumerate(positions))
                parts.append(project(pooled))
            if model.similarity_histogram is not None:
                n_bins = config.histogram_n_bins
                counts = torch.zeros(n_bins)
                for l in positions:
                    counts[min(max(int((sims[l] + 1) * n_bins / 2), 0), n_bins - 1)] += 1
                parts.append(counts / max(len(positions), 1))
        logits.append(model.fusion(torch.cat(parts)).squeeze(-1))
    return torch.stack(logits)


def as_table_rows(inputs, seed=7):
    """The same content given as rows of a table: every (sample, position) its own row, row 0 = padding."""
    g = torch.Generator().manual_seed(seed)
    batch, length, dim = inputs["behavior_content_embeds"].shape
    table = torch.cat([inputs["target_content_embeds"], inputs["behavior_content_embeds"].reshape(-1, dim)])
    order = torch.randperm(len(table), generator=g)  # rows in no particular order
    table = torch.cat([torch.zeros(1, dim), table[order]])
    row_of = torch.empty_like(order)
    row_of[order] = torch.arange(len(order)) + 1
    out = {k: v for k, v in inputs.items() if k not in ("target_content_embeds", "behavior_content_embeds")}
    out.update(content_table=table, target_content_rows=row_of[:batch],
               behavior_content_rows=row_of[batch:].view(batch, length) * inputs["behavior_mask"])
    return out


@pytest.mark.parametrize("content", ["embeds", "rows"])
@pytest.mark.parametrize("normalization", ["softmax", "sum"])
@pytest.mark.parametrize("base", ["din", "sim"])
@pytest.mark.parametrize("mode", MODES)
def test_logits_equal_reference_computation(mode, base, normalization, content, attention_path):
    # a wide init makes logits O(1), so the comparison has teeth
    model = tester.get_model(mode=mode, base=base, attention_normalization=normalization, initializer_range=0.5)
    inputs = tester.get_inputs(seq_len=7)
    if content == "rows":
        inputs = as_table_rows(inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = reference_logits(model, inputs)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_parts_switched_off_equal_reference():
    for part in ("content_interest_vector", "similarity_in_attention", "similarity_histogram"):
        model = tester.get_model(mode="ciubm", initializer_range=0.5, **{part: False})
        inputs = tester.get_inputs()
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, reference_logits(model, inputs), rtol=1e-5, atol=1e-5)


def test_sampled_row_dots_equal_gathered_dots():
    g = torch.Generator().manual_seed(0)
    table, target = torch.randn(11, 6, generator=g), torch.randn(4, 6, generator=g)
    rows = torch.tensor([3, 3, 0, 10, 3, 7, 7, 1])  # repeated rows, within and across samples
    sample = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    torch.testing.assert_close(sampled_row_dots(table, target, rows, sample), (table[rows] * target[sample]).sum(-1))
    assert sampled_row_dots(table, target, rows[:0], sample[:0]).shape == (0,)


def test_content_table_rows_equal_embeddings_in_training_mode():
    # gradients, loss and the unknown-ID dropout draws agree whichever way content comes in
    inputs = tester.get_inputs()
    grads = []
    for given in (inputs, as_table_rows(inputs)):
        model = tester.get_model(mode="ciubm", unknown_row_policy="trained", unknown_id_dropout=0.3).train()
        torch.manual_seed(1)
        loss = model(**given).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_content_table_norms_follow_in_place_changes():
    model = tester.get_model(mode="ciubm")
    inputs = as_table_rows(tester.get_inputs())
    before = model(**inputs).logits
    table = inputs["content_table"]
    table[inputs["behavior_content_rows"][0, 0]] = torch.randn(CONTENT_DIM) * 5  # same tensor, new content
    fresh = tester.get_model(mode="ciubm")
    expected = fresh(**{**inputs, "content_table": table.clone()}).logits
    torch.testing.assert_close(model(**inputs).logits, expected)
    assert not torch.allclose(expected, before)


def test_content_table_made_under_inference_mode():
    # e.g. a table moved to the GPU inside an inference_mode evaluation loop: it has no version
    # counter, so its norms are not cached, and an in-place change there still shows
    model = tester.get_model(mode="ciubm").eval()
    inputs = as_table_rows(tester.get_inputs())
    with torch.inference_mode():
        table = inputs["content_table"].clone()
        assert table.is_inference()
        given = {**inputs, "content_table": table}
        torch.testing.assert_close(model(**given).logits, model(**inputs).logits)
        table[inputs["behavior_content_rows"][0, 0]] = torch.randn(CONTENT_DIM) * 5
        changed = model(**given).logits
    expected = tester.get_model(mode="ciubm").eval()(**{**inputs, "content_table": table.clone()}).logits
    torch.testing.assert_close(changed, expected)


@pytest.mark.parametrize("base", ["din", "sim"])
def test_bfloat16_model_reads_content_rows(base):
    # the row dots run in float32 for half-precision models (no sampled_addmm kernel for them)
    model = tester.get_model(mode="ciubm", base=base, initializer_range=0.5).to(torch.bfloat16)
    inputs = tester.get_inputs(seq_len=7)
    with torch.no_grad():
        from_rows = model(**as_table_rows(inputs)).logits
        from_embeds = model(**inputs).logits
    assert from_rows.dtype == torch.bfloat16 and torch.isfinite(from_rows).all()
    torch.testing.assert_close(from_rows, from_embeds, rtol=0.05, atol=0.05)


def test_content_both_ways_at_once_is_refused():
    model = tester.get_model(mode="ciubm")
    inputs = tester.get_inputs()
    rows = as_table_rows(inputs)
    with pytest.raises(ValueError, match="not both"):
        model(**inputs, content_table=rows["content_table"], target_content_rows=rows["target_content_rows"],
              behavior_content_rows=rows["behavior_content_rows"])
    with pytest.raises(ValueError, match="behavior_content_rows"):
        model(**{**rows, "behavior_content_rows": None})
    with pytest.raises(ValueError, match=r"target_content_rows holds index 99 outside the rows of content_table \[0, 29\)"):
        model(**{**rows, "target_content_rows": torch.tensor([1, 2, 99, 3])})


def test_similarity_histogram_by_hand():
    similarity = torch.tensor([[-0.9, -0.1, 0.2, 0.95, 0.3], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False], [False] * 5])
    # 4 bins over [-1, 1]: [-1,-.5) [-.5,0) [0,.5) [.5,1]; the masked 0.3 is not counted
    expected = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(CiUBMSimilarityHistogram(4)(similarity, mask), expected)


def test_sim_search_keeps_most_similar_and_matches_din_on_them():
    torch.manual_seed(0)
    inputs = tester.get_inputs(seq_len=8)
    target = inputs["target_content_embeds"]
    content = torch.randn(4, 8, CONTENT_DIM)
    # row 0: positions 6, 1, 4 made increasingly similar to the target
    for position, weight in ((6, 10.0), (1, 5.0), (4, 3.0)):
        content[0, position] = weight * target[0] + 0.1 * content[0, position]
    # row 3 (6 valid): a padded position made identical to the target must not be picked
    content[3, 7] = target[3]
    inputs["behavior_content_embeds"] = content
    model = tester.get_model(mode="ciubm", base="sim")
    out = model(**inputs)
    selected = out.selected_behavior_indices
    assert set(selected[0].tolist()) == {6, 1, 4}
    similarity = content_cosine_similarity(target, content).masked_fill(~inputs["behavior_mask"], -2)
    assert set(selected[3].tolist()) == set(similarity[3].topk(3).indices.tolist())
    assert 7 not in selected[3].tolist()
    # the same weights with base="din" on the kept behaviours give the same logits
    din_base = CiUBMForCTR(model.config.__class__(**{**model.config.to_dict(), "base": "din"})).eval()
    din_base.load_state_dict(model.state_dict())
    gathered = dict(inputs)
    take = lambda t: t.gather(1, selected if t.dim() == 2 else selected.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    for key in ("behavior_item_ids", "behavior_mask", "behavior_content_embeds"):
        gathered[key] = take(inputs[key])
    gathered["behavior_item_features"] = {k: take(v) for k, v in inputs["behavior_item_features"].items()}
    torch.testing.assert_close(din_base(**gathered).logits, out.logits)


def sim_inputs_with_ties(seq_len=12, top_k=3):
    """Tester inputs (rows of 12, 1, 0 and 10 real behaviours) plus 3 padded positions of garbage;
    row 0's behaviours take one of three contents, the most similar twice and the second three
    times, so the k-th (3rd) kept behaviour is a three-way tie."""
    inputs = tester.get_inputs(seq_len=seq_len)
    g = torch.Generator().manual_seed(5)
    target = inputs["target_content_embeds"][0]
    near, middle, far = (weight * target + torch.randn(CONTENT_DIM, generator=g) for weight in (4.0, 1.0, -1.0))
    content = inputs["behavior_content_embeds"].clone()
    for position in range(seq_len):
        content[0, position] = near if position in (3, 9) else middle if position in (1, 5, 10) else far
    inputs["behavior_content_embeds"] = content
    return with_padding_garbage(inputs, extra=3)


def reference_top_similarities(inputs, top_k):
    """Per sample, the sorted similarities of the top-k real behaviours: full (B, L, C) content,
    cosine from explicit norms, masked, torch.sort (the straightforward search)."""
    target, content = inputs["target_content_embeds"], inputs["behavior_content_embeds"]
    dots = (content * target.unsqueeze(1)).sum(-1)
    similarity = dots / (content.norm(dim=-1) * target.norm(dim=-1, keepdim=True)).clamp_min(1e-8)
    out = []
    for b in range(len(target)):
        real = similarity[b][inputs["behavior_mask"][b]]
        out.append(real.sort(descending=True).values[:top_k])
    return similarity, out


@pytest.mark.parametrize("dots", ["sorted_csr", "gathered"])
@pytest.mark.parametrize("content", ["embeds", "rows"])
def test_sim_keeps_reference_top_k_with_ties_padding_and_empty_rows(content, dots, monkeypatch):
    # the search keeps a set whose similarities are exactly the reference top-k (ties broken
    # either way), never a padded position while real ones remain, and the logits equal the
    # same weights with base="din" on the kept behaviours
    if dots == "gathered":  # the accelerator path, run on CPU
        monkeypatch.setattr(modeling_ciubm, "_dots_by_sorted_csr", lambda table: False)
    inputs = sim_inputs_with_ties()
    similarity, expected = reference_top_similarities(inputs, top_k=3)
    given = as_table_rows(inputs) if content == "rows" else inputs
    model = tester.get_model(mode="ciubm", base="sim", initializer_range=0.5)
    with torch.no_grad():
        out = model(**given)
    selected, mask = out.selected_behavior_indices, inputs["behavior_mask"]
    assert selected.shape == (4, 3)
    for b in range(4):
        kept = [position for position in selected[b].tolist() if mask[b, position]]
        assert len(kept) == len(set(kept)) == min(3, int(mask[b].sum()))
        torch.testing.assert_close(similarity[b, kept].sort(descending=True).values, expected[b], rtol=0, atol=1e-6)
    assert len({3, 9} & set(selected[0].tolist())) == 2 and len({1, 5, 10} & set(selected[0].tolist())) == 1
    din_base = CiUBMForCTR(model.config.__class__(**{**model.config.to_dict(), "base": "din"})).eval()
    din_base.load_state_dict(model.state_dict())
    take = lambda t: t.gather(1, selected if t.dim() == 2 else selected.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    gathered = {**inputs, "behavior_item_features": {k: take(v) for k, v in inputs["behavior_item_features"].items()}}
    for key in ("behavior_item_ids", "behavior_mask", "behavior_content_embeds"):
        gathered[key] = take(inputs[key])
    with torch.no_grad():
        expected_logits = din_base(**gathered).logits
    assert expected_logits.abs().max() > 0.1
    torch.testing.assert_close(out.logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_search_on_prefilled_padding_equals_masked_search():
    g = torch.Generator().manual_seed(3)
    similarity = torch.rand(6, 20, generator=g) * 2 - 1
    mask = torch.rand(6, 20, generator=g) < 0.5
    mask[0] = False  # no real behaviour
    mask[1, :2] = True
    mask[1, 2:] = False  # fewer real behaviours than k
    search = CiUBMBehaviorSearch(top_k=4)
    masked = search(similarity, mask)
    prefilled = search(similarity.masked_fill(~mask, CiUBMBehaviorSearch.search_padding_value))
    for b in range(6):
        real = lambda indices: {i for i in indices[b].tolist() if mask[b, i]}
        assert real(masked) == real(prefilled)
        assert len(real(prefilled)) == min(4, int(mask[b].sum()))


def test_gathered_row_dots_equal_sorted_csr_dots_in_chunks():
    g = torch.Generator().manual_seed(0)
    table, target = torch.randn(11, 6, generator=g), torch.randn(4, 6, generator=g)
    rows = torch.tensor([3, 3, 0, 10, 3, 7, 7, 1])
    sample = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    expected = sampled_row_dots(table, target, rows, sample)
    torch.testing.assert_close(_gathered_row_dots(table, target, rows, sample, chunk_elements=18), expected)  # 3 rows a chunk
    half = _gathered_row_dots(table.bfloat16(), target.bfloat16(), rows, sample)
    assert half.dtype == torch.float32  # accumulated in float32
    torch.testing.assert_close(half, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("base", ["din", "sim"])
def test_non_finite_behaviour_row_raises(base):
    # a NaN row of content_table read only by a real behaviour (not by any target) is refused
    model = tester.get_model(mode="ciubm", base=base)
    inputs = as_table_rows(tester.get_inputs(seq_len=7))
    table = inputs["content_table"].clone()
    table[inputs["behavior_content_rows"][3, 2], 1] = float("nan")
    with pytest.raises(ValueError, match=r"content_table holds nan"):
        model(**{**inputs, "content_table": table})


def test_save_load_identical_logits_and_auto_classes(tmp_path):
    vocabularies = {
        "user_id": ["[UNK]"] + [f"u{i}" for i in range(1, N_USERS)],
        "item_id": ["[UNK]"] + [f"i{i}" for i in range(1, N_ITEMS)],
        "user_gender": ["[UNK]", "F", "M"],
        "item_genres": ["[UNK]", "a", "b", "c", "d", "e"],
        "item_year": ["[UNK]", "1990", "1991", "1992", "1993"],
    }
    model = tester.get_model(mode="ciubm", vocabularies=vocabularies, center_fingerprint="abc123")
    inputs = tester.get_inputs()
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == {"AutoConfig": "configuration_ciubm.CiUBMConfig",
                                 "AutoModel": "modeling_ciubm.CiUBMForCTR"}
    assert (tmp_path / "modeling_ciubm.py").is_file() and (tmp_path / "configuration_ciubm.py").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CiUBMConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is CiUBMForCTR
    assert loaded.config.vocabularies["item_year"] == vocabularies["item_year"]
    assert loaded.config.center_fingerprint == "abc123"
    torch.testing.assert_close(loaded(**inputs).logits, expected, atol=0, rtol=0)


def test_unknown_row_policies():
    with pytest.raises(ValueError, match="unknown_id_dropout > 0"):
        tester.get_config(unknown_row_policy="trained")
    model = tester.get_model(unknown_row_policy="trained", unknown_id_dropout=0.5).train()
    assert model.embeddings.item_id_embeddings.weight[0].abs().sum() == 0  # starts at zero
    model(**tester.get_inputs()).loss.backward()
    assert model.embeddings.item_id_embeddings.weight.grad[0].abs().sum() > 0  # and is trained


def test_bad_inputs_raise_clear_errors():
    model = tester.get_model(mode="ciubm")
    inputs = tester.get_inputs()
    with pytest.raises(ValueError, match="labels must be 0 or 1, got 2"):
        model(**{**inputs, "labels": torch.tensor([1, 0, 2, 0])})
    with pytest.raises(ValueError, match="content dim 5 but config.content_dim is 8"):
        model(**{**inputs, "target_content_embeds": torch.randn(4, 5)})
    with pytest.raises(ValueError, match="needs target_content_embeds"):
        model(**{**inputs, "behavior_content_embeds": None})
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 30\)"):
        model(**{**inputs, "target_item_ids": torch.tensor([1, 2, 30, 4])})
    with pytest.raises(ValueError, match="do not match the config"):
        model(**{**inputs, "user_features": {"user_age": torch.zeros(4, dtype=torch.long)}})
    with pytest.raises(ValueError, match="behavior_mask shape"):
        model(**{**inputs, "behavior_mask": inputs["behavior_mask"][:, :3]})
    with pytest.raises(ValueError, match="mode must be one of"):
        tester.get_config(mode="dien")
    with pytest.raises(ValueError, match="disagrees with its vocabulary"):
        tester.get_config(vocabularies={"user_id": ["[UNK]", "u"], "item_id": ["[UNK]", "i"],
                                        "user_gender": ["[UNK]"], "item_genres": ["[UNK]"], "item_year": ["[UNK]"]})


def test_remote_code_copy_loads_and_matches(tmp_path):
    # load the class the way trust_remote_code does (from the files copied next to the weights),
    # bypassing the local registration that `import mim_hf` made
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    model = tester.get_model(mode="ciubm", base="sim")
    inputs = tester.get_inputs(seq_len=7)
    model.save_pretrained(tmp_path)
    remote_class = get_class_from_dynamic_module("modeling_ciubm.CiUBMForCTR", str(tmp_path))
    assert remote_class.__module__.startswith("transformers_modules"), remote_class.__module__
    remote = remote_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(remote(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


# ---------------------------------------------------------------- CTRCollator
def tiny_catalogue():
    from datasets import Dataset

    return Dataset.from_dict({
        "item_id": ["m1", "m2", "m3", "m4"],
        "title": ["A", "B", "C", "D"],
        "genres": [["Drama"], ["Comedy", "Drama"], [], ["Action", "Comedy", "Drama"]],
        "year": [1995, 1996, None, 1995],
    })


def tiny_collator(center=None, max_len=3):
    from mim_hf.ctr.collator import CTRCollator
    from mim_hf.data import Vocabulary

    vocabs = {
        "user_id": Vocabulary.build(["u1", "u2"], "user_id"),
        "item_id": Vocabulary.build(["m1", "m2", "m3"], "item_id"),  # m4 unseen in training
        "user_gender": Vocabulary.build(["F", "M"], "user_gender"),
        "item_genres": Vocabulary.build([["Comedy", "Drama"]], "item_genres"),  # Action unseen
        "item_year": Vocabulary.build([1995, 1996], "item_year"),
    }
    return CTRCollator(vocabs, items=tiny_catalogue(), center=center, max_len=max_len,
                       user_features=["user_gender"], item_features=["item_genres", "item_year"])


class DictCenter:
    """Dict-backed stand-in with the Representation Center's lookup contract."""

    def __init__(self, table):
        self.table = table

    def lookup(self, item_ids):
        found = torch.tensor([i in self.table for i in item_ids])
        dim = len(next(iter(self.table.values())))
        embeds = torch.stack([torch.tensor(self.table.get(i, [0.0] * dim)) for i in item_ids])
        return embeds, found


ROWS = [
    {"user_id": "u1", "item_id": "m2", "label": 1, "user_gender": "F",
     "behavior_item_ids": ["m1", "m3", "m4", "m2"]},  # 4 > max_len 3: oldest (m1) dropped
    {"user_id": "u9", "item_id": "m4", "label": 0, "user_gender": "X", "behavior_item_ids": []},
]


def test_collator_encodes_pads_and_counts_fallbacks():
    center = DictCenter({"m1": [1.0, 0.0], "m2": [0.0, 1.0], "m3": [1.0, 1.0]})  # m4: no content
    collator = tiny_collator(center)
    batch = collator(ROWS)
    item = collator.vocabs["item_id"]
    m2, m3 = (int(item.encode([x])[0]) for x in ("m2", "m3"))
    assert batch["user_ids"].tolist() == [1, 0]
    assert batch["target_item_ids"].tolist() == [m2, 0]
    assert batch["behavior_item_ids"].tolist() == [[m3, 0, m2], [0, 0, 0]]  # m4 unknown -> 0, still a behaviour
    assert batch["behavior_mask"].tolist() == [[True, True, True], [False, False, False]]
    genres = collator.vocabs["item_genres"]
    comedy, drama = (int(genres.encode([g])[0]) for g in ("Comedy", "Drama"))
    # m2 genres (Comedy, Drama) padded to the longest list (3); m4 has Action (unknown -> 0)
    assert batch["target_item_features"]["item_genres"].tolist() == [[comedy, drama, 0], [0, comedy, drama]]
    assert batch["behavior_item_features"]["item_genres"][0, 0].tolist() == [0, 0, 0]  # m3: no genres
    assert batch["behavior_item_features"]["item_year"][1].tolist() == [0, 0, 0]
    assert batch["user_features"]["user_gender"].tolist() == [1, 0]
    assert batch["labels"].tolist() == [1, 0]
    torch.testing.assert_close(batch["target_content_embeds"], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(batch["behavior_content_embeds"][0], torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]))
    assert batch["behavior_content_embeds"][1].abs().sum() == 0
    stats = collator.stats
    assert stats["unknown_users"] == 1 and stats["unknown_target_items"] == 1
    assert stats["unknown_behavior_items"] == 1 and stats["unknown_user_gender"] == 1
    assert stats["content_missing"] == 2 and stats["truncated_samples"] == 1  # m4 as target and behaviour
    assert stats["items_missing_from_table"] == 0


def test_collator_columns_equal_rows_and_repeated_items_count_per_occurrence():
    center = DictCenter({"m1": [1.0, 0.0], "m2": [0.0, 1.0], "m3": [1.0, 1.0]})  # m4: no content
    rows = ROWS + [{"user_id": "u1", "item_id": "m9", "label": 1, "user_gender": "F",
                    "behavior_item_ids": ["m4", "m4", "m2"]}]  # an unknown item twice, m4 (no content) twice
    by_rows, by_columns = tiny_collator(center), tiny_collator(center)
    expected = by_rows(rows)
    batch = by_columns({key: [row[key] for row in rows] for key in rows[0]})  # a batched Dataset slice
    for key, value in expected.items():
        if isinstance(value, dict):
            assert value.keys() == batch[key].keys() and all(torch.equal(v, batch[key][k]) for k, v in value.items())
        else:
            assert torch.equal(value, batch[key]), key
    assert by_columns.stats == by_rows.stats
    # distinct ids are looked up once, fallbacks still count every position
    assert by_rows.stats["content_missing"] == 2 + 2 + 1 and by_rows.stats["unknown_behavior_items"] == 1 + 2
    assert by_rows.stats["unknown_target_items"] == 2
    # the item vocabulary counts the same occurrences: 2 unknown targets + 3 unknown behaviours
    assert by_rows.vocabs["item_id"].unknown_count == by_columns.vocabs["item_id"].unknown_count == 2 + 3


def test_collator_feeds_the_model_end_to_end():
    torch.manual_seed(0)
    center = DictCenter({f"m{i}": torch.randn(CONTENT_DIM).tolist() for i in range(1, 5)})
    collator = tiny_collator(center)
    config = CiUBMConfig(**collator.config_kwargs(), id_embed_dim=4, content_dim=CONTENT_DIM, content_proj_dim=4,
                         attention_hidden_sizes=[8], fusion_hidden_sizes=[8], base="sim", sim_top_k=2)
    assert config.n_items == 4 and config.item_feature_sizes == {"item_genres": 3, "item_year": 3}
    out = CiUBMForCTR(config)(**collator(ROWS))
    assert torch.isfinite(out.loss) and out.logits.shape == (2,)


def test_collator_bad_inputs():
    from mim_hf.ctr.collator import CTRCollator

    with pytest.raises(ValueError, match=r"vocabs lack \['item_year'\]"):
        CTRCollator({"user_id": ["[UNK]"], "item_id": ["[UNK]"]}, items=tiny_catalogue(), item_features=["item_year"])
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        tiny_collator()([{**ROWS[0], "label": 3}])
    bad_center = lambda ids: (torch.zeros(len(ids) + 1, 2), torch.ones(len(ids) + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="content lookup of 4 ids"):
        tiny_collator(bad_center)(ROWS[:1])
