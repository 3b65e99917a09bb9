"""Share a Representation Center on the Hugging Face Hub as a dataset repo (load: ``RepresentationCenter.load``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationDelete, HfApi

from mim_hf.center.layout import CARD_FILE, EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE, read_metadata
from mim_hf.center.versions import resolve_local
from mim_hf.common import cards as hub_cards
from mim_hf.common.hub import _artefact_dir, _ensure_branch, _folder_operations, _hub_errors, _prepare_push

CENTER_FILES = frozenset({EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE, CARD_FILE})


def push_center(center: Any, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str | None = None, create_branch: bool = True,
                template_dir=None) -> CommitInfo:
    """Push the live version of a center (a ``RepresentationCenter`` or its directory) as a dataset repo.

    Uploads the version's embeddings, index and metadata (flat layout; the checksums in
    metadata.json travel with them, so readers of the copy detect damage) and a card from
    ``hub_cards/center.md``, in one commit. Files of an earlier push that this version lacks are
    removed. Load with ``RepresentationCenter.load(repo_id, revision=...)``.
    """
    token = _prepare_push(repo_id, token)
    if isinstance(center, (str, os.PathLike)):
        version_dir, _ = resolve_local(_artefact_dir(center, "representation center", ()))
        metadata = read_metadata(Path(version_dir) / METADATA_FILE)
    else:
        version_dir, metadata = center.version_dir, dict(center.metadata)
    card = hub_cards.center_card(metadata, repo_id, template_dir)
    # The center's own files only (whatever else a user left in the version folder stays local).
    operations = [op for op in _folder_operations(Path(version_dir), {CARD_FILE: str(card).encode()})
                  if op.path_in_repo in CENTER_FILES]
    api = HfApi(token=token)
    with _hub_errors("push", repo_id, revision, "dataset"):
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        _ensure_branch(api, repo_id, "dataset", revision, create_branch)
        pushed = {op.path_in_repo for op in operations} | {".gitattributes"}
        stale = [f for f in api.list_repo_files(repo_id, repo_type="dataset", revision=revision) if f not in pushed]
        operations += [CommitOperationDelete(path) for path in stale]
        return api.create_commit(
            repo_id, operations, repo_type="dataset", revision=revision,
            commit_message=commit_message or f"Representation center: {metadata['num_items']} items, "
                                             f"{metadata['embed_dim']}-d, encoder {metadata['encoder_name']}")
