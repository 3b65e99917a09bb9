"""A local test double of the Hugging Face Hub's HTTP API.

Tests start :class:`LocalHub` on ``127.0.0.1`` and point the *real* ``huggingface_hub``,
``transformers`` and ``datasets`` clients at it (:func:`point_hf_clients_at`), so push/pull code
is exercised end to end with no network. It implements the part of the Hub API those clients
call when creating repos, committing (regular and LFS files), branching and downloading; it is
not a Hub: no Xet storage, no pull requests, no pagination (every listing is one page), no
gitignore handling, one user.

Storage is in memory. A repo is a chain of commits; each commit has a 40-hex sha, a parent sha
and a full snapshot ``{path: _FileEntry}``. Branches and tags map names to shas, and every
revision argument accepts a branch, a tag or a full commit sha. File contents are kept once per
git blob oid (regular files) or per sha256 (LFS objects). Creating a repo makes an initial commit
holding ``.gitattributes``, as the Hub does.

Authentication: every write (create repo, preupload, LFS batch, commit, branch, tag) needs
``Authorization: Bearer <LocalHub.token>``; without it the answer is 401 with a message saying
so. Reads of public repos need no token; reads of private repos without the token give 404
``RepoNotFound``, as on the Hub. The LFS upload URL handed out by the batch API carries its own
signature (like a pre-signed storage URL), because the client sends no token with that PUT.

Errors follow the Hub's convention the clients parse: a JSON body ``{"error": message}`` plus
``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and
``X-Error-Message`` headers.

Routes (``{type}`` is ``models``/``datasets``/``spaces``; ``{prefix}`` is empty for models,
``datasets/`` or ``spaces/`` otherwise; ``{rev}`` is URL-quoted, so ``refs/x`` arrives as one
segment):

=======  =================================================  ==========================================
Method   Path                                               Purpose
=======  =================================================  ==========================================
GET      /api/whoami-v2                                     token check (401 without a valid token)
POST     /api/repos/create                                  create a repo (409 if it exists)
POST     /api/validate-yaml                                 check a card's YAML front matter
GET      /api/{type}/{repo}[/revision/{rev}]                repo info: sha, siblings, private
GET      /api/{type}/{repo}/tree/{rev}[/{path}]             listing (``recursive``, ``expand``)
POST     /api/{type}/{repo}/paths-info/{rev}                info on given paths (form or JSON body)
GET      /api/{type}/{repo}/refs                            branches and tags
GET      /api/{type}/{repo}/commits/{rev}                   history, newest first
POST     /api/{type}/{repo}/preupload/{rev}                 upload mode per file (``lfs``/``regular``)
POST     /api/{type}/{repo}/commit/{rev}                    NDJSON commit: header, file, lfsFile,
                                                            deletedFile, deletedFolder
POST     /api/{type}/{repo}/branch/{branch}                 create a branch (``startingPoint``)
DELETE   /api/{type}/{repo}/branch/{branch}                 delete a branch
POST     /api/{type}/{repo}/tag/{rev}                       create a tag (``{"tag": name}``)
POST     /{prefix}{repo}.git/info/lfs/objects/batch         LFS batch API (upload, basic transfer)
PUT      /lfs-upload/{sha256}?sig=...                       receive one LFS object (sha256 checked)
HEAD     /{prefix}{repo}/resolve/{rev}/{path}               file metadata: X-Repo-Commit, ETag,
                                                            X-Linked-Etag/X-Linked-Size for LFS
GET      /{prefix}{repo}/resolve/{rev}/{path}               file content (``Range`` supported)
=======  =================================================  ==========================================

Repo ids must be ``namespace/name`` in URLs; ``create_repo("name")`` creates ``<user>/name``.
Request bodies are capped (:data:`MAX_BODY_BYTES`) and sockets time out, so a broken client
cannot hang a test.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

MAX_BODY_BYTES = 512 * 1024 * 1024  # far above any test fixture; bounds memory on a bad request
SOCKET_TIMEOUT_S = 30.0
USER_NAME = "test-user"

# The Hub stores these as LFS whatever their size (its default .gitattributes patterns).
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".pkl", ".npy",
    ".npz", ".parquet", ".arrow", ".zip", ".gz", ".tar", ".zst", ".png", ".jpg", ".jpeg", ".webp",
)
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files go to LFS whatever their type
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_oid(content: bytes) -> str:
    """Git's object id of a blob: sha1 over ``b"blob <size>\\0" + content`` (40 hex)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in the git tree for an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclasses.dataclass(frozen=True)
