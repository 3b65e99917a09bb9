"""Representation Center speed: batched look-up vs a RAM gather, and opening a 10M-item center.

    python benchmarks/bench_center.py                       # 1M look-up + 10M open (~3 GB in /tmp)
    python benchmarks/bench_center.py --open-items 1000000  # smaller open test
    python benchmarks/bench_center.py --device cuda         # + look-up into pinned memory -> GPU

1. Look-up: random batches of ``--batch-size`` string ids (fresh ``str`` objects, as a data
   loader makes them) from a ``--lookup-items`` x ``--dim`` float16 center. ``center.lookup``
   (with numba: one join + encode of the batch, then one compiled call that splits, hashes,
   probes the memory-mapped hash table, verifies the stored id bytes and copies the rows from the
   memory-mapped embeddings into the output, zero-filling unknowns; without numba the same in
   numpy) against the ceiling ``torch.index_select`` on the same table held in RAM with the row
   numbers already known. Ratio = ceiling time / lookup time, per round of all batches, the
   ceiling and each candidate timed back to back at each step, no candidate on a batch another
   one has just read (see :func:`timed_against_ceiling`); goal >= 0.5; printed as the median
   over ``--repeats`` rounds and the smallest-largest round. The headline is ``list of str -> float16`` (the ceiling's
   output dtype); float32 output, id -> row only, and numpy 'U' / pyarrow inputs are reported
   beside it, and (compiled path) where the headline's time goes: the join of the list, the
   search (``rows_for`` minus the join) and the row copy of known rows into a new tensor, each
   timed on its own in the same rounds. ``--device cuda`` adds a separate line:
   ``lookup(..., pin_memory=True)`` + ``.to("cuda", non_blocking=True)`` against ``index_select``
   on a CUDA copy of the table.
2. Open: a fresh process opens a ``--open-items`` center (``RepresentationCenter.load``) and
   reports wall time and memory growth (RSS and its private part), then a first look-up, then
   the reference: reading the embeddings file into RAM (what a store that is not mapped pays).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mim_hf.center.store as center_module
from mim_hf.center.store import EMBEDDINGS_FILE, RepresentationCenter


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


def timed_against_ceiling(ceiling, ceiling_batches, candidates: dict, batches: dict, repeats: int) -> dict:
    """Seconds per pass over all batches, median of ``repeats`` rounds, for the ceiling and each
    candidate, plus each candidate's ratio ceiling_time / candidate_time (median over rounds, and
    its smallest and largest round).

    Step by step the ceiling and every candidate run back to back, so on a shared machine each
    ratio compares runs that saw the same load. At step i the ceiling runs batch i and candidate
    j batch ``i - j * stride``: every candidate covers every batch once per round, and none reads
    index entries or rows that another candidate brought into cache a moment before (the first
    candidate, the headline, runs the ceiling's batch: the ceiling reads its own copy of the
    table). ``batches[name]``: the input of candidate ``name``, one per batch.
    """
    for name, fn in candidates.items():
        fn(batches[name][0])  # warm-up
    ceiling(ceiling_batches[0])
    n_batches = len(ceiling_batches)
    stride = max(1, n_batches // (len(candidates) + 1))
    rounds = []
    for _ in range(repeats):  # interleaved: a load burst slows the ceiling and the candidates of one step alike
        seconds = dict.fromkeys(["ceiling", *candidates], 0.0)
        for i, rows in enumerate(ceiling_batches):
            started = time.perf_counter()
            ceiling(rows)
            seconds["ceiling"] += time.perf_counter() - started
            for j, (name, fn) in enumerate(candidates.items()):
                batch = batches[name][(i - j * stride) % n_batches]
                started = time.perf_counter()
                fn(batch)
                seconds[name] += time.perf_counter() - started
        rounds.append(seconds)
    result = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    per_round = {name: [r["ceiling"] / r[name] for r in rounds] for name in candidates}
    ratios = {name: statistics.median(values) for name, values in per_round.items()}
    return {"seconds": result, "ratios": ratios, "ratio_ranges": {name: (min(v), max(v)) for name, v in per_round.items()}}


def compiled_row_copy(center: RepresentationCenter):
    """``rows -> (N, D) tensor``: the compiled look-up's row copy alone (rows already known), from the
    memory-mapped embeddings into a new tensor, as ``lookup`` does after finding the rows."""
    import numba

    from mim_hf.center.numba_lookup import _gather

    gather = numba.njit(nogil=True)(lambda table, rows, out: _gather(table, rows, out))
    table = center._level_bytes["item_embeds"]
    dtype = center._level_torch_dtypes["item_embeds"]

    def copy_rows(rows: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(rows), center.embed_dim, dtype=dtype)
        gather(table, rows, out.numpy().view(np.uint8))
        return out

    return copy_rows


def parts_breakdown(lookup: dict) -> str | None:
    """Where the headline's time goes, in ceilings (a part's time / index_select's): the join of the
    list, the search (``rows_for`` minus the join) and the row copy, each timed on its own."""
    if "ratio_part_join_list" not in lookup:
        return None
    join = 1 / lookup["ratio_part_join_list"]
    search = 1 / lookup["ratio_numba_rows_for_list"] - join
    copy = 1 / lookup["ratio_part_copy_known_rows"]
    whole = 1 / lookup["ratio_numba_lookup_list_float16"]
    return (f"  parts of [numba] lookup(list) -> float16, each timed alone, in ceilings (time / index_select's): "
            f"join of the list {join:.2f}, search (rows_for - join) {search:.2f}, copy of the known rows into a "
            f"new tensor {copy:.2f}; the whole call {whole:.2f}")


def bench_cuda(center: RepresentationCenter, ram_table: torch.Tensor, id_batches: list, row_tensors: list,
               repeats: int) -> dict:
    """On a GPU: ``lookup`` into page-locked memory + ``.to("cuda", non_blocking=True)`` against the
    CUDA ceiling, ``index_select`` on a CUDA copy of the table with the rows already on the GPU.
    Both sides end with ``torch.cuda.synchronize()`` so the timer sees finished work."""
    table = ram_table.to("cuda")
    rows = [r.to("cuda") for r in row_tensors]

    def ceiling(cuda_rows):
        out = torch.index_select(table, 0, cuda_rows)
        torch.cuda.synchronize()
        return out

    def lookup_to_cuda(ids):
        embeds, found = center.lookup(ids, dtype=torch.float16, pin_memory=True)
        embeds = embeds.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        return embeds, found

    embeds, found = lookup_to_cuda(id_batches[0])
    assert bool(found.all()) and torch.equal(embeds, ceiling(rows[0])), "cuda look-up differs from the ceiling"
    timing = timed_against_ceiling(ceiling, rows, {"lookup_pinned_to_cuda": lookup_to_cuda},
                                   {"lookup_pinned_to_cuda": id_batches}, repeats)
    return {"device_name": torch.cuda.get_device_name(), "ceiling_s": timing["seconds"]["ceiling"],
            "lookup_s": timing["seconds"]["lookup_pinned_to_cuda"], "ratio": timing["ratios"]["lookup_pinned_to_cuda"],
            "range": timing["ratio_ranges"]["lookup_pinned_to_cuda"]}


def bench_lookup(workdir: Path, n_items: int, dim: int, batch_size: int, n_batches: int, repeats: int,
                 device: str = "cpu") -> dict:
    import pyarrow as pa

    started = time.perf_counter()
    center = make_center(workdir / "lookup-center", n_items, dim)
    build_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    row_batches = [rng.integers(0, n_items, batch_size) for _ in range(n_batches)]
    id_batches = [[f"item-{r}" for r in rows] for rows in row_batches]  # fresh str objects, as from a loader
    row_tensors = [torch.from_numpy(rows) for rows in row_batches]
    ram_table = torch.from_numpy(np.array(center.embeddings()))  # (N, D) float16 in RAM

    # correctness first: every timed path returns the rows the ceiling gathers
    inputs = {"list": id_batches, "numpy": [np.array(ids) for ids in id_batches],
              "arrow": [pa.array(ids) for ids in id_batches]}

    def on_path(use_numba: bool, fn):
        """``fn`` run with the compiled (numba) or the numpy look-up path selected."""
        def run(ids):
            center_module.USE_NUMBA = use_numba
            try:
                return fn(ids)
            finally:
                center_module.USE_NUMBA = default
        return run

    default = center_module.USE_NUMBA
    paths = {"numba": True, "numpy": False} if center_module.lookup_backend() == "numba" else {"numpy": False}
    candidates = {}
    for path, use_numba in paths.items():
        candidates.update({
            f"{path}_lookup_list_float16": on_path(use_numba, lambda ids: center.lookup(ids, dtype=torch.float16)),
            f"{path}_lookup_list_float32": on_path(use_numba, center.lookup),
            f"{path}_rows_for_list": on_path(use_numba, center.rows_for),
            f"{path}_lookup_numpy_float16": on_path(use_numba, lambda ids: center.lookup(ids, dtype=torch.float16)),
            f"{path}_lookup_arrow_float16": on_path(use_numba, lambda ids: center.lookup(ids, dtype=torch.float16)),
        })
    for path, use_numba in paths.items():  # both paths give the ceiling's rows, before anything is timed
        for name, batches in inputs.items():
            embeds, found = on_path(use_numba, lambda ids: center.lookup(ids, dtype=torch.float16))(batches[0])
            assert bool(found.all()) and torch.equal(embeds, torch.index_select(ram_table, 0, row_tensors[0])), name
    batches = {name: inputs[name.split("_")[-2 if "_lookup_" in name else -1]] for name in candidates}
    if "numba" in paths:  # the parts of the headline call, each timed on its own (see parts_breakdown)
        copy_rows = compiled_row_copy(center)
        candidates["part_join_list"] = lambda ids: center_module._joined_utf8(ids, "item_ids")
        candidates["part_copy_known_rows"] = copy_rows
        batches["part_join_list"] = inputs["list"]
        batches["part_copy_known_rows"] = row_batches
        assert torch.equal(copy_rows(row_batches[0]), torch.index_select(ram_table, 0, row_tensors[0]))
    timing = timed_against_ceiling(lambda rows: torch.index_select(ram_table, 0, rows), row_tensors,
                                   candidates, batches, repeats)
    total = batch_size * n_batches
    result = {"items": n_items, "dim": dim, "batch_size": batch_size, "batches": n_batches,
              "build_s": round(build_s, 2), "repeats": repeats, "paths": list(paths)}
    result.update({f"{name}_ids_per_s": total / s for name, s in timing["seconds"].items()})
    result.update({f"ratio_{name}": r for name, r in timing["ratios"].items()})
    result.update({f"range_{name}": r for name, r in timing["ratio_ranges"].items()})
    if device == "cuda":
        result["cuda"] = bench_cuda(center, ram_table, id_batches, row_tensors, repeats)
    if "numba" in paths:
        result["first_call"] = bench_first_call(workdir, center.root)
    shutil.rmtree(workdir / "lookup-center")
    return result


def bench_first_call(workdir: Path, center_path: Path) -> list[dict]:
    """First look-up in fresh processes sharing an empty NUMBA_CACHE_DIR: the first compiles the
    kernels (and writes the cache), the second only loads them (what every later process pays)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(workdir / "numba-cache")}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, __file__, "--measure-open", str(center_path)], env=env,
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs


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
    parser.add_argument("--open-items", type=int, default=10_000_000, help="0 skips the open benchmark")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (ratios: median and range over rounds)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: also time lookup into pinned memory + copy to the GPU against index_select "
                             "on a CUDA copy of the table (a separate line; the CPU ratio stays the headline)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides; the compiled look-up splits a batch over "
                             "torch.get_num_threads() threads too (default 1: on a shared machine idle OpenMP "
                             "threads only add waits)")
    parser.add_argument("--workdir", default="/tmp", help="where the temporary centers are written")
    parser.add_argument("--measure-open", default=None, help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args(argv)
    if args.measure_open:
        print(json.dumps(measure_open(args.measure_open)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-center-") as tmp:
        lookup = bench_lookup(Path(tmp), args.lookup_items, args.dim, args.batch_size, args.batches, args.repeats,
                              args.device)
        print(f"look-up, {lookup['items']:,} x {lookup['dim']} float16 center, {lookup['batches']} batches of "
              f"{lookup['batch_size']} random str ids, {lookup['repeats']} interleaved rounds (torch threads: "
              f"{torch.get_num_threads()}; ratio = ceiling time / time, median (smallest-largest) over rounds):")
        rows = [("ceiling", "torch.index_select (RAM, rows known) -> float16")]
        for path in lookup["paths"]:
            rows += [
                (f"{path}_lookup_list_float16", f"[{path}] center.lookup(list of str) -> float16"),
                (f"{path}_lookup_list_float32", f"[{path}] center.lookup(list of str) -> float32"),
                (f"{path}_rows_for_list", f"[{path}] id -> row only: center.rows_for(list)"),
                (f"{path}_lookup_numpy_float16", f"[{path}] center.lookup(numpy 'U' array) -> float16"),
                (f"{path}_lookup_arrow_float16", f"[{path}] center.lookup(pyarrow string array) -> float16"),
            ]
        for key, label in rows:
            ratio = "" if key == "ceiling" else (f"   ratio {lookup[f'ratio_{key}']:.2f} "
                                                 f"({lookup[f'range_{key}'][0]:.2f}-{lookup[f'range_{key}'][1]:.2f})")
            print(f"  {label:<56} {lookup[f'{key}_ids_per_s'] / 1e6:8.2f} M ids/s{ratio}")
        breakdown = parts_breakdown(lookup)
        if breakdown:
            print(breakdown)
        if "cuda" in lookup:
            cuda = lookup["cuda"]
            print(f"  CUDA ({cuda['device_name']}): center.lookup(list of str, pin_memory=True) + .to('cuda', "
                  f"non_blocking=True) {cuda['lookup_s'] / lookup['batches'] * 1e6:.0f} us/batch vs index_select on "
                  f"a CUDA copy {cuda['ceiling_s'] / lookup['batches'] * 1e6:.0f} us/batch: ratio {cuda['ratio']:.3f} "
                  f"({cuda['range'][0]:.3f}-{cuda['range'][1]:.3f})")
        if "numba" not in lookup["paths"]:
            print("  (numba is not installed or MIM_HF_NO_NUMBA=1: only the numpy path; pip install 'mim-hf[fast]')")
        print(f"  default path: {lookup['paths'][0]}; goal: ratio >= 0.5 for "
              f"[{lookup['paths'][0]}] center.lookup(list of str) -> float16")
        for label, run in zip(("compiles (empty numba cache)", "loads the numba cache"), lookup.get("first_call", [])):
            print(f"  first lookup of 4096 ids in a fresh process that {label}: "
                  f"{run['first_lookup_4096_s'] * 1e3:.0f} ms (open {run['open_s'] * 1e3:.1f} ms)")
        if args.open_items:
            opened = bench_open(Path(tmp), args.open_items, args.dim)
            print(f"open, {opened['items']:,} x {args.dim} float16 center ({opened['size_gb']:.2f} GB on disk, "
                  f"built in {opened['build_s']}s), fresh process:")
            print(f"  RepresentationCenter.load        {opened['open_s'] * 1e3:9.1f} ms   RSS +{opened['open_rss_mb']:.0f} MB"
                  f" (private +{opened['open_private_mb']:.0f} MB)")
            print(f"  + first lookup of 4096 ids       {opened['first_lookup_4096_s'] * 1e3:9.1f} ms   RSS +"
                  f"{opened['lookup_rss_mb']:.0f} MB (private +{opened['lookup_private_mb']:.0f} MB), since start")
            print(f"  reference: read embeddings file  {opened['reference_read_s'] * 1e3:9.1f} ms   RSS +"
                  f"{opened['reference_rss_mb']:.0f} MB (private +{opened['reference_private_mb']:.0f} MB)"
                  f"   -> open is {opened['ratio_read_vs_open']:.0f}x faster")


if __name__ == "__main__":
    main()
