"""Push a trained CTR model to the Hugging Face Hub and load it back (with its center).

    push_ctr_model(dir, repo_id, center_repo_id="org/center")   # the center must be pushed first
    bundle = load_ctr_from_hub(repo_id)   # = mim_hf.ctr.predict.load_ctr_model(repo_id)

The pushed ``config.json`` names the center's dataset repo and pins its revision to a commit
sha; loading opens exactly that center and checks it in :func:`mim_hf.ctr.predict.attach_center`
(the one place the fingerprint is checked, for local and Hub models alike).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo

from mim_hf.common import cards as hub_cards
from mim_hf.common.hub import (
    _SAFE_LOAD,
    CARD_FILE,
    _artefact_dir,
    _check_repo_id,
    _commit,
    _folder_operations,
    _hub_errors,
    _metrics_for,
    _model_snapshot,
    _prepare_push,
    _read_json,
    _remote_code_files,
    resolve_revision,
)

logger = logging.getLogger(__name__)


def _needs_center(config: Mapping[str, Any]) -> bool:
    """Whether the model reads content embeddings (every mode but plain DIN on a DIN base)."""
    return not (config.get("mode") == "din" and config.get("base", "din") == "din")


def _center_metadata(center_repo: str, revision: str | None, token: str | None) -> tuple[str, dict]:
    """(commit sha, metadata.json) of a center dataset repo; ValueError if it is not there."""
    from huggingface_hub import hf_hub_download

    from mim_hf.center.store import METADATA_FILE

    action = "CTR model's Representation Center"
    _check_repo_id(center_repo)
    sha = None
    try:
        sha = resolve_revision(center_repo, revision, "dataset", token)
        with _hub_errors(action, center_repo, revision, "dataset"):
            path = hf_hub_download(center_repo, METADATA_FILE, repo_type="dataset", revision=sha, token=token)
    except ValueError as err:
        raise ValueError(f"the CTR model names center {center_repo!r} (revision {revision!r}), which cannot be "
                         f"used: {err}. Push the center first (push_center / `mim-hf push center`)") from None
    return sha, _read_json(Path(path))


def push_ctr_model(directory: str | os.PathLike, repo_id: str, *, center_repo_id: str | None = None,
                   center_revision: str | None = None, metrics=None, dataset_repo_id: str | None = None,
                   revision: str | None = None, private: bool | None = None, token: str | None = None,
                   commit_message: str | None = None, create_branch: bool = True, template_dir=None) -> CommitInfo:
    """Push a ``CiUBMForCTR`` saved with ``save_pretrained`` (vocabularies live in its config).

    The center it was trained with must already be on the Hub as a dataset repo:
    ``center_repo_id``/``center_revision`` (default: ``center_repo``/``center_revision`` of its
    config). The pushed ``config.json`` names that repo and pins the revision to a commit sha;
    the center's encoder fingerprint must equal the config's ``center_fingerprint`` (recorded
    from the center, with a log line, when the config has none) and its dim ``content_dim``.
    Plain DIN (mode and base "din") needs no center. ``dataset_repo_id``: the processed-data
    repo (``push_prepared``) to link in the card.
    """
    token = _prepare_push(repo_id, token)
    folder = _artefact_dir(directory, "CTR model", ("config.json",))
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "ciubm":
        raise ValueError(f"{folder / 'config.json'} has model_type {config.get('model_type')!r}, expected 'ciubm'")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} holds no *.safetensors weights; save the model with save_pretrained")
    center_repo = center_repo_id or config.get("center_repo")
    if center_repo is None and _needs_center(config):
        raise ValueError(f"CTR model in {folder} (mode {config.get('mode')!r}) reads content embeddings but names no "
                         f"center: pass center_repo_id='org/center' (--center-repo-id) after pushing the center")
    if center_repo is not None:
        if center_repo_id is None and (folder / center_repo).exists():  # absolute, or relative to the model folder
            raise ValueError(f"the CTR model's center_repo is the local path {center_repo!r}; push that center "
                             f"(push_center) and pass its repo id as center_repo_id")
        # The recorded revision belongs to the recorded center_repo (for a local center it is a
        # version folder like "v0001", not a Hub revision): only reuse it for that same repo.
        recorded_revision = config.get("center_revision") if center_repo_id in (None, config.get("center_repo")) else None
        sha, metadata = _center_metadata(center_repo, center_revision or recorded_revision, token)
        fingerprint = config.get("center_fingerprint")
        if fingerprint is None:
            logger.warning("CTR config names no center_fingerprint; recording %s from %s@%s",
                           metadata["encoder_fingerprint"], center_repo, sha)
            fingerprint = metadata["encoder_fingerprint"]
        elif fingerprint != metadata["encoder_fingerprint"]:
            raise ValueError(f"center {center_repo!r}@{sha[:12]} has encoder fingerprint "
                             f"{metadata['encoder_fingerprint']!r}, the CTR model was trained with {fingerprint!r}")
        if _needs_center(config) and int(metadata["embed_dim"]) != int(config.get("content_dim", -1)):
            raise ValueError(f"center {center_repo!r} is {metadata['embed_dim']}-d, the CTR model expects "
                             f"content_dim={config.get('content_dim')}")
        config = {**config, "center_repo": center_repo, "center_revision": sha, "center_fingerprint": fingerprint}
    metrics = _metrics_for(folder, metrics)
    card = hub_cards.ctr_card(config, repo_id, metrics, dataset_repo_id, template_dir)
    replaced = {CARD_FILE: str(card).encode(), "config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
                **_remote_code_files(folder, config)}
    return _commit(repo_id, "model", _folder_operations(folder, replaced), revision=revision, private=private,
                   token=token, create_branch=create_branch,
                   commit_message=commit_message or f"CiUBM CTR model (mode {config.get('mode')})")


def load_ctr_from_hub(repo_id: str, revision: str | None = None, token: str | None = None,
                      load_center: bool = True, center=None):
    """:class:`~mim_hf.ctr.predict.CTRBundle` of a pushed model: model + vocabularies + the
    Representation Center its config names at the pinned revision (or ``center``), checked.

    Raises ``ValueError`` when the named center repo / revision is not on the Hub or does not
    match the model (another encoder's fingerprint or dim).
    """
    import mim_hf  # noqa: F401  registers CiUBM with AutoModel
    from transformers import AutoModel

    from mim_hf.center.store import RepresentationCenter
    from mim_hf.ctr.predict import attach_center

    sha = resolve_revision(repo_id, revision, "model", token)
    model = AutoModel.from_pretrained(_model_snapshot(repo_id, sha, token), **_SAFE_LOAD).eval()
    config = model.config
    if load_center and center is None and config.center_repo is not None:
        center_sha, _ = _center_metadata(config.center_repo, config.center_revision, token)
        if Path(config.center_repo).exists():  # RepresentationCenter.load would open it instead of the Hub repo
            raise ValueError(f"CTR model {repo_id!r} names center repo {config.center_repo!r}, which is also a local path "
                             f"here ({Path(config.center_repo).resolve()}); a name from a Hub config never opens a "
                             "local folder: run from another directory")
        center = RepresentationCenter.load(config.center_repo, revision=center_sha, token=token)
    elif load_center and center is None and _needs_center(config.to_dict()):
        raise ValueError(f"CTR model {repo_id!r} (mode {config.mode!r}) reads content embeddings but its config names "
                         f"no center_repo; pass center= or load_center=False")
    return attach_center(model, center, repo_id, load_center)


__all__ = ["push_ctr_model", "load_ctr_from_hub"]
