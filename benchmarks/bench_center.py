"""Representation Center speed: batched look-up vs a plain RAM gather, and opening a 10M-item center.

    python benchmarks/bench_center.py                          # 1M look-up + 10M open
    python benchmarks/bench_center.py --open-items 1000000     # smaller open test

1. Look-up: random batches of ``--batch-size`` string ids (fresh ``str`` objects, as a data
   loader makes them) from a ``--lookup-items`` x ``--dim`` float16 center. ``center.lookup``
   (hash the batch, ``numpy.searchsorted`` in the memory-mapped sorted hashes, compare the stored
   id bytes, ``torch.index_select`` from the memory-mapped table) against the ceiling
   ``torch.index_select`` on the same table held in RAM with the row numbers already known.
   Ratio = ceiling time / look-up time; the two run back to back on every batch, and the figure
   is the median over ``--repeats`` rounds (with the smallest and largest round). Every chunk's
   checksum is checked in the warm-up round (the first touch); the first look-up of a fresh
   process, which pays for it, is reported under 2.
2. Open: a fresh process opens a ``--open-items`` x ``--open-dim`` center
   (``RepresentationCenter.load``) and reports wall time and memory growth (RSS and its private
   part), then a first look-up, then the reference: reading the embeddings file into RAM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mim_hf.center.layout import EMBEDDINGS_FILE
from mim_hf.center.store import RepresentationCenter


def make_center(path: Path, n_items: int, dim: int, seed: int = 0) -> RepresentationCenter:
    """A center of ``n_items`` random unit rows (float16) with ids ``"item-<i>"``."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.empty(n_items, dim, dtype=torch.float16)
    for start in range(0, n_items, 1 << 18):  # chunked: no float32 copy of the whole table
        stop = min(start + (1 << 18), n_items)
        table[start:stop] = torch.nn.functional.normalize(torch.randn(stop - start, dim, generator=generator), dim=-1)
    item_ids = [f"item-{i}" for i in range(n_items)]
    return RepresentationCenter.build(item_ids, {"item_embeds": table}, path, encoder_name="benchmark-random",
                                      encoder_fingerprint="sha256:" + "0" * 64, dtype="float16", normalized=True)


def bench_lookup(workdir: Path, n_items: int, dim: int, batch_size: int, n_batches: int, repeats: int) -> dict:
    center = make_center(workdir / "lookup-center", n_items, dim)
    ram_table = torch.from_numpy(np.array(center.embeddings()))  # the ceiling's own copy, in RAM
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, n_items, batch_size) for _ in range(n_batches)]
    row_tensors = [torch.from_numpy(r) for r in rows]
    candidates = {
        "lookup_float16": lambda ids: center.lookup(ids, dtype=torch.float16),
        "lookup_float32": lambda ids: center.lookup(ids),
        "rows_for": center.rows_for,
    }
    for fn in candidates.values():  # warm-up: every chunk touched, so checked once
        for i in range(n_batches):
            fn([f"item-{r}" for r in rows[i].tolist()])
    assert bool(center.lookup([f"item-{r}" for r in rows[0].tolist()])[1].all())
    rounds = []
    for _ in range(repeats):
        seconds = dict.fromkeys(["ceiling", *candidates], 0.0)
        for i in range(n_batches):
            started = time.perf_counter()
            torch.index_select(ram_table, 0, row_tensors[i])
            seconds["ceiling"] += time.perf_counter() - started
            for name, fn in candidates.items():
                ids = [f"item-{r}" for r in rows[i].tolist()]  # fresh str objects, as a data loader makes them
                started = time.perf_counter()
                fn(ids)
                seconds[name] += time.perf_counter() - started
        rounds.append(seconds)
    result = {"items": n_items, "dim": dim, "batch_size": batch_size, "batches": n_batches, "repeats": repeats}
    for name in ["ceiling", *candidates]:
        result[f"{name}_ids_per_s"] = n_batches * batch_size / statistics.median(r[name] for r in rounds)
        if name != "ceiling":
            ratios = [r["ceiling"] / r[name] for r in rounds]
            result[f"ratio_{name}"] = statistics.median(ratios)
            result[f"range_{name}"] = (min(ratios), max(ratios))
    return result


