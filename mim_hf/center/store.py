"""Representation Center: item_id -> frozen content embedding, stored once, memory-mapped.

Encoders are too slow to run inside CTR training and serving, so every item is encoded once
and its embeddings (one tensor per level: ``item_embeds``, ``text_embeds``, ``image_embeds``)
are stored next to an item-id index and metadata naming the encoder that produced them.
Files of a version: :mod:`mim_hf.center.layout`; versioned folders and atomic updates:
:mod:`mim_hf.center.versions`; the id index: :mod:`mim_hf.center.index`; building from an
encoder: :mod:`mim_hf.center.build`; the Hub: :mod:`mim_hf.center.hub`. User guide: docs/center.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mim_hf.center import index as id_index
from mim_hf.center.encoders import encode_levels, encoder_fingerprint
from mim_hf.center.hub import push_center
from mim_hf.center.layout import (
    CARD_FILE,
    CHECK_CHUNK_BYTES,
    DEFAULT_LEVEL,
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    METADATA_FILE,
    STORAGE_DTYPES,
    ChunkChecks,
    as_numpy,
    metadata_digest,
    open_tensors,
    read_metadata,
    rows_normalized,
    save_tensors,
    validated_embeddings,
    write_text_synced,
)
from mim_hf.center.versions import live_version, new_version, resolve_local, writer_lock
from mim_hf.common.cards import center_card
from mim_hf.common.fs import resolve_inside

logger = logging.getLogger(__name__)

NEAREST_INDEXES = ("exact", "faiss")


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RepresentationCenter:
    """A memory-mapped item_id -> content-embedding store.

    Open with :meth:`load`, create with :meth:`build` (or :func:`mim_hf.center.build.build_center`
    from an encoder). ``stats`` counts look-ups: ``{"lookups", "unknown_lookups"}`` (ids requested /
    ids that were not in the center and got a zero row).
    """

    def __init__(self, root: Path, version_dir: Path, versioned: bool, trusted_dir: Path | None = None):
        """Use :meth:`load`; this opens the version in ``version_dir`` (memory-mapped).

        Every file read must resolve (symlinks followed) inside ``trusted_dir`` (default ``root``;
        for a Hub snapshot the repo's cache folder, whose snapshot files link to its blobs)."""
        self.root = Path(root)
        self.version_dir = Path(version_dir)
        self.versioned = versioned
        self._trusted_dir = Path(trusted_dir) if trusted_dir is not None else self.root
        self.stats = {"lookups": 0, "unknown_lookups": 0}
        self._faiss: dict[str, Any] = {}
        self._open()

    def _file(self, name: str) -> Path:
        """``version_dir / name``, refused (``ValueError``) if it resolves outside the center."""
        if not (self.version_dir / name).exists():
            raise ValueError(f"{self.version_dir / name}: missing file (a representation center needs it)")
        return resolve_inside(self._trusted_dir, self.version_dir / name, "the center directory")

    # ---- opening ------------------------------------------------------------------------
    def _open(self) -> None:
        metadata = read_metadata(self._file(METADATA_FILE))
        num_items, embed_dim, levels = metadata["num_items"], metadata["embed_dim"], list(metadata["levels"])
        checksums = metadata["checksums"]
        expected = {EMBEDDINGS_FILE: {lv: ((num_items, embed_dim), STORAGE_DTYPES[metadata["dtype"]]) for lv in levels},
                    INDEX_FILE: {"item_id_bytes": (None, np.uint8), "item_id_offsets": ((num_items + 1,), np.int64),
                                 "id_hash_sorted": ((num_items,), np.uint64), "id_hash_rows": ((num_items,), np.int64)}}
        arrays, self._checks = {}, {}
        for file_name, tensors in expected.items():
            path = self._file(file_name)
            opened = open_tensors(path)
            if set(opened) != set(tensors):
                raise ValueError(f"{path}: holds tensors {sorted(opened)}, metadata.json expects {sorted(tensors)}")
            for name, (shape, dtype) in tensors.items():
                tensor = opened[name]
                if tensor.dtype != torch.from_numpy(np.empty(0, dtype)).dtype or tensor.ndim != (len(shape or (0,))) \
                        or (shape is not None and tuple(tensor.shape) != shape):
                    raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype} of shape {tuple(tensor.shape)}, "
                                     f"metadata.json says {np.dtype(dtype).name} of shape {shape or '(bytes,)'} "
                                     f"(num_items={num_items}, embed_dim={embed_dim})")
                arrays[name] = tensor
                self._checks[name] = ChunkChecks(path, name, as_numpy(tensor), checksums[file_name][name],
                                                 checksums["chunk_bytes"])
        self.metadata = metadata
        self._levels = {level: arrays[level] for level in levels}
        self._row_bytes = embed_dim * np.dtype(STORAGE_DTYPES[metadata["dtype"]]).itemsize
        self._id_bytes = as_numpy(arrays["item_id_bytes"])
        self._id_offsets = as_numpy(arrays["item_id_offsets"])
        self._sorted_hashes = as_numpy(arrays["id_hash_sorted"])
        self._sorted_rows = as_numpy(arrays["id_hash_rows"])
        self._hash_key = metadata["hash_key"]
        self._faiss = {}

    @classmethod
    def load(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None,
             token: str | None = None) -> "RepresentationCenter":
        """Open a center from a local directory (versioned or flat) or a Hub dataset repo.

        A path that is an existing directory is opened locally (``revision`` must be None);
        anything else is taken as a Hub dataset repo id and fetched with
        ``huggingface_hub.snapshot_download(repo_type="dataset", revision=revision)``.
        Opening memory-maps the files and reads only metadata.json: its cost and private memory
        do not grow with the catalogue.
        """
        local = Path(path_or_repo_id)
        if local.is_dir():
            if revision is not None:
                raise ValueError(f"revision={revision!r} only applies to Hub repos; {local} is a local directory")
            return cls(local, *resolve_local(local), trusted_dir=local)
        if local.exists():
            raise ValueError(f"{local}: not a directory (a representation center is a directory)")
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(repo_id=str(path_or_repo_id), repo_type="dataset", revision=revision,
                                          token=token))
        # Hub cache layout: <repo folder>/snapshots/<sha>/<file> links into <repo folder>/blobs/.
        repo_folder = snapshot.parent.parent if snapshot.parent.name == "snapshots" else snapshot
        return cls(snapshot, *resolve_local(snapshot), trusted_dir=repo_folder)

    def _reopen(self) -> None:
        self.version_dir, self.versioned = resolve_local(self.root)
        self._open()

    # ---- properties ---------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return int(self.metadata["num_items"])

    def __len__(self) -> int:
        return self.num_items

    @property
    def embed_dim(self) -> int:
        return int(self.metadata["embed_dim"])

    @property
    def levels(self) -> list[str]:
        return list(self._levels)

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the encoder that produced these embeddings (see :func:`encoder_fingerprint`)."""
        return self.metadata["encoder_fingerprint"]

    @property
    def version(self) -> str | None:
        """Live version name (``"v0003"``) of a versioned center, None for a flat one."""
        return self.version_dir.name if self.versioned else None

    def __repr__(self) -> str:
        return (f"RepresentationCenter(path={str(self.root)!r}, version={self.version!r}, items={self.num_items}, "
                f"embed_dim={self.embed_dim}, dtype={self.metadata['dtype']}, levels={self.levels})")

    def _check_level(self, level: str) -> None:
        if level not in self._levels:
            raise ValueError(f"level {level!r} is not in this center (levels: {self.levels})")

    def embeddings(self, level: str = DEFAULT_LEVEL) -> np.ndarray:
        """The read-only memory-mapped (num_items, embed_dim) array of ``level``, row order = index
        (every chunk is checked against its checksum first: this reads the whole table once)."""
        self._check_level(level)
        self._checks[level].check_all()
        return as_numpy(self._levels[level])

    def item_ids(self, rows: Sequence[int] | np.ndarray | None = None) -> list[str]:
        """Ids of ``rows`` (all rows when None; that makes every id a Python str, avoid on huge centers).

        Raises ``ValueError`` for a row outside ``0..num_items-1``."""
        if rows is None:
            rows = np.arange(self.num_items)
        rows = np.asarray(rows)
        if rows.ndim != 1 or (len(rows) and rows.dtype.kind not in "iu"):
            raise ValueError(f"rows must be a 1-D sequence of ints, got {rows.dtype} of shape {rows.shape}")
        rows = rows.astype(np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_items):
            bad = rows[(rows < 0) | (rows >= self.num_items)][:5].tolist()
            raise ValueError(f"rows {bad} are outside 0..{self.num_items - 1}")
        return self._stored_ids(rows).to_pylist()

    def _stored_ids(self, rows: np.ndarray) -> pa.LargeStringArray:
        """Stored ids of ``rows`` (checked against their chunks' checksums)."""
        self._checks["item_id_offsets"].check(rows * 8, rows * 8 + 15)
        starts, ends = self._id_offsets[rows], self._id_offsets[rows + 1]
        nonempty = ends > starts
        self._checks["item_id_bytes"].check(starts[nonempty], ends[nonempty] - 1)
        return id_index.stored_ids(self._id_bytes, starts, ends)

    # ---- look-up ------------------------------------------------------------------------
    def rows_for(self, item_ids: Sequence[str]) -> np.ndarray:
        """(N,) str ids -> (N,) int64 rows, -1 for ids not in the center. Vectorised.

        ``item_ids``: list/tuple/iterable of str, numpy ``'U'``/object array of str or ``'S'``
        array of UTF-8 bytes, pandas Series/Index of str, or pyarrow string array. Raises
        ``TypeError`` for non-str ids, ``ValueError`` for a str with no UTF-8 form or a corrupted
        index (a chunk whose CRC32 differs from metadata.json)."""
        queries = id_index.id_array(item_ids)
        rows = np.full(len(queries), -1, np.int64)
        if len(queries) == 0 or self.num_items == 0:
            return rows
        positions, hit = id_index.search(self._sorted_hashes, id_index.hash_ids(queries, self._hash_key))
        self._checks["id_hash_sorted"].check(positions * 8, positions * 8 + 7)
        if not hit.all():  # a damaged, unchecked part of the table could have steered the search away
            self._checks["id_hash_sorted"].check_all()
        candidates = np.flatnonzero(hit)
        self._checks["id_hash_rows"].check(positions[candidates] * 8, positions[candidates] * 8 + 7)
        candidate_rows = self._sorted_rows[positions[candidates]]
        same = id_index.same_ids(self._stored_ids(candidate_rows), queries.take(candidates))
        rows[candidates[same]] = candidate_rows[same]
        return rows

    def lookup(self, item_ids: Sequence[str], level: str = DEFAULT_LEVEL, dtype: torch.dtype = torch.float32,
               pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of a batch of item ids.

        ``item_ids``: (N,) str ids (see :meth:`rows_for` for the accepted containers). Returns
        ``(embeds (N, embed_dim) in ``dtype``, found_mask BoolTensor (N,))``; ids not in the
        center get a zero row and ``found_mask`` False, and are counted in
        ``stats["unknown_lookups"]``. The rows are gathered with ``torch.index_select`` from the
        memory-mapped table (each chunk checked against its checksum the first time it is read).
        ``pin_memory=True`` returns ``embeds`` in page-locked memory (needs CUDA).
        """
        self._check_level(level)
        rows = self.rows_for(item_ids)
        found = rows >= 0
        unknown = int(len(rows) - np.count_nonzero(found))
        self.stats["lookups"] += len(rows)
        self.stats["unknown_lookups"] += unknown
        if self.num_items == 0:
            embeds = torch.zeros(len(rows), self.embed_dim, dtype=dtype)
        else:
            known = rows[found]
            self._checks[level].check(known * self._row_bytes, (known + 1) * self._row_bytes - 1)
            embeds = torch.index_select(self._levels[level], 0, torch.from_numpy(np.where(found, rows, 0)))
            if unknown:
                embeds[torch.from_numpy(~found)] = 0
            embeds = embeds.to(dtype)
        if pin_memory:
            embeds = embeds.pin_memory()
        return embeds, torch.from_numpy(found)

    # ---- nearest neighbours -------------------------------------------------------------
    def nearest(self, queries: Sequence[str] | torch.Tensor, k: int = 10, level: str = DEFAULT_LEVEL,
                chunk_size: int = 65536, exclude_self: bool = True,
                index: str = "exact") -> tuple[torch.Tensor, list[list[str]]]:
        """Top-``k`` items by cosine similarity.

        ``queries``: (Q,) str item ids (all must be in the center) or a (Q, embed_dim) / (embed_dim,)
        float tensor. With ids and ``exclude_self`` the query item itself is never returned.
        ``index="exact"`` scans the catalogue ``chunk_size`` rows at a time (memory
        O(Q * (k + chunk_size))); ``index="faiss"`` searches an approximate FAISS HNSW index of
        the level (``pip install 'mim-hf[faiss]'``), built at its first use and kept on this handle
        (it holds a float32 copy of the level). ``k`` is capped at the number of candidates.
        Returns ``(scores (Q, k) float32, ids list of Q lists of k str)``, best first.
        """
        self._check_level(level)
        if index not in NEAREST_INDEXES:
            raise ValueError(f"index must be one of {NEAREST_INDEXES}, got {index!r}")
        for name, value in (("k", k), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        query_rows, query_vectors = self._query_vectors(queries, level)
        exclude = query_rows is not None and exclude_self
        k = min(k, self.num_items - (1 if exclude else 0))
        if k < 1:
            raise ValueError(f"nearest(): no candidates left (center holds {self.num_items} item(s))")
        self._checks[level].check_all()
        search = self._nearest_faiss if index == "faiss" else self._nearest_exact
        best_scores, best_rows = search(query_vectors, query_rows if exclude else None, k, level, chunk_size)
        flat_ids = self.item_ids(best_rows.reshape(-1).numpy())
        return best_scores, [flat_ids[i * k:(i + 1) * k] for i in range(len(query_vectors))]

    def _query_vectors(self, queries: Any, level: str) -> tuple[np.ndarray | None, torch.Tensor]:
        """(query rows or None for vectors, (Q, D) L2-normalised float32 query vectors)."""
        if isinstance(queries, torch.Tensor):
            if not (queries.is_floating_point() or queries.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"query vectors must be a float tensor, got {queries.dtype}")
            vectors = queries.detach().float().cpu()
            vectors = vectors[None] if vectors.ndim == 1 else vectors
            if vectors.ndim != 2 or vectors.shape[1] != self.embed_dim:
                raise ValueError(f"query vectors must be (Q, {self.embed_dim}), got {tuple(queries.shape)}")
            if not bool(torch.isfinite(vectors).all()):
                raise ValueError("query vectors hold NaN/inf; nearest() needs finite vectors")
            return None, torch.nn.functional.normalize(vectors, dim=-1)
        rows = self.rows_for(queries)
        if (rows < 0).any():
            unknown = [q for q, r in zip(id_index.as_id_array(queries), rows) if r < 0][:5]
            raise ValueError(f"nearest(): query ids {unknown} are not in the center ({self.num_items} items)")
        self._checks[level].check(rows * self._row_bytes, (rows + 1) * self._row_bytes - 1)
        vectors = torch.index_select(self._levels[level], 0, torch.from_numpy(rows)).float()
        return rows, torch.nn.functional.normalize(vectors, dim=-1)

    def _nearest_exact(self, query_vectors, exclude_rows, k, level, chunk_size):
        n_queries = len(query_vectors)
        best_scores = torch.full((n_queries, 0), -math.inf)
        best_rows = torch.zeros((n_queries, 0), dtype=torch.long)
        table = self._levels[level]
        for start in range(0, self.num_items, chunk_size):
            stop = min(start + chunk_size, self.num_items)
            chunk = torch.nn.functional.normalize(table[start:stop].float(), dim=-1)
            scores = query_vectors @ chunk.T  # (Q, chunk)
            if exclude_rows is not None:
                own = torch.from_numpy(exclude_rows)
                inside = (own >= start) & (own < stop)
                scores[inside.nonzero().squeeze(1), own[inside] - start] = -math.inf
            merged_scores = torch.cat([best_scores, scores], dim=1)
            merged_rows = torch.cat([best_rows, torch.arange(start, stop).expand(n_queries, -1)], dim=1)
            top = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_scores, best_rows = top.values, merged_rows.gather(1, top.indices)
        return best_scores, best_rows

    def _nearest_faiss(self, query_vectors, exclude_rows, k, level, chunk_size):
        try:
            import faiss
        except ImportError:
            raise ImportError("nearest(index='faiss') needs faiss: pip install 'mim-hf[faiss]' (faiss-cpu)") from None
        if level not in self._faiss:
            graph = faiss.IndexHNSWFlat(self.embed_dim, 32, faiss.METRIC_INNER_PRODUCT)
            for start in range(0, self.num_items, chunk_size):
                chunk = self._levels[level][start:start + chunk_size].float()
                graph.add(torch.nn.functional.normalize(chunk, dim=-1).numpy())
            self._faiss[level] = graph
        graph = self._faiss[level]
        wanted = k + (1 if exclude_rows is not None else 0)
        graph.hnsw.efSearch = max(64, 2 * wanted)
        scores, rows = graph.search(np.ascontiguousarray(query_vectors.numpy()), wanted)
        keep = rows >= 0
        if exclude_rows is not None:
            keep &= rows != exclude_rows[:, None]
        if (keep.sum(axis=1) < k).any():
            raise RuntimeError(f"the FAISS index returned fewer than k={k} neighbours; use index='exact'")
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the kept results, in their (best-first) order
        return (torch.from_numpy(np.take_along_axis(scores, order, 1)).float(),
                torch.from_numpy(np.take_along_axis(rows, order, 1)).long())

    # ---- compatibility and integrity ----------------------------------------------------
    def check_fingerprint(self, expected_fingerprint: str, expected_dim: int | None = None) -> None:
        """Raise ``ValueError`` unless this center came from the encoder a model was trained with.

        ``expected_fingerprint`` / ``expected_dim``: what the CTR model recorded at training time.
        """
        problems = []
        if expected_fingerprint != self.fingerprint:
            problems.append(f"encoder fingerprint: model expects {expected_fingerprint!r}, "
                            f"center has {self.fingerprint!r}")
        if expected_dim is not None and int(expected_dim) != self.embed_dim:
            problems.append(f"embed_dim: model expects {int(expected_dim)}, center has {self.embed_dim}")
        if problems:
            raise ValueError(f"representation center {self.version_dir} does not match the model ("
                             + "; ".join(problems) + "); rebuild the center with the model's encoder or retrain")

    def verify(self) -> None:
        """Check every chunk of every tensor against its CRC32 now (reads everything).

        Raises ``ValueError`` naming the file, tensor and byte range whose bytes changed."""
        for checks in self._checks.values():
            checks.check_all()

    # ---- writing ------------------------------------------------------------------------
    @classmethod
    def build(cls, item_ids: Sequence[str], embeddings: Mapping[str, torch.Tensor | np.ndarray],
              path: str | os.PathLike, *, encoder_name: str, encoder_fingerprint: str,
              encoder_revision: str | None = None, dtype: str = "float16", normalized: bool | None = None,
              overwrite: bool = False, keep_versions: int = 2,
              extra_metadata: Mapping[str, Any] | None = None) -> "RepresentationCenter":
        """Write a new center (or, with ``overwrite``, a new version of an existing one).

        ``item_ids``: (N,) unique str ids. ``embeddings``: level name -> (N, D) float tensor; must
        contain ``"item_embeds"``; all levels share D. ``dtype``: storage dtype, "float16" or
        "float32". ``normalized``: whether rows are L2-normalised (detected when None).
        Raises ``ValueError`` for duplicate ids, NaN/inf (also after the cast to ``dtype``),
        mismatched shapes, or an existing center at ``path`` without ``overwrite``.
        Returns the opened center.
        """
        ids = id_index.validated_catalogue_ids(item_ids)
        arrays = validated_embeddings(ids, embeddings, dtype, expected_levels=None, expected_dim=None)
        root = Path(path)
        cls.check_destination(root, overwrite)
        id_strings = id_index.id_array(ids)
        hash_key, sorted_hashes, sorted_rows = id_index.hash_table(id_strings)
        blob, offsets = id_index.id_buffers(id_strings)
        now = _utc_now()
        metadata = {
            "format_version": FORMAT_VERSION, "encoder_name": encoder_name, "encoder_revision": encoder_revision,
            "encoder_fingerprint": encoder_fingerprint, "embed_dim": int(arrays[DEFAULT_LEVEL].shape[1]),
            "dtype": dtype, "normalized": bool(rows_normalized(arrays) if normalized is None else normalized),
            "num_items": len(ids), "levels": list(arrays), "created_at": now, "updated_at": now,
            "hash_key": hash_key, **dict(extra_metadata or {}),
        }
        index_arrays = {"item_id_bytes": blob, "item_id_offsets": offsets, "id_hash_sorted": sorted_hashes,
                        "id_hash_rows": sorted_rows}
        with writer_lock(root), new_version(root, keep_versions) as (folder, name):
            _write_version_files(folder, name, metadata, arrays, index_arrays)
        return cls.load(root)

    @classmethod
    def check_destination(cls, root: str | os.PathLike, overwrite: bool) -> None:
        """Raise ``ValueError`` unless a center can be written at ``root``: missing, empty (hidden
        entries such as a build's staging aside) or, with ``overwrite``, a center."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ValueError(f"{root}: exists and is not a directory")
        if root.is_dir() and any(not entry.name.startswith(".") for entry in root.iterdir()):
            try:
                resolve_local(root)
            except ValueError:
                raise ValueError(f"{root}: exists and is not an empty directory or a representation center") from None
            if not overwrite:
                raise ValueError(f"{root}: a representation center already exists; pass overwrite=True to "
                                 "write a new version, or use upsert() to add items")

    def upsert_embeddings(self, item_ids: Sequence[str], embeddings: Mapping[str, torch.Tensor | np.ndarray],
                          encoder_fingerprint: str | None = None, keep_versions: int = 2) -> dict[str, Any]:
        """Add new items and replace existing ones, writing a new version atomically.

        ``item_ids``: (M,) unique str ids; ``embeddings``: level -> (M, D), the same levels as the
        center. Existing rows keep their position (replaced in place); new items are appended.
        ``encoder_fingerprint``: when given, must equal the center's. The write is a
        compare-and-swap: under the writer lock, if another writer published a version since this
        handle opened, the handle first moves to that version and this update is applied on top
        of it, so no writer's items are lost. The new version is built in memory (O(N) for a
        center of N items) and written with safetensors.
        Returns ``{"added", "replaced", "version"}``; ``self`` then reads the new version.
        """
        if not self.versioned:
            raise ValueError(f"{self.root}: a flat (read-only, e.g. Hub snapshot) center cannot be updated; "
                             "copy it into a versioned one with RepresentationCenter.build(..., path) first")
        ids = id_index.as_id_array(item_ids, "upsert item_ids")
        if len(ids):
            ids = id_index.validated_catalogue_ids(ids, "upsert item_ids")
        with writer_lock(self.root):
            if live_version(self.root) != self.version:  # another writer published: rebase onto its version
                logger.info("%s: %s was published since this handle opened %s; applying the upsert on top of it",
                            self.root, live_version(self.root), self.version)
                self._reopen()
            if encoder_fingerprint is not None and encoder_fingerprint != self.fingerprint:
                raise ValueError(f"upsert: embeddings come from encoder {encoder_fingerprint!r} but the center was "
                                 f"built with {self.fingerprint!r}; build a new center instead of mixing spaces")
            if len(ids) == 0:
                return {"added": 0, "replaced": 0, "version": self.version}
            update = validated_embeddings(ids, embeddings, self.metadata["dtype"], expected_levels=self.levels,
                                          expected_dim=self.embed_dim)
            self.verify()  # never copy damaged rows into a fresh, checksummed version
            rows = self.rows_for(ids)
            replace = rows >= 0
            new_ids = ids[~replace]
            n_old, n_new = self.num_items, len(new_ids)
            arrays = {}
            for level in self.levels:
                table = np.empty((n_old + n_new, self.embed_dim), update[level].dtype)
                table[:n_old] = as_numpy(self._levels[level])
                table[rows[replace]] = update[level][replace]
                table[n_old:] = update[level][~replace]
                arrays[level] = table
            index_arrays, hash_key = self._index_with(new_ids)
            metadata = {**self.metadata, "num_items": n_old + n_new, "hash_key": hash_key, "updated_at": _utc_now(),
                        "normalized": bool(self.metadata["normalized"] and rows_normalized(update))}
            with new_version(self.root, keep_versions) as (folder, name):
                _write_version_files(folder, name, metadata, arrays, index_arrays)
            self._reopen()
        return {"added": n_new, "replaced": int(replace.sum()), "version": self.version}

    def _index_with(self, new_ids: np.ndarray) -> tuple[dict[str, np.ndarray], str]:
        """(index arrays of this version's ids followed by ``new_ids``, hash key): the new ids'
        hashes are merged into the sorted table, or every id is re-keyed on a collision."""
        n_old = self.num_items
        new_strings = id_index.id_array(new_ids)
        new_blob, new_offsets = id_index.id_buffers(new_strings)
        blob = np.concatenate([self._id_bytes, new_blob])
        offsets = np.concatenate([self._id_offsets, new_offsets[1:] + self._id_offsets[-1]])
        hashes = np.concatenate([self._sorted_hashes, id_index.hash_ids(new_strings, self._hash_key)])
        order = np.argsort(hashes, kind="stable")
        sorted_hashes = hashes[order]
        sorted_rows = np.concatenate([self._sorted_rows, np.arange(n_old, n_old + len(new_ids))])[order]
        hash_key = self._hash_key
        if (sorted_hashes[1:] == sorted_hashes[:-1]).any():
            all_ids = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(blob))
            hash_key, sorted_hashes, sorted_rows = id_index.hash_table(all_ids)
        return {"item_id_bytes": blob, "item_id_offsets": offsets, "id_hash_sorted": sorted_hashes,
                "id_hash_rows": sorted_rows.astype(np.int64)}, hash_key

    def upsert(self, items, encoder: torch.nn.Module, processor, batch_size: int = 64,
               show_progress: bool = True, keep_versions: int = 2) -> dict[str, Any]:
        """Encode ``items`` (a ``datasets.Dataset`` with an ``item_id`` column: new or changed
        items only) with ``encoder``/``processor`` and upsert them (see :meth:`upsert_embeddings`).

        Raises ``ValueError`` if ``encoder`` is not the encoder the center was built with.
        """
        fingerprint = encoder_fingerprint(encoder)
        if fingerprint != self.fingerprint:
            raise ValueError(f"upsert: encoder fingerprint {fingerprint!r} differs from the center's "
                             f"{self.fingerprint!r} ({self.metadata['encoder_name']}); build a new center")
        embeddings = encode_levels(encoder, processor, items, self.levels, batch_size, show_progress)
        return self.upsert_embeddings(items["item_id"], embeddings, encoder_fingerprint=fingerprint,
                                      keep_versions=keep_versions)

    # ---- sharing ------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, revision: str | None = None, private: bool | None = None,
                    commit_message: str | None = None, token: str | None = None) -> str:
        """Upload the live version (flat layout + card) as a Hub *dataset* repo, in one commit.

        ``revision``: branch to push to (created if missing). Files of an earlier push that this
        version no longer has are deleted. Returns the commit URL (see :func:`mim_hf.center.hub.push_center`).
        """
        info = push_center(self, repo_id, revision=revision, private=private, token=token,
                           commit_message=commit_message)
        return str(info.commit_url)


def _write_version_files(folder: Path, name: str, metadata: dict[str, Any], arrays: Mapping[str, np.ndarray],
                         index_arrays: Mapping[str, np.ndarray]) -> None:
    """Write version ``name``'s embeddings, index, metadata.json (with checksums) and card into ``folder``."""
    checksums = {"chunk_bytes": CHECK_CHUNK_BYTES, EMBEDDINGS_FILE: save_tensors(folder / EMBEDDINGS_FILE, arrays),
                 INDEX_FILE: save_tensors(folder / INDEX_FILE, index_arrays)}
    metadata = {**{k: v for k, v in metadata.items() if k != "metadata_sha256"}, "version": name,
                "checksums": checksums}
    metadata["metadata_sha256"] = metadata_digest(metadata)
    write_text_synced(folder / METADATA_FILE, json.dumps(metadata, indent=1) + "\n")
    write_text_synced(folder / CARD_FILE, str(center_card(metadata, folder.parent.name)))
