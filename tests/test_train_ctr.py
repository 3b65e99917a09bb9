"""Tests for stage 3 training (mim_hf/ctr/train.py, training/train_ctr.py).

A synthetic world is prepared under both protocols; a tiny Representation Center is built
from random unit vectors; the CiUBM config is tiny (4-d IDs, one 8-unit attention layer).
"""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mim_hf.center.store import RepresentationCenter
from mim_hf.data import PreparedData, make_synthetic_world, prepare
from mim_hf.ctr.metrics import auc
from mim_hf.ctr import train as ctr_module
from mim_hf.common.config import load_config
from mim_hf.ctr.predict import CTRBundle, load_ctr_model, predict
from mim_hf.ctr.train import CTRTrainConfig, run

REPO = Path(__file__).resolve().parents[1]
CONTENT_DIM = 8
BUCKET_KEYS = {"overall", "cold", "long_tail", "head"}
TOP_KEYS = {"protocol", "mode", "dataset", "seed", "test", "valid", "history", "config", "timings_s", "fallbacks", "training"}


@pytest.fixture(scope="module")
def world_dirs(tmp_path_factory):
    """{"temporal": dir, "item-cold": dir, "center": dir, "other_center": dir} for one synthetic world."""
    root = tmp_path_factory.mktemp("ctr_world")
    world = make_synthetic_world(n_users=30, n_items=40, impressions_per_user=12)
    dirs = {}
    for protocol in ("temporal", "item-cold"):
        dirs[protocol] = prepare(world, protocol=protocol, max_len=10).save(root / protocol)
    items = PreparedData.load(dirs["temporal"]).items
    generator = torch.Generator().manual_seed(0)
    for name, fingerprint in (("center", "sha256:tiny-a"), ("other_center", "sha256:tiny-b")):
        embeds = torch.nn.functional.normalize(torch.randn(len(items), CONTENT_DIM, generator=generator), dim=-1)
        RepresentationCenter.build(items["item_id"], {"item_embeds": embeds}, root / name,
                                   encoder_name="random", encoder_fingerprint=fingerprint)
        dirs[name] = root / name
    return dirs


def tiny_config(world_dirs, tmp_path, protocol="temporal", mode="ciubm", **overrides) -> CTRTrainConfig:
    values = dict(
        data_dir=str(world_dirs[protocol]), output_dir=str(tmp_path / f"{protocol}_{mode}"), mode=mode,
        center_path=None if mode == "din" else str(world_dirs["center"]), max_len=10, id_embed_dim=4,
        content_proj_dim=4, attention_hidden_sizes=[8], fusion_hidden_sizes=[16], batch_size=32,
        eval_batch_size=64, learning_rate=3e-3, epochs=3, patience=0, show_progress=False,
        num_threads=1,  # tiny tensors: a second thread only adds synchronisation
    )
    values.update(overrides)
    return load_config(CTRTrainConfig, None, values)


def check_metrics_shape(metrics, prepared, config):
    assert set(metrics) == TOP_KEYS
    assert metrics["protocol"] == prepared.config.protocol and metrics["mode"] == config.mode
    assert metrics["seed"] == config.seed and metrics["dataset"] == prepared.name
    for split in ("valid", "test"):
        assert set(metrics[split]) == BUCKET_KEYS
        for bucket, values in metrics[split].items():
            assert {"auc", "gauc", "logloss", "n"} <= set(values)
        # the buckets partition the split
        assert metrics[split]["overall"]["n"] == len(prepared.samples[split])
        assert sum(metrics[split][b]["n"] for b in ("cold", "long_tail", "head")) == len(prepared.samples[split])
        assert 0.0 <= metrics[split]["overall"]["auc"] <= 1.0
    assert metrics["history"] and all("valid_auc" in h and "train_loss" in h for h in metrics["history"])
    assert metrics["fallbacks"]["train"]["samples"] == len(prepared.samples["train"])
    on_disk = json.loads((Path(config.output_dir) / "metrics.json").read_text())
    assert on_disk["test"] == json.loads(json.dumps(metrics["test"]))


