"""Share every MIM artefact on the Hugging Face Hub, with generated cards, and load it back.

Push (each writes one commit, card included, and never writes into the local artefact, so a
failed push leaves it exactly as it was):

    push_ctr_model(dir, repo_id)      saved CiUBMForCTR -> model repo; checks and pins its center
    push_center(dir, repo_id)         Representation Center (live version) -> dataset repo
    push_prepared(prepared, repo_id)  samples / pairs / items as `datasets` configs -> dataset repo
                                      (one commit per config, written by datasets, + one for the card)

The content encoder and its LoRA adapters push and load in ``mim_hf.encoder.hub``, with the
plumbing here.

Load: ``AutoModel.from_pretrained`` works on encoder and CTR repos (with ``import mim_hf`` or
``trust_remote_code=True``); :func:`load_ctr_from_hub` (model + vocabularies + its center), ``RepresentationCenter.load``
and :func:`load_prepared_from_hub` restore the rest.

``revision`` on a push is the branch to commit to (created from the default branch when
missing, unless ``create_branch=False``); on a load, any branch, tag or commit sha. Errors
(no token, malformed repo id, unknown repo or revision, a CTR model whose center is not on
the Hub, a card template missing a field) are ``ValueError`` naming the bad value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from mim_hf.common import cards as hub_cards
from mim_hf.common.fs import resolve_inside

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
PREPARED_FILES = ("prepared.json", "vocabs.json", "stats.json")
PREPARED_CONFIGS = ("samples", "pairs", "items")
ITEMS_SPLIT = "catalogue"  # the items config holds the whole catalogue as one split
# Files never uploaded from an artefact folder: locks, caches, the card (regenerated).
_SKIP_NAMES = {CARD_FILE, ".lock", "__pycache__", ".gitattributes"}
_MODELING_DIR = Path(__file__).resolve().parent / "modeling"
_MODULE_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")


# ------------------------------------------------------------------------------------------
# checks shared by every push / load
# ------------------------------------------------------------------------------------------
def _check_repo_id(repo_id: Any) -> str:
    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a str like 'org/name', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise ValueError(f"malformed repo id {repo_id!r}: expected 'namespace/name' of letters, digits, '-', '_', '.' "
                         f"({err})") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"malformed repo id {repo_id!r}: expected 'namespace/name' (e.g. 'my-org/mim-csft')")
    return repo_id


def _require_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: pass token=... (--token), set HF_TOKEN, or run `hf auth login`; "
                         "pushing needs a token with write access")
    return token


@contextlib.contextmanager
def _hub_errors(action: str, repo_id: str, revision: str | None, repo_type: str) -> Iterator[None]:
    """Turn the Hub's repo/revision/auth errors into ``ValueError`` saying what to fix."""
    where = f"{repo_type} repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        yield
    except RevisionNotFoundError:
        raise ValueError(f"{action}: revision {revision!r} does not exist in {repo_type} repo {repo_id!r}"
                         f"{_refs_hint(repo_id, repo_type)}") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{action}: {where} does not exist or is private (check the id and your token)") from None
    except EntryNotFoundError as err:
        raise ValueError(f"{action}: {where} lacks a file it needs ({err})") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise ValueError(f"{action}: the Hub refused the token for {where} (HTTP {status}); use a token with "
                             f"write access to {repo_id.split('/')[0]!r}") from None
        raise


def _refs_hint(repo_id: str, repo_type: str) -> str:
    try:
        refs = HfApi().list_repo_refs(repo_id, repo_type=repo_type)
    except HfHubHTTPError:
        return ""
    return f"; it has branches {sorted(b.name for b in refs.branches)} and tags {sorted(t.name for t in refs.tags)}"


def resolve_revision(repo_id: str, revision: str | None = None, repo_type: str = "model",
                     token: str | None = None) -> str:
    """Commit sha of ``revision`` (branch, tag or sha; default branch if None) in a Hub repo."""
    _check_repo_id(repo_id)
    with _hub_errors("load", repo_id, revision, repo_type):
        info = HfApi(token=token).repo_info(repo_id, repo_type=repo_type, revision=revision)
    return info.sha


# Every model load: weights from safetensors only, and the package's own classes, never code from the repo.
_SAFE_LOAD = {"use_safetensors": True, "trust_remote_code": False}


def _snapshot(repo_id: str, sha: str, repo_type: str, token: str | None) -> Path:
    """Local folder of a repo at a commit (downloaded once into the HF cache).

    Loading from this folder rather than passing ``repo_id`` on means a local directory that
    happens to be named like the repo id is never read instead of the Hub repo.
    """
    from huggingface_hub import snapshot_download

    with _hub_errors("load", repo_id, sha, repo_type):
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=sha, token=token))


def _model_snapshot(repo_id: str, sha: str, token: str | None) -> Path:
    """:func:`_snapshot` of a model repo that must hold safetensors weights (pickle files are never opened)."""
    local = _snapshot(repo_id, sha, "model", token)
    if not any(local.glob("*.safetensors")) and not any(local.glob("*.safetensors.index.json")):
        pickled = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        raise ValueError(f"model repo {repo_id!r}@{sha[:12]} holds no *.safetensors weights"
                         + (f", only {pickled} (pickle), which mim-hf never loads" if pickled else "")
                         + "; expected a repo written by push_encoder / push_ctr_model")
    return local


