"""File-system helpers shared by the stores that write or read artefact folders."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a written file, or a folder's entries, to disk (before a rename makes it visible)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_inside(root: str | os.PathLike, path: str | os.PathLike, place: str) -> Path:
    """``path`` with symlinks resolved; ``ValueError`` unless it lies inside ``root`` (resolved).

    ``place`` names ``root`` in the message, e.g. ``"the center directory"``.
    """
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{path}: resolves to {resolved}, outside {place} {base}; it must be self-contained "
                         "(no '../' names, absolute names or symlinks leading out)")
    return resolved
