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
    "content_feature": "content-as-feature (pre-trained)",
    "ciubm_pretrained": "CiUBM (pre-trained center)",
    "ciubm_csft": "CiUBM (C-SFT center)",
}


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
        lines.append(f"| {MODEL_LABELS.get(model, model)} | " + " | ".join(cells) + " |")
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
            row = f"{MODEL_LABELS.get(model, model):<34}"
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


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """Grouped bars of AUC per bucket per model (one PNG per protocol) + C-SFT recall@10 curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for protocol, results in report["protocols"].items():
        fig, ax = plt.subplots(figsize=(8, 4))
        models = list(results)
        width = 0.8 / max(len(models), 1)
        x = np.arange(len(BUCKET_ORDER))
        for i, model in enumerate(models):
            means = [((results[model].get(b) or {}).get("auc") or math.nan) for b in BUCKET_ORDER]
            stds = [((results[model].get(b) or {}).get("auc_std") or 0.0) for b in BUCKET_ORDER]
            ax.bar(x + i * width - 0.4 + width / 2, means, width, yerr=stds, label=MODEL_LABELS.get(model, model), capsize=2)
        ax.set_xticks(x, BUCKET_ORDER)
        ax.set_ylabel("test AUC")
        finite = [v for m in models for b in BUCKET_ORDER if (v := (results[m].get(b) or {}).get("auc")) is not None]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.03))
        ax.set_title(f"AUC by item popularity bucket — {protocol} protocol")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"auc_by_bucket_{protocol}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    histories = report.get("csft_history", {})
    if histories:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for protocol, history in histories.items():
            points = [(h["step"], h["valid_recall@10"]) for h in history if h.get("valid_recall@10") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=protocol)
        ax.set_xlabel("C-SFT step")
        ax.set_ylabel("valid recall@10")
        ax.set_title("C-SFT retrieval over training")
        ax.legend()
        fig.tight_layout()
        path = out_dir / "csft_recall_at_10.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
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
