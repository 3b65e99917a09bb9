"""Building a center from an encoder: chunked encoding staged on disk, so a killed build resumes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mim_hf.center.encoders import encode_levels, encoder_fingerprint, encoder_levels
from mim_hf.center.index import id_array, id_buffers, validated_catalogue_ids
from mim_hf.center.layout import (
    STORAGE_DTYPES,
    as_numpy,
    open_tensors,
    save_tensors,
    validated_embeddings,
    write_text_synced,
)
from mim_hf.center.store import RepresentationCenter
from mim_hf.common.fs import fsync_path

logger = logging.getLogger(__name__)

STAGING_DIR = ".build-staging"
STAGING_MANIFEST = "manifest.json"
DEFAULT_CHUNK_SIZE = 8192


class CenterBuildStaging:
    """Encoded chunks of a center build kept on disk, so that a killed build resumes where it stopped.

    Lives in ``<center dir>/.build-staging/``: ``manifest.json`` names what is being built
    (encoder fingerprint, levels, storage dtype, chunk size, item count, sha256 of the item ids)
    and ``chunk-NNNNNN.safetensors`` holds chunk k: rows ``k*chunk_size`` up to
    ``(k+1)*chunk_size`` of every level, already validated and cast to the storage dtype. A chunk
    is written under a temp name, fsynced and renamed, so a kill leaves only whole chunks (and a
    temp file, removed on the next start). ``resume=False`` discards earlier chunks; with
    ``resume=True`` they are kept when the manifest matches, else ``ValueError`` says what differs.
    """

    def __init__(self, path: str | os.PathLike, item_ids: np.ndarray, *, encoder_fingerprint: str,
                 levels: Sequence[str], dtype: str, chunk_size: int = DEFAULT_CHUNK_SIZE, resume: bool = False):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        self.item_ids, self.levels, self.dtype, self.chunk_size = item_ids, tuple(levels), dtype, chunk_size
        self.dir = Path(path) / STAGING_DIR
        blob, offsets = id_buffers(id_array(item_ids))
        ids_digest = hashlib.sha256(offsets.tobytes() + blob.tobytes()).hexdigest()
        self.manifest = {"encoder_fingerprint": encoder_fingerprint, "levels": list(self.levels), "dtype": dtype,
                         "chunk_size": chunk_size, "num_items": len(item_ids), "item_ids_sha256": ids_digest}
        manifest_path = self.dir / STAGING_MANIFEST
        if resume and manifest_path.is_file():
            try:
                previous = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError):
                previous = None
            if previous != self.manifest:
                differs = sorted(k for k in self.manifest if not isinstance(previous, dict)
                                 or previous.get(k) != self.manifest[k])
                raise ValueError(f"{manifest_path}: the staged chunks belong to another build ({', '.join(differs)} "
                                 "differ); build without resume to start over")
            for stale in self.dir.glob(".chunk-*"):  # half-written by a killed build
                stale.unlink()
            return
        if self.dir.exists():
            logger.info("%s: discarding the chunks of an earlier build (resume=False)", self.dir)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        write_text_synced(manifest_path, json.dumps(self.manifest, indent=2) + "\n")
        fsync_path(self.dir)

    @property
    def num_chunks(self) -> int:
        return -(-len(self.item_ids) // self.chunk_size)

    def chunk_rows(self, chunk: int) -> range:
        """Catalogue rows of ``chunk``."""
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, len(self.item_ids)))

    def _chunk_path(self, chunk: int) -> Path:
        return self.dir / f"chunk-{chunk:06d}.safetensors"

    def _read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
        """Level -> (rows, D) memory-mapped array of a staged chunk; ValueError if it is not whole."""
        path = self._chunk_path(chunk)
        arrays = {name: as_numpy(tensor) for name, tensor in open_tensors(path).items()}
        rows = len(self.chunk_rows(chunk))
        for level in self.levels:
            array = arrays.get(level)
            if array is None or array.ndim != 2 or array.shape[0] != rows or array.dtype != STORAGE_DTYPES[self.dtype]:
                raise ValueError(f"{path}: staged chunk lacks a ({rows}, D) {self.dtype} tensor {level!r}")
        return {level: arrays[level] for level in self.levels}

    def missing(self) -> list[int]:
        """Chunks still to encode (a staged chunk that does not read back whole counts as missing)."""
        todo = []
        for chunk in range(self.num_chunks):
            if not self._chunk_path(chunk).exists():
                todo.append(chunk)
                continue
            try:
                self._read_chunk(chunk)
            except ValueError as err:
                logger.warning("re-encoding chunk %d: %s", chunk, err)
                todo.append(chunk)
        return todo

    def write(self, chunk: int, embeddings: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Validate ``embeddings`` (level -> (rows of ``chunk``, D)) and stage them atomically."""
        rows = self.chunk_rows(chunk)
        arrays = validated_embeddings(
            self.item_ids[rows.start:rows.stop], embeddings, self.dtype, expected_levels=self.levels, expected_dim=None)
        temp = self.dir / f".chunk-{chunk:06d}-{os.getpid()}.tmp"
        save_tensors(temp, {level: arrays[level] for level in self.levels})
        _stage_chunk(temp, self._chunk_path(chunk))

    def read(self) -> dict[str, np.ndarray]:
        """Level -> (N, D) storage-dtype array of the whole catalogue; ValueError if a chunk is missing."""
        missing = self.missing()
        if missing:
            raise ValueError(f"{self.dir}: chunks {missing[:10]} are not staged yet")
        chunks = [self._read_chunk(chunk) for chunk in range(self.num_chunks)]
        return {level: np.concatenate([chunk[level] for chunk in chunks]) for level in self.levels}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _stage_chunk(temp: Path, final: Path) -> None:
    """Publish a fully written chunk (a separate function so tests can kill the process here)."""
    os.replace(temp, final)
    fsync_path(final.parent)


