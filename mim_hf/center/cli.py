"""``mim-hf center build|info|nearest``: the Representation Center on the command line.

    mim-hf center build --encoder runs/csft/encoder --data data/ml100k/temporal --out runs/center
    mim-hf center build ... --resume      # after a crash: encode only the chunks not yet staged
    mim-hf center info runs/center
    mim-hf center nearest runs/center --item-id 50 --item-id 181 --k 5

``add_center_subparsers(commands)`` registers the three sub-commands on the ``mim-hf`` parser.
"""

from __future__ import annotations

import argparse
import json
import time

from mim_hf.center.build import DEFAULT_CHUNK_SIZE
from mim_hf.cli_support import check_stage_inputs
from mim_hf.encoder.build import load_encoder_and_processor


def center_build_cli(args: argparse.Namespace) -> int:
    """Encode every item of a prepared-data directory and write a center to ``--out``."""
    from mim_hf.center.build import build_center
    from mim_hf.data import PreparedData

    check_stage_inputs(argparse.Namespace(data_dir=args.data, encoder_path=args.encoder),
                       {"data_dir": "--data", "encoder_path": "--encoder"})  # names the command that makes each
    started = time.perf_counter()
    encoder, processor = load_encoder_and_processor(args.encoder)
    items = PreparedData.load(args.data).items
    center = build_center(encoder, processor, items, args.out, batch_size=args.batch_size, dtype=args.dtype,
                          encoder_name=args.encoder_name or str(args.encoder), show_progress=not args.quiet,
                          overwrite=args.overwrite, resume=args.resume, chunk_size=args.chunk_size)
    fallbacks = {k: v for k, v in processor.fallback_counts.items() if v}
    print(f"built {center} in {time.perf_counter() - started:.1f}s; processor fallbacks: {fallbacks or 'none'}")
    return 0


def center_info_cli(args: argparse.Namespace) -> int:
    """Print a center's metadata (``--json`` for machine-readable output)."""
    from mim_hf.center.layout import EMBEDDINGS_FILE
    from mim_hf.center.store import RepresentationCenter

    center = RepresentationCenter.load(args.center, revision=args.revision)
    if args.verify:
        center.verify()
    info = {"path": str(center.root), "version": center.version, **center.metadata}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("path", "version", "num_items", "embed_dim", "dtype", "normalized", "levels", "encoder_name",
                "encoder_revision", "encoder_fingerprint", "created_at", "updated_at", "format_version"):
        print(f"{key:<20} {info.get(key)}")
    if args.verify:
        print(f"{'checksums':<20} ok (every chunk of {', '.join(center.metadata['checksums'][EMBEDDINGS_FILE])} "
              f"and of the id index)")
    return 0


def center_nearest_cli(args: argparse.Namespace) -> int:
    """Print the ``--k`` nearest items (cosine) of each ``--item-id``, the item itself excluded."""
    from mim_hf.center.store import RepresentationCenter

    center = RepresentationCenter.load(args.center, revision=args.revision)
    scores, ids = center.nearest(args.item_id, k=args.k, level=args.level)
    if args.json:
        print(json.dumps({q: [{"item_id": i, "score": round(float(s), 6)} for i, s in zip(row_ids, row_scores)]
                          for q, row_ids, row_scores in zip(args.item_id, ids, scores.tolist())}, indent=2))
        return 0
    for query, row_ids, row_scores in zip(args.item_id, ids, scores.tolist()):
        print(f"{query}:")
        for rank, (item_id, score) in enumerate(zip(row_ids, row_scores), start=1):
            print(f"  {rank:>3}. {item_id:<24} {score:.4f}")
    return 0


def add_center_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a center build, shared by ``mim-hf center build`` and ``training/build_center.py``."""
    parser.add_argument("--encoder", required=True, help="saved MIMContentEncoder + processor directory")
    parser.add_argument("--data", required=True, help="prepared-data directory (mim-hf data prepare OUT/<protocol>)")
    parser.add_argument("--out", required=True, help="center directory to create")
    parser.add_argument("--batch-size", type=int, default=64, help="items per forward pass, per process (default 64)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")
    parser.add_argument("--encoder-name", default=None, help="name recorded in metadata (default: --encoder)")
    parser.add_argument("--overwrite", action="store_true", help="write a new version over an existing center")
    parser.add_argument("--resume", action="store_true",
                        help="keep the chunks an interrupted build of the same items and encoder staged in "
                             "OUT/.build-staging and encode only the rest")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help=f"items encoded and staged per chunk, the unit a resumed build skips (default "
                             f"{DEFAULT_CHUNK_SIZE}); a resumed build must use the same value")


def add_center_subparsers(commands) -> argparse.ArgumentParser:
    """Add ``center build|info|nearest`` to ``commands`` (the ``mim-hf`` sub-parsers action)."""
    from mim_hf.center.layout import DEFAULT_LEVEL

    center = commands.add_parser("center", help="build, inspect and query a Representation Center")
    center_commands = center.add_subparsers(dest="center_command", required=True)

    build = center_commands.add_parser(
        "build", help="encode every item with a content encoder and write a center",
        description="Writes OUT/CURRENT and OUT/v0001/ (embeddings.safetensors, item_index.safetensors, "
                    "metadata.json, README.md). Use training/build_center.py with `accelerate launch` to "
                    "split the encoding across processes.")
    add_center_build_arguments(build)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=center_build_cli)

    info = center_commands.add_parser("info", help="print a center's metadata")
    info.add_argument("center", help="center directory or Hub dataset repo id")
    info.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    info.add_argument("--verify", action="store_true", help="also check every chunk of every tensor against its CRC32")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=center_info_cli)

    nearest = center_commands.add_parser("nearest", help="cosine nearest neighbours of items")
    nearest.add_argument("center", help="center directory or Hub dataset repo id")
    nearest.add_argument("--item-id", action="append", required=True, help="query item id (repeatable)")
    nearest.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    nearest.add_argument("--level", default=DEFAULT_LEVEL, help=f"embedding level (default {DEFAULT_LEVEL})")
    nearest.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    nearest.add_argument("--json", action="store_true", help="print JSON")
    nearest.set_defaults(func=center_nearest_cli)
    return center
