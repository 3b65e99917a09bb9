"""The results harness: FuxiCTR adapter, paired intervals, tuning, resumable runs, report, plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mim_hf.results import tuning
from mim_hf.results.paired import paired_difference


# ---------------------------------------------------------------- paired intervals
def test_paired_difference_mean_and_interval():
    base = {(0, 0): 0.70, (0, 1): 0.71, (1, 0): 0.69, (1, 1): 0.72}
    model = {(0, 0): 0.73, (0, 1): 0.72, (1, 0): 0.74, (1, 1): 0.73}
    result = paired_difference(model, base, n_boot=2000)
    diffs = [0.03, 0.01, 0.05, 0.01]
    assert result["auc_diff"] == pytest.approx(np.mean(diffs))
    assert min(diffs) <= result["ci_low"] < result["auc_diff"] < result["ci_high"] <= max(diffs)
    assert result["n_pairs"] == 4 and result["unmatched"] == 0
    assert paired_difference(model, base, n_boot=2000) == result  # seeded: same interval every time


def test_paired_difference_pairs_by_key_and_counts_unmatched():
    # a constant per-pair difference has a zero-width interval, however large the run-to-run spread
    base = {(0, 0): 0.60, (0, 1): 0.80, (1, 0): 0.70}
    model = {(0, 0): 0.62, (0, 1): 0.82, (2, 0): 0.99}
    result = paired_difference(model, base)
    assert result["auc_diff"] == pytest.approx(0.02)
    assert result["ci_low"] == pytest.approx(0.02) and result["ci_high"] == pytest.approx(0.02)
    assert result["n_pairs"] == 2 and result["unmatched"] == 2


def test_paired_difference_without_a_match_raises():
    with pytest.raises(ValueError, match="no matched"):
        paired_difference({(0, 0): 0.7}, {(1, 0): 0.7})


# ---------------------------------------------------------------- tuning
def test_grid_keeps_base_values_and_choice_uses_valid_with_ties_to_first():
    base = {"learning_rate": 0.002, "id_embed_dim": 16, "dropout": 0.1, "weight_decay": 0.0}
    grid = tuning.settings_grid("small", base)
    assert [s["learning_rate"] for s in grid] == tuning.BUDGETS["small"]["grid"]["learning_rate"]
    assert all(s["id_embed_dim"] == 16 and s["dropout"] == 0.1 for s in grid)
    assert len(tuning.settings_grid("full", base)) == 24
    assert tuning.choose({"a": 0.6, "b": 0.7, "c": 0.7, "d": None}) == "b"
    with pytest.raises(ValueError, match="budget"):
        tuning.budget("huge")
    with pytest.raises(ValueError, match="no setting"):
        tuning.choose({"a": None})


def test_split_grid_adds_unknown_id_dropout_under_temporal_where_a_model_has_it():
    from mim_hf.results.harness import ResultsConfig, split_grid, total_runs

    assert split_grid("temporal", "din") == {"unknown_id_dropout": [0.1, 0.0]}
    assert split_grid("item-cold", "din") == {} and split_grid("temporal", "fuxictr_din") == {}
    assert split_grid("temporal", "ciubm_csft+content_to_id") == {"unknown_id_dropout": [0.1]}  # needs dropout > 0
    base = {"learning_rate": 0.001, "id_embed_dim": 16, "dropout": 0.1, "weight_decay": 0.0}
    ids = [tuning.setting_id(s) for s in tuning.settings_grid("small", base, split_grid("temporal", "din"))]
    assert ids == ["lr0.001-emb16-do0.1-wd0-uid0.1", "lr0.001-emb16-do0.1-wd0-uid0",
                   "lr0.003-emb16-do0.1-wd0-uid0.1", "lr0.003-emb16-do0.1-wd0-uid0",
                   "lr0.01-emb16-do0.1-wd0-uid0.1", "lr0.01-emb16-do0.1-wd0-uid0"]
    assert [tuning.setting_id(s) for s in tuning.settings_grid("small", base)] == [
        "lr0.001-emb16-do0.1-wd0", "lr0.003-emb16-do0.1-wd0", "lr0.01-emb16-do0.1-wd0"]
    config = ResultsConfig(protocols=("temporal/rating", "item-cold/rating"), models=("din", "fuxictr_din"), folds=3)
    assert total_runs(config) == (6 + 2) + (3 + 2) + 3 * ((3 + 2) + (3 + 2))  # 3 rates (× 2 ID dropouts: temporal)
    config = ResultsConfig(protocols=("temporal/rating",), models=("din", "ciubm_csft", "ciubm_csft+simtier"))
    assert total_runs(config) == 2 * (6 + 2) + 3  # the lever row: its base's setting, with the 3 seeds


def test_a_lever_row_takes_its_base_rows_setting_where_the_lever_allows_it():
    from mim_hf.results.harness import lever_setting

    chosen = {"learning_rate": 0.003, "id_embed_dim": 16, "dropout": 0.1, "weight_decay": 0.0, "unknown_id_dropout": 0.0}
    assert lever_setting(chosen, "temporal", "ciubm_csft+simtier") == chosen
    assert lever_setting(chosen, "temporal", "ciubm_csft+content_to_id") == {**chosen, "unknown_id_dropout": 0.1}
    no_split_field = {k: v for k, v in chosen.items() if k != "unknown_id_dropout"}
    assert lever_setting(no_split_field, "item-cold", "ciubm_csft+content_to_id") == no_split_field


def test_prepare_kwargs_folds_apply_to_item_cold_only():
    from mim_hf.results.harness import ResultsConfig, prepare_kwargs, protocol_folds, split_labels

    assert prepare_kwargs("item-cold", "rating", 1, 0) == {"protocol": "item-cold", "labels": "rating", "seed": 0}
    assert prepare_kwargs("item-cold", "implicit", 5, 3) == {
        "protocol": "item-cold", "labels": "implicit", "seed": 0, "folds": 5, "fold": 3}
    assert prepare_kwargs("temporal", "implicit", 5, 0) == {"protocol": "temporal", "labels": "implicit", "seed": 0}
    config = ResultsConfig(protocols=["temporal/rating", "item-cold/implicit"], folds=5, fold_limit=2)
    assert [protocol_folds(config, p) for p in config.protocols] == [[0], [0, 1]]
    config = ResultsConfig(protocols=["temporal/rating", "item-cold/implicit"], folds=5, only_folds=(4, 3))
    assert [protocol_folds(config, p) for p in config.protocols] == [[0], [3, 4]] and config.run_folds == 2
    for bad in ({"only_folds": (5,)}, {"only_folds": (1,), "fold_limit": 2}, {"only_folds": (0,), "folds": 1}):
        with pytest.raises(ValueError, match=r"only_folds \[\d\] must name item folds in \[0, "):
            ResultsConfig(**bad).validate()
    with pytest.raises(ValueError, match="folds must be 1"):
        ResultsConfig(folds=2).validate()
    with pytest.raises(ValueError, match="SPLIT/LABELS"):
        split_labels("temporal")


# ---------------------------------------------------------------- FuxiCTR adapter
@pytest.fixture(scope="module")
def tiny_prepared():
    from mim_hf.data import make_synthetic_world, prepare

    return prepare(make_synthetic_world(n_users=40, n_items=50, seed=0), protocol="temporal")


def _collator(prepared):
    from mim_hf.ctr.collator import CTRCollator
    from mim_hf.ctr.train import CTRTrainConfig, infer_features

    user, item = infer_features(prepared, CTRTrainConfig(data_dir="unused"))
    return CTRCollator(prepared.vocabs, items=prepared.items, max_len=10, user_features=user, item_features=item)


def test_fuxictr_batches_put_behaviours_then_target(tiny_prepared):
    from mim_hf.ctr.train import CTRTensorSplit
    from mim_hf.results.fuxictr import FuxiBatches

    split = CTRTensorSplit.collate(_collator(tiny_prepared), tiny_prepared.samples["test"])
    batch_dict, item_dict, mask = next(iter(FuxiBatches(split, batch_size=7)))
    rows = item_dict["item_id"].view(7, 11)
    assert rows[:, -1].tolist() == split.tensors["target_item_ids"][:7].tolist()
    assert rows[:, :-1].tolist() == split.tensors["behavior_item_ids"][:7].tolist()
    assert mask.tolist() == split.tensors["behavior_mask"][:7].float().tolist()
    assert batch_dict["label"].tolist() == split.tensors["labels"][:7].float().tolist()
    assert set(item_dict) == {"item_id", *split.tensors["target_item_features"]}


def test_fuxictr_din_metrics_are_ours_on_its_predictions(tiny_prepared):
    pytest.importorskip("fuxictr")
    from sklearn.metrics import log_loss, roc_auc_score

    from mim_hf.results.fuxictr import train_and_evaluate

    settings = {"learning_rate": 3e-3, "id_embed_dim": 8, "dropout": 0.0, "weight_decay": 0.0}
    threads = torch.get_num_threads()
    result = train_and_evaluate(tiny_prepared, _collator(tiny_prepared), settings,
                                {"attention_hidden_sizes": [8], "fusion_hidden_sizes": [16]}, seed=0, epochs=2,
                                patience=2, batch_size=128, return_predictions=True, num_threads=threads + 1)
    # the run's thread count applies to that run only (a results process sets 1 beside another process)
    assert result["training"]["num_threads"] == threads + 1 and torch.get_num_threads() == threads
    test = tiny_prepared.samples["test"]
    labels, probs = np.asarray(test["label"]), result["predictions"]["test"]
    assert probs.shape == (len(test),) and np.all((probs > 0) & (probs < 1))
    assert result["test"]["overall"]["auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert result["test"]["overall"]["logloss"] == pytest.approx(log_loss(labels, probs), rel=1e-5)
    buckets = np.asarray(test["popularity_bucket"])
    for bucket in ("long_tail", "head"):
        chosen = buckets == bucket
        if len(set(labels[chosen])) == 2:
            assert result["test"][bucket]["auc"] == pytest.approx(roc_auc_score(labels[chosen], probs[chosen]))
            assert result["test"][bucket]["n"] == int(chosen.sum())
    assert result["training"]["steps"] >= 1 and "item_id" in result["training"]["features"]


# ---------------------------------------------------------------- harness: resumable, report layout
def test_harness_runs_resumes_and_reports(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from mim_hf.results import harness

    config = harness.ResultsConfig(
        out=str(tmp_path / "out"), world="synthetic", protocols=("temporal/rating",), models=("din",),
        seeds=(0, 1), folds=1, epochs=1, show_progress=False, docs_dir=str(tmp_path / "docs"),
        overrides={"world": {"n_users": 40, "n_items": 50}, "ctr": {"batch_size": 256}})
    report = harness.run_results(config)
    fold = tmp_path / "out" / "temporal" / "rating" / "fold0"
    stored = sorted(p.relative_to(fold / "results").as_posix() for p in (fold / "results").rglob("*.json"))
    grid = [tuning.setting_id(s) for s in tuning.settings_grid("small", {
        "learning_rate": 0, "id_embed_dim": 8, "dropout": 0.1, "weight_decay": 0.0}, harness.split_grid("temporal", "din"))]
    assert len(grid) == 2 * len(tuning.BUDGETS["small"]["grid"]["learning_rate"])  # × unknown-ID dropout {0.1, 0}
    assert len(stored) == len(grid) + 1  # every grid setting with seed 0, the chosen one with seed 1
    din = report["protocols"]["temporal/rating"]["din"]
    assert set(din) >= {"overall", "long_tail", "head", "runs"} and din["runs"] == 2
    assert set(din["overall"]) >= {"auc", "auc_std", "gauc", "logloss", "n"}
    chosen = report["settings"]["temporal/rating"]["din"]["fold0"]
    valid = {r: json.loads((fold / "results" / "din" / r / "seed0.json").read_text())["valid"]["overall"]["auc"]
             for r in [tuning.setting_id(s)
                       for s in tuning.settings_grid("small", {**chosen}, harness.split_grid("temporal", "din"))]}
    assert tuning.setting_id(chosen) == max(valid, key=valid.get)
    made_at = {json.loads((fold / "results" / r).read_text())["commit"] for r in stored}
    assert made_at == {report["commit"]} and report["run_commits"] == [report["commit"]]
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["protocols"] == json.loads(
        json.dumps(report["protocols"]))
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "auc_by_bucket_temporal_rating.png").exists()
    assert report["protocols_missing"] == ["item-cold/rating", "temporal/implicit", "item-cold/implicit"]
    assert "**Not in this report**" in (tmp_path / "out" / "report.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a stored result was recomputed")

    monkeypatch.setattr(harness, "_train_one", no_training)
    again = harness.run_results(config)
    assert again["protocols"] == report["protocols"]


def test_paired_rows_are_against_din(tmp_path):
    from mim_hf.results.harness import ResultsConfig
    from mim_hf.results.report import build_report

    def run(auc):
        return {"test": {"overall": {"auc": auc, "gauc": auc, "logloss": 0.6, "n": 10}}, "timings_s": {"total": 1.0}}

    folds = {"item-cold/rating": {0: {
        "din": {"setting": {}, "valid_auc_by_setting": {}, "runs": {0: run(0.60), 1: run(0.62)}},
        "ciubm_csft": {"setting": {}, "valid_auc_by_setting": {}, "runs": {0: run(0.65), 1: run(0.66)}}}}}
    config = ResultsConfig(folds=1, seeds=(0, 1), epochs=1, world="synthetic")
    report = build_report(config, folds, wall_time_s=3.0)
    assert set(report["paired"]["item-cold/rating"]) == {"ciubm_csft"}
    assert report["paired"]["item-cold/rating"]["ciubm_csft"]["auc_diff"] == pytest.approx(0.045)
    assert report["protocols"]["item-cold/rating"]["din"]["overall"]["n"] == 10  # summed over folds, not seeds


def test_the_center_chosen_on_valid_is_per_fold_the_center_row_with_the_best_mean_valid_auc():
    from mim_hf.results.harness import ResultsConfig
    from mim_hf.results.report import CENTER_ON_VALID, build_report, center_chosen_on_valid, markdown

    def row(valid, test):  # two seeds each
        return {"setting": dict.fromkeys(tuning.TUNED_FIELDS, 0), "valid_auc_by_setting": {}, "runs": {
            s: {"valid": {"overall": {"auc": v}}, "test": {"overall": {"auc": t, "gauc": t, "logloss": 0.6, "n": 10}},
                "timings_s": {"total": 1.0}} for s, (v, t) in enumerate(zip(valid, test))}}

    fold0 = {"din": row([0.9, 0.9], [0.60, 0.60]), "ciubm_pretrained": row([0.70, 0.74], [0.64, 0.64]),
             "ciubm_csft": row([0.73, 0.73], [0.61, 0.62]), "ciubm_csft+simtier": row([0.99, 0.99], [0.7, 0.7])}
    fold1 = {**fold0, "ciubm_csft": row([0.71, 0.71], [0.66, 0.66])}
    # DIN-ID and a CTR lever are not centers; the mean over seeds decides (0.73 > 0.72), not the best seed
    assert center_chosen_on_valid(fold0)["chosen"] == "ciubm_csft"
    assert center_chosen_on_valid(fold1)["chosen"] == "ciubm_pretrained"
    assert center_chosen_on_valid({"din": fold0["din"], "ciubm_csft": fold0["ciubm_csft"]}) is None
    report = build_report(ResultsConfig(folds=5, fold_limit=2, seeds=(0, 1), epochs=1, world="synthetic"),
                          {"item-cold/rating": {0: fold0, 1: fold1}}, wall_time_s=1.0)
    assert report["center_on_valid"]["item-cold/rating"] == {"fold0": "ciubm_csft", "fold1": "ciubm_pretrained"}
    chosen = report["protocols"]["item-cold/rating"][CENTER_ON_VALID]
    assert chosen["overall"]["auc"] == pytest.approx((0.61 + 0.62 + 0.64 + 0.64) / 4)  # the chosen rows' test runs
    assert report["paired"]["item-cold/rating"][CENTER_ON_VALID]["auc_diff"] == pytest.approx((0.61 + 0.62 + 0.64 + 0.64) / 4 - 0.6)
    assert CENTER_ON_VALID not in report["levers"]["item-cold/rating"]
    assert "fold0: CiUBM (C-SFT center), fold1: CiUBM (pre-trained center)" in markdown(report, [])


# ---------------------------------------------------------------- plots (issue 18 point 7)
def test_plot_buckets_skip_empty_and_duplicate_cold():
    from mim_hf.report import _shown_buckets

    item_cold = {"din": {"overall": {"n": 50}, "cold": {"n": 50}, "long_tail": {"n": 0}, "head": {"n": 0}}}
    assert _shown_buckets(item_cold) == ["overall"]
    temporal = {"din": {"overall": {"n": 50}, "cold": {"n": 5}, "long_tail": {"n": 20}, "head": {"n": 25}}}
    assert _shown_buckets(temporal) == ["overall", "cold", "long_tail", "head"]


def test_csft_plot_draws_reference_lines(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from mim_hf.report import plot_csft_curves

    drawn = {}
    original = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        drawn["labels"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        drawn["ylim"] = fig.axes[0].get_ylim()
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = capture
    try:
        retrieval = {"temporal": {name: {"recall@10": v} for name, v in
                                  (("raw", 0.05), ("pretrained", 0.08), ("popularity", 0.06), ("csft", 0.12))}}
        plot_csft_curves({"temporal": [{"step": 10, "valid_recall@10": 0.09}, {"step": 20, "valid_recall@10": 0.11}]},
                         retrieval, tmp_path / "c.png")
    finally:
        plt.Figure.savefig = original
    assert (tmp_path / "c.png").exists()
    assert drawn["labels"] == ["C-SFT (valid)", "raw (test) 0.050", "pretrained (test) 0.080",
                               "popularity (test) 0.060", "C-SFT final (test) 0.120"]
    assert drawn["ylim"][0] == 0


def test_auc_plot_has_chance_line_and_legend_off_the_bars(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from mim_hf.report import plot_auc_by_bucket

    drawn = {}
    original = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        ax = fig.axes[0]
        drawn.update(ylim=ax.get_ylim(), ylabel=ax.get_ylabel(), ticks=[t.get_text() for t in ax.get_xticklabels()],
                     legend_anchor=ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted()).x0,
                     lines=[line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"])
        return original(fig, *args, **kwargs)

    results = {"din": {"overall": {"n": 50, "auc": 0.8, "auc_std": 0.01}, "cold": {"n": 5, "auc": 0.7},
                       "long_tail": {"n": 20, "auc": 0.75}, "head": {"n": 25, "auc": 0.82}}}
    plt.Figure.savefig = capture
    try:
        plot_auc_by_bucket(results, "t", tmp_path / "a.png", "3 seeds")
    finally:
        plt.Figure.savefig = original
    assert drawn["ylim"][0] < 0.5 < drawn["ylim"][1] and drawn["lines"] == [0.5]
    assert drawn["ticks"] == ["overall\nn=50", "cold\nn=5", "long_tail\nn=20", "head\nn=25"]
    assert "std over 3 seeds" in drawn["ylabel"] and drawn["legend_anchor"] > 1.0


def test_reference_verdict_flags_a_stronger_fuxictr_din():
    from mim_hf.results.report import reference_verdict

    assert "beats DIN-ID" in reference_verdict({"auc_diff": 0.02, "ci_low": 0.01, "ci_high": 0.03})
    assert "DIN-ID beats" in reference_verdict({"auc_diff": -0.02, "ci_low": -0.03, "ci_high": -0.01})
    assert "matches" in reference_verdict({"auc_diff": 0.001, "ci_low": -0.01, "ci_high": 0.01})


def test_content_models_share_one_encoder_chain_per_fold(tmp_path):
    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "pretrain": {"max_steps": 2, "eval_every": 0, "batch_size": 8},
            "csft": {"max_steps": 2, "eval_every": 2, "batch_size": 8, "queue_size": 16},
            "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", "ciubm_csft"), seeds=(0,), folds=1, epochs=1,
                                   show_progress=False, overrides=tiny)
    report = harness.run_results(config)
    fold = tmp_path / "item-cold" / "rating" / "fold0"
    assert (fold / "centers" / "csft" / "CURRENT").exists() and not (fold / "centers" / "pretrained").exists()
    assert sorted(p.name for p in (fold / "results").iterdir()) == ["ciubm_csft", "din"]
    assert report["paired"]["item-cold/rating"]["ciubm_csft"]["n_pairs"] == 1


# ---------------------------------------------------------------- levers (ablation rows)
def test_lever_names_are_parsed_and_checked():
    from mim_hf.results import levers

    assert levers.parse_model("ciubm_csft+content_to_id+simtier") == ("ciubm_csft", ("content_to_id", "simtier"))
    assert levers.overrides(("content_to_id", "simtier"), "ctr") == {
        "content_to_id": True, "histogram_kind": "simtier", "histogram_n_bins": 20}
    for bad, match in [("ciubm_csft+wings", "unknown lever"), ("din+simtier", "content models"),
                       ("ciubm_csft+simtier+simtier", "twice")]:
        with pytest.raises(ValueError, match=match):
            levers.parse_model(bad)


def test_csft_levers_get_their_own_center(monkeypatch):
    from mim_hf.results import harness, levers

    monkeypatch.setitem(levers.LEVERS, "long_csft", ("csft", {"max_steps": 1000}))
    assert harness.model_center("ciubm_csft+simtier+long_csft") == "csft+long_csft"
    assert harness.model_center("ciubm_pretrained+simtier") == "pretrained"
    assert harness.model_center("din") is None and harness.model_center("fuxictr_din") is None
    with pytest.raises(ValueError, match="need the base 'ciubm_csft'"):
        levers.parse_model("ciubm_pretrained+long_csft")


def test_lever_rows_train_their_own_model(tmp_path):
    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "pretrain": {"max_steps": 2, "eval_every": 0, "batch_size": 8}, "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", "ciubm_pretrained", "ciubm_pretrained+content_to_id",
                                           "ciubm_pretrained+id_dropout_high"), seeds=(0,),
                                   folds=1, epochs=1, show_progress=False, overrides=tiny)
    report = harness.run_results(config)
    rows = report["protocols"]["item-cold/rating"]
    assert set(rows) == {"din", "ciubm_pretrained", "ciubm_pretrained+content_to_id", "ciubm_pretrained+id_dropout_high"}
    fold = tmp_path / "item-cold" / "rating" / "fold0" / "results"

    def parameters(model):
        return json.loads(next((fold / model).rglob("seed0.json")).read_text())["training"]["num_parameters"]

    assert parameters("ciubm_pretrained+content_to_id") > parameters("ciubm_pretrained")  # the generator's weights
    chosen = report["settings"]["item-cold/rating"]["ciubm_pretrained"]["fold0"]
    assert [p.name for p in (fold / "ciubm_pretrained+content_to_id").iterdir()] == [tuning.setting_id(chosen)]
    assert len(list((fold / "ciubm_pretrained").iterdir())) == len(tuning.BUDGETS["small"]["grid"]["learning_rate"])
    assert "CiUBM (pre-trained center) + content_to_id" in (tmp_path / "report.md").read_text()
    # a "setting" lever: the base row's setting with the field it fixes (the CTR training's fields)
    raised = {**chosen, "unknown_id_dropout": 0.5}
    assert report["settings"]["item-cold/rating"]["ciubm_pretrained+id_dropout_high"]["fold0"] == raised
    run = fold / "ciubm_pretrained+id_dropout_high" / tuning.setting_id(raised) / "seed0.json"
    assert tuning.setting_id(raised).endswith("-uid0.5") and json.loads(run.read_text())["setting"] == raised


def test_a_lever_rows_model_fields_go_on_top_of_the_model_overrides_in_effect(tmp_path, monkeypatch):
    from mim_hf.ctr import train as ctr
    from mim_hf.results import harness

    seen = []
    monkeypatch.setattr(ctr, "run", lambda cfg, resume=False: seen.append(cfg.model_overrides)
                        or dict.fromkeys(("valid", "test", "training", "timings_s"), {}))
    shipped_stage_config = harness.stage_config

    def stage_config(cls, name, **overrides):  # a shipped CTR config that sets model fields
        return shipped_stage_config(cls, name, **{"model_overrides": {"initializer_range": 0.07}, **overrides})

    monkeypatch.setattr(harness, "stage_config", stage_config)
    names = harness.config_names("movielens-100k", "temporal")
    setting = {"learning_rate": 1e-3, "id_embed_dim": 16, "dropout": 0.1, "weight_decay": 0.0}
    for overrides in ({}, {"ctr": {"model_overrides": {"initializer_range": 0.05}}}):  # shipped, then --set
        config = harness.ResultsConfig(out=str(tmp_path), overrides=overrides)
        harness._train_one(config, tmp_path, names, "ciubm_pretrained+content_to_id", setting, 0,
                           {"pretrained": tmp_path}, 1)
    assert seen == [{"initializer_range": 0.07, "content_to_id": True}, {"initializer_range": 0.05, "content_to_id": True}]


def test_frozen_encoder_center_is_the_towers_pooled_output(tmp_path):
    from mim_hf.encoder.build import load_encoder_and_processor
    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12}, "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path), world="synthetic", protocols=("temporal/rating",),
                                   models=("din", "ciubm_raw"), seeds=(0,), folds=1, epochs=1,
                                   show_progress=False, overrides=tiny)
    report = harness.run_results(config)
    fold = tmp_path / "temporal" / "rating" / "fold0"
    assert not (fold / "pretrain").exists()  # the frozen encoder needs no pre-training
    encoder, processor = load_encoder_and_processor(fold / "raw" / "encoder")
    inputs = processor([{"title": "a quiet film", "genres": ["Drama"], "year": 1990}])
    tower = encoder.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    weights = inputs["attention_mask"].unsqueeze(-1).float()
    pooled = (tower.last_hidden_state * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(encoder.encode_text(inputs["input_ids"], inputs["attention_mask"]), pooled)
    assert "ciubm_raw" in report["paired"]["temporal/rating"]


def test_report_names_the_commits_its_runs_were_made_at():

    from mim_hf.results.harness import ResultsConfig
    from mim_hf.results.report import build_report

    def run(auc, commit=None):
        result = {"test": {"overall": {"auc": auc, "gauc": auc, "logloss": 0.6, "n": 10}}, "timings_s": {"total": 1.0}}
        return {**result, "commit": commit} if commit else result

    folds = {"temporal/rating": {0: {"din": {"setting": {}, "valid_auc_by_setting": {},
                                             "runs": {0: run(0.6, "abc"), 1: run(0.61, "def"), 2: run(0.62)}}}}}
    config = ResultsConfig(folds=1, seeds=(0, 1, 2), epochs=1, world="synthetic")
    assert build_report(config, folds, wall_time_s=1.0)["run_commits"] == ["abc", "def", "unrecorded"]


def test_lever_rows_are_paired_against_their_base_model():

    from mim_hf.results.harness import ResultsConfig
    from mim_hf.results.report import build_report, markdown

    def run(auc):
        return {"test": {"overall": {"auc": auc, "gauc": auc, "logloss": 0.6, "n": 10}}, "timings_s": {"total": 1.0}}

    rows = {"din": (0.60, 0.62), "ciubm_csft": (0.65, 0.66), "ciubm_csft+simtier": (0.66, 0.68),
            "ciubm_raw+simtier": (0.7, 0.7)}  # its base did not run: no lever pair
    setting = dict.fromkeys(tuning.TUNED_FIELDS, 0)
    folds = {"item-cold/rating": {0: {m: {"setting": setting, "valid_auc_by_setting": {}, "runs": {0: run(a), 1: run(b)}}
                                      for m, (a, b) in rows.items()}}}
    config = ResultsConfig(folds=1, seeds=(0, 1), epochs=1, world="synthetic")
    report = build_report(config, folds, wall_time_s=1.0)
    assert set(report["levers"]["item-cold/rating"]) == {"ciubm_csft+simtier"}
    assert report["levers"]["item-cold/rating"]["ciubm_csft+simtier"]["auc_diff"] == pytest.approx(0.015)
    assert "| model vs its base model |" in markdown(report, [])


def test_from_raw_lever_starts_csft_from_the_frozen_towers_without_pretraining(tmp_path):
    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "csft": {"max_steps": 2, "eval_every": 2, "batch_size": 8, "queue_size": 16}, "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", "ciubm_csft+from_raw"), seeds=(0,), folds=1, epochs=1,
                                   show_progress=False, overrides=tiny)
    report = harness.run_results(config)
    fold = tmp_path / "item-cold" / "rating" / "fold0"
    assert harness.model_center("ciubm_csft+from_raw") == "csft+from_raw"
    started_from = json.loads((fold / "csft+from_raw" / "config.json").read_text())["encoder_path"]
    assert started_from == str(fold / "raw" / "encoder") and (fold / "raw" / "encoder" / "config.json").exists()
    assert not (fold / "pretrain").exists()  # nothing here needs the pre-trained encoder
    assert (fold / "centers" / "csft+from_raw" / "CURRENT").exists()


def test_id_aligned_and_user_negative_levers_train_csft_on_the_folds_din_and_the_users_negatives(tmp_path):
    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "pretrain": {"max_steps": 2, "eval_every": 0, "batch_size": 8},
            "csft": {"max_steps": 2, "eval_every": 2, "batch_size": 8, "queue_size": 16}, "ctr": {"batch_size": 64}}
    model = "ciubm_csft+id_aligned_pairs+user_negatives"
    config = harness.ResultsConfig(out=str(tmp_path), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", model), seeds=(0,), folds=1, epochs=1,
                                   show_progress=False, overrides=tiny)
    report = harness.run_results(config)
    fold = tmp_path / "item-cold" / "rating" / "fold0"
    stage = fold / "csft+id_aligned_pairs+user_negatives"
    csft = json.loads((stage / "config.json").read_text())
    assert csft["pair_source"] == "id_aligned" and csft["id_model_path"] == str(fold / "id_model_din" / "model")
    assert (csft["hard_negatives"], csft["hard_negative_source"]) == (4, "user_negatives")
    id_model = json.loads((fold / "id_model_din" / "config.json").read_text())
    assert (id_model["mode"], id_model["epochs"], id_model["data_dir"]) == ("din", 1, str(fold / "data"))
    assert json.loads((stage / "metrics.json").read_text())["pair_source"]["name"] == "id_aligned"
    assert model in report["protocols"]["item-cold/rating"]
    # the ID model's config is one its row reads: a DIN config change reaches the row
    assert "ctr_synthetic_din.yaml" in harness.row_files("synthetic", "item-cold/rating", model)


def test_raw_channel_lever_reads_a_center_of_both_channels(tmp_path):
    from mim_hf.center import RepresentationCenter
    from mim_hf.results import harness, levers

    assert harness.model_center("ciubm_csft+no_anchor+raw_channel") == "csft+no_anchor+raw_channel"
    assert levers.center_channels("csft+no_anchor+raw_channel") == ("csft+no_anchor", ["raw"])
    with pytest.raises(ValueError, match="already reads"):
        levers.parse_model("ciubm_raw+raw_channel")
    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "pretrain": {"max_steps": 2, "eval_every": 0, "batch_size": 8}, "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", "ciubm_pretrained+raw_channel"), seeds=(0,), folds=1, epochs=1,
                                   show_progress=False, overrides=tiny)
    report = harness.run_results(config)
    centers = tmp_path / "item-cold" / "rating" / "fold0" / "centers"
    both, pretrained = (RepresentationCenter.load(centers / name) for name in ("pretrained+raw_channel", "pretrained"))
    raw = RepresentationCenter.load(centers / "raw")
    assert both.embed_dim == pretrained.embed_dim + raw.embed_dim and both.item_ids() == pretrained.item_ids()
    assert "ciubm_pretrained+raw_channel" in report["protocols"]["item-cold/rating"]


def test_a_finished_encoder_stage_made_with_another_config_is_refused_not_reused(tmp_path, monkeypatch):
    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "pretrain": {"max_steps": 2, "eval_every": 0, "batch_size": 8},
            "csft": {"max_steps": 2, "eval_every": 2, "batch_size": 8, "queue_size": 16}, "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", "ciubm_csft"), seeds=(0,), folds=1, epochs=1,
                                   show_progress=False, overrides=tiny)
    harness.run_results(config)
    monkeypatch.chdir(tmp_path)  # the same folders spelt relative to here: still the same run
    harness.run_results(harness.ResultsConfig(**{**vars(config), "out": "."}))
    changed = {**tiny, "csft": {**tiny["csft"], "max_steps": 3}}
    with pytest.raises(ValueError, match=r"csft was made with another configuration: max_steps \(recorded: 2, "
                                         r"this run: 3\); delete that folder"):
        harness.run_results(harness.ResultsConfig(**{**vars(config), "overrides": changed}))


def test_a_results_folder_moved_whole_keeps_its_finished_stages_and_runs(tmp_path):
    import shutil

    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "pretrain": {"max_steps": 2, "eval_every": 0, "batch_size": 8}, "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path / "first"), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", "ciubm_pretrained"), seeds=(0,), folds=1, epochs=1,
                                   show_progress=False, overrides=tiny)
    report = harness.run_results(config)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    stage = tmp_path / "moved" / "item-cold" / "rating" / "fold0" / "pretrain" / "metrics.json"
    finished = stage.stat().st_mtime_ns
    again = harness.run_results(harness.ResultsConfig(**{**vars(config), "out": str(tmp_path / "moved")}))
    assert again["protocols"] == report["protocols"] and stage.stat().st_mtime_ns == finished  # reused, not rerun
    # a stage whose data is somewhere else than where the run recorded it (relative to the stage) is another run
    moved_data = tmp_path / "moved" / "item-cold" / "rating" / "fold0" / "data"
    shutil.copytree(moved_data, tmp_path / "elsewhere")
    from mim_hf.common.checkpoints import config_differences
    from mim_hf.common.config import config_from_dict
    from mim_hf.pretrain.train import PretrainConfig

    recorded = json.loads((stage.parent / "config.json").read_text())
    elsewhere = config_from_dict(PretrainConfig, {**recorded, "output_dir": str(stage.parent),
                                                  "data_dir": str(tmp_path / "elsewhere")})
    assert [d.split(" ")[0] for d in config_differences(recorded, elsewhere)] == ["data_dir"]


def _one_protocol_report(protocol, rows, seeds=(0, 1)):

    from mim_hf.results.harness import ResultsConfig
    from mim_hf.results.report import build_report

    def run(auc):
        return {"test": {"overall": {"auc": auc, "gauc": auc, "logloss": 0.6, "n": 10}}, "timings_s": {"total": 1.0},
                "commit": f"commit-{protocol}"}

    setting = dict.fromkeys(tuning.TUNED_FIELDS, 0)
    folds = {protocol: {0: {m: {"setting": setting, "valid_auc_by_setting": {}, "runs": {s: run(a + s / 100) for s in seeds}}
                            for m, a in rows.items()}}}
    config = ResultsConfig(folds=5, fold_limit=1, seeds=seeds, epochs=1, world="synthetic")
    return build_report(config, folds, wall_time_s=1.0)


def test_an_earlier_reports_protocols_are_carried_with_their_provenance_and_the_new_ones_win(tmp_path):
    from mim_hf.results.report import carry_protocols, markdown, write_report

    earlier = _one_protocol_report("temporal/rating", {"din": 0.6, "ciubm_csft": 0.62})
    stale = _one_protocol_report("item-cold/rating", {"din": 0.5, "ciubm_csft": 0.5})
    earlier = carry_protocols(earlier, stale)  # an earlier report that already carried one
    docs = tmp_path / "docs"
    write_report(earlier, tmp_path / "a", docs)
    now = _one_protocol_report("item-cold/rating", {"din": 0.7, "ciubm_csft": 0.72, "ciubm_csft+simtier": 0.73})
    written = write_report(now, tmp_path / "b", docs, keep_docs_protocols=True)
    on_disk = json.loads((docs / "results.json").read_text())
    assert list(on_disk["protocols"]) == ["temporal/rating", "item-cold/rating"]  # protocol order, not arrival order
    assert on_disk["protocols"]["item-cold/rating"]["din"]["overall"]["auc"] == pytest.approx(0.705)  # this run's
    assert on_disk["carried"] == {"temporal/rating": {"commit": earlier["commit"], "run_commits": ["commit-temporal/rating"],
                                                      "compute_time_s": 4.0, "config_digest": earlier["config_digest"]}}
    assert "item-cold/rating" not in on_disk["protocols_missing"] and "temporal/rating" not in on_disk["protocols_missing"]
    assert written == on_disk
    md = (docs / "results.md").read_text()
    assert "*Carried from the report written at commit" in md
    assert "not run" in markdown(written, [])  # the lever ran under one protocol only: the summary says so
    # without the flag the docs hold this invocation's protocols only
    assert list(write_report(now, tmp_path / "c", docs)["protocols"]) == ["item-cold/rating"]


def test_protocols_of_a_report_made_under_another_protocol_are_not_carried():
    from mim_hf.results.report import carry_protocols

    earlier = _one_protocol_report("temporal/rating", {"din": 0.6}, seeds=(0, 1, 2))
    with pytest.raises(ValueError, match=r"seeds: \[0, 1, 2\] there, \[0, 1\] here"):
        carry_protocols(_one_protocol_report("item-cold/rating", {"din": 0.7}), earlier)
    other_configs = {**_one_protocol_report("temporal/rating", {"din": 0.6}), "config_digest": "0123456789abcdef"}
    with pytest.raises(ValueError, match="config_digest: '0123456789abcdef' there"):
        carry_protocols(_one_protocol_report("item-cold/rating", {"din": 0.7}), other_configs)


def test_the_config_digest_follows_the_shipped_configs_and_overrides_but_not_thread_counts():
    from mim_hf.results.report import config_digest

    shipped = config_digest("movielens-100k", {})
    assert len(shipped) == 16 and shipped != config_digest("synthetic", {})
    assert config_digest("movielens-100k", {"ctr": {"num_threads": 1}, "pretrain": {"num_threads": 1}}) == shipped
    assert config_digest("movielens-100k", {"ctr": {"epochs": 9}}) != shipped
    # an override equal to what every shipped CTR config says is no change: the digest is of the configs in effect
    assert config_digest("movielens-100k", {"ctr": {"dropout": 0.1}}) == shipped
    assert config_digest("movielens-100k", {}, epochs=5) not in (shipped, config_digest("movielens-100k", {}, epochs=10))


def test_a_run_digest_names_the_epoch_cap_it_trains_under():
    from mim_hf.results.harness import ResultsConfig
    from mim_hf.results.report import config_digest, run_digest

    assert ResultsConfig().epoch_cap == tuning.budget("small")["epochs"] and ResultsConfig(epochs=7).epoch_cap == 7
    # `--epochs` equal to the budget's cap is the same run: the digest is of the cap in effect
    assert run_digest(ResultsConfig()) == run_digest(ResultsConfig(epochs=ResultsConfig().epoch_cap))
    assert run_digest(ResultsConfig(budget="full")) == config_digest("movielens-100k", {}, epochs=10)


def test_threads_reach_every_stage_unless_a_stage_sets_its_own_and_leave_the_digest():
    from mim_hf.results.harness import ResultsConfig
    from mim_hf.results.report import run_digest

    config = ResultsConfig(threads=1, overrides={"ctr": {"num_threads": 2, "dropout": 0.2}})
    assert config.stage_overrides("pretrain") == {"num_threads": 1} == config.stage_overrides("csft")
    assert config.stage_overrides("ctr") == {"num_threads": 2, "dropout": 0.2}
    assert ResultsConfig().stage_overrides("csft") == {}
    assert run_digest(ResultsConfig(threads=1)) == run_digest(ResultsConfig())
    with pytest.raises(ValueError, match="threads and lever_folds must be >= 0; got 0, 0, -1, 0"):
        ResultsConfig(threads=-1).validate()


def test_rows_are_carried_beside_rows_that_reproduce_the_earlier_report_and_refused_otherwise():
    from mim_hf.results.report import carry_protocols, markdown

    earlier = _one_protocol_report("temporal/rating", {"din": 0.6, "ciubm_csft": 0.62, "content_feature": 0.61})
    again = _one_protocol_report("temporal/rating", {"din": 0.6, "ciubm_csft": 0.62, "ciubm_csft+simtier": 0.64})
    out = carry_protocols(again, earlier)
    assert list(out["protocols"]["temporal/rating"]) == ["din", "ciubm_csft", "content_feature", "ciubm_csft+simtier"]
    assert out["paired"]["temporal/rating"]["content_feature"] == earlier["paired"]["temporal/rating"]["content_feature"]
    assert out["carried_rows"]["temporal/rating"]["rows"] == ["content_feature"]
    assert "are carried from the report written at commit" in markdown(out, [])
    drifted = _one_protocol_report("temporal/rating", {"din": 0.601, "ciubm_csft+simtier": 0.64})
    with pytest.raises(ValueError, match=r"row din is not reproduced \(AUC 0.60500"):
        carry_protocols(drifted, earlier)


def test_keeping_an_incompatible_earlier_report_is_refused_before_any_run(tmp_path):
    from mim_hf.results import harness

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.json").write_text(json.dumps(_one_protocol_report("temporal/rating", {"din": 0.6}, seeds=(0, 1, 2))))
    config = harness.ResultsConfig(out=str(tmp_path / "out"), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din",), seeds=(0, 1), folds=5, docs_dir=str(docs),
                                   keep_docs_protocols=True, show_progress=False)
    with pytest.raises(ValueError, match="seeds"):
        harness.run_results(config)
    assert not (tmp_path / "out").exists()


def test_an_archive_keeps_every_run_and_a_fresh_out_rebuilds_the_report_without_training(tmp_path, monkeypatch):
    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "pretrain": {"max_steps": 2, "eval_every": 0, "batch_size": 8}, "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path / "out"), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", "ciubm_pretrained"), seeds=(0, 1), folds=1, epochs=1,
                                   show_progress=False, overrides=tiny, archive=str(tmp_path / "archive"))
    report = harness.run_results(config)
    fold = Path("item-cold") / "rating" / "fold0" / "results"
    stored = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out" / fold).rglob("*.json"))
    digest = report["config_digest"]
    archived = sorted(p.relative_to(tmp_path / "archive" / digest).as_posix()
                      for p in (tmp_path / "archive").rglob("*.json") if p.name != harness.ARCHIVE_INPUTS)
    assert (tmp_path / "archive" / digest / harness.ARCHIVE_INPUTS).exists()  # what those runs trained from
    rates = len(tuning.BUDGETS["small"]["grid"]["learning_rate"])
    assert archived == stored and len(stored) == 2 * (rates + 1)  # 2 models × (the rates on seed 0 + the chosen on seed 1)

    def no_training(*args, **kwargs):
        raise AssertionError("an archived result was recomputed")

    def no_encoder_stage(*args, build=True, **kwargs):
        if build:  # checking the finished stages on disk is allowed (a fresh out has none)
            raise AssertionError("an encoder stage ran although every run is archived")
        return {}

    monkeypatch.setattr(harness, "_train_one", no_training)
    monkeypatch.setattr(harness, "_encoder_chain", no_encoder_stage)
    fresh = harness.run_results(dataclasses.replace(config, out=str(tmp_path / "fresh")))
    assert fresh["protocols"] == report["protocols"]
    assert not (tmp_path / "fresh" / "item-cold" / "rating" / "fold0" / "pretrain").exists()
    # runs under other configs are archived under their own digest: nothing archived is reused for them
    other = {**tiny, "ctr": {**tiny["ctr"], "max_grad_norm": 0.5}}
    with pytest.raises(AssertionError, match="recomputed"):
        harness.run_results(dataclasses.replace(config, out=str(tmp_path / "other"), overrides=other))
    # and a result stored in out under other configs or another epoch cap is refused, not reused
    with pytest.raises(ValueError, match="was made under other shipped configs, --set values or epoch cap"):
        harness.run_results(dataclasses.replace(config, out=str(tmp_path / "fresh"), overrides=other))
    with pytest.raises(ValueError, match="was made under other shipped configs, --set values or epoch cap"):
        harness.run_results(dataclasses.replace(config, out=str(tmp_path / "fresh"), epochs=2))


def test_a_run_archived_under_other_configs_is_reused_when_every_config_it_reads_is_the_same(tmp_path, monkeypatch):
    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "pretrain": {"max_steps": 2, "eval_every": 0, "batch_size": 8}, "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path / "out"), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", "ciubm_pretrained"), seeds=(0,), folds=1, epochs=1,
                                   show_progress=False, overrides=tiny, archive=str(tmp_path / "archive"))
    first = harness.run_results(config)
    assert harness.read_archive_inputs(tmp_path / "archive" / first["config_digest"])["configs"]
    # pre-training changes: DIN-ID reads no encoder, so its runs are the first invocation's
    trained, train_one = [], harness._train_one
    monkeypatch.setattr(harness, "_train_one", lambda c, r, n, model, *a: trained.append(model) or train_one(c, r, n, model, *a))
    changed = dataclasses.replace(config, out=str(tmp_path / "changed"),
                                  overrides={**tiny, "pretrain": {**tiny["pretrain"], "max_steps": 3}})
    second = harness.run_results(changed)
    assert second["config_digest"] != first["config_digest"]
    assert set(trained) == {"ciubm_pretrained"}
    din = sorted((tmp_path / "archive" / second["config_digest"]).rglob("din/*/seed0.json"))
    assert din and all(json.loads(p.read_text())["config_digest"] == first["config_digest"] for p in din)
    assert second["protocols"]["item-cold/rating"]["din"] == first["protocols"]["item-cold/rating"]["din"]
    # the copies in the new out are accepted on the same grounds when that out is resumed
    trained.clear()
    assert harness.run_results(changed)["protocols"] == second["protocols"] and trained == []
    # a CTR change reaches every row: nothing is reused
    ctr_changed = {**tiny, "ctr": {**tiny["ctr"], "max_grad_norm": 0.5}}
    harness.run_results(dataclasses.replace(config, out=str(tmp_path / "ctr"), overrides=ctr_changed))
    assert trained == ["din"] * len(tuning.BUDGETS["small"]["grid"]["learning_rate"]) + ["ciubm_pretrained"] * len(
        tuning.BUDGETS["small"]["grid"]["learning_rate"])
    # an edited configs.json is refused, naming the file
    inputs = tmp_path / "archive" / first["config_digest"] / harness.ARCHIVE_INPUTS
    inputs.write_text(inputs.read_text().replace('"max_steps": 2', '"max_steps": 4'))
    with pytest.raises(ValueError, match="configs.json hashes to .* not to its folder's name"):
        harness.run_results(dataclasses.replace(changed, out=str(tmp_path / "again")))


def test_a_lever_adopted_into_a_shipped_config_brings_its_archived_runs_under_the_plain_name(tmp_path, monkeypatch):
    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "pretrain": {"max_steps": 2, "eval_every": 0, "batch_size": 8},
            "csft": {"max_steps": 2, "eval_every": 2, "batch_size": 8, "queue_size": 16}, "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path / "out"), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", "ciubm_csft", "ciubm_csft+cooccurrence_pairs"), seeds=(0,), folds=1, epochs=1,
                                   show_progress=False, overrides=tiny, archive=str(tmp_path / "archive"))
    first = harness.run_results(config)
    # the C-SFT config now ships co-occurrence pairs: its plain row is the first invocation's lever row
    adopted = {**tiny, "csft": {**tiny["csft"], "pair_source": "cooccurrence"}}
    trained, train_one = [], harness._train_one
    monkeypatch.setattr(harness, "_train_one", lambda c, r, n, model, *a: trained.append(model) or train_one(c, r, n, model, *a))
    second = harness.run_results(dataclasses.replace(config, out=str(tmp_path / "adopted"), overrides=adopted,
                                                     models=("din", "ciubm_csft", "ciubm_csft+behaviour_pairs")))
    assert second["config_digest"] != first["config_digest"]
    # the lever row ran at the base row's chosen setting only: the plain row trains the grid's others
    rates = len(tuning.BUDGETS["small"]["grid"]["learning_rate"])
    assert trained == ["ciubm_csft"] * (rates - 1)
    # the config left pair_source out (its default, behaviour): that row is ciubm_csft+behaviour_pairs now
    assert second["protocols"]["item-cold/rating"]["ciubm_csft+behaviour_pairs"] == first["protocols"]["item-cold/rating"]["ciubm_csft"]
    setting = first["settings"]["item-cold/rating"]["ciubm_csft+cooccurrence_pairs"]["fold0"]
    fold = Path("item-cold") / "rating" / "fold0" / "results"
    before = json.loads((tmp_path / "archive" / first["config_digest"] / fold / "ciubm_csft+cooccurrence_pairs"
                         / tuning.setting_id(setting) / "seed0.json").read_text())
    after = json.loads((tmp_path / "archive" / second["config_digest"] / fold / "ciubm_csft"
                        / tuning.setting_id(setting) / "seed0.json").read_text())
    assert after == {**before, "model": "ciubm_csft", "trained_as": "ciubm_csft+cooccurrence_pairs"}
    # a row is not reused from a row that trains from anything else: another C-SFT field
    trained.clear()
    other = {**adopted, "csft": {**adopted["csft"], "max_steps": 3}}
    harness.run_results(dataclasses.replace(config, out=str(tmp_path / "other"), overrides=other,
                                            models=("din", "ciubm_csft")))
    assert trained == ["ciubm_csft"] * len(tuning.BUDGETS["small"]["grid"]["learning_rate"])


def test_row_inputs_apply_the_levers_fields_and_two_levers_may_not_set_one_field():
    from mim_hf.results.harness import row_digest, row_inputs
    from mim_hf.results.levers import parse_model
    from mim_hf.results.report import digest_inputs

    inputs = digest_inputs("movielens-100k", {})
    rows = {m: row_inputs(inputs, "movielens-100k", "temporal/rating", m)
            for m in ("ciubm_csft", "ciubm_csft+simtier", "ciubm_csft+no_anchor", "ciubm_csft+raw_channel")}
    assert rows["ciubm_csft+simtier"]["configs"]["ctr_ml100k_temporal_ciubm_csft.yaml"]["model_overrides"] == {
        **rows["ciubm_csft"]["configs"]["ctr_ml100k_temporal_ciubm_csft.yaml"]["model_overrides"],
        "histogram_kind": "simtier", "histogram_n_bins": 20}
    assert rows["ciubm_csft+no_anchor"]["configs"]["csft_ml100k.yaml"]["anchor_weight"] == 0.0
    assert rows["ciubm_csft+raw_channel"]["channels"] == ["raw"] and rows["ciubm_csft"]["channels"] == []
    digest = lambda m: row_digest(inputs, "movielens-100k", "temporal/rating", m)  # noqa: E731
    assert len({digest(m) for m in rows}) == len(rows)
    # a "setting" lever changes the setting, which names each run, not what the row trains from
    assert digest("ciubm_csft+id_dropout_high") == digest("ciubm_csft")
    # same configs, different model: never the same runs
    assert digest("ciubm_pretrained") != digest("ciubm_raw") and digest("din") != digest("fuxictr_din")
    # a field a config leaves out is that field at its default: writing it out changes nothing
    written = {**inputs, "configs": {**inputs["configs"], "csft_ml100k.yaml": {
        **inputs["configs"]["csft_ml100k.yaml"], "hard_negative_source": "field"}}}
    assert "hard_negative_source" not in inputs["configs"]["csft_ml100k.yaml"]
    assert row_digest(written, "movielens-100k", "temporal/rating", "ciubm_csft") == digest("ciubm_csft")
    with pytest.raises(ValueError, match=r"set the same field \(\[\('csft', 'pair_source'\)\]\)"):
        parse_model("ciubm_csft+behaviour_pairs+id_aligned_pairs")


def test_row_files_are_the_configs_a_row_reads():
    from mim_hf.results.harness import row_files

    assert row_files("movielens-100k", "item-cold/implicit", "fuxictr_din") == {"ctr_ml100k_item_cold_din.yaml"}
    assert row_files("movielens-100k", "temporal/rating", "ciubm_raw") == {
        "ctr_ml100k_temporal_ciubm_pretrained.yaml", "pretrain_ml100k.yaml"}
    assert row_files("synthetic", "temporal/rating", "ciubm_csft+simtier") == {
        "ctr_synthetic_ciubm_csft.yaml", "pretrain_synthetic.yaml", "csft_synthetic.yaml"}


def test_the_readme_results_table_is_the_committed_reports_headline():
    from mim_hf.results.report import headline_table

    root = Path(__file__).resolve().parents[1]
    table = headline_table(json.loads((root / "docs" / "results.json").read_text()))
    assert table in (root / "README.md").read_text(), "README's results table differs from docs/results.json"


def test_lever_folds_run_lever_rows_in_the_first_item_folds_only_and_the_report_says_so(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from mim_hf.results import harness
    from mim_hf.results.report import CENTER_ON_VALID

    config = harness.ResultsConfig(
        out=str(tmp_path), world="synthetic", protocols=("item-cold/rating",),
        models=("din", "ciubm_pretrained", "ciubm_csft", "ciubm_csft+simtier", "ciubm_csft+cooccurrence_pairs"),
        seeds=(0, 1), folds=3, lever_folds=1, epochs=1, show_progress=False, docs_dir=None,
        overrides={"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12}})
    assert config.fold_models("item-cold/rating", 0) == config.models
    assert config.fold_models("item-cold/rating", 2) == ("din", "ciubm_pretrained", "ciubm_csft")
    assert config.fold_models("temporal/rating", 0) == config.models
    valid = {"din": 0.6, "ciubm_pretrained": 0.7, "ciubm_csft": 0.65, "ciubm_csft+simtier": 0.9,
             "ciubm_csft+cooccurrence_pairs": 0.99}
    trained = []

    def fake_training(config, root, names, model, setting, seed, centers, epochs):  # no encoder stage is built
        trained.append((root.name, model))
        auc = valid[model] + 0.001 * seed
        table = {"overall": {"auc": auc, "gauc": auc, "logloss": 0.6, "n": 10}}
        return {"model": model, "seed": seed, "setting": setting, "valid": table, "test": table,
                "training": {}, "timings_s": {"total": 1.0}}

    monkeypatch.setattr(harness, "_train_one", fake_training)
    report = harness.run_results(config)
    assert {f for f, m in trained if "+" in m} == {"fold0"}
    assert {f for f, m in trained if m == "din"} == {"fold0", "fold1", "fold2"}
    assert len(trained) == harness.total_runs(config)
    rows = report["protocols"]["item-cold/rating"]
    assert rows["ciubm_csft+simtier"]["runs"] == 2 and rows["ciubm_csft"]["runs"] == 6
    assert report["row_folds"]["item-cold/rating"] == {"ciubm_csft+simtier": [0], "ciubm_csft+cooccurrence_pairs": [0]}
    assert report["levers"]["item-cold/rating"]["ciubm_csft+simtier"]["n_pairs"] == 2  # fold 0's seeds only
    # the center chosen on valid picks among the rows of every fold, never a fold-0-only lever row
    assert set(report["center_on_valid"]["item-cold/rating"].values()) == {"ciubm_pretrained"}
    assert rows[CENTER_ON_VALID]["overall"]["auc"] == pytest.approx(rows["ciubm_pretrained"]["overall"]["auc"])
    assert "ran in fold(s) 0 only (`--lever-folds`)" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="lever_folds"):
        harness.ResultsConfig(lever_folds=-1).validate()


def test_a_center_is_built_with_only_the_stages_behind_it_when_a_run_first_needs_it(tmp_path, monkeypatch):
    from mim_hf.results import harness

    tiny = {"world": {"n_users": 30, "n_items": 40, "impressions_per_user": 12},
            "pretrain": {"max_steps": 2, "eval_every": 0, "batch_size": 8},
            "csft": {"max_steps": 2, "eval_every": 2, "batch_size": 8, "queue_size": 16}, "ctr": {"batch_size": 64}}
    config = harness.ResultsConfig(out=str(tmp_path), world="synthetic", protocols=("item-cold/rating",),
                                   models=("din", "ciubm_csft", "ciubm_csft+no_anchor", "ciubm_csft+cooccurrence_pairs"),
                                   seeds=(0,), folds=1, epochs=1, show_progress=False, overrides=tiny)
    real = harness._train_one

    def only_no_anchor_trains(config, root, names, model, setting, seed, centers, epochs):
        if model in ("din", "ciubm_csft+no_anchor"):  # the other rows stand for runs found in an archive
            return real(config, root, names, model, setting, seed, centers, epochs)
        table = {"overall": {"auc": 0.6, "gauc": 0.6, "logloss": 0.6, "n": 10}}
        return {"model": model, "seed": seed, "setting": setting, "valid": table, "test": table, "training": {},
                "timings_s": {"total": 0.0}}

    monkeypatch.setattr(harness, "_train_one", only_no_anchor_trains)
    harness.run_results(config)
    fold = tmp_path / "item-cold" / "rating" / "fold0"
    assert (fold / "centers" / "csft+no_anchor" / "CURRENT").exists() and (fold / "pretrain" / "metrics.json").exists()
    assert not (fold / "csft").exists() and not (fold / "csft+cooccurrence_pairs").exists()
