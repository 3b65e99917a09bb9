"""Tests for the CiUBM CTR model (modeling/configuration_ciubm.py, modeling/modeling_ciubm.py)."""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel

import mim_hf  # noqa: F401  (registers the Auto classes)
from mim_hf.ctr.collator import center_content_table
from mim_hf.modeling.configuration_ciubm import CiUBMConfig
from mim_hf.modeling.modeling_ciubm import (
    CiUBMDice,
    CiUBMForCTR,
    CiUBMSimilarityHistogram,
    CiUBMSimTier,
    CiUBMTargetAttention,
    CiUBMBehaviorSearch,
)

N_USERS, N_ITEMS, CONTENT_DIM, N_ROWS = 9, 30, 8, 25
MODES = ("din", "content_feature", "ciubm")
# the content table the tester's models hold: row 0 = zeros (padding / no content)
TABLE = torch.cat([torch.zeros(1, CONTENT_DIM), torch.randn(N_ROWS - 1, CONTENT_DIM,
                                                             generator=torch.Generator().manual_seed(11))])


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

    def get_model(self, table=TABLE, **overrides):
        torch.manual_seed(self.seed)
        model = CiUBMForCTR(self.get_config(**overrides)).eval()
        return model.set_content_table(table) if model.needs_content_inputs else model

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
            "target_content_rows": torch.randint(1, N_ROWS, (batch,), generator=g),
            "behavior_content_rows": torch.randint(1, N_ROWS, (batch, length), generator=g) * mask,
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
    """Append `extra` padded positions and fill every padded position with random ids/features/rows."""
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
    out["behavior_content_rows"] = fill(inputs["behavior_content_rows"], (), N_ROWS)
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
    assert model.content_table is None
    inputs = tester.get_inputs()
    with_content = model(**inputs).logits
    inputs.update(target_content_rows=None, behavior_content_rows=None)
    torch.testing.assert_close(model(**inputs).logits, with_content, atol=0, rtol=0)


def test_content_changes_output_in_content_modes():
    for mode in ("content_feature", "ciubm"):
        model = tester.get_model(mode=mode)
        inputs = tester.get_inputs()
        before = model(**inputs).logits
        inputs["target_content_rows"] = inputs["target_content_rows"] % (N_ROWS - 1) + 1
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
    similarity from explicit norms, SIM as an explicit sort, histogram by counting; content rows
    read from the model's table."""
    config, emb = model.config, model.embeddings
    target_content = behavior_content = None
    if model.content_table is not None:
        target_content = model.content_table[inputs["target_content_rows"]]
        behavior_content = model.content_table[inputs["behavior_content_rows"]]
    multi = set(config.multi_valued_item_features)

    def item_vector(item_id, features, content_row):
        parts = [emb.item_id_embeddings.weight[item_id]]
        if model.content_to_id is not None and item_id == 0 and content_row > 0:
            parts = [model.content_to_id.layers(model.content_table[content_row])]
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
        target = item_vector(inputs["target_item_ids"][b], {k: v[b] for k, v in inputs["target_item_features"].items()},
                             inputs["target_content_rows"][b])
        positions = [l for l in range(inputs["behavior_mask"].shape[1]) if inputs["behavior_mask"][b, l]]
        sims = {l: cosine(target_content[b], behavior_content[b, l]) for l in positions} if (
            target_content is not None and model.needs_content_inputs) else {}
        if config.base == "sim" and inputs["behavior_mask"].shape[1] > config.sim_top_k:
            positions = sorted(positions, key=lambda l: -sims[l])[:config.sim_top_k]
        keys = [item_vector(inputs["behavior_item_ids"][b, l], {k: v[b, l] for k, v in inputs["behavior_item_features"].items()},
                            inputs["behavior_content_rows"][b, l]) for l in positions]
        interest, content_pooled = torch.zeros_like(target), None
        if keys:
            k = torch.stack(keys)
            q = target.expand_as(k)
            scores = unit.score_layers(unit.activation(unit.input_layer(torch.cat([q, k, q - k, q * k], -1)))).squeeze(-1)
            if model.similarity_scale is not None:
                scores = scores + model.similarity_scale * torch.tensor([sims[l] for l in positions])
            if model.similarity_gates is not None:  # b1 * score + b2 * cos / t + b3 * score * cos / t
                b1, b2, b3 = model.similarity_gates
                scaled = torch.tensor([sims[l] for l in positions]) / config.content_temperature
                scores = b1 * scores + b2 * scaled + b3 * scores * scaled
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
                if config.histogram_kind == "simtier":  # sum over bins of log(1 + count) * bin vector
                    parts.append(sum(torch.log1p(counts[i]) * model.similarity_histogram.bin_embeddings.weight[:, i]
                                     for i in range(n_bins)))
                else:
                    parts.append(counts / max(len(positions), 1))
        logits.append(model.fusion(torch.cat(parts)).squeeze(-1))
    return torch.stack(logits)


