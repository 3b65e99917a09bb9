"""The quickstart's results report: ``report.json`` -> ``report.md`` + PNG plots.

``report.json`` layout::

    {"protocols": {"temporal": {"din": {"overall": {"auc", "gauc", "logloss", "n", "auc_std", ...},
                                        "cold": {...}, "long_tail": {...}, "head": {...},
                                        "seeds": [per-seed tables]}, ...}, "item-cold": {...}},
     "retrieval": {"<protocol>": {"raw": {"recall@1", "recall@10", "recall@50", "mrr", "n"},
                                  "pretrained": {...}, "csft": {...}, "popularity": {...}}},
     "csft_history": {"<protocol>": [{"step", "valid_recall@10"}, ...]},
     "timings_s": {...}, "environment": {...}}

Per-model entries hold the mean over seeds of each metric and ``<metric>_std`` beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

BUCKET_ORDER = ("overall", "cold", "long_tail", "head")
METRICS = ("auc", "gauc", "logloss")
MODEL_LABELS = {
    "din": "DIN-ID",
    "fuxictr_din": "FuxiCTR DIN",
    "content_feature": "content-as-feature (pre-trained)",
    "ciubm_raw": "CiUBM (frozen-encoder center)",
    "ciubm_pretrained": "CiUBM (pre-trained center)",
    "ciubm_csft": "CiUBM (C-SFT center)",
    "ciubm_center_on_valid": "CiUBM (center chosen on valid)",
}


def model_label(model: str) -> str:
    """The table label of a model name, levers included: ``ciubm_csft+simtier`` ->
    ``CiUBM (C-SFT center) + simtier``."""
    base, *levers = model.split("+")
    return " + ".join([MODEL_LABELS.get(base, base), *levers])


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """Mean and std over seeds of every metric in every bucket; keeps the per-seed tables."""
    out: dict = {"seeds": per_seed}
    for bucket in BUCKET_ORDER:
        entries = [s[bucket] for s in per_seed if bucket in s]
        if not entries:
            continue
        merged = {"n": entries[0].get("n")}
        for metric in METRICS:
            values = [e[metric] for e in entries if e.get(metric) is not None]
            merged[metric] = float(np.mean(values)) if values else None
            merged[f"{metric}_std"] = float(np.std(values)) if len(values) > 1 else (0.0 if values else None)
        out[bucket] = merged
    return out


def _cell(entry: dict | None, metric: str) -> str:
    if not entry or entry.get(metric) is None:
        return "–"
    std = entry.get(f"{metric}_std")
    return f"{entry[metric]:.4f}" + (f" ± {std:.4f}" if std else "")


def results_table(protocol_results: dict, metric: str = "auc") -> str:
    """Markdown table: model rows x bucket columns for one metric (mean ± std over seeds)."""
    header = "| model | " + " | ".join(BUCKET_ORDER) + " |"
    lines = [header, "|" + "---|" * (len(BUCKET_ORDER) + 1)]
    for model, result in protocol_results.items():
        cells = [_cell(result.get(bucket), metric) for bucket in BUCKET_ORDER]
        lines.append(f"| {model_label(model)} | " + " | ".join(cells) + " |")
    counts = next(iter(protocol_results.values()), {})
    lines.append("| *samples (n)* | " + " | ".join(str((counts.get(b) or {}).get("n", "–")) for b in BUCKET_ORDER) + " |")
    return "\n".join(lines)


def retrieval_table(retrieval: dict) -> str:
    keys = ("recall@1", "recall@10", "recall@50", "mrr", "n")
    lines = ["| encoder | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, values in retrieval.items():
        cells = [("–" if values.get(k) is None else (f"{values[k]:.4f}" if isinstance(values[k], float) else str(values[k]))) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def terminal_table(report: dict) -> str:
    """Compact text version of the main table (AUC / GAUC per bucket) for the terminal."""
    lines = []
    for protocol, results in report["protocols"].items():
        lines.append(f"\n== {protocol}: AUC (GAUC) by popularity bucket, mean over seeds ==")
        lines.append(f"{'model':<34}" + "".join(f"{b:>20}" for b in BUCKET_ORDER))
        for model, result in results.items():
            row = f"{model_label(model):<34}"
            for bucket in BUCKET_ORDER:
                entry = result.get(bucket) or {}
                auc, gauc = entry.get("auc"), entry.get("gauc")
                text = "–" if auc is None else f"{auc:.4f} ({gauc:.4f})" if gauc is not None else f"{auc:.4f} (–)"
                row += f"{text:>20}"
            lines.append(row)
        ns = next(iter(results.values()), {})
        lines.append(f"{'n':<34}" + "".join(f"{str((ns.get(b) or {}).get('n', '–')):>20}" for b in BUCKET_ORDER))
    for protocol, retrieval in report.get("retrieval", {}).items():
        lines.append(f"\n== {protocol}: retrieval of the next positive among all items (test pairs) ==")
        for name, values in retrieval.items():
            lines.append(f"{name:<12} recall@10={values.get('recall@10', float('nan')):.4f}  mrr={values.get('mrr', float('nan')):.4f}")
    return "\n".join(lines)


def _shown_buckets(results: dict) -> list[str]:
    """Buckets to plot: those with samples, and "cold" not when it is the whole test split
    (item-cold: every test item is unseen), so the same numbers are not drawn twice."""
    first = next(iter(results.values()), {})
    n = {b: (first.get(b) or {}).get("n") for b in BUCKET_ORDER}
    return [b for b in BUCKET_ORDER if n[b] != 0 and not (b == "cold" and n[b] is not None and n[b] == n["overall"])]


def plot_auc_by_bucket(results: dict, title: str, path: Path, runs: str) -> Path:
    """Grouped bars of test AUC per bucket per model: the axis includes 0.5 with a chance line, the
    bucket's n under each group, error bars = std over ``runs`` (e.g. "3 seeds"), legend beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets, models = _shown_buckets(results), list(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(buckets))
    for i, model in enumerate(models):
        means = [((results[model].get(b) or {}).get("auc") or math.nan) for b in buckets]
        stds = [((results[model].get(b) or {}).get("auc_std") or 0.0) for b in buckets]
        ax.bar(x + i * width - 0.4 + width / 2, means, width, yerr=stds, label=model_label(model), capsize=2)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance (AUC 0.5)")
    first = next(iter(results.values()), {})
    ax.set_xticks(x, [f"{b}\nn={(first.get(b) or {}).get('n', '–')}" for b in buckets])
    finite = [v for m in models for b in buckets if (v := (results[m].get(b) or {}).get("auc")) is not None]
    ax.set_ylim(min([0.45, *finite]) - 0.02, min(1.0, max([0.5, *finite]) + 0.05))
    ax.set_ylabel(f"test AUC (error bars: std over {runs})")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_csft_curves(histories: dict, retrieval: dict, path: Path) -> Path:
    """One panel per protocol: C-SFT valid recall@10 over steps, with the raw encoder, the
    pre-trained encoder and popularity as reference lines and the final C-SFT encoder's test
    recall@10 beside the curve (``retrieval[protocol]`` holds the test values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(5.5 * len(histories), 3.6), squeeze=False)
    styles = {"raw": ":", "pretrained": "--", "popularity": "-."}
    for ax, (protocol, history) in zip(axes[0], histories.items()):
        points = [(h["step"], h["valid_recall@10"]) for h in history if h.get("valid_recall@10") is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label="C-SFT (valid)")
        tests = retrieval.get(protocol) or {}
        for name, style in styles.items():
            value = (tests.get(name) or {}).get("recall@10")
            if value is not None:
                ax.axhline(value, linestyle=style, color="grey", linewidth=1, label=f"{name} (test) {value:.3f}")
        final = (tests.get("csft") or {}).get("recall@10")
        if final is not None:
            ax.plot([points[-1][0] if points else 0], [final], marker="*", markersize=12, linestyle="none",
                    color="tab:red", label=f"C-SFT final (test) {final:.3f}")
        ax.set_xlabel("C-SFT step")
        ax.set_ylabel("recall@10")
        ax.set_ylim(bottom=0)
        ax.set_title(f"C-SFT retrieval — {protocol}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """One AUC-by-bucket plot per protocol + the C-SFT recall@10 curves (one panel per protocol)."""
    written = []
    for protocol, results in report["protocols"].items():
        seeds = len(report.get("environment", {}).get("seeds", [])) or "the"
        written.append(plot_auc_by_bucket(results, f"AUC by item popularity bucket — {protocol} protocol",
                                          out_dir / f"auc_by_bucket_{protocol}.png", f"{seeds} seeds"))
    histories = {protocol: history for protocol, history in report.get("csft_history", {}).items() if history}
    if histories:
        written.append(plot_csft_curves(histories, report.get("retrieval", {}), out_dir / "csft_recall_at_10.png"))
    return written


def write_markdown(report: dict, out_dir: Path, plots: list[Path]) -> Path:
    lines = ["# mim-hf quickstart report", ""]
    env = report.get("environment", {})
    if env:
        lines += ["Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), ""]
    for protocol, results in report["protocols"].items():
        n_seeds = len(next(iter(results.values()), {}).get("seeds", []))
        lines += [f"## CTR, `{protocol}` protocol (test split, mean ± std over {n_seeds} seed(s))", ""]
        for metric in METRICS:
            lines += [f"**{metric.upper()}**", "", results_table(results, metric), ""]
    for protocol, retrieval in report.get("retrieval", {}).items():
        lines += [f"## C-SFT retrieval, `{protocol}` (test pairs: trigger → next positive, ranking all items)", "",
                  retrieval_table(retrieval), ""]
    if report.get("timings_s"):
        lines += ["## Timings (s)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
        lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
