"""Share the content encoder and its LoRA adapters on the Hugging Face Hub, and load them back.

    push_encoder(dir, repo_id)        saved MIMContentEncoder (+ its processor) -> model repo
    push_adapters(dir, repo_id)       LoRA adapters (mim_hf.encoder.lora.save_adapters) -> model repo

Each push writes one commit with a generated card and never writes into the local folder. The
Hub plumbing (repo checks, commits, snapshots, error messages) is ``mim_hf.common.hub``'s.
"""

from __future__ import annotations

import json
import os

from huggingface_hub import CommitInfo

from mim_hf.common import cards as hub_cards
from mim_hf.common.hub import (
    _SAFE_LOAD,
    CARD_FILE,
    _artefact_dir,
    _check_repo_id,
    _commit,
    _folder_operations,
    _metrics_for,
    _model_snapshot,
    _prepare_push,
    _read_json,
    _remote_code_files,
    _snapshot,
    resolve_revision,
)
from mim_hf.modeling.processing_mim_encoder import has_saved_processor

ADAPTERS_META_FILE = "mim_adapters.json"  # {"base_model": repo id, "base_revision": ...}


# ------------------------------------------------------------------------------------------
# content encoder
# ------------------------------------------------------------------------------------------
def push_encoder(directory: str | os.PathLike, repo_id: str, *, metrics=None, revision: str | None = None,
                 private: bool | None = None, token: str | None = None, commit_message: str | None = None,
                 create_branch: bool = True, template_dir=None) -> CommitInfo:
    """Push a ``MIMContentEncoder`` saved with ``save_pretrained`` (+ its processor, if saved there).

    The card is generated from ``config.json`` and ``metrics`` (path or dict; default
    ``<directory>/metrics.json``). Afterwards ``AutoModel.from_pretrained(repo_id)`` works with
    ``import mim_hf`` and with ``trust_remote_code=True`` alone. Returns the ``CommitInfo``.
    """
    token = _prepare_push(repo_id, token)
    folder = _artefact_dir(directory, "content encoder", ("config.json",))
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "mim_content_encoder":
        raise ValueError(f"{folder / 'config.json'} has model_type {config.get('model_type')!r}, expected "
                         f"'mim_content_encoder' (for a CTR model use push_ctr_model)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} holds no *.safetensors weights; save the encoder with save_pretrained")
    has_processor = has_saved_processor(folder)
    card = hub_cards.encoder_card(config, repo_id, _metrics_for(folder, metrics), has_processor, template_dir)
    replaced = {CARD_FILE: str(card).encode(), **_remote_code_files(folder, config)}
    return _commit(repo_id, "model", _folder_operations(folder, replaced), revision=revision, private=private,
                   token=token, create_branch=create_branch,
                   commit_message=commit_message or f"MIM content encoder ({config.get('embed_dim')}-d)")


def load_encoder_from_hub(repo_id: str, revision: str | None = None, token: str | None = None):
    """``(MIMContentEncoder, MIMContentProcessor | None)`` from a repo written by :func:`push_encoder`
    (safetensors weights and this package's classes only; the repo's own code is never run).
    The processor is also ``encoder.processor``."""
    from transformers import AutoModel

    sha = resolve_revision(repo_id, revision, "model", token)
    encoder = AutoModel.from_pretrained(_model_snapshot(repo_id, sha, token), **_SAFE_LOAD)
    return encoder, encoder.processor


# ------------------------------------------------------------------------------------------
# LoRA adapters
# ------------------------------------------------------------------------------------------
def push_adapters(directory: str | os.PathLike, repo_id: str, *, base_model: str | None = None,
                  base_revision: str | None = None, metrics=None, revision: str | None = None,
                  private: bool | None = None, token: str | None = None, commit_message: str | None = None,
                  create_branch: bool = True, template_dir=None) -> CommitInfo:
    """Push adapters written by ``mim_hf.encoder.lora.save_adapters`` (``<tower>/adapter_*`` + head).

    ``base_model``: Hub repo of the encoder the adapters apply to (default: ``base_model`` in
    ``<directory>/mim_adapters.json``); it must exist on the Hub (checked, its revision pinned
    to a commit sha). Each tower's ``adapter_config.json`` gets ``base_model_name_or_path`` /
    ``revision`` in the pushed copy.
    """
    token = _prepare_push(repo_id, token)
    folder = _artefact_dir(directory, "adapters folder", ())
    towers = {p.parent.name: _read_json(p) for p in sorted(folder.glob("*/adapter_config.json"))}
    if not towers:
        raise ValueError(f"{folder} holds no <tower>/adapter_config.json; write it with mim_hf.encoder.lora.save_adapters")
    saved_meta = _read_json(folder / ADAPTERS_META_FILE) if (folder / ADAPTERS_META_FILE).is_file() else {}
    base_model = base_model or saved_meta.get("base_model")
    base_revision = base_revision or saved_meta.get("base_revision")
    if not base_model:
        raise ValueError(f"adapters in {folder} name no base encoder: pass base_model='org/encoder' (--base-model), "
                         f"the Hub repo of the encoder they were trained on")
    _check_repo_id(base_model)
    base_sha = resolve_revision(base_model, base_revision, "model", token)
    replaced: dict[str, bytes] = {}
    for tower, adapter_config in towers.items():
        pushed = {**adapter_config, "base_model_name_or_path": base_model, "revision": base_sha}
        replaced[f"{tower}/adapter_config.json"] = json.dumps(pushed, indent=2, sort_keys=True).encode()
    replaced[ADAPTERS_META_FILE] = json.dumps({"base_model": base_model, "base_revision": base_sha,
                                               "towers": sorted(towers)}, indent=2).encode()
    card = hub_cards.adapters_card(towers, repo_id, base_model, base_sha, _metrics_for(folder, metrics), template_dir)
    replaced[CARD_FILE] = str(card).encode()
    return _commit(repo_id, "model", _folder_operations(folder, replaced), revision=revision, private=private,
                   token=token, create_branch=create_branch,
                   commit_message=commit_message or f"LoRA adapters ({', '.join(towers)}) for {base_model}")


def load_adapters_from_hub(repo_id: str, revision: str | None = None, *, base_model: str | None = None,
                           base_revision: str | None = None, token: str | None = None):
    """Base encoder (from the repo the adapters name, or ``base_model``) with the adapters and head loaded."""
    from transformers import AutoModel

    from mim_hf.encoder.lora import load_adapters

    sha = resolve_revision(repo_id, revision, "model", token)
    local = _snapshot(repo_id, sha, "model", token)
    meta = _read_json(local / ADAPTERS_META_FILE) if (local / ADAPTERS_META_FILE).is_file() else {}
    base_model = base_model or meta.get("base_model")
    if not base_model:
        raise ValueError(f"adapters repo {repo_id!r} names no base encoder ({ADAPTERS_META_FILE} missing); "
                         f"pass base_model=...")
    _check_repo_id(base_model)
    base_sha = resolve_revision(base_model, base_revision or meta.get("base_revision"), "model", token)
    encoder = AutoModel.from_pretrained(_model_snapshot(base_model, base_sha, token), **_SAFE_LOAD)
    return load_adapters(encoder, local)


__all__ = ["push_encoder", "load_encoder_from_hub", "push_adapters", "load_adapters_from_hub", "ADAPTERS_META_FILE"]