@pytest.mark.parametrize("normalization", ["softmax", "sum"])
@pytest.mark.parametrize("base", ["din", "sim"])
@pytest.mark.parametrize("mode", MODES)
def test_logits_equal_reference_computation(mode, base, normalization, attention_path):
    # a wide init makes logits O(1), so the comparison has teeth
    model = tester.get_model(mode=mode, base=base, attention_normalization=normalization, initializer_range=0.5)
    inputs = tester.get_inputs(seq_len=7)
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = reference_logits(model, inputs)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


LEVERS = {"simtier": {"histogram_kind": "simtier", "histogram_n_bins": 20},
          "aware": {"similarity_attention": "aware"},
          "content_to_id": {"content_to_id": True, "unknown_id_dropout": 0.5}}


def with_unknown_items(inputs):
    """Some targets and behaviours with the unknown item ID 0 (their content rows stay)."""
    out = dict(inputs)
    out["target_item_ids"] = inputs["target_item_ids"].clone()
    out["target_item_ids"][::2] = 0
    out["behavior_item_ids"] = inputs["behavior_item_ids"].clone()
    out["behavior_item_ids"][:, ::3] = 0
    return out


@pytest.mark.parametrize("lever", [*LEVERS, "all"])
@pytest.mark.parametrize("base", ["din", "sim"])
def test_levers_equal_reference_computation(lever, base, attention_path):
    overrides = {k: v for levers in LEVERS.values() for k, v in levers.items()} if lever == "all" else LEVERS[lever]
    model = tester.get_model(mode="ciubm", base=base, initializer_range=0.5, **overrides)
    if model.similarity_gates is not None:  # away from the start, where b3 = 0 hides the product term
        model.similarity_gates.data = torch.tensor([0.7, 0.3, -0.4])
    inputs = with_unknown_items(tester.get_inputs(seq_len=7))
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = reference_logits(model, inputs)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_aware_attention_starts_equal_to_the_similarity_bias():
    inputs = tester.get_inputs(seq_len=7)
    bias = tester.get_model(mode="ciubm", initializer_range=0.5)
    aware = tester.get_model(mode="ciubm", initializer_range=0.5, similarity_attention="aware")
    assert aware.similarity_scale is None and bias.similarity_gates is None
    state = {k: v for k, v in aware.state_dict().items() if k != "similarity_gates"}
    assert set(state) == set(bias.state_dict()) - {"similarity_scale"}
    aware.load_state_dict({**bias.state_dict(), "similarity_gates": aware.similarity_gates.detach()}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(aware(**inputs).logits, bias(**inputs).logits)


def test_content_to_id_fills_only_unknown_ids_and_learns_from_dropped_ones():
    model = tester.get_model(mode="ciubm", **LEVERS["content_to_id"])
    inputs = tester.get_inputs(seq_len=7)
    with torch.no_grad():
        warm = model(**inputs).logits
        model.content_to_id.layers[-1].bias.add_(1.0)
        assert torch.equal(model(**inputs).logits, warm)  # every ID known: the generator is not read
        cold = with_unknown_items(inputs)
        before = model(**cold).logits
        model.content_to_id.layers[-1].bias.sub_(2.0)
        assert not torch.allclose(model(**cold).logits, before)  # unknown IDs read it
    model.train()
    torch.manual_seed(0)
    model(**inputs).loss.backward()  # known IDs, dropped at rate 0.5 in training
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.content_to_id.parameters())