class _FileEntry:
    """One file in a commit snapshot; ``lfs_sha256`` is set for LFS files."""

    size: int
    git_oid: str  # blob oid of the content (regular) or of the LFS pointer (LFS)
    lfs_sha256: str | None = None

    def to_json(self, path: str) -> dict:
        out: dict = {"type": "file", "path": path, "size": self.size, "oid": self.git_oid}
        if self.lfs_sha256 is not None:
            pointer_size = len(lfs_pointer(self.lfs_sha256, self.size))
            out["lfs"] = {"oid": self.lfs_sha256, "size": self.size, "pointerSize": pointer_size}
        return out


@dataclasses.dataclass
class _Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _FileEntry]


@dataclasses.dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        """Branch, tag or full commit sha -> commit; None if unknown."""
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and revision in self.commits:
            sha = revision
        return self.commits.get(sha) if sha is not None else None

    def history(self, commit: _Commit) -> list[_Commit]:
        """``commit`` and its ancestors, newest first."""
        out = [commit]
        while out[-1].parent is not None:
            out.append(self.commits[out[-1].parent])
        return out


class HubError(Exception):
    """An HTTP error answer in the Hub's format."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more fields for the JSON body


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_true(value: str | bool | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def _under(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` itself or lies below it (``folder=""`` is the root)."""
    return not folder or path == folder or path.startswith(folder + "/")


class _HubState:
    """All repos and LFS objects, guarded by one lock (requests run in threads)."""

    def __init__(self, token: str):
        self.token = token
        self.lock = threading.Lock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, shared by all repos
        self.blobs: dict[str, bytes] = {}  # git blob oid -> content of regular files
        self._commit_counter = itertools.count()
        self.upload_secret = secrets.token_bytes(16)
        self.request_log: collections.deque = collections.deque(maxlen=10_000)  # (method, path, status)

    def new_commit(self, repo: _Repo, parent: _Commit | None, title: str, message: str,
                   files: dict[str, _FileEntry]) -> _Commit:
        """Record a commit with a fresh 40-hex sha (unique even for identical trees)."""
        seed = json.dumps([repo.repo_type, repo.repo_id, parent.sha if parent else None, title,
                           sorted((p, e.git_oid) for p, e in files.items()), next(self._commit_counter)])
        commit = _Commit(hashlib.sha1(seed.encode()).hexdigest(), parent.sha if parent else None,
                         title, message, _now(), files)
        repo.commits[commit.sha] = commit
        return commit

    def upload_signature(self, oid: str) -> str:
        return hmac.new(self.upload_secret, oid.encode(), hashlib.sha256).hexdigest()

    def file_content(self, entry: _FileEntry) -> bytes:
        return self.lfs_objects[entry.lfs_sha256] if entry.lfs_sha256 else self.blobs[entry.git_oid]


