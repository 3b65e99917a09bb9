"""``mim-hf predict`` and ``mim-hf recommend`` (see docs/cli.md).

    mim-hf predict --model runs/ctr/model --data requests.jsonl --out scores.csv [--data-dir DATA]
    mim-hf recommend --model runs/ctr/model --data-dir DATA --user-id u3 --k 10 [--candidates FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

OUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


def _load(args):
    """(bundle, prepared or None) from ``--model``, ``--center``, ``--data-dir``."""
    from mim_hf.ctr.predict import load_ctr_model
    from mim_hf.data import PreparedData

    prepared = PreparedData.load(args.data_dir) if args.data_dir else None
    return load_ctr_model(args.model, args.center), prepared


def _fallback_note(counts: dict) -> str:
    shown = {key: value for key, value in counts.items() if value and key not in ("samples", "behaviors")}
    return ", ".join(f"{key}={value}" for key, value in sorted(shown.items())) or "none"


def cmd_predict(args) -> int:
    from mim_hf.ctr.predict import predict
    from mim_hf.ctr.recommend import read_table, request_samples

    out = Path(args.out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"--out {args.out!r}: unknown file type {out.suffix!r}; expected one of {OUT_SUFFIXES}")
    frame = read_table(args.data, ("user_id", "item_id"))
    bundle, prepared = _load(args)
    if bundle.model.config.item_feature_sizes and prepared is None:
        raise ValueError("this model uses item side features: pass --data-dir (the prepared data with the catalogue)")
    fallbacks = Counter()
    samples = request_samples(frame, bundle, prepared, fallbacks)
    probs = predict(bundle, samples, items=prepared.items if prepared else None, batch_size=args.batch_size,
                    show_progress=not args.quiet, fallbacks=fallbacks)
    scored = frame[["user_id", "item_id"]].assign(score=probs)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        scored.to_parquet(out, index=False)
    elif suffix == ".jsonl":
        scored.to_json(out, orient="records", lines=True)
    else:
        scored.to_csv(out, sep="\t" if suffix == ".tsv" else ",", index=False)
    print(f"scored {len(scored)} rows -> {out} (fallbacks: {_fallback_note(fallbacks)})", file=sys.stderr)
    return 0


def cmd_recommend(args) -> int:
    from mim_hf.ctr.recommend import read_table, recommend

    bundle, prepared = _load(args)
    candidates = list(read_table(args.candidates, ("item_id",))["item_id"]) if args.candidates else None
    stats = Counter()
    top = recommend(bundle, prepared, args.user_id, k=args.k, candidates=candidates, batch_size=args.batch_size,
                    stats=stats)
    if args.json:
        print(json.dumps([{"item_id": item, "score": score} for item, score in top], indent=2))
    else:
        for rank, (item, score) in enumerate(top, 1):
            print(f"{rank:>3}  {item}  {score:.4f}")
    note = " (the user has no positive history: ranked by ID, features and content only)" if stats["empty_history"] else ""
    if stats["unscorable_skipped"]:
        note += f"; {stats['unscorable_skipped']} item(s) unknown to the model and without content left out"
    print(f"ranked {stats['candidates']} candidates for user {args.user_id!r}, {stats['cold_candidates']} of them cold "
          f"(scored by content){note}", file=sys.stderr)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="trained CTR model: OUTPUT_DIR/model of training/train_ctr.py, "
                                                       "or a Hub repo id")
    parser.add_argument("--center", default=None, help="Representation Center directory (default: the one the model "
                                                       "config records)")
    parser.add_argument("--batch-size", type=int, default=4096, help="samples per forward pass")


def add_ctr_subparsers(commands) -> None:
    predict = commands.add_parser(
        "predict", help="score a file of (user, item) requests with a trained CTR model",
        description="Reads JSONL/CSV/TSV/Parquet rows with user_id, item_id and optionally behavior_item_ids "
                    "(the user's earlier positives, oldest first; space-separated in CSV) and user_* features; "
                    "what a row lacks comes from --data-dir. Writes user_id, item_id, score.")
    _common(predict)
    predict.add_argument("--data", required=True, help="request file (.jsonl, .json, .csv, .tsv, .parquet)")
    predict.add_argument("--out", required=True, help=f"scores file ({', '.join(OUT_SUFFIXES)})")
    predict.add_argument("--data-dir", default=None, help="prepared data (mim-hf data prepare OUT/<protocol>): "
                                                          "histories, user features and the item catalogue")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=cmd_predict)

    rec = commands.add_parser(
        "recommend", help="rank candidate items (cold ones included) for a user from their history",
        description="Scores every candidate with the CTR model given the user's history in --data-dir (their "
                    "positives, oldest first) and prints the top k. Default candidates: every item of the center "
                    "(catalogue for ID-only models) the user has not interacted with. A user absent from "
                    "--data-dir is an error.")
    _common(rec)
    rec.add_argument("--data-dir", required=True, help="prepared data holding the user's history")
    rec.add_argument("--user-id", required=True, help="the user to recommend for")
    rec.add_argument("--k", type=int, default=10, help="how many items to print")
    rec.add_argument("--candidates", default=None, help="file of candidate item ids (.txt one per line, or a "
                                                        "JSONL/CSV/Parquet table with item_id)")
    rec.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rec.set_defaults(func=cmd_recommend)


__all__ = ["add_ctr_subparsers", "cmd_predict", "cmd_recommend"]