def test_simtier_by_hand():
    simtier = CiUBMSimTier(n_bins=4, dim=3)
    similarity = torch.tensor([[0.9, 0.8, -0.9, 0.1], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [False, False, False, False]])
    counts = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])  # bins of 0.5 over [-1, 1]
    torch.testing.assert_close(simtier(similarity, mask), torch.log1p(counts) @ simtier.bin_embeddings.weight.t())
    assert torch.equal(simtier(similarity, mask)[1], torch.zeros(3))  # no behaviour: zeros


@pytest.mark.parametrize("lever", LEVERS)
def test_levers_save_and_load_with_identical_logits(lever, tmp_path):
    model = tester.get_model(mode="ciubm", **LEVERS[lever])
    inputs = with_unknown_items(tester.get_inputs(seq_len=7))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval().set_content_table(TABLE)
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_lever_configs_refuse_bad_values():
    for bad, match in [({"similarity_attention": "gated"}, "similarity_attention"),
                       ({"histogram_kind": "log"}, "histogram_kind"),
                       ({"content_to_id": True, "unknown_id_dropout": 0.0}, "unknown_id_dropout > 0"),
                       ({"content_to_id": True, "unknown_id_dropout": 0.5, "mode": "din"}, "mode 'ciubm'")]:
        with pytest.raises(ValueError, match=match):
            tester.get_config(**bad)


def test_embedding_initializer_range_sets_the_embeddings_std_only():
    model = tester.get_model(mode="ciubm", initializer_range=0.5, embedding_initializer_range=1e-4, id_embed_dim=64)
    embeddings = [m.weight.detach()[1:] for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    linears = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert embeddings and all(float(w.std()) < 1e-3 for w in embeddings)
    assert all(float(w.std()) > 0.1 for w in linears if w.numel() > 64)
    with pytest.raises(ValueError, match="embedding_initializer_range must be > 0"):
        tester.get_config(embedding_initializer_range=0.0)


def test_parts_switched_off_equal_reference():
    for part in ("content_interest_vector", "similarity_in_attention", "similarity_histogram"):
        model = tester.get_model(mode="ciubm", initializer_range=0.5, **{part: False})
        inputs = tester.get_inputs()
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, reference_logits(model, inputs), rtol=1e-5, atol=1e-5)


def test_content_table_is_a_non_persistent_buffer_with_norms_computed_once(tmp_path):
    model = tester.get_model(mode="ciubm")
    assert "content_table" not in model.state_dict() and "content_inverse_norms" not in model.state_dict()
    torch.testing.assert_close(model.content_inverse_norms[1:], 1 / TABLE[1:].norm(dim=-1))
    assert model.content_inverse_norms[0] == 0  # the zero row: similarity 0, no 1/eps
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert not any(name.startswith("content_") and "projection" not in name for name in load_file(tmp_path / "model.safetensors"))
    # moved and cast with the model
    half = tester.get_model(mode="ciubm").to(torch.bfloat16)
    assert half.content_table.dtype == torch.bfloat16 and torch.isfinite(half.content_inverse_norms).all()


def test_set_content_table_refuses_bad_tables_and_forward_needs_one():
    model = CiUBMForCTR(tester.get_config(mode="ciubm"))
    inputs = tester.get_inputs()
    with pytest.raises(ValueError, match="call model.set_content_table"):
        model(**inputs)
    with pytest.raises(ValueError, match=r"float \(N, 8\) tensor"):
        model.set_content_table(torch.zeros(5, 3))
    bad = TABLE.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match="row 4 holds NaN/inf"):
        model.set_content_table(bad)
    with pytest.raises(ValueError, match="needs target_content_rows"):
        model.set_content_table(TABLE)(**{**inputs, "behavior_content_rows": None})