def _artefact_dir(path: str | os.PathLike, what: str, required: tuple[str, ...]) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{what} directory {str(path)!r} does not exist")
    missing = [name for name in required if not (path / name).exists()]
    if missing:
        raise ValueError(f"{str(path)!r} is not a saved {what}: missing {missing}")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _metrics_for(folder: Path, metrics) -> dict:
    """Explicit metrics (path or dict) win; else ``<folder>/metrics.json`` when present."""
    if metrics is None and (folder / METRICS_FILE).is_file():
        metrics = folder / METRICS_FILE
    return hub_cards.load_metrics(metrics)


def _folder_operations(folder: Path, replaced: Mapping[str, bytes]) -> list[CommitOperationAdd]:
    """Every file under ``folder`` (minus skipped ones) + ``replaced`` {path_in_repo: bytes}.

    A file or folder that is a symlink leading out of ``folder`` is a ``ValueError``: a push
    uploads the artefact, never what a link points at elsewhere on the machine.
    """
    operations = []
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if set(relative.parts) & _SKIP_NAMES or relative.parts[0].startswith("."):
            continue
        resolve_inside(folder, file, "the artefact folder (nothing outside it is uploaded)")
        if not file.is_file():
            continue
        if relative.as_posix() not in replaced:
            operations.append(CommitOperationAdd(relative.as_posix(), str(file)))
    operations += [CommitOperationAdd(path, content) for path, content in replaced.items()]
    return operations


def _remote_code_files(folder: Path, config: Mapping[str, Any]) -> dict[str, bytes]:
    """The modeling files ``config['auto_map']`` names but the folder lacks, from this package."""
    # "repo--module.Class" refers to code in another repo: nothing to ship from here.
    refs = [ref for value in (config.get("auto_map") or {}).values()
            for ref in (value if isinstance(value, list) else [value]) if isinstance(ref, str) and "--" not in ref]
    for ref in refs:
        # A module name only: "../x.Class" or "/abs/x.Class" would read (and upload) a file from elsewhere.
        if not _MODULE_REF.fullmatch(ref):
            raise ValueError(f"config.json auto_map entry {ref!r} is not 'module.ClassName' (a module name of letters, "
                             "digits and '_'); refusing to read code from a path")
    names = {ref.split(".")[0] + ".py" for ref in refs}
    out = {}
    for name in sorted(names):
        if not (folder / name).is_file():
            source = _MODELING_DIR / name
            if not source.is_file():
                raise ValueError(f"config.json auto_map names {name}, absent from {folder} and from mim_hf.modeling")
            out[name] = source.read_bytes()
    return out


def _commit(repo_id: str, repo_type: str, operations: list, *, revision: str | None, private: bool | None,
            token: str | None, commit_message: str, create_branch: bool = True) -> CommitInfo:
    """Create the repo (if needed) and the branch (if needed), then one commit of ``operations``."""
    api = HfApi(token=token)
    with _hub_errors("push", repo_id, revision, repo_type):
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        _ensure_branch(api, repo_id, repo_type, revision, create_branch)
        return api.create_commit(repo_id, operations, commit_message=commit_message, repo_type=repo_type,
                                 revision=revision)


def _ensure_branch(api: HfApi, repo_id: str, repo_type: str, revision: str | None, create_branch: bool) -> None:
    if revision is None:
        return
    branches = {b.name for b in api.list_repo_refs(repo_id, repo_type=repo_type).branches}
    if revision in branches:
        return
    if not create_branch:
        raise ValueError(f"push: branch {revision!r} does not exist in {repo_type} repo {repo_id!r} (branches: "
                         f"{sorted(branches)}); pass create_branch=True to create it")
    api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)


def _prepare_push(repo_id: str, token: str | None) -> str:
    _check_repo_id(repo_id)
    return _require_token(token)


# ------------------------------------------------------------------------------------------
# CiUBM CTR model
# ------------------------------------------------------------------------------------------
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
        if center_repo_id is None and Path(center_repo).exists():
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


@dataclasses.dataclass
class CTRBundle:
    """What scoring needs: the model, its vocabularies (from its config) and its center (or None)."""

    model: Any
    vocabs: dict[str, list[str]]
    center: Any = None

    def collator(self, items=None, max_len: int = 50):
        """A ``CTRCollator`` for this model (side features from its config; ``items`` for item features)."""
        from mim_hf.ctr.collator import CTRCollator

        config = self.model.config
        return CTRCollator(self.vocabs, items=items, center=self.center, max_len=max_len,
                           user_features=tuple(config.user_feature_sizes), item_features=tuple(config.item_feature_sizes))


