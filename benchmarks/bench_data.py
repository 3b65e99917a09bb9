"""Data preparation speed on MovieLens-100k: samples/s of ``prepare``.

Reference, measured in the same run: the textbook per-user loop that builds each sample's
behaviour sequence by scanning the user's time-sorted history in Python (what one writes
first). Printed as a ratio (ours / reference) because machines here are noisy.

    python benchmarks/bench_data.py [--source PATH]
"""

from __future__ import annotations

import argparse
import time

from mim_hf.data import load_movielens_100k, prepare
from mim_hf.data.prepare import behaviour_sequences


def reference_sequences(frame, max_len: int) -> list[list[str]]:
    """Per-user Python loop: for each interaction, the user's strictly earlier positives."""
    out = [None] * len(frame)
    for _, group in frame.sort_values("timestamp", kind="stable").groupby("user_id", sort=False):
        history_items, history_times = [], []
        for row, item, ts, label in zip(group.index, group["item_id"], group["timestamp"], group["label"]):
            earlier = [i for i, t in zip(history_items, history_times) if t < ts]
            out[row] = earlier[-max_len:]
            if label == 1:
                history_items.append(item)
                history_times.append(ts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="MovieLens source (default: cached recbole wheel)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = load_movielens_100k(args.source)
    n = len(data.interactions)

    full = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        prepare(data, protocol="temporal", max_len=50)
        full.append(time.perf_counter() - start)
    frame = data.interactions.to_pandas()
    positives = frame["label"].to_numpy() == 1
    ours = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        behaviour_sequences(frame, positives, 50)
        ours.append(time.perf_counter() - start)
    start = time.perf_counter()
    reference_sequences(frame, 50)
    reference = time.perf_counter() - start

    print(f"full prepare (split, sequences, buckets, pairs, vocabs, stats; temporal, max_len=50) on {n} interactions: "
          f"{min(full):.2f}s best of {args.repeats} -> {n / min(full):,.0f} samples/s")
    print(f"behaviour sequences, ours (vectorised): {min(ours):.3f}s -> {n / min(ours):,.0f} samples/s")
    print(f"behaviour sequences, reference per-user loop: {reference:.3f}s -> {n / reference:,.0f} samples/s")
    print(f"ratio ours/reference (sequences, samples/s): {reference / min(ours):.1f}x")

if __name__ == "__main__":
    main()