@pytest.mark.parametrize("base", ["din", "sim"])
def test_bfloat16_model_reads_content_rows(base):
    # cosines are computed in float32 for half-precision tables (then rounded to bf16, which may move
    # one into another histogram bin: the histogram is off here)
    model = tester.get_model(mode="ciubm", base=base, initializer_range=0.5, similarity_histogram=False).to(torch.bfloat16)
    inputs = tester.get_inputs(seq_len=7)
    with torch.no_grad():
        half = model(**inputs).logits
        expected = model.float()(**inputs).logits  # the same (bf16-rounded) weights in float32
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), expected, rtol=0.05, atol=0.05)


def test_forward_accepts_trainer_kwargs_and_checks_only_on_request():
    model = tester.get_model(mode="ciubm")
    inputs = tester.get_inputs()
    torch.testing.assert_close(model(**inputs, num_items_in_batch=4).logits, model(**inputs).logits)
    bad = {**inputs, "labels": torch.tensor([1, 0, 2, 0])}
    model(**bad)  # no check (and no host sync) by default
    checked = tester.get_model(mode="ciubm", check_inputs=True)
    with pytest.raises(ValueError, match="labels must be 0 or 1, got 2"):
        checked(**bad)
    with pytest.raises(ValueError, match=r"target_item_ids holds index 30 outside \[0, 30\)"):
        checked(**{**inputs, "target_item_ids": torch.tensor([1, 2, 30, 4])})
    with pytest.raises(ValueError, match=r"behavior_content_rows holds index -1 outside \[0, 25\)"):
        checked(**{**inputs, "behavior_content_rows": inputs["behavior_content_rows"] - 1})


@pytest.mark.parametrize("base", ["din", "sim"])
@pytest.mark.parametrize("mode", MODES)
def test_forward_compiles_as_one_graph(mode, base, monkeypatch):
    # fullgraph=True fails on any graph break, e.g. a host sync (the packed attention path, CPU
    # only, reads the number of real behaviours: switched off here as it is on accelerators)
    monkeypatch.setattr(CiUBMTargetAttention, "packing_max_density", -1.0)
    model = tester.get_model(mode=mode, base=base)
    inputs = tester.get_inputs(seq_len=7)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits)


def test_similarity_histogram_by_hand():
    similarity = torch.tensor([[-0.9, -0.1, 0.2, 0.95, 0.3], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False], [False] * 5])
    # 4 bins over [-1, 1]: [-1,-.5) [-.5,0) [0,.5) [.5,1]; the masked 0.3 is not counted
    expected = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(CiUBMSimilarityHistogram(4)(similarity, mask), expected)


def with_dense_content(inputs, target, content):
    """(inputs reading `target` (B, C) and `content` (B, L, C) through rows, their table): row 0 zeros,
    then the targets, then every (sample, position); padded positions read row 0."""
    batch, length, dim = content.shape
    table = torch.cat([torch.zeros(1, dim), target, content.reshape(-1, dim)])
    rows = (1 + batch + torch.arange(batch * length).view(batch, length)) * inputs["behavior_mask"]
    return {**inputs, "target_content_rows": torch.arange(batch) + 1, "behavior_content_rows": rows}, table


def cosine(target, content):
    """(B, C), (B, L, C) -> (B, L) from explicit norms."""
    return (content * target.unsqueeze(1)).sum(-1) / (content.norm(dim=-1) * target.norm(dim=-1, keepdim=True)).clamp_min(1e-8)


def same_weights_on_din_base(model):
    din_base = CiUBMForCTR(model.config.__class__(**{**model.config.to_dict(), "base": "din"})).eval()
    din_base.load_state_dict(model.state_dict())
    return din_base.set_content_table(model.content_table)


