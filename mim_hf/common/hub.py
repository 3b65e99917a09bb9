"""Share every MIM artefact on the Hugging Face Hub, with generated cards, and load it back.

Each push writes one commit, card included, and never writes into the local artefact, so a
failed push leaves it exactly as it was. Each artefact owns its push / load, with the pieces here:
CTR models push and load in :mod:`mim_hf.ctr.hub` (``push_ctr_model``, ``load_ctr_from_hub``),
prepared data in :mod:`mim_hf.data.hub` (``push_prepared``, ``load_prepared_from_hub``), the
content encoder and its LoRA adapters in :mod:`mim_hf.encoder.hub` (``push_encoder``,
``load_encoder_from_hub``, ``push_adapters``, ``load_adapters_from_hub``).

Load: ``AutoModel.from_pretrained`` works on encoder and CTR repos (with ``import mim_hf`` or
``trust_remote_code=True``); the modules above and ``RepresentationCenter.load`` restore the rest.

``revision`` on a push is the branch to commit to (created from the default branch when
missing, unless ``create_branch=False``); on a load, any branch, tag or commit sha. Errors
(no token, malformed repo id, unknown repo or revision, a CTR model whose center is not on
the Hub, a card template missing a field) are ``ValueError`` naming the bad value.
"""

from __future__ import annotations

import contextlib
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
# Files never uploaded from an artefact folder: locks, caches, the card (regenerated).
_SKIP_NAMES = {CARD_FILE, ".lock", "__pycache__", ".gitattributes"}
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
    from mim_hf import modeling  # installed from the top-level modeling/ folder (package-dir mapping)

    modeling_dir = Path(modeling.__file__).resolve().parent
    out = {}
    for name in sorted(names):
        if not (folder / name).is_file():
            source = modeling_dir / name
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


__all__ = ["resolve_revision"]