def load_ctr_from_hub(repo_id: str, revision: str | None = None, token: str | None = None,
                      load_center: bool = True) -> CTRBundle:
    """Model + vocabularies + the Representation Center its config names (fingerprint checked).

    Raises ``ValueError`` when the named center repo / revision is not on the Hub or does not
    match the model (another encoder's fingerprint or dim).
    """
    import mim_hf  # noqa: F401  registers CiUBM with AutoModel
    from transformers import AutoModel

    from mim_hf.center.store import RepresentationCenter

    sha = resolve_revision(repo_id, revision, "model", token)
    model = AutoModel.from_pretrained(_model_snapshot(repo_id, sha, token), **_SAFE_LOAD).eval()
    config = model.config
    vocabs = dict(config.vocabularies or {})
    if not vocabs:
        raise ValueError(f"CTR model {repo_id!r} has no vocabularies in its config; it cannot map raw ids to rows")
    center = None
    if load_center and config.center_repo is not None:
        center_sha, _ = _center_metadata(config.center_repo, config.center_revision, token)
        if Path(config.center_repo).exists():  # RepresentationCenter.load would open it instead of the Hub repo
            raise ValueError(f"CTR model {repo_id!r} names center repo {config.center_repo!r}, which is also a local path "
                             f"here ({Path(config.center_repo).resolve()}); a name from a Hub config never opens a "
                             "local folder: run from another directory")
        center = RepresentationCenter.load(config.center_repo, revision=center_sha, token=token)
        if config.center_fingerprint is not None:
            center.check_fingerprint(config.center_fingerprint, config.content_dim if _needs_center(config.to_dict())
                                     else None)
    elif load_center and _needs_center(config.to_dict()):
        raise ValueError(f"CTR model {repo_id!r} (mode {config.mode!r}) reads content embeddings but its config names "
                         f"no center_repo; load a center yourself and pass load_center=False")
    return CTRBundle(model, vocabs, center)


# ------------------------------------------------------------------------------------------
# Representation Center
# ------------------------------------------------------------------------------------------
def _center_files() -> frozenset[str]:
    from mim_hf.center.store import EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE

    return frozenset({EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE, CARD_FILE})


def push_center(center, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str | None = None, create_branch: bool = True,
                template_dir=None) -> CommitInfo:
    """Push the live version of a center (a ``RepresentationCenter`` or its directory) as a dataset repo.

    Uploads the version's embeddings, index and metadata (flat layout) and a card from
    ``hub_cards/center.md``, in one commit (``RepresentationCenter.push_to_hub`` calls this). Files of an earlier push that this version lacks are removed.
    Load with ``RepresentationCenter.load(repo_id, revision=...)``.
    """
    from huggingface_hub import CommitOperationDelete

    from mim_hf.center.store import RepresentationCenter

    token = _prepare_push(repo_id, token)
    if not isinstance(center, RepresentationCenter):
        center = RepresentationCenter.load(_artefact_dir(center, "representation center", ()))
    metadata = dict(center.metadata)
    card = hub_cards.center_card(metadata, repo_id, template_dir)
    # The center's own files only (whatever else a user left in the version folder stays local).
    operations = [op for op in _folder_operations(center.version_dir, {CARD_FILE: str(card).encode()})
                  if op.path_in_repo in _center_files()]
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


# ------------------------------------------------------------------------------------------
# processed data (datasets)
# ------------------------------------------------------------------------------------------
def push_prepared(prepared, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                  token: str | None = None, template_dir=None) -> CommitInfo:
    """Push ``PreparedData`` (or a directory written by ``PreparedData.save``) as a dataset repo.

    Configs (``load_dataset(repo_id, <config>)``): ``samples`` and ``pairs`` with splits
    train/valid/test, ``items`` with one split ``catalogue``; plus ``prepared.json``,
    ``vocabs.json`` and ``stats.json`` and the card, in a last commit. The card is built before
    anything is uploaded. Returns the last commit's ``CommitInfo``.
    """
    from datasets import DatasetDict
    from huggingface_hub import DatasetCard, hf_hub_download

    from mim_hf.data.prepare import FORMAT_VERSION, PreparedData

    token = _prepare_push(repo_id, token)
    if not isinstance(prepared, PreparedData):
        prepared = PreparedData.load(_artefact_dir(prepared, "prepared-data", ("prepared.json",)))
    tables = {"samples": prepared.samples, "pairs": prepared.pairs, "items": DatasetDict({ITEMS_SPLIT: prepared.items})}
    meta = {"format_version": FORMAT_VERSION, "name": prepared.name,
            "config": {**prepared.config.__dict__, "fractions": list(prepared.config.fractions)},
            "train_item_ids": prepared.train_item_ids}
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
                           cache_dir: str | None = None):
    """``PreparedData`` from a repo written by :func:`push_prepared` (tables via ``load_dataset``)."""
    from datasets import load_dataset

    from mim_hf.data.prepare import FORMAT_VERSION, PrepareConfig, PreparedData
    from mim_hf.data.vocab import Vocabulary

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


__all__ = [
    "push_ctr_model",
    "load_ctr_from_hub", "CTRBundle", "push_center", "push_prepared", "load_prepared_from_hub", "resolve_revision",
]