def kept_only(inputs, selected):
    take = lambda t: t.gather(1, selected if t.dim() == 2 else selected.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    gathered = {**inputs, "behavior_item_features": {k: take(v) for k, v in inputs["behavior_item_features"].items()}}
    for key in ("behavior_item_ids", "behavior_mask", "behavior_content_rows"):
        gathered[key] = take(inputs[key])
    return gathered


def test_sim_search_keeps_most_similar_and_matches_din_on_them():
    torch.manual_seed(0)
    inputs = tester.get_inputs(seq_len=8)
    target, content = torch.randn(4, CONTENT_DIM), torch.randn(4, 8, CONTENT_DIM)
    # row 0: positions 6, 1, 4 made increasingly similar to the target
    for position, weight in ((6, 10.0), (1, 5.0), (4, 3.0)):
        content[0, position] = weight * target[0] + 0.1 * content[0, position]
    # row 3 (6 valid): a padded position made identical to the target must not be picked
    content[3, 7] = target[3]
    inputs, table = with_dense_content(inputs, target, content)
    inputs["behavior_content_rows"][3, 7] = 1 + 4 + 3 * 8 + 7  # padding may point anywhere
    model = tester.get_model(mode="ciubm", base="sim", table=table)
    out = model(**inputs)
    selected = out.selected_behavior_indices
    assert set(selected[0].tolist()) == {6, 1, 4}
    similarity = cosine(target, content).masked_fill(~inputs["behavior_mask"], -2)
    assert set(selected[3].tolist()) == set(similarity[3].topk(3).indices.tolist())
    assert 7 not in selected[3].tolist()
    # the same weights with base="din" on the kept behaviours give the same logits
    torch.testing.assert_close(same_weights_on_din_base(model)(**kept_only(inputs, selected)).logits, out.logits)


def test_sim_keeps_reference_top_k_with_ties_padding_and_empty_rows():
    # the search keeps a set whose similarities are exactly the reference top-k (ties broken
    # either way), never a padded position while real ones remain, and the logits equal the
    # same weights with base="din" on the kept behaviours. Rows of 12, 1, 0 and 10 real
    # behaviours plus 3 padded positions of garbage; row 0's behaviours take one of three
    # contents, the most similar twice and the second three times: the 3rd kept is a 3-way tie.
    seq_len = 12
    g = torch.Generator().manual_seed(5)
    target, content = torch.randn(4, CONTENT_DIM, generator=g), torch.randn(4, seq_len, CONTENT_DIM, generator=g)
    near, middle, far = (weight * target[0] + torch.randn(CONTENT_DIM, generator=g) for weight in (4.0, 1.0, -1.0))
    for position in range(seq_len):
        content[0, position] = near if position in (3, 9) else middle if position in (1, 5, 10) else far
    inputs, table = with_dense_content(tester.get_inputs(seq_len=seq_len), target, content)
    inputs = with_padding_garbage(inputs, extra=3)
    mask = inputs["behavior_mask"]
    similarity = cosine(target, table[inputs["behavior_content_rows"]])
    expected = [similarity[b][mask[b]].sort(descending=True).values[:3] for b in range(4)]
    model = tester.get_model(mode="ciubm", base="sim", initializer_range=0.5, table=table)
    with torch.no_grad():
        out = model(**inputs)
    selected = out.selected_behavior_indices
    assert selected.shape == (4, 3)
    for b in range(4):
        kept = [position for position in selected[b].tolist() if mask[b, position]]
        assert len(kept) == len(set(kept)) == min(3, int(mask[b].sum()))
        torch.testing.assert_close(similarity[b, kept].sort(descending=True).values, expected[b], rtol=0, atol=1e-6)
    assert len({3, 9} & set(selected[0].tolist())) == 2 and len({1, 5, 10} & set(selected[0].tolist())) == 1
    with torch.no_grad():
        expected_logits = same_weights_on_din_base(model)(**kept_only(inputs, selected)).logits
    assert expected_logits.abs().max() > 0.1
    torch.testing.assert_close(out.logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_search_ignores_padding_whatever_its_similarity():
    g = torch.Generator().manual_seed(3)
    similarity = torch.rand(6, 20, generator=g) * 2 - 1
    mask = torch.rand(6, 20, generator=g) < 0.5
    mask[0] = False  # no real behaviour
    mask[1, :2] = True
    mask[1, 2:] = False  # fewer real behaviours than k
    similarity[~mask] = 1.0  # padding as similar as can be
    selected = CiUBMBehaviorSearch(top_k=4)(similarity, mask)
    for b in range(6):
        real = {i for i in selected[b].tolist() if mask[b, i]}
        assert len(real) == min(4, int(mask[b].sum()))
        assert real == set(torch.where(mask[b], similarity[b], -2).topk(4).indices.tolist()) & set(real)


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
    assert type(loaded) is CiUBMForCTR and loaded.content_table is None  # the table is not saved
    loaded.set_content_table(TABLE)
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


def test_bad_configs_raise_clear_errors():
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
    remote = remote_class.from_pretrained(tmp_path).eval().set_content_table(TABLE)
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
    """Dict-backed stand-in with the Representation Center's contract: ``rows_for`` (-1 = absent),
    ``embeddings(level)`` (num_items, C), row order = the dict's."""

    def __init__(self, table):
        self.ids, self.table = list(table), torch.tensor(list(table.values()))

    def rows_for(self, item_ids):
        return np.array([self.ids.index(i) if i in self.ids else -1 for i in item_ids])

    def embeddings(self, level="item_embeds"):
        return self.table.numpy()


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
    # content rows: center row + 1 (m1 -> 1, m2 -> 2, m3 -> 3), 0 for m4 (no content) and padding
    assert batch["target_content_rows"].tolist() == [2, 0] and batch["behavior_content_rows"].tolist() == [[3, 0, 2], [0, 0, 0]]
    assert all(value.dtype == torch.int64 for key, value in batch.items() if key not in ("behavior_mask",)
               and not isinstance(value, dict))
    table = center_content_table(center)
    torch.testing.assert_close(table[batch["behavior_content_rows"][0]], torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]))
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


