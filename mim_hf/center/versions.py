"""Versioned center folders: which version is live, and publishing a new one atomically.

    CURRENT          regular file naming the live version, e.g. "v0002"
    v0001/ v0002/    one version each (see :mod:`mim_hf.center.layout`)

A writer takes ``.lock`` (``flock``), writes the new version into a hidden temp folder, fsyncs,
renames it to ``vNNNN`` and only then publishes it by ``os.replace`` of ``CURRENT``; a crash at
any point leaves the live version readable. Readers never lock. Pruning keeps the new version
and the ``keep_versions - 1`` newest versions that were live before it; a version numbered above
the previously live one was never published (a writer died before its ``CURRENT`` swap) and is
removed. A folder holding the version files directly (a Hub snapshot) is a read-only *flat* center.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from mim_hf.center.layout import METADATA_FILE, write_text_synced
from mim_hf.common.fs import fsync_path, resolve_inside

CURRENT_FILE = "CURRENT"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_MAX_CURRENT_BYTES = 64


def live_version(root: Path) -> str | None:
    """Name of the version ``root/CURRENT`` names (None without a CURRENT file).

    ``ValueError`` for a CURRENT that is a symlink or not a regular file, or whose content is not a
    version folder of ``root``; the message never repeats content that is not a version name."""
    current = root / CURRENT_FILE
    if current.is_symlink() or (current.exists() and not current.is_file()):
        raise ValueError(f"{current}: must be a regular file (not a symlink or folder) naming the live version")
    if not current.exists():
        return None
    with open(current, "rb") as handle:
        raw = handle.read(_MAX_CURRENT_BYTES + 1)
    name = raw.decode("utf-8", errors="replace").strip()
    if len(raw) > _MAX_CURRENT_BYTES or not _VERSION_RE.match(name):
        raise ValueError(f"{current}: corrupted (expected a version name like 'v0001', {len(raw)} bytes read)")
    if not (root / name).is_dir():
        raise ValueError(f"{current}: names version {name!r}, which is not a version folder in {root}")
    return name


def resolve_local(root: Path) -> tuple[Path, bool]:
    """(folder of the live version, versioned?) of a local center folder."""
    name = live_version(root)
    if name is not None:
        return resolve_inside(root, root / name, "the center directory"), True
    if (root / METADATA_FILE).is_file():
        return root, False
    raise ValueError(f"{root}: not a representation center (no {CURRENT_FILE} or {METADATA_FILE})")


def version_number(name: str | None) -> int:
    match = _VERSION_RE.match(name or "")
    return int(match.group(1)) if match else 0


@contextlib.contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """One writer per center at a time (readers never lock); removes a crashed writer's temp folders."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in root.glob(".tmp-v*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def new_version(root: Path, keep_versions: int) -> Iterator[tuple[Path, str]]:
    """Under :func:`writer_lock`: yield (a temp folder to fill, its version name), then publish it.

    The number follows every version folder present (orphans included, so a name is never
    reused); the folder is fsynced, renamed, then ``CURRENT`` is swapped (:func:`swap_current`)
    and old versions are pruned (see the module docstring). An exception removes the temp folder
    and leaves ``CURRENT`` as it was."""
    previous = live_version(root)
    numbers = sorted(version_number(p.name) for p in root.iterdir() if _VERSION_RE.match(p.name))
    name = f"v{(numbers[-1] + 1) if numbers else 1:04d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp, name
        fsync_path(tmp)
        os.rename(tmp, root / name)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_current(root, name)
    live_before = [n for n in numbers if n <= version_number(previous)][::-1]
    keep = {version_number(name)} | set(live_before[: max(keep_versions, 1) - 1])
    for number in numbers:
        if number not in keep:
            shutil.rmtree(root / f"v{number:04d}", ignore_errors=True)


def swap_current(root: Path, name: str) -> None:
    """Publish version ``name``: the single atomic step (before it readers see the old version)."""
    write_text_synced(root / (CURRENT_FILE + ".tmp"), name + "\n")
    os.replace(root / (CURRENT_FILE + ".tmp"), root / CURRENT_FILE)
    fsync_path(root)
