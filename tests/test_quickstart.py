"""The main job end to end on a tiny synthetic world (tiny text + vision towers, images through
the vision tower): every stage runs, the report has the documented layout, stages are reusable."""

from __future__ import annotations

import json

import pytest

from mim_hf.center.store import RepresentationCenter
from mim_hf.quickstart import CTR_MODELS, QuickstartConfig, parse_overrides, run_quickstart

TINY = {
    "world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
    "pretrain": {"max_steps": 2, "eval_every": 0, "checkpoint_every": 0, "batch_size": 8},
    "csft": {"max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "batch_size": 8, "queue_size": 16},
    "ctr": {"epochs": 1, "batch_size": 64},
}


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    config = QuickstartConfig(out=str(out), world="synthetic", protocols=("temporal", "item-cold"), seeds=(0, 1), jobs=2,
                              show_progress=False, overrides=TINY)
    return out, config, run_quickstart(config)


def test_report_layout(quickstart_run):
    out, config, report = quickstart_run
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk["protocols"]) == {"temporal", "item-cold"}
    for protocol, results in on_disk["protocols"].items():
        assert set(results) == set(CTR_MODELS)
        for model, result in results.items():
            assert len(result["seeds"]) == 2
            overall = result["overall"]
            assert 0.0 <= overall["auc"] <= 1.0 and overall["n"] > 0 and "auc_std" in overall
        retrieval = on_disk["retrieval"][protocol]
        assert set(retrieval) == {"raw", "pretrained", "csft", "popularity"}
        assert all(0.0 <= r["recall@10"] <= 1.0 for r in retrieval.values())
    # item-cold: every test sample is a cold item; no long-tail/head rows exist.
    assert on_disk["protocols"]["item-cold"]["din"]["cold"]["n"] == on_disk["protocols"]["item-cold"]["din"]["overall"]["n"]
    assert {"total", "temporal/pretrain", "item-cold/csft"} <= set(on_disk["timings_s"])
    assert on_disk["environment"]["world"] == "synthetic"
    markdown = (out / "report.md").read_text()
    assert "CiUBM (C-SFT center)" in markdown and "recall@10" in markdown
    for plot in ("auc_by_bucket_temporal.png", "auc_by_bucket_item-cold.png", "csft_recall_at_10.png"):
        assert (out / plot).stat().st_size > 1000


def test_image_path_went_through_the_vision_tower(quickstart_run):
    out, _, _ = quickstart_run
    from mim_hf.center.store import RepresentationCenter

    center = RepresentationCenter.load(out / "temporal" / "centers" / "csft")
    assert "image_embeds" in center.levels
    embeds, found = center.lookup(["i00000", "i00001"], level="image_embeds")
    assert found.all() and (embeds.norm(dim=1) > 0.99).all()


def test_stages_are_reused_not_recomputed(quickstart_run):
    out, config, report = quickstart_run
    again = run_quickstart(QuickstartConfig(**{**config.__dict__, "stages": ("report",)}))
    assert again["protocols"] == json.loads(json.dumps(report["protocols"]))
    assert set(again["timings_s"]) == {"load_data", "total"}


def test_overrides_parse_and_reject_bad_input():
    assert parse_overrides(["ctr.epochs=1", "world.n_users=30", "csft.level_weights={item: 1.0}"]) == {
        "ctr": {"epochs": 1}, "world": {"n_users": 30}, "csft": {"level_weights": {"item": 1.0}}}
    with pytest.raises(ValueError, match="STAGE.FIELD=VALUE"):
        parse_overrides(["epochs=1"])
    with pytest.raises(ValueError, match="unknown stage"):
        run_quickstart(QuickstartConfig(stages=("train",)))


def test_an_interrupted_stage_resumes_and_force_starts_over(quickstart_run, capsys):
    # Runs last: it rewrites the temporal C-SFT artefacts of the shared run.
    out, config, _ = quickstart_run
    csft_dir = out / "temporal" / "csft"
    finished = json.loads((csft_dir / "metrics.json").read_text())
    (csft_dir / "metrics.json").unlink()  # as if killed after its last checkpoint
    only_csft = {**config.__dict__, "stages": ("csft",), "protocols": ("temporal",), "jobs": 1}
    run_quickstart(QuickstartConfig(**only_csft))
    assert "resuming" in capsys.readouterr().out
    resumed = json.loads((csft_dir / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("step_2")
    assert resumed["retrieval"] == finished["retrieval"] and resumed["history"] == finished["history"]
    center_dir = out / "temporal" / "centers" / "csft"
    run_quickstart(QuickstartConfig(**{**only_csft, "stages": ("csft", "centers"), "force": True}))
    assert "resuming" not in capsys.readouterr().out
    assert json.loads((csft_dir / "metrics.json").read_text())["resumed_from"] is None
    assert RepresentationCenter.load(center_dir).num_items == 40