def test_collator_pads_to_the_longest_history_not_max_len():
    center = DictCenter({"m1": [1.0, 0.0], "m2": [0.0, 1.0], "m3": [1.0, 1.0]})
    collator = tiny_collator(center, max_len=10**8)  # must not allocate (B, 10**8) tensors
    batch = collator(ROWS)
    assert batch["behavior_item_ids"].shape == batch["behavior_mask"].shape == batch["behavior_content_rows"].shape == (2, 4)
    assert batch["behavior_item_features"]["item_genres"].shape == (2, 4, 3)
    assert batch["behavior_mask"].sum(1).tolist() == [4, 0]
    assert tiny_collator(center, max_len=2)(ROWS)["behavior_mask"].shape == (2, 2)  # capped by max_len
    empty = collator([{**ROWS[1], "behavior_item_ids": None}])
    assert empty["behavior_mask"].shape == (1, 1) and not empty["behavior_mask"].any()


def test_collator_feeds_the_model_end_to_end():
    torch.manual_seed(0)
    center = DictCenter({f"m{i}": torch.randn(CONTENT_DIM).tolist() for i in range(1, 5)})
    collator = tiny_collator(center)
    config = CiUBMConfig(**collator.config_kwargs(), id_embed_dim=4, content_dim=CONTENT_DIM, content_proj_dim=4,
                         attention_hidden_sizes=[8], fusion_hidden_sizes=[8], base="sim", sim_top_k=2)
    assert config.n_items == 4 and config.item_feature_sizes == {"item_genres": 3, "item_year": 3}
    out = CiUBMForCTR(config).set_content_table(center_content_table(center))(**collator(ROWS))
    assert torch.isfinite(out.loss) and out.logits.shape == (2,)


def test_collator_bad_inputs():
    from mim_hf.ctr.collator import CTRCollator

    with pytest.raises(ValueError, match=r"vocabs lack \['item_year'\]"):
        CTRCollator({"user_id": ["[UNK]"], "item_id": ["[UNK]"]}, items=tiny_catalogue(), item_features=["item_year"])
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        tiny_collator()([{**ROWS[0], "label": 3}])
    bad_center = lambda ids: np.zeros(len(ids) + 1, dtype=np.int64)
    with pytest.raises(ValueError, match=r"content rows of 4 ids must be an integer array of shape \(4,\)"):
        tiny_collator(bad_center)(ROWS[:1])
    with pytest.raises(TypeError, match="center must have .rows_for"):
        tiny_collator(object())


