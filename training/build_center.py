"""Build a Representation Center with the encoding split across processes.

    accelerate launch --num_processes 4 training/build_center.py \
        --encoder runs/csft/encoder --data data/ml100k/temporal --out runs/center

Each process encodes a contiguous shard of the catalogue (``split_between_processes``);
the shards are gathered (padded to equal length, then trimmed) onto the main process,
which checks the count and writes the center once. Runs unchanged as a single process
(``python training/build_center.py ...``).
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from mim_hf.center import RepresentationCenter, encode_levels, encoder_fingerprint, encoder_levels
from mim_hf.center_cli import add_center_build_arguments
from mim_hf.encoders import load_encoder_and_processor
from mim_hf.data import PreparedData


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
    accelerator = Accelerator()
    started = time.perf_counter()
    encoder, processor = load_encoder_and_processor(args.encoder)
    encoder.to(accelerator.device)
    items = PreparedData.load(args.data).items
    levels = encoder_levels(encoder)

    with accelerator.split_between_processes(list(range(len(items)))) as shard:
        local = encode_levels(encoder, processor, items.select(shard), levels, batch_size=args.batch_size,
                              show_progress=accelerator.is_local_main_process, device=accelerator.device)
    counts = gather_object([len(shard)])
    embeddings = {level: gather_rows(accelerator, local[level], counts) for level in levels}

    if accelerator.is_main_process:
        if sum(counts) != len(items):  # shards must tile the catalogue exactly once
            raise RuntimeError(f"gathered {sum(counts)} rows from shards {counts}, catalogue has {len(items)}")
        center = RepresentationCenter.build(
            items["item_id"], embeddings, args.out, encoder_name=args.encoder_name or str(args.encoder),
            encoder_fingerprint=encoder_fingerprint(encoder), dtype=args.dtype, overwrite=args.overwrite,
            extra_metadata={"built_by_processes": accelerator.num_processes})
        print(f"built {center} from {accelerator.num_processes} process(es), shards {counts}, "
              f"in {time.perf_counter() - started:.1f}s")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
