"""Prepared data on the Hugging Face Hub: one dataset repo per prepared directory.

    push_prepared(prepared, repo_id)     samples / pairs / items as `datasets` configs -> dataset repo
                                         (one commit per config, written by datasets, + one for the card)
    load_prepared_from_hub(repo_id)      -> PreparedData

``revision`` on a push is the branch to commit to (created from the default branch when
missing); on a load, any branch, tag or commit sha. Errors (no token, malformed repo id, unknown
repo or revision, a card template missing a field) are ``ValueError`` naming the bad value.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, DatasetCard, HfApi, hf_hub_download

from mim_hf.common import cards as hub_cards
from mim_hf.common.hub import (
    CARD_FILE,
    _artefact_dir,
    _ensure_branch,
    _hub_errors,
    _prepare_push,
    _read_json,
    _snapshot,
    resolve_revision,
)

from .prepare import FORMAT_VERSION, PrepareConfig, PreparedData
from .vocab import Vocabulary

PREPARED_FILES = ("prepared.json", "vocabs.json", "stats.json")
PREPARED_CONFIGS = ("samples", "pairs", "items")
ITEMS_SPLIT = "catalogue"  # the items config holds the whole catalogue as one split


def push_prepared(prepared, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                  token: str | None = None, template_dir=None) -> CommitInfo:
    """Push ``PreparedData`` (or a directory written by ``PreparedData.save``) as a dataset repo.

    Configs (``load_dataset(repo_id, <config>)``): ``samples`` and ``pairs`` with splits
    train/valid/test, ``items`` with one split ``catalogue``; plus ``prepared.json``,
    ``vocabs.json`` and ``stats.json`` and the card, in a last commit. The card is built before
    anything is uploaded. Returns the last commit's ``CommitInfo``.
    """
    from datasets import DatasetDict

    token = _prepare_push(repo_id, token)
    if not isinstance(prepared, PreparedData):
        prepared = PreparedData.load(_artefact_dir(prepared, "prepared-data", ("prepared.json",)))
    tables = {"samples": prepared.samples, "pairs": prepared.pairs, "items": DatasetDict({ITEMS_SPLIT: prepared.items})}
    meta = prepared.metadata()
    split_rows = {name: {split: len(table) for split, table in dd.items()} for name, dd in tables.items()}
    columns = {name: list(next(iter(dd.values())).column_names) for name, dd in tables.items()}
    hub_cards.data_card(meta, prepared.stats, split_rows, columns, repo_id, template_dir=template_dir)  # fail early
    api = HfApi(token=token)
    with _hub_errors("push", repo_id, revision, "dataset"):
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        _ensure_branch(api, repo_id, "dataset", revision, True)
        for name, table in tables.items():
            table.push_to_hub(repo_id, config_name=name, set_default=name == "samples", revision=revision,
                              token=token, commit_message=f"{name} of {prepared.name} ({prepared.config.protocol})")
        # datasets wrote the README's `configs` / `dataset_info` metadata: keep it under our card.
        written = DatasetCard(Path(hf_hub_download(repo_id, CARD_FILE, repo_type="dataset", revision=revision,
                                                   token=token)).read_text(encoding="utf-8"))
        card = hub_cards.data_card(meta, prepared.stats, split_rows, columns, repo_id, written.data, template_dir)
        files = {"prepared.json": json.dumps(meta, indent=1), "vocabs.json": json.dumps(
            {k: v.to_dict() for k, v in prepared.vocabs.items()}), "stats.json": json.dumps(prepared.stats, indent=2),
            CARD_FILE: str(card)}
        return api.create_commit(repo_id, [CommitOperationAdd(p, c.encode()) for p, c in files.items()],
                                 repo_type="dataset", revision=revision,
                                 commit_message=f"Card, vocabularies and stats of {prepared.name}")


def load_prepared_from_hub(repo_id: str, revision: str | None = None, token: str | None = None,
                           cache_dir: str | None = None) -> PreparedData:
    """``PreparedData`` from a repo written by :func:`push_prepared` (tables via ``load_dataset``)."""
    from datasets import load_dataset

    sha = resolve_revision(repo_id, revision, "dataset", token)
    local = _snapshot(repo_id, sha, "dataset", token)
    files = {name: _read_json(local / name) for name in PREPARED_FILES}
    # load_dataset on the snapshot folder: a repo id that is also a local path would read that path.
    tables = {name: load_dataset(str(local), name, cache_dir=cache_dir) for name in PREPARED_CONFIGS}
    meta = files["prepared.json"]
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{repo_id}: prepared.json format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return PreparedData(
        name=meta["name"], items=tables["items"][ITEMS_SPLIT], samples=tables["samples"], pairs=tables["pairs"],
        vocabs={k: Vocabulary.from_dict(v) for k, v in files["vocabs.json"].items()},
        train_item_ids=meta["train_item_ids"],
        config=PrepareConfig.from_dict(meta["config"], source=f"{repo_id}/prepared.json"),
        stats=files["stats.json"],
    )


__all__ = ["push_prepared", "load_prepared_from_hub"]