def measure_open(path: str) -> dict:
    """In a fresh process: time and memory of load(), of a first look-up, and of the reference
    (reading the embeddings file into RAM, what a store that is not memory-mapped pays).

    Memory is reported as RSS and as its private (anonymous) part: file pages mapped by the
    center are shared, reclaimable page cache and count in RSS only while cached.
    """
    import psutil

    process = psutil.Process()

    def memory_mb() -> tuple[float, float]:
        info = process.memory_info()
        return info.rss / 2**20, (info.rss - info.shared) / 2**20

    rss0, anon0 = memory_mb()
    started = time.perf_counter()
    center = RepresentationCenter.load(path)
    open_s = time.perf_counter() - started
    rss_open, anon_open = memory_mb()
    rng = np.random.default_rng(1)
    ids = [f"item-{r}" for r in rng.integers(0, len(center), 4096)]
    started = time.perf_counter()
    embeds, found = center.lookup(ids)
    first_lookup_s = time.perf_counter() - started
    assert bool(found.all())
    rss_lookup, anon_lookup = memory_mb()
    started = time.perf_counter()
    in_ram = np.fromfile(center.version_dir / EMBEDDINGS_FILE, dtype=np.uint8)
    reference_s = time.perf_counter() - started
    rss_reference, anon_reference = memory_mb()
    del in_ram
    return {
        "items": len(center), "open_s": open_s, "first_lookup_4096_s": first_lookup_s,
        "reference_read_s": reference_s,
        "open_rss_mb": rss_open - rss0, "open_private_mb": anon_open - anon0,
        "lookup_rss_mb": rss_lookup - rss0, "lookup_private_mb": anon_lookup - anon0,
        "reference_rss_mb": rss_reference - rss_lookup, "reference_private_mb": anon_reference - anon_lookup,
    }


def bench_open(workdir: Path, n_items: int, dim: int) -> dict:
    need = n_items * (dim * 2 + 8 * 3 + 16) * 1.1
    free = shutil.disk_usage(workdir).free
    if free < 2 * need:
        raise SystemExit(f"need ~{need / 1e9:.1f} GB free in {workdir} for a {n_items}-item center, {free / 1e9:.1f} GB free")
    started = time.perf_counter()
    center = make_center(workdir / "open-center", n_items, dim)
    build_s = time.perf_counter() - started
    size = sum(p.stat().st_size for p in center.version_dir.iterdir())
    del center
    proc = subprocess.run([sys.executable, __file__, "--measure-open", str(workdir / "open-center")],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(build_s=round(build_s, 1), size_gb=size / 1e9)
    result["ratio_read_vs_open"] = result["reference_read_s"] / result["open_s"]
    shutil.rmtree(workdir / "open-center")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lookup-items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--open-items", type=int, default=10_000_000, help="0 skips the open benchmark")
    parser.add_argument("--open-dim", type=int, default=32, help="dim of the open benchmark's center (open reads "
                                                               "no rows: its cost does not depend on it)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (ratios: median and range over rounds)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    parser.add_argument("--workdir", default="/tmp", help="where the temporary centers are written")
    parser.add_argument("--measure-open", default=None, help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args(argv)
    if args.measure_open:
        print(json.dumps(measure_open(args.measure_open)))
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-center-") as tmp:
        if args.lookup_items:
            lookup = bench_lookup(Path(tmp), args.lookup_items, args.dim, args.batch_size, args.batches, args.repeats)
            print(f"look-up, {lookup['items']:,} x {lookup['dim']} float16 center, {lookup['batches']} batches of "
                  f"{lookup['batch_size']} random str ids, {lookup['repeats']} rounds (torch threads: "
                  f"{torch.get_num_threads()}; ratio = index_select time / time, median (smallest-largest)):")
            labels = {"ceiling": "torch.index_select (RAM, rows known) -> float16",
                      "lookup_float16": "center.lookup(list of str) -> float16",
                      "lookup_float32": "center.lookup(list of str) -> float32",
                      "rows_for": "id -> row only: center.rows_for(list of str)"}
            for key, label in labels.items():
                ratio = "" if key == "ceiling" else (f"   ratio {lookup[f'ratio_{key}']:.3f} "
                                                     f"({lookup[f'range_{key}'][0]:.3f}-{lookup[f'range_{key}'][1]:.3f})")
                print(f"  {label:<50} {lookup[f'{key}_ids_per_s'] / 1e6:8.2f} M ids/s{ratio}")
        if args.open_items:
            opened = bench_open(Path(tmp), args.open_items, args.open_dim)
            print(f"open, {opened['items']:,} x {args.open_dim} float16 center ({opened['size_gb']:.2f} GB on disk, "
                  f"built in {opened['build_s']}s), fresh process:")
            print(f"  RepresentationCenter.load        {opened['open_s'] * 1e3:9.1f} ms   RSS +{opened['open_rss_mb']:.0f} MB"
                  f" (private +{opened['open_private_mb']:.0f} MB)")
            print(f"  + first lookup of 4096 ids       {opened['first_lookup_4096_s'] * 1e3:9.1f} ms   RSS +"
                  f"{opened['lookup_rss_mb']:.0f} MB (private +{opened['lookup_private_mb']:.0f} MB), since start "
                  "(checks the checksums of every chunk it touches)")
            print(f"  reference: read embeddings file  {opened['reference_read_s'] * 1e3:9.1f} ms   RSS +"
                  f"{opened['reference_rss_mb']:.0f} MB (private +{opened['reference_private_mb']:.0f} MB)"
                  f"   -> open is {opened['ratio_read_vs_open']:.0f}x faster")


if __name__ == "__main__":
    main()