@pytest.mark.parametrize("protocol", ["temporal", "item-cold"])
@pytest.mark.parametrize("mode", ["din", "content_feature", "ciubm"])
def test_each_mode_runs_end_to_end(world_dirs, tmp_path, protocol, mode):
    config = tiny_config(world_dirs, tmp_path, protocol, mode)
    metrics = run(config)
    prepared = PreparedData.load(config.data_dir)
    check_metrics_shape(metrics, prepared, config)
    model_dir = Path(config.output_dir) / "model"
    bundle = load_ctr_model(model_dir)
    model, center = bundle.model, bundle.center
    # the unknown row of the ID tables is never trained under the "zero" policy
    assert torch.count_nonzero(model.embeddings.item_id_embeddings.weight[0]) == 0
    assert torch.count_nonzero(model.embeddings.user_id_embeddings.weight[0]) == 0
    if mode == "din":
        assert center is None and model.config.center_fingerprint is None and model.content_table is None
    else:
        assert model.config.center_fingerprint == "sha256:tiny-a" and model.config.content_dim == CONTENT_DIM
        assert model.content_table.shape == (center.num_items + 1, CONTENT_DIM)  # attached by the loader
        assert (Path(config.output_dir) / "model" / model.config.center_repo).resolve() == Path(world_dirs["center"]).resolve()
    # the center is not copied into the model folder
    assert sum(f.stat().st_size for f in model_dir.iterdir()) < 200_000
    assert not list(model_dir.rglob("embeddings.safetensors"))
    if protocol == "item-cold":  # held-out targets are all cold and all map to the unknown item row
        assert metrics["test"]["cold"]["n"] == metrics["test"]["overall"]["n"]
        assert metrics["fallbacks"]["test"]["unknown_target_items"] == len(prepared.samples["test"])
    # predict() reproduces the test scores behind metrics.json
    probs = predict(model_dir, prepared.samples["test"], items=prepared.items)
    assert auc(prepared.samples["test"]["label"], probs) == pytest.approx(metrics["test"]["overall"]["auc"], abs=1e-12)
    assert isinstance(bundle, CTRBundle)
    np.testing.assert_array_equal(predict(bundle, prepared.samples["test"], items=prepared.items), probs)


def test_training_loss_decreases(world_dirs, tmp_path):
    metrics = run(tiny_config(world_dirs, tmp_path, mode="ciubm", epochs=4, learning_rate=1e-2))
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]


def test_early_stopping_triggers_and_keeps_best(world_dirs, tmp_path):
    config = tiny_config(world_dirs, tmp_path, mode="din", epochs=60, patience=2, learning_rate=3e-2)
    metrics = run(config)
    history, training = metrics["history"], metrics["training"]
    steps_per_epoch = training["steps_per_epoch"]
    assert training["stopped_early"] and training["steps"] < 60 * steps_per_epoch
    # stopped exactly `patience` evaluations after the best one
    best_index = max(i for i, h in enumerate(history) if h["is_best"])
    assert len(history) == best_index + 1 + 2
    assert training["best_step"] == history[best_index]["step"]
    assert training["best_valid_auc"] == max(h["valid_auc"] for h in history)
    # the saved model is the best one: its valid AUC is the best recorded
    assert metrics["valid"]["overall"]["auc"] == pytest.approx(training["best_valid_auc"], abs=1e-9)


def test_learning_rate_is_cut_after_each_evaluation_without_improvement(world_dirs, tmp_path):
    config = tiny_config(world_dirs, tmp_path, mode="din", epochs=8, patience=4, learning_rate=3e-2,
                         lr_decay_on_plateau=0.5)
    history = run(config)["history"]
    assert any(not h["is_best"] for h in history[:-1])  # the rule below is exercised
    for before, after in zip(history, history[1:]):
        expected = before["learning_rate"] * (1.0 if before["is_best"] else 0.5)
        assert after["learning_rate"] == pytest.approx(expected, rel=1e-12)
    assert history[0]["learning_rate"] == 3e-2
    with pytest.raises(ValueError, match="lr_decay_on_plateau must be in"):
        tiny_config(world_dirs, tmp_path, mode="din", lr_decay_on_plateau=0.0).validate()


class Interrupted(Exception):
    pass