class _Handler(BaseHTTPRequestHandler):
    """Dispatches one request to a ``_route_*`` method; answers errors in the Hub's format."""

    protocol_version = "HTTP/1.1"  # keep-alive: the clients pool connections
    timeout = SOCKET_TIMEOUT_S
    server: "_HubHTTPServer"

    # Routes: (method, regex on the raw path, handler name). First match wins.
    _REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+?)"
    ROUTES = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/(?P<type>models|datasets|spaces)/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("GET", rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/refs", "refs"),
        ("GET", rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/commits/(?P<rev>[^/]+)", "commits"),
        ("POST", rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("DELETE", rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/branch/(?P<branch>[^/]+)", "delete_branch"),
        ("POST", rf"/api/(?P<type>models|datasets|spaces)/{_REPO}/tag/(?P<rev>[^/]+)", "create_tag"),
        ("POST", rf"/(?:(?P<type>datasets|spaces)/)?{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
        ("GET", rf"/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
    _COMPILED = [(m, re.compile(pattern + r"/?"), name) for m, pattern, name in ROUTES]

    # --- plumbing -------------------------------------------------------------------------

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass  # quiet: pytest shows failures through the clients' own errors

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    @property
    def state(self) -> _HubState:
        return self.server.state

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self._body: bytes | None = None
        try:
            route_method = "GET" if method == "HEAD" else method
            for allowed, pattern, name in self._COMPILED:
                match = pattern.fullmatch(split.path)
                if match and allowed == route_method:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    status, body, headers = getattr(self, f"_route_{name}")(**params)
                    break
            else:
                raise HubError(404, f"no route for {method} {split.path} in the local Hub test double")
        except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP answer, never a hang
            err = exc if isinstance(exc, HubError) else HubError(500, f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, HubError):
                self.close_connection = True  # the request stream may be out of sync: do not reuse it
            status, headers = err.status, dict(err.headers)
            body = json.dumps({"error": err.message, **err.extra}).encode()
            headers["Content-Type"] = "application/json"
            headers["X-Error-Message"] = err.message.encode("ascii", "replace").decode()
            if err.code:
                headers["X-Error-Code"] = err.code
        if not self.close_connection:
            try:
                self._read_body()  # drain an unread body so the kept-alive connection stays in sync
            except Exception:  # noqa: BLE001 - too large or malformed: drop the connection instead
                self.close_connection = True
        self.state.request_log.append((method, split.path, status))
        self._send(method, status, body, headers)

    def _send(self, method: str, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _chunked(self) -> bool:
        return "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()

    def _read_body(self) -> bytes:
        """The request body (Content-Length or chunked), at most MAX_BODY_BYTES."""
        if self._body is not None:
            return self._body
        if self._chunked():
            parts, total = [], 0
            while True:
                size = int(self.rfile.readline(64).split(b";")[0].strip() or b"0", 16)
                total += size
                if total > MAX_BODY_BYTES:
                    raise HubError(413, f"request body over {MAX_BODY_BYTES} bytes")
                if size == 0:
                    while self.rfile.readline(1024).strip():  # trailers, then the blank line
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(8)  # CRLF after each chunk
            self._body = b"".join(parts)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise HubError(413, f"request body of {length} bytes over {MAX_BODY_BYTES}")
            self._body = self.rfile.read(length)
        return self._body

    def _json_body(self) -> dict:
        try:
            data = json.loads(self._read_body() or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"request body is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise HubError(400, f"expected a JSON object, got {type(data).__name__}")
        return data

    @staticmethod
    def _json(data, status: int = 200, headers: dict | None = None):
        return status, json.dumps(data).encode(), dict(headers or {})

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization") or ""
        return hmac.compare_digest(auth.encode(), f"Bearer {self.state.token}".encode())

    def _require_write_token(self) -> None:
        if not self.headers.get("Authorization"):
            raise HubError(401, "Authentication required: this write needs an 'Authorization: Bearer <token>' header"
                                " (set HF_TOKEN or pass token=...)")
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, type: str | None, ns: str, name: str) -> _Repo:  # noqa: A002 - route group name
        repo_type = REPO_TYPES[type or "models"]  # no type segment in a URL means a model repo
        repo = self.state.repos.get((repo_type, f"{ns}/{name}"))
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, f"Repository {repo_type} '{ns}/{name}' not found", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_at(repo: _Repo, rev: str) -> _Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev} (no such branch, tag or commit in {repo.repo_id})",
                           "RevisionNotFound")
        return commit

    def _endpoint(self) -> str:
        return self.server.endpoint

    # --- account --------------------------------------------------------------------------

    def _route_whoami(self):
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")
        return self._json({"type": "user", "name": USER_NAME, "fullname": "Local Test User", "orgs": [],
                           "auth": {"type": "access_token",
                                    "accessToken": {"displayName": "local-test", "role": "write"}}})

    def _route_validate_yaml(self):
        content = str(self._json_body().get("content", ""))
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return self._json({"errors": [{"message": f"invalid YAML: {err}"}]}, status=400)
        if metadata is not None and not isinstance(metadata, dict):
            return self._json({"errors": [{"message": "YAML metadata must be a mapping"}]}, status=400)
        return self._json({"errors": [], "warnings": []})

    # --- repos ----------------------------------------------------------------------------

    def _route_create_repo(self):
        self._require_write_token()
        payload = self._json_body()
        name, namespace = payload.get("name"), payload.get("organization") or USER_NAME
        repo_type = payload.get("type") or "model"
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or repo_type not in URL_PREFIX:
            raise HubError(400, f"invalid repo name {name!r} or type {repo_type!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self._endpoint()}/{URL_PREFIX[repo_type]}{repo_id}"
        with self.state.lock:
            if (repo_type, repo_id) in self.state.repos:
                # The client reads "url" from this 409 when called with exist_ok=True.
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", extra={"url": url})
            repo = _Repo(repo_type, repo_id, payload.get("visibility") == "private" or bool(payload.get("private")),
                         _now())
            blob_oid = git_blob_oid(GITATTRIBUTES)
            self.state.blobs[blob_oid] = GITATTRIBUTES
            first = self.state.new_commit(repo, None, "initial commit", "",
                                          {".gitattributes": _FileEntry(len(GITATTRIBUTES), blob_oid)})
            repo.branches["main"] = first.sha
            self.state.repos[(repo_type, repo_id)] = repo
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _route_repo_info(self, type, ns, name, rev="main"):  # noqa: A002
        repo = self._repo(type, ns, name)
        with self.state.lock:
            commit = self._commit_at(repo, rev)
            siblings = []
            for path, entry in sorted(commit.files.items()):
                sibling = {"rfilename": path, "size": entry.size, "blobId": entry.git_oid}
                if entry.lfs_sha256:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256,
                                      "pointerSize": len(lfs_pointer(entry.lfs_sha256, entry.size))}
                siblings.append(sibling)
            return self._json({"id": repo.repo_id, "_id": repo.repo_id, "author": ns, "sha": commit.sha,
                               "private": repo.private, "gated": False, "disabled": False, "downloads": 0,
                               "likes": 0, "tags": [], "createdAt": repo.created_at,
                               "lastModified": commit.date, "siblings": siblings})

    def _route_refs(self, type, ns, name):  # noqa: A002
        repo = self._repo(type, ns, name)
        with self.state.lock:
            def refs(kind, mapping):
                return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(mapping.items())]
            return self._json({"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags),
                               "converts": [], "pullRequests": []})

    def _route_commits(self, type, ns, name, rev):  # noqa: A002
        repo = self._repo(type, ns, name)
        with self.state.lock:
            history = repo.history(self._commit_at(repo, rev))
            return self._json([{"id": c.sha, "title": c.title, "message": c.message, "date": c.date,
                                "authors": [{"user": USER_NAME}]} for c in history])

    def _route_create_branch(self, type, ns, name, branch):  # noqa: A002
        self._require_write_token()
        repo = self._repo(type, ns, name)
        start = self._json_body().get("startingPoint") or "main"
        with self.state.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self._commit_at(repo, start).sha
        return self._json({})

    def _route_delete_branch(self, type, ns, name, branch):  # noqa: A002
        self._require_write_token()
        repo = self._repo(type, ns, name)
        with self.state.lock:
            if branch == "main" or branch not in repo.branches:
                raise HubError(404 if branch != "main" else 403, f"cannot delete branch {branch!r}",
                               "RevisionNotFound" if branch != "main" else None)
            del repo.branches[branch]
        return self._json({})

    def _route_create_tag(self, type, ns, name, rev):  # noqa: A002
        self._require_write_token()
        repo = self._repo(type, ns, name)
        tag = self._json_body().get("tag")
        with self.state.lock:
            if not isinstance(tag, str) or tag in repo.tags:
                raise HubError(409, f"tag {tag!r} is missing or already exists")
            repo.tags[tag] = self._commit_at(repo, rev).sha
        return self._json({})

    # --- listings -------------------------------------------------------------------------

    def _folder_entry(self, repo: _Repo, commit: _Commit, folder: str, expand: bool) -> dict:
        under = sorted((p, e.git_oid) for p, e in commit.files.items() if _under(p, folder))
        out = {"type": "directory", "path": folder, "oid": hashlib.sha1(json.dumps(under).encode()).hexdigest()}
        if expand:
            out["lastCommit"] = self._last_commit(repo, commit, folder)
        return out

    def _file_entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict:
        out = commit.files[path].to_json(path)
        if expand:
            out["lastCommit"] = self._last_commit(repo, commit, path)
        return out

    @staticmethod
    def _last_commit(repo: _Repo, commit: _Commit, path: str) -> dict:
        """The newest commit in ``commit``'s history that changed ``path`` (a file or a folder)."""
        def snapshot(c: _Commit):
            return sorted((p, e.git_oid) for p, e in c.files.items() if _under(p, path))
        current = commit
        while current.parent is not None and snapshot(repo.commits[current.parent]) == snapshot(current):
            current = repo.commits[current.parent]
        return {"id": current.sha, "title": current.title, "date": current.date}

    def _route_tree(self, type, ns, name, rev, path=""):  # noqa: A002
        repo = self._repo(type, ns, name)
        recursive, expand = _is_true(self.query.get("recursive")), _is_true(self.query.get("expand"))
        path = path.strip("/")
        with self.state.lock:
            commit = self._commit_at(repo, rev)
            files = [p for p in commit.files if _under(p, path) and p != path]
            if path and not files:
                raise HubError(404, f"Folder {path!r} not found at {rev} in {repo.repo_id}", "EntryNotFound",
                               {"X-Repo-Commit": commit.sha})
            prefix = path + "/" if path else ""
            folders, listed_files = set(), []
            for file_path in files:
                parts = file_path[len(prefix):].split("/")
                if recursive:  # every folder between `path` and the file
                    folders.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
                    listed_files.append(file_path)
                elif len(parts) > 1:
                    folders.add(prefix + parts[0])
                else:
                    listed_files.append(file_path)
            entries = [self._folder_entry(repo, commit, f, expand) for f in sorted(folders)]
            entries += [self._file_entry(repo, commit, f, expand) for f in sorted(listed_files)]
        return self._json(entries)

    def _route_paths_info(self, type, ns, name, rev):  # noqa: A002
        repo = self._repo(type, ns, name)
        body = self._read_body()
        if "json" in (self.headers.get("Content-Type") or ""):
            data = self._json_body()
            paths, expand = data.get("paths", []), data.get("expand")
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), (form.get("expand") or ["false"])[-1]
        with self.state.lock:
            commit = self._commit_at(repo, rev)
            out = []
            for path in [p.strip("/") for p in (paths if isinstance(paths, list) else [paths])]:
                if path in commit.files:  # unknown paths are left out, as on the Hub
                    out.append(self._file_entry(repo, commit, path, _is_true(expand)))
                elif any(_under(p, path) for p in commit.files):
                    out.append(self._folder_entry(repo, commit, path, _is_true(expand)))
        return self._json(out)

    # --- uploads --------------------------------------------------------------------------

    def _writable_branch(self, repo: _Repo, rev: str) -> _Commit:
        if _is_true(self.query.get("create_pr")):
            raise HubError(400, "create_pr is not supported by the local Hub test double")
        if rev not in repo.branches:
            self._commit_at(repo, rev)  # 404 RevisionNotFound if unknown
            raise HubError(400, f"Invalid rev id: {rev} is not a branch; commits go to branches")
        return repo.commits[repo.branches[rev]]

    def _route_preupload(self, type, ns, name, rev):  # noqa: A002
        self._require_write_token()
        repo = self._repo(type, ns, name)
        files = self._json_body().get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload body needs a 'files' list")
        out = []
        with self.state.lock:
            head = self._writable_branch(repo, rev)
            for item in files:
                path, size = item.get("path"), int(item.get("size", 0))
                sample = base64.b64decode(item.get("sample") or "")
                is_lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample
                existing = head.files.get(path)
                # The remote oid lets the client skip files that did not change (no empty commits).
                oid = None if existing is None else (existing.lfs_sha256 or existing.git_oid)
                out.append({"path": path, "uploadMode": "lfs" if is_lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        return self._json({"files": out, "commitOid": head.sha})

    def _route_lfs_batch(self, ns, name, type=None):  # noqa: A002
        self._require_write_token()
        self._repo(type, ns, name)  # 404 if the repo is unknown
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, f"only LFS 'upload' is supported, got {payload.get('operation')!r}")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", -1))
            entry: dict = {"oid": oid, "size": size, "authenticated": True}
            with self.state.lock:
                present = oid in self.state.lfs_objects
            if not present:  # no "actions" means "already uploaded" to the client
                href = f"{self._endpoint()}/lfs-upload/{oid}?size={size}&sig={self.state.upload_signature(oid)}"
                entry["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects},
                          headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _route_lfs_upload(self, oid):
        if not hmac.compare_digest(self.query.get("sig", ""), self.state.upload_signature(oid)):
            raise HubError(403, "LFS upload URL signature is invalid")
        content = self._read_body()
        if hashlib.sha256(content).hexdigest() != oid or str(len(content)) != self.query.get("size"):
            raise HubError(400, f"uploaded content does not match LFS oid {oid} / size {self.query.get('size')}")
        with self.state.lock:
            self.state.lfs_objects[oid] = content
        return 200, b"", {}

    def _route_commit(self, type, ns, name, rev):  # noqa: A002
        self._require_write_token()
        repo = self._repo(type, ns, name)
        lines = [line for line in self._read_body().splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except json.JSONDecodeError as err:
            raise HubError(400, f"commit body is not NDJSON: {err}") from err
        header = next((item["value"] for item in items if item.get("key") == "header"), None)
        if header is None:
            raise HubError(400, "commit body has no 'header' line")
        with self.state.lock:
            head = self._writable_branch(repo, rev)
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != head.sha:
                raise HubError(412, f"A commit has happened since {parent_commit}: branch {rev} is at {head.sha}")
            files = dict(head.files)
            for item in items:
                key, value = item.get("key"), item.get("value") or {}
                path = str(value.get("path", "")).strip("/")
                if key == "file":
                    content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                        else str(value["content"]).encode()
                    oid = git_blob_oid(content)
                    self.state.blobs[oid] = content
                    files[path] = _FileEntry(len(content), oid)
                elif key == "lfsFile":
                    sha256 = value["oid"]
                    if sha256 not in self.state.lfs_objects:
                        raise HubError(400, f"LFS object {sha256} for {path!r} was never uploaded")
                    size = len(self.state.lfs_objects[sha256])
                    files[path] = _FileEntry(size, git_blob_oid(lfs_pointer(sha256, size)), sha256)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"cannot delete {path!r}: not in {rev}", "EntryNotFound")
                elif key == "deletedFolder":
                    for file_path in [p for p in files if _under(p, path)]:
                        del files[file_path]
                elif key != "header":
                    raise HubError(400, f"unsupported commit operation {key!r}")
            commit = self.state.new_commit(repo, head, header.get("summary") or "", header.get("description") or "",
                                           files)
            repo.branches[rev] = commit.sha
        url = f"{self._endpoint()}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.sha}"
        return self._json({"success": True, "commitOid": commit.sha, "commitUrl": url, "hookOutput": ""})

    # --- downloads ------------------------------------------------------------------------

    def _route_resolve(self, ns, name, rev, path, type=None):  # noqa: A002
        repo = self._repo(type, ns, name)
        with self.state.lock:
            commit = self._commit_at(repo, rev)
            entry = commit.files.get(path)
            if entry is None:
                raise HubError(404, f"Entry {path!r} not found at {rev} in {repo.repo_id}", "EntryNotFound",
                               {"X-Repo-Commit": commit.sha})
            content = self.state.file_content(entry)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.lfs_sha256 or entry.git_oid}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if entry.lfs_sha256:
            # On the Hub these come with a redirect to the CDN; the client reads them first.
            headers.update({"X-Linked-Etag": f'"{entry.lfs_sha256}"', "X-Linked-Size": str(entry.size)})
        byte_range = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if byte_range and (byte_range.group(1) or byte_range.group(2)):
            first, last = byte_range.groups()
            start = int(first) if first else max(0, len(content) - int(last))
            end = min(int(last), len(content) - 1) if first and last else len(content) - 1
            if start >= len(content) or start > end:
                raise HubError(416, f"range {self.headers['Range']} outside 0-{len(content) - 1}",
                               headers={"Content-Range": f"bytes */{len(content)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return 206, content[start:end + 1], headers
        return 200, content, headers


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client connection never blocks shutdown
    endpoint: str
    state: _HubState


class LocalHub:
    """A running Hub test double on ``127.0.0.1``; use as a context manager or call :meth:`stop`.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``, the value for ``HF_ENDPOINT``.
        token: the only token the server accepts for writes (``Authorization: Bearer <token>``).
        user: the user name ``whoami`` returns and the namespace of repos created without one.
    """

    def __init__(self, token: str = "hf_local_test_token", port: int = 0):
        self.token, self.user = token, USER_NAME
        self._server = _HubHTTPServer(("127.0.0.1", port), _Handler)
        self._server.state = _HubState(token)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._server.endpoint = self.endpoint
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of the requests served so far, oldest first (last 10,000)."""
        with self._server.state.lock:
            return list(self._server.state.request_log)

    def repo_ids(self) -> list[tuple[str, str]]:
        """(repo_type, repo_id) of every repo created so far."""
        with self._server.state.lock:
            return sorted(self._server.state.repos)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "LocalHub":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def point_hf_clients_at(endpoint: str, token: str) -> Callable[[], None]:
    """Point ``huggingface_hub`` and ``datasets`` at ``endpoint`` with ``token``; returns an undo function.

    Sets ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_DISABLE_XET=1`` in ``os.environ`` and patches the
    module constants the libraries computed from them at import time:
    ``huggingface_hub.constants.{ENDPOINT, HUGGINGFACE_CO_URL_TEMPLATE, HF_URL_HOSTS, HF_HUB_DISABLE_XET}``
    and ``datasets.config.{HF_ENDPOINT, HUB_DATASETS_URL}``. (``HF_TOKEN`` is read at call time.)
    ``transformers`` reads the endpoint through ``huggingface_hub.constants`` and needs nothing more.
    """
    import datasets.config
    from huggingface_hub import constants

    saved_env = {key: os.environ.get(key) for key in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_DISABLE_XET")}
    patches = [
        (constants, "ENDPOINT", endpoint),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname}),
        (constants, "HF_HUB_DISABLE_XET", True),  # Xet storage is not emulated: force the LFS protocol
        (datasets.config, "HF_ENDPOINT", endpoint),
        (datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"),
    ]
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in patches]
    os.environ.update({"HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1"})
    for module, attr, value in patches:
        setattr(module, attr, value)

    def undo() -> None:
        for module, attr, value in saved:
            setattr(module, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    return undo


__all__ = ["LocalHub", "point_hf_clients_at", "git_blob_oid", "lfs_pointer"]
