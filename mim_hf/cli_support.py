"""What every command line of the package shares: one-line errors, stage-input checks, and the
warning for ``accelerate launch --num_processes N`` on CPU (which silently runs one process).

    python training/train_ctr.py --config ... --data-dir data/synthetic/temporal   # a stage script
    mim-hf predict --model ... --debug                                            # full traceback

Errors end the command with ``error: <message>`` on one line (exit status 1); ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_HINT = f"(run again with {DEBUG_FLAG} for the traceback)"


def pop_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (wherever it stands), and whether it was there."""
    return [arg for arg in argv if arg != DEBUG_FLAG], DEBUG_FLAG in argv


def one_line(err: BaseException) -> str:
    """``err`` as one line: its message (type name added unless it is a ValueError), newlines folded."""
    message = " ".join(str(err).split()) or "(no message)"
    if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in message:
        message = f"{message}: {err.filename}"
    return message if isinstance(err, ValueError) else f"{type(err).__name__}: {message}"


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Turn an exception raised in the block into ``error: <one line>`` on stderr and exit status 1.
    With ``debug`` the exception propagates unchanged (full traceback)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if debug:
            raise
        raise SystemExit(f"error: {one_line(err)} {DEBUG_HINT}") from None


def warn_if_single_process_on_cpu(environ=None) -> str | None:
    """Warn (stderr) when ``accelerate launch --num_processes N`` (N > 1, no ``--multi_gpu``) started
    this script as its only process: accelerate's simple launcher sets ``MASTER_ADDR`` for N > 1 but
    runs ONE process and sets no ``WORLD_SIZE``. Returns the warning (None when all is well)."""
    environ = os.environ if environ is None else environ
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in environ
    if not (launched_by_accelerate and "MASTER_ADDR" in environ and "WORLD_SIZE" not in environ):
        return None
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "SCRIPT"
    warning = (f"warning: accelerate launched ONE process although --num_processes > 1 was asked (without "
               f"--multi_gpu it runs a single process). For N processes on CPU run "
               f"`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N training/{script} ...` or "
               f"`ACCELERATE_USE_CPU=true torchrun --nproc_per_node N training/{script} ...`")
    print(warning, file=sys.stderr, flush=True)
    return warning


# field -> (what it is, the command that makes it, given the missing path)
_MAKERS = {
    "data_dir": ("prepared-data folder",
                 lambda p: f"`mim-hf data prepare --dataset synthetic|movielens-100k --out {p.parent}` (it writes {p})"
                 if p.name in ("temporal", "item-cold") else
                 "`mim-hf data prepare --dataset synthetic|movielens-100k --out OUT` (it writes OUT/temporal and "
                 "OUT/item-cold)"),
    "encoder_path": ("encoder folder",
                     lambda p: f"`python training/pretrain.py --config ... --output-dir {p.parent}` (it writes "
                               f"{p.parent}/encoder)"),
    "center_path": ("Representation Center", lambda p: f"`mim-hf center build --encoder ENCODER --data DATA_DIR --out {p}`"),
}


def check_stage_inputs(config, options: dict[str, str] | None = None) -> None:
    """Raise ``ValueError`` naming the first missing input folder of a stage config and the command
    that makes it (``data_dir``; ``encoder_path`` and ``center_path`` when set; an ``encoder_path``
    shaped like a Hub id ``org/name`` is left to the loader). ``options``: the
    command-line option of a field where it is not ``--field-name``."""
    for field, (what, maker) in _MAKERS.items():
        if not hasattr(config, field):
            continue
        value = getattr(config, field)
        option = (options or {}).get(field, "--" + field.replace("_", "-"))
        if field == "data_dir" and not value:
            raise ValueError(f"no data_dir: pass {option} DIR, a folder made by `mim-hf data prepare --dataset "
                             "synthetic --out data/synthetic` (DIR = data/synthetic/temporal)")
        hub_id_like = field == "encoder_path" and re.fullmatch(r"[\w.-]+/[\w.-]+", str(value or ""))
        if value and not hub_id_like and not Path(value).is_dir():
            raise ValueError(f"{field} {value!r} does not exist (expected a {what}); make it with "
                             f"{maker(Path(value))}, or pass {option} DIR")
        if value and field == "data_dir" and not (Path(value) / "prepared.json").is_file():
            raise ValueError(f"data_dir {value!r} is not a prepared-data folder (no prepared.json); pass "
                             f"OUT/<protocol> of `mim-hf data prepare --out OUT`")


STAGE_HELP = """
--resume continues from the newest intact checkpoint under OUTPUT_DIR/checkpoints (exactly:
same metrics and weights as an uninterrupted run; no pickle is loaded; a changed configuration
is refused). Without it, a run refuses a folder that holds an earlier run's checkpoints; a
second run into a folder in use is refused too. See docs/training.md.

A missing input folder is named with the command that makes it; errors are one line
(--debug: the traceback). For N processes on CPU: ACCELERATE_USE_CPU=true torchrun
--nproc_per_node N training/{script} ... (see docs/cli.md).
"""


def close_process_group() -> None:
    """Tear down torch.distributed on every process before the interpreter exits: a gloo group left to
    interpreter shutdown can abort a process ("terminate called without an active exception") after
    training succeeded, and the launcher then kills the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_stage(config_cls, run, description: str, argv: list[str] | None = None):
    """The body of a ``training/<stage>.py`` script: parse ``--config`` + ``--field`` options (``--center``
    = ``--center-path``), check the input folders, train; errors as one line unless ``--debug``.
    Returns ``run``'s metrics."""
    from mim_hf.common.config import parse_config

    argv, debug = pop_debug_flag(list(sys.argv[1:] if argv is None else argv))
    if any(field.name == "center_path" for field in dataclasses.fields(config_cls)):  # --center DIR, as in mim-hf
        argv = ["--center-path" if arg == "--center" else arg.replace("--center=", "--center-path=", 1)
                if arg.startswith("--center=") else arg for arg in argv]
    warn_if_single_process_on_cpu()
    with user_errors(debug):
        config, resume = parse_config(config_cls, description + STAGE_HELP.format(script=Path(sys.argv[0]).name), argv)
        check_stage_inputs(config)
        metrics = run(config, resume)
        close_process_group()
        return metrics


__all__ = ["STAGE_HELP", "check_stage_inputs", "close_process_group", "one_line", "pop_debug_flag", "run_stage", "user_errors",
           "warn_if_single_process_on_cpu"]
