"""``mim-hf push ...``: share an artefact on the Hugging Face Hub with a generated card.

    mim-hf push encoder  DIR --repo-id org/mim-csft        [--metrics M.json]
    mim-hf push adapters DIR --repo-id org/mim-lora        --base-model org/mim-pretrained
    mim-hf push ctr      DIR --repo-id org/ciubm-ml100k    [--center-repo-id org/ml100k-center]
    mim-hf push center   DIR --repo-id org/ml100k-center
    mim-hf push data     DIR --repo-id org/ml100k-item-cold
    common: [--revision/--branch NAME] [--no-create-branch] [--private] [--token T] [--commit-message M]

The lead's ``mim_hf/cli.py`` calls :func:`add_push_subparsers` on its sub-command set.
"""

from __future__ import annotations

import argparse

from mim_hf.cli_support import one_line


def _common(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("directory", metavar="DIR", help=f"the saved {what}")
    parser.add_argument("--repo-id", required=True, help="Hub repo to push to, 'namespace/name' (created if missing)")
    parser.add_argument("--revision", "--branch", dest="revision", default=None,
                        help="branch to commit to (default: the repo's default branch); created if missing")
    parser.add_argument("--no-create-branch", dest="create_branch", action="store_false",
                        help="fail instead of creating a missing --branch")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or `hf auth login`)")


def _metrics(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics", default=None,
                        help="metrics JSON for the card (default: DIR/metrics.json when present)")
    parser.add_argument("--commit-message", default=None, help="commit message (default: a summary of the artefact)")


def _report(kind: str, repo_id: str, info) -> int:
    print(f"pushed {kind} to {repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def _run(kind: str, push, args, **kwargs) -> int:
    try:
        info = push(args.directory, args.repo_id, revision=args.revision, private=args.private, token=args.token,
                    **kwargs)
    except (ValueError, TypeError) as err:
        if getattr(args, "debug", False):
            raise
        raise SystemExit(f"error: mim-hf push {kind}: {one_line(err)}") from None
    return _report(kind, args.repo_id, info)


def cmd_push_encoder(args) -> int:
    from mim_hf.encoder.hub import push_encoder

    return _run("encoder", push_encoder, args, metrics=args.metrics, commit_message=args.commit_message,
                create_branch=args.create_branch)


def cmd_push_adapters(args) -> int:
    from mim_hf.encoder.hub import push_adapters

    return _run("adapters", push_adapters, args, base_model=args.base_model, base_revision=args.base_revision,
                metrics=args.metrics, commit_message=args.commit_message, create_branch=args.create_branch)


def cmd_push_ctr(args) -> int:
    from mim_hf.ctr.hub import push_ctr_model

    return _run("ctr", push_ctr_model, args, center_repo_id=args.center_repo_id, center_revision=args.center_revision,
                dataset_repo_id=args.dataset_repo_id, metrics=args.metrics, commit_message=args.commit_message,
                create_branch=args.create_branch)


def cmd_push_center(args) -> int:
    from mim_hf.center.hub import push_center

    return _run("center", push_center, args, commit_message=args.commit_message, create_branch=args.create_branch)


def cmd_push_data(args) -> int:
    from mim_hf.data.hub import push_prepared

    if not args.create_branch:
        raise SystemExit("error: mim-hf push data: --no-create-branch is not supported (datasets creates the branch)")
    return _run("data", push_prepared, args)


def add_push_subparsers(subparsers) -> argparse.ArgumentParser:
    """Add ``push {encoder,adapters,ctr,center,data}`` to an ``add_subparsers()`` object; returns the push parser."""
    push = subparsers.add_parser(
        "push", help="share an artefact on the Hugging Face Hub with a generated card",
        description="Upload a saved artefact in one commit with a model/dataset card generated from the artefact "
                    "and its metrics. The local directory is only read.")
    kinds = push.add_subparsers(dest="push_command", required=True)

    encoder = kinds.add_parser("encoder", help="a saved MIMContentEncoder (+ processor) -> model repo")
    _common(encoder, "encoder directory (save_pretrained)")
    _metrics(encoder)
    encoder.set_defaults(func=cmd_push_encoder)

    adapters = kinds.add_parser("adapters", help="LoRA adapters (mim_hf.encoder.lora.save_adapters) -> model repo")
    _common(adapters, "adapters directory (save_adapters)")
    _metrics(adapters)
    adapters.add_argument("--base-model", default=None,
                          help="Hub repo of the encoder the adapters apply to (default: DIR/mim_adapters.json)")
    adapters.add_argument("--base-revision", default=None, help="its revision (default: its default branch)")
    adapters.set_defaults(func=cmd_push_adapters)

    ctr = kinds.add_parser("ctr", help="a saved CiUBMForCTR -> model repo, referencing its center on the Hub")
    _common(ctr, "CTR model directory (save_pretrained)")
    _metrics(ctr)
    ctr.add_argument("--center-repo-id", default=None,
                     help="dataset repo of the center the model was trained with (default: center_repo in its config)")
    ctr.add_argument("--center-revision", default=None, help="the center's revision (pinned to a commit sha)")
    ctr.add_argument("--dataset-repo-id", default=None, help="processed-data repo to cite in the card")
    ctr.set_defaults(func=cmd_push_ctr)

    center = kinds.add_parser("center", help="a Representation Center (its live version) -> dataset repo")
    _common(center, "center directory")
    center.add_argument("--commit-message", default=None, help="commit message")
    center.set_defaults(func=cmd_push_center)

    data = kinds.add_parser("data", help="prepared data (mim-hf data prepare OUT/<protocol>) -> dataset repo")
    _common(data, "prepared-data directory")
    data.set_defaults(func=cmd_push_data)
    return push


__all__ = ["add_push_subparsers"]