def test_content_cosine_in_chunks_equals_one_gather_and_the_formula():
    """The chunked similarity gives the values of one (B, L, C) gather bit for bit, and the cosine."""
    from mim_hf.modeling.modeling_ciubm import content_cosine_similarity, table_inverse_norms

    generator = torch.Generator().manual_seed(0)
    table = torch.randn(40, 16, generator=generator)
    table[3] = 0.0  # a zero row: similarity 0
    rows = torch.randint(0, 40, (11, 7), generator=generator)
    rows[0, :3] = 3
    target = torch.nn.functional.normalize(torch.randn(11, 16, generator=generator), dim=-1)
    inverse_norms = table_inverse_norms(table)
    one_gather = content_cosine_similarity(target, table, inverse_norms, rows, chunk_elements=10**9)
    for chunk_elements in (1, 16 * 7 * 2, 16 * 7 * 5 + 3):
        assert torch.equal(content_cosine_similarity(target, table, inverse_norms, rows, chunk_elements), one_gather)
    expected = torch.nn.functional.cosine_similarity(target.unsqueeze(1), table[rows], dim=-1)
    torch.testing.assert_close(one_gather, expected, atol=1e-6, rtol=0)
    assert one_gather[0, :3].eq(0).all()
    assert content_cosine_similarity(target[:0], table, inverse_norms, rows[:0]).shape == (0, 7)


# ---------------------------------------------------------------- Dice in the DIN attention
def test_dice_by_hand_with_batch_and_running_statistics():
    torch.manual_seed(0)
    dice = CiUBMDice(3)
    dice.alpha.data = torch.tensor([0.5, -1.0, 2.0])
    rows = torch.randn(6, 3)
    normed = (rows - rows.mean(0)) / torch.sqrt(rows.var(0, unbiased=False) + 1e-9)
    gate = torch.sigmoid(normed)
    torch.testing.assert_close(dice.train()(rows), gate * rows + (1 - gate) * dice.alpha * rows)
    running_mean, running_var = dice.norm.running_mean.clone(), dice.norm.running_var.clone()
    assert not torch.equal(running_mean, torch.zeros(3))  # the batch moved them (momentum 0.01)
    gate = torch.sigmoid((rows - running_mean) / torch.sqrt(running_var + 1e-9))
    torch.testing.assert_close(dice.eval()(rows), gate * rows + (1 - gate) * dice.alpha * rows)
    one = rows[:1]  # one row in training: the running statistics, no error
    torch.testing.assert_close(dice.train()(one), dice.eval()(one))
    assert dice.train()(rows[:0]).shape == (0, 3)


def test_dice_attention_ignores_padding_in_training_on_both_paths_and_gets_gradients(attention_path):
    model = tester.get_model(mode="ciubm", attention_activation="dice", dropout=0.0).train()
    assert isinstance(model.id_attention.activation, CiUBMDice)
    inputs = tester.get_inputs(seq_len=7)
    expected = model(**inputs).logits  # batch statistics of the real behaviours
    torch.testing.assert_close(model(**with_padding_garbage(inputs, extra=5)).logits, expected)
    model.id_attention.activation.alpha.data.fill_(0.3)
    model(**inputs).loss.backward()
    assert model.id_attention.activation.alpha.grad.abs().sum() > 0


def test_dice_attention_paths_agree_and_save_and_load(tmp_path, monkeypatch):
    model = tester.get_model(mode="ciubm", attention_activation="dice", initializer_range=0.5)
    inputs = tester.get_inputs(seq_len=7)
    model.train()(**inputs)  # move the running statistics off their start
    model.eval()
    logits = {}
    for name, density in (("packed", 1.0), ("per_sample", -1.0)):
        monkeypatch.setattr(CiUBMTargetAttention, "packing_max_density", density)
        with torch.no_grad():
            logits[name] = model(**inputs).logits
    torch.testing.assert_close(logits["packed"], logits["per_sample"])
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval().set_content_table(TABLE)
    assert loaded.config.attention_activation == "dice"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, logits["per_sample"], atol=0, rtol=0)
    with pytest.raises(ValueError, match="attention_activation"):
        tester.get_config(attention_activation="swishy")