def test_resume_gives_the_same_metrics(world_dirs, tmp_path, monkeypatch):
    common = dict(mode="ciubm", epochs=3, checkpoint_every=4, dropout=0.2, unknown_id_dropout=0.2)
    uninterrupted = run(tiny_config(world_dirs, tmp_path / "a", **common))

    real_save = ctr_module.save_checkpoint

    def save_then_die(accelerator, output_dir, step, state, **kwargs):
        path = real_save(accelerator, output_dir, step, state, **kwargs)
        if step == 8:  # mid-epoch (an epoch is 9 or 10 steps here), after the first evaluation
            raise Interrupted(f"killed after checkpoint {path.name}")
        return path

    config = tiny_config(world_dirs, tmp_path / "b", **common)
    monkeypatch.setattr(ctr_module, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        run(config)
    monkeypatch.setattr(ctr_module, "save_checkpoint", real_save)
    resumed = run(config, resume=True)
    assert resumed["training"]["resumed_from"].endswith("step_8")
    for key in ("test", "valid", "history"):
        assert resumed[key] == uninterrupted[key]


def test_resume_without_checkpoint_is_an_error(world_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run(tiny_config(world_dirs, tmp_path, mode="din"), resume=True)


def test_mismatching_center_is_refused(world_dirs, tmp_path):
    config = tiny_config(world_dirs, tmp_path, mode="ciubm", epochs=1)
    run(config)
    prepared = PreparedData.load(config.data_dir)
    with pytest.raises(ValueError, match="encoder fingerprint"):
        load_ctr_model(Path(config.output_dir) / "model", str(world_dirs["other_center"]))
    with pytest.raises(ValueError, match="encoder fingerprint"):
        predict(Path(config.output_dir) / "model", prepared.samples["test"], RepresentationCenter.load(world_dirs["other_center"]),
                items=prepared.items)


def test_content_mode_without_center_is_a_clear_error(world_dirs, tmp_path):
    with pytest.raises(ValueError, match="center_path"):
        run(tiny_config(world_dirs, tmp_path, mode="content_feature", center_path=None))
    with pytest.raises(ValueError, match="not a directory"):
        run(tiny_config(world_dirs, tmp_path, mode="ciubm", center_path=str(tmp_path / "nowhere")))


def test_labels_outside_zero_one_are_rejected(world_dirs, tmp_path):
    prepared = PreparedData.load(world_dirs["temporal"])
    prepared.samples["train"] = prepared.samples["train"].map(
        lambda row, i: {"label": 2 if i == 3 else row["label"]}, with_indices=True)
    bad_dir = prepared.save(tmp_path / "bad_labels")
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        run(tiny_config(world_dirs, tmp_path, mode="din", data_dir=str(bad_dir)))


@pytest.mark.parametrize("field, value, fragment", [
    ("mode", "dien", "mode must be one of"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("learning_rate", 0.0, "learning_rate must be > 0"),
    ("data_dir", "", "data_dir is required"),
])
def test_bad_config_values(world_dirs, tmp_path, field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        run(tiny_config(world_dirs, tmp_path, **{"mode": "din", field: value}))
    with pytest.raises(ValueError, match="unknown CTRTrainConfig field"):
        load_config(CTRTrainConfig, None, {"learning_rte": 1e-3})


def test_script_entry_point(world_dirs, tmp_path, monkeypatch):
    config_file = tmp_path / "ctr.yaml"
    config_file.write_text(f"data_dir: {world_dirs['item-cold']}\nmode: din\nmax_len: 10\nid_embed_dim: 4\n"
                           "attention_hidden_sizes: [8]\nfusion_hidden_sizes: [16]\nbatch_size: 64\nepochs: 1\nnum_threads: 1\n")
    out = tmp_path / "script_out"
    # the script run as __main__ in this process (a subprocess would re-import torch: slow)
    monkeypatch.setattr(sys, "argv", ["train_ctr.py", "--config", str(config_file), "--output-dir", str(out),
                                      "--show-progress", "false", "--seed", "3"])
    runpy.run_path(str(REPO / "training" / "train_ctr.py"), run_name="__main__")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seed"] == 3 and metrics["protocol"] == "item-cold" and metrics["mode"] == "din"
    assert (out / "model" / "config.json").is_file() and (out / "config.json").is_file()
    assert np.isfinite(metrics["test"]["cold"]["logloss"])


def test_transformers_trainer_trains_with_the_collator(world_dirs, tmp_path):
    # CiUBMForCTR under transformers.Trainer, the project's collator as data_collator (raw sample
    # rows in, so remove_unused_columns=False keeps the columns the collator reads)
    from transformers import Trainer, TrainingArguments

    from mim_hf.ctr.collator import CTRCollator, center_content_table
    from mim_hf.modeling import CiUBMConfig, CiUBMForCTR

    prepared = PreparedData.load(world_dirs["temporal"])
    center = RepresentationCenter.load(world_dirs["center"])
    collator = CTRCollator(prepared.vocabs, items=prepared.items, center=center, max_len=10,
                           item_features=["item_category"])
    torch.manual_seed(0)
    config = CiUBMConfig(**collator.config_kwargs(), content_dim=CONTENT_DIM, id_embed_dim=4, content_proj_dim=4,
                         attention_hidden_sizes=[8], fusion_hidden_sizes=[16])
    model = CiUBMForCTR(config).set_content_table(center_content_table(center))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=16, max_steps=4,
                             learning_rate=1e-2, remove_unused_columns=False, report_to=[], save_strategy="no",
                             logging_steps=1, use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=prepared.samples["train"], data_collator=collator)
    result = trainer.train()
    assert result.global_step == 4 and np.isfinite(result.training_loss)
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters() if p.requires_grad
               and name in ("fusion.layers.0.weight", "content_projection.weight"))
    assert np.isfinite(trainer.evaluate(eval_dataset=prepared.samples["valid"])["eval_loss"])
