"""Build a Representation Center with the encoding split across processes.

    accelerate launch --num_processes 4 training/build_center.py \
        --encoder runs/csft/encoder --data data/ml100k/temporal --out runs/center
    accelerate launch ... training/build_center.py ... --resume   # after a crash or a kill

The catalogue is cut into chunks of ``--chunk-size`` items. The main process decides which
chunks are still to encode (all of them, or with ``--resume`` those an interrupted run did not
stage in ``OUT/.build-staging``) and deals them out round-robin; in each round every process
encodes one chunk, the rows are gathered (padded to equal length, then trimmed) onto the main
process, which stages each chunk on disk as it arrives. Once every chunk is staged the main
process writes the center once (atomic version swap) and removes the staging. Only the main
process touches the disk. Runs unchanged as a single process (``python training/build_center.py``).
Errors are one line (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from mim_hf.center.build import CenterBuildStaging
from mim_hf.center.encoders import encode_levels, encoder_fingerprint, encoder_levels
from mim_hf.center.index import validated_catalogue_ids
from mim_hf.center.store import RepresentationCenter
from mim_hf.center.cli import add_center_build_arguments
from mim_hf.cli_support import check_stage_inputs, close_process_group, pop_debug_flag, user_errors, warn_if_single_process_on_cpu
from mim_hf.data import PreparedData
from mim_hf.encoder.build import load_encoder_and_processor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_center_build_arguments(parser)
    return parser.parse_args(argv)


def gather_rows(accelerator: Accelerator, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every process's (n_p, D) rows in rank order: (sum n_p, D) on every process."""
    padded = accelerator.pad_across_processes(local.to(accelerator.device), dim=0)
    gathered = accelerator.gather(padded).cpu()  # (P * max n_p, D)
    block = padded.shape[0]
    return torch.cat([gathered[rank * block: rank * block + count] for rank, count in enumerate(counts)])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_stage_inputs(SimpleNamespace(data_dir=args.data, encoder_path=args.encoder),
                       {"data_dir": "--data", "encoder_path": "--encoder"})
    accelerator = Accelerator()
    started = time.perf_counter()
    encoder, processor = load_encoder_and_processor(args.encoder)
    encoder.to(accelerator.device)
    items = PreparedData.load(args.data).items
    levels = encoder_levels(encoder)
    item_ids = validated_catalogue_ids(items["item_id"])
    fingerprint = encoder_fingerprint(encoder)

    staging, todo = None, [None]
    if accelerator.is_main_process:
        RepresentationCenter.check_destination(args.out, args.overwrite)  # fail before encoding anything
        staging = CenterBuildStaging(args.out, item_ids, encoder_fingerprint=fingerprint, levels=levels,
                                     dtype=args.dtype, chunk_size=args.chunk_size, resume=args.resume)
        todo = [staging.missing()]
    todo = broadcast_object_list(todo)[0]
    n_processes, rank = accelerator.num_processes, accelerator.process_index
    chunk_size = args.chunk_size
    for first in range(0, len(todo), n_processes):
        round_chunks = todo[first:first + n_processes]  # chunk of rank r: round_chunks[r], if any
        mine = round_chunks[rank] if rank < len(round_chunks) else None
        rows = range(0) if mine is None else range(mine * chunk_size, min((mine + 1) * chunk_size, len(items)))
        if len(rows):
            local = encode_levels(encoder, processor, items.select(rows), levels, batch_size=args.batch_size,
                                  show_progress=False, device=accelerator.device)
        else:  # this process has no chunk this round: it still joins the gather
            local = {level: torch.zeros(0, encoder.config.embed_dim) for level in levels}
        counts = gather_object([len(rows)])
        gathered = {level: gather_rows(accelerator, local[level], counts) for level in levels}
        if accelerator.is_main_process:
            offset = 0
            for chunk, count in zip(round_chunks, counts):
                staging.write(chunk, {level: gathered[level][offset: offset + count] for level in levels})
                offset += count
            print(f"staged chunks {round_chunks} ({first + len(round_chunks)}/{len(todo)} to do)", flush=True)

    if accelerator.is_main_process:
        center = RepresentationCenter.build(
            item_ids, staging.read(), args.out, encoder_name=args.encoder_name or str(args.encoder),
            encoder_fingerprint=fingerprint, dtype=args.dtype, overwrite=args.overwrite,
            extra_metadata={"built_by_processes": n_processes})
        staging.remove()
        print(f"built {center} from {n_processes} process(es), {len(todo)} of {staging.num_chunks} chunk(s) "
              f"encoded in this run, in {time.perf_counter() - started:.1f}s")
    accelerator.end_training()
    close_process_group()


if __name__ == "__main__":
    arguments, debug = pop_debug_flag(sys.argv[1:])
    warn_if_single_process_on_cpu()
    with user_errors(debug):
        main(arguments)