def build_center(encoder: torch.nn.Module, processor, items, path: str | os.PathLike, batch_size: int = 64,
                 dtype: str = "float16", levels: Sequence[str] | None = None, encoder_name: str | None = None,
                 encoder_revision: str | None = None, show_progress: bool = True,
                 overwrite: bool = False, resume: bool = False,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> RepresentationCenter:
    """Encode every item of ``items`` and write a center at ``path``.

    ``items``: ``datasets.Dataset`` with an ``item_id`` str column plus the content columns
    ``processor`` reads (title, attributes, image). ``levels``: which embeddings to store
    (default :func:`encoder_levels`: item + text, + image with a vision tower); rows of items
    without an image are zero in ``image_embeds``. Encoding is ``mim_hf.encoder.encoding.encode_items``
    (batched, length-sorted, original order restored), ``chunk_size`` items at a time; each
    finished chunk is staged on disk (:class:`CenterBuildStaging`) and ``resume=True`` skips the
    chunks a killed build already staged (same encoder, items, levels, dtype, chunk size), so
    the result equals an uninterrupted build exactly. ``encoder_name`` defaults to the encoder's
    ``name_or_path``. Returns the opened :class:`RepresentationCenter`.
    """
    from tqdm.auto import tqdm

    levels = tuple(levels) if levels is not None else encoder_levels(encoder)
    if "item_id" not in items.column_names:
        raise ValueError(f"items must have an 'item_id' column, got columns {items.column_names}")
    RepresentationCenter.check_destination(path, overwrite)  # before the encoding, not after
    item_ids = validated_catalogue_ids(items["item_id"])
    fingerprint = encoder_fingerprint(encoder)
    staging = CenterBuildStaging(path, item_ids, encoder_fingerprint=fingerprint, levels=levels, dtype=dtype,
                                 chunk_size=chunk_size, resume=resume)
    todo = staging.missing()
    for chunk in tqdm(todo, desc="encoding chunks", unit="chunk", disable=not show_progress or len(todo) < 2):
        rows = staging.chunk_rows(chunk)
        staging.write(chunk, encode_levels(encoder, processor, items.select(rows), levels, batch_size,
                                           show_progress=show_progress and len(todo) == 1))
    config = getattr(encoder, "config", None)
    center = RepresentationCenter.build(
        item_ids, staging.read(), path, encoder_name=encoder_name or _encoder_name(encoder),
        encoder_fingerprint=fingerprint, encoder_revision=encoder_revision or getattr(config, "_commit_hash", None),
        dtype=dtype, overwrite=overwrite)
    staging.remove()
    return center


def _encoder_name(encoder: torch.nn.Module) -> str:
    name = getattr(encoder, "name_or_path", None) or getattr(getattr(encoder, "config", None), "_name_or_path", None)
    return str(name) if name else type(encoder).__name__
