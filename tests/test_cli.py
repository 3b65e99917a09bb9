"""The command lines: stand-alone stage scripts, `mim-hf predict` / `recommend`, multi-process CPU
training, one-line errors and portable saved configs (docs/cli.md)."""

from __future__ import annotations

import json
import os
from collections import Counter
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mim_hf.cli import main
from mim_hf.cli_support import check_stage_inputs, run_stage, warn_if_single_process_on_cpu
from spawned_workers import free_port

REPO = Path(__file__).resolve().parents[1]
CTR_CONFIG = REPO / "training" / "configs" / "ctr_synthetic_ciubm_csft.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny item-cold synthetic world (its valid/test items are cold), a random-vector center and a
    CiUBM model trained for one epoch."""
    from mim_hf.center.store import RepresentationCenter
    from mim_hf.common.config import load_config
    from mim_hf.ctr.train import CTRTrainConfig, run
    from mim_hf.data import PreparedData, make_synthetic_world, prepare

    root = tmp_path_factory.mktemp("cli")
    data_dir = prepare(make_synthetic_world(n_users=30, n_items=40, impressions_per_user=12, seed=1),
                       protocol="item-cold", max_len=10).save(root / "data")
    prepared = PreparedData.load(data_dir)
    embeds = torch.nn.functional.normalize(torch.randn(len(prepared.items), 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    RepresentationCenter.build(prepared.items["item_id"], {"item_embeds": embeds}, root / "center",
                               encoder_name="random", encoder_fingerprint="sha256:cli", overwrite=True)
    config = load_config(CTRTrainConfig, CTR_CONFIG, dict(
        data_dir=str(data_dir), output_dir=str(root / "run"), center_path=str(root / "center"), max_len=10,
        epochs=1, batch_size=64, show_progress=False))
    run(config)
    return {"root": root, "data": data_dir, "center": root / "center", "model": root / "run" / "model",
            "prepared": prepared}


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as caught:
        main([str(a) for a in argv])
    message = str(caught.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


# ---- 4. stage commands stand alone -------------------------------------------------------------
def test_stage_script_on_a_fresh_clone_names_the_command_that_makes_each_missing_input(trained, tmp_path):
    # the shipped config's folders do not exist in a fresh checkout: a one-line error naming the command
    result = subprocess.run([sys.executable, str(REPO / "training" / "train_ctr.py"), "--config", str(CTR_CONFIG)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: data_dir 'data/synthetic/temporal' does not exist")
    assert "mim-hf data prepare --dataset synthetic|movielens-100k --out data/synthetic" in result.stderr
    assert "Traceback" not in result.stderr

    from mim_hf.csft.train import CSFTConfig
    from mim_hf.ctr.train import CTRTrainConfig, run

    argv = ["--config", str(CTR_CONFIG), "--data-dir", str(trained["data"]), "--center", str(tmp_path / "c")]
    with pytest.raises(SystemExit, match=r"center_path '.*/c' does not exist .*`mim-hf center build --encoder"):
        run_stage(CTRTrainConfig, run, "", argv)
    with pytest.raises(SystemExit, match=r"encoder_path 'runs/pre/encoder' does not exist .*training/pretrain.py"):
        run_stage(CSFTConfig, run, "", ["--data-dir", str(trained["data"]), "--encoder-path", "runs/pre/encoder"])
    with pytest.raises(SystemExit, match=r"no data_dir: pass --data-dir DIR"):
        run_stage(CTRTrainConfig, run, "", [])
    with pytest.raises(ValueError, match=r"data_dir .* is not a prepared-data folder"):
        check_stage_inputs(CTRTrainConfig(data_dir=str(tmp_path)))
    # the shipped configs no longer point into the quickstart's folders
    for config in (REPO / "training" / "configs").glob("*.yaml"):
        assert "runs/quickstart" not in config.read_text(), config.name


# ---- 6. multi-process on CPU -----------------------------------------------------------------------
def test_train_ctr_script_runs_end_to_end_in_two_cpu_processes(trained, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO / "training" / "train_ctr.py"), "--config", str(CTR_CONFIG), "--data-dir", str(trained["data"]),
               "--center", str(trained["center"]), "--output-dir", str(out), "--max-len", "10", "--epochs", "1",
               "--batch-size", "64", "--show-progress", "false"]
    # own process group: on the deadline the launcher AND its workers are killed, none is left behind
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        _, stderr = launcher.communicate()
        pytest.fail(f"2-process training still running after 180 s; killed. stderr: {stderr[-3000:]}")
    assert launcher.returncode == 0, stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["num_processes"] == 2
    assert metrics["test"]["overall"]["n"] == len(trained["prepared"].samples["test"])
    assert (out / "model" / "model.safetensors").is_file()


def test_accelerate_single_process_on_cpu_is_named_with_what_to_run_instead(capsys):
    launched = {"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    warning = warn_if_single_process_on_cpu(launched)  # accelerate launch --num_processes 2 (no --multi_gpu)
    assert "ONE process" in warning and "torchrun --nproc_per_node N" in warning and "--multi_gpu" in warning
    assert warning in capsys.readouterr().err
    assert warn_if_single_process_on_cpu({**launched, "WORLD_SIZE": "2"}) is None  # a real multi-process launch
    assert warn_if_single_process_on_cpu({}) is None  # plain python


# ---- 5. scoring and recommending --------------------------------------------------------------
def test_predict_scores_a_request_file_filling_histories_from_the_data_dir(trained, tmp_path, capsys):
    from mim_hf.ctr.predict import load_ctr_model, predict

    prepared = trained["prepared"]
    test = prepared.samples["test"].select(range(4))
    rows = [{"user_id": r["user_id"], "item_id": r["item_id"]} for r in test]
    rows[0]["behavior_item_ids"] = list(test[0]["behavior_item_ids"])  # given in the file
    rows.append({"user_id": "nobody", "item_id": rows[1]["item_id"]})  # no history anywhere: counted
    rows.append({"user_id": rows[1]["user_id"], "item_id": "no-such-item"})  # unknown item: counted
    request = tmp_path / "req.jsonl"
    request.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = _cli(["predict", "--model", trained["model"], "--data", request, "--out", tmp_path / "s.csv",
                         "--data-dir", trained["data"], "--quiet"], capsys)
    assert code == 0
    assert "scored 6 rows" in err and "rows_without_history=1" in err and "unknown_target_items=" in err
    scores = pd.read_csv(tmp_path / "s.csv", dtype={"user_id": str, "item_id": str})
    assert list(scores.columns) == ["user_id", "item_id", "score"] and len(scores) == 6

    # the same as predict() on samples whose histories are the users' positives in the data dir
    bundle = load_ctr_model(trained["model"])
    frames = [s.to_pandas() for s in prepared.samples.values()]
    log = pd.concat(frames).sort_values("timestamp", kind="stable")
    history = {u: g.loc[g["label"] == 1, "item_id"].tolist() for u, g in log.groupby("user_id")}
    from datasets import Dataset

    expected_rows = [{**r, "behavior_item_ids": r.get("behavior_item_ids", history.get(r["user_id"], []))} for r in rows]
    expected = predict(bundle, Dataset.from_list(expected_rows), items=prepared.items)
    np.testing.assert_allclose(scores["score"].to_numpy(), expected, rtol=1e-6)

    # CSV requests (histories space-separated) give the same scores as JSONL
    csv = tmp_path / "req.csv"
    pd.DataFrame([{**r, "behavior_item_ids": " ".join(r["behavior_item_ids"])} for r in expected_rows]).to_csv(csv, index=False)
    _cli(["predict", "--model", trained["model"], "--data", csv, "--out", tmp_path / "s.parquet",
          "--data-dir", trained["data"], "--quiet"], capsys)
    np.testing.assert_allclose(pd.read_parquet(tmp_path / "s.parquet")["score"].to_numpy(), expected, rtol=1e-6)


def test_recommend_ranks_unseen_items_cold_ones_by_content(trained, tmp_path, capsys):
    from mim_hf.ctr.predict import load_ctr_model
    from mim_hf.ctr.recommend import recommend, user_histories

    prepared = trained["prepared"]
    bundle = load_ctr_model(trained["model"])
    user = prepared.samples["train"][0]["user_id"]
    seen = user_histories(prepared, [user])[user].seen_item_ids
    full = recommend(bundle, prepared, user, k=1000)
    assert {item for item, _ in full} == set(bundle.center.item_ids()) - seen
    assert [s for _, s in full] == sorted((s for _, s in full), reverse=True)
    cold = [i for i, _ in full if i not in bundle.vocabs["item_id"]]
    assert cold, "the item-cold world has candidates the model's ID vocabulary lacks"

    code, out, err = _cli(["recommend", "--model", trained["model"], "--data-dir", trained["data"], "--user-id", user,
                           "--k", 3, "--json"], capsys)
    assert code == 0 and [r["item_id"] for r in json.loads(out)] == [i for i, _ in full[:3]]
    assert f"ranked {len(full)} candidates" in err and f"{len(cold)} of them cold" in err

    candidates = tmp_path / "cands.txt"
    candidates.write_text(f"{cold[0]}\n{full[0][0]}\n")
    code, out, _ = _cli(["recommend", "--model", trained["model"], "--data-dir", trained["data"], "--user-id", user,
                         "--candidates", candidates], capsys)
    assert [line.split()[1] for line in out.strip().splitlines()] == [full[0][0], cold[0]]

    candidates.write_text("ghost-item\n")
    assert "unknown to the model and have no content in its center, e.g. ['ghost-item']" in _error_of(
        ["recommend", "--model", trained["model"], "--data-dir", trained["data"], "--user-id", user,
         "--candidates", candidates], capsys)
    assert "user 'nobody' has no interactions in the prepared data" in _error_of(
        ["recommend", "--model", trained["model"], "--data-dir", trained["data"], "--user-id", "nobody"], capsys)


def test_recommend_with_an_id_only_model_leaves_out_items_it_cannot_score(trained, tmp_path):
    from mim_hf.common.config import load_config
    from mim_hf.ctr.predict import load_ctr_model
    from mim_hf.ctr.recommend import recommend
    from mim_hf.ctr.train import CTRTrainConfig, run

    run(load_config(CTRTrainConfig, REPO / "training" / "configs" / "ctr_synthetic_din.yaml", dict(
        data_dir=str(trained["data"]), output_dir=str(tmp_path / "din"), max_len=10, epochs=1, show_progress=False)))
    bundle, prepared = load_ctr_model(tmp_path / "din" / "model"), trained["prepared"]
    stats = Counter()
    ranked = recommend(bundle, prepared, prepared.samples["train"][0]["user_id"], k=1000, stats=stats)
    assert stats["unscorable_skipped"] > 0  # the held-out (cold) items: no ID, no content
    assert all(item in bundle.vocabs["item_id"] for item, _ in ranked)


# ---- 7. polish ---------------------------------------------------------------------------------------
def test_cli_errors_are_one_line_and_debug_shows_the_traceback(trained, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    argv = ["predict", "--model", trained["model"], "--data", missing, "--out", tmp_path / "s.csv"]
    assert f"'{missing}' does not exist" in _error_of(argv, capsys)
    with pytest.raises(ValueError, match="does not exist"):
        main([str(a) for a in argv] + ["--debug"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"user": "u1", "item_id": "i1"}) + "\n")
    assert "lacks column(s) ['user_id']" in _error_of(
        ["predict", "--model", trained["model"], "--data", bad, "--out", tmp_path / "s.csv"], capsys)
    assert "has no stats.json" in _error_of(["data", "stats", tmp_path], capsys)
    assert "no-center" in _error_of(["center", "info", tmp_path / "no-center"], capsys)
    assert "'--data' does not exist" not in _error_of(
        ["center", "build", "--encoder", tmp_path / "enc", "--data", tmp_path / "d", "--out", tmp_path / "c"], capsys)


def test_saved_model_config_and_card_hold_no_absolute_local_path(trained):
    from mim_hf.common.cards import ctr_card
    from mim_hf.ctr.predict import load_ctr_model

    text = (trained["model"] / "config.json").read_text()
    config = json.loads(text)
    assert config["center_repo"] == "../../center" and str(trained["root"]) not in text
    metrics = json.loads((trained["model"].parent / "metrics.json").read_text())
    card = str(ctr_card(config, "org/ciubm", metrics))
    assert str(trained["root"]) not in card and "/home/" not in card
    # the relative record is resolved against the model folder, wherever the command runs
    assert load_ctr_model(trained["model"]).center.fingerprint == "sha256:cli"


def test_pushing_a_model_whose_center_is_a_relative_local_path_asks_for_the_center_repo(trained, hub_server):
    from mim_hf.ctr.hub import push_ctr_model

    with pytest.raises(ValueError, match=r"center_repo is the local path '\.\./\.\./center'; push that center"):
        push_ctr_model(trained["model"], f"{hub_server.user}/cli-ctr")
