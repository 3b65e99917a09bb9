"""Does content similarity alone separate clicks from non-clicks? A diagnostic for the quickstart's centers.

For every test sample with a history, score = cosine(target, each of the user's earlier positives
(last 50)), pooled by mean or max, using a Representation Center; prints the AUC of that score
against the label. 0.5 = no signal. Run after `mim-hf quickstart`:

    python examples/similarity_auc.py [--root runs/quickstart]
"""

import argparse

import torch
import torch.nn.functional as F

from mim_hf.center.store import RepresentationCenter
from mim_hf.data import PreparedData
from mim_hf.ctr.metrics import auc


def similarity_auc(prepared: PreparedData, center: RepresentationCenter, split: str = "test") -> dict:
    """``{"n", "auc_mean_cos", "auc_max_cos"}`` over the samples of ``split`` that have a history."""
    rows = prepared.samples[split].select_columns(["item_id", "behavior_item_ids", "label"])[:]
    ids = sorted(set(rows["item_id"]) | {b for history in rows["behavior_item_ids"] for b in history})
    embeds, _ = center.lookup(ids)
    embeds = F.normalize(embeds.float(), dim=1)
    row_of = {item_id: k for k, item_id in enumerate(ids)}
    mean_scores, max_scores, labels = [], [], []
    for target, history, label in zip(rows["item_id"], rows["behavior_item_ids"], rows["label"]):
        if not history:
            continue
        sims = embeds[[row_of[b] for b in history[-50:]]] @ embeds[row_of[target]]
        mean_scores.append(float(sims.mean()))
        max_scores.append(float(sims.max()))
        labels.append(label)
    return {"n": len(labels), "auc_mean_cos": auc(labels, mean_scores),
            "auc_max_cos": auc(labels, max_scores)}


def attribute_overlap_auc(prepared: PreparedData, column: str = "genres", split: str = "test") -> dict:
    """The same question asked of a list-valued item attribute instead of content: score = mean
    Jaccard overlap of the target's ``column`` values with each of the user's earlier positives'
    (last 50). ``{"n", "auc_mean_jaccard"}``; the reference a content center should beat."""
    values = {item_id: set(v or ()) for item_id, v in zip(prepared.items["item_id"], prepared.items[column])}
    rows = prepared.samples[split].select_columns(["item_id", "behavior_item_ids", "label"])[:]
    scores, labels = [], []
    for target, history, label in zip(rows["item_id"], rows["behavior_item_ids"], rows["label"]):
        if not history:
            continue
        overlaps = [len(values[target] & values[b]) / max(1, len(values[target] | values[b])) for b in history[-50:]]
        scores.append(sum(overlaps) / len(overlaps))
        labels.append(label)
    return {"n": len(labels), "auc_mean_jaccard": auc(labels, scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/quickstart", help="the quickstart's output folder")
    args = parser.parse_args()
    for protocol in ("temporal", "item-cold"):
        prepared = PreparedData.load(f"{args.root}/{protocol}/data")
        for name in ("pretrained", "csft"):
            result = similarity_auc(prepared, RepresentationCenter.load(f"{args.root}/{protocol}/centers/{name}"))
            print(f"{protocol:9s} {name:10s} n={result['n']}  AUC(mean cos)={result['auc_mean_cos']:.4f}  "
                  f"AUC(max cos)={result['auc_max_cos']:.4f}")
        genres = attribute_overlap_auc(prepared, "genres")
        print(f"{protocol:9s} {'genres':10s} n={genres['n']}  AUC(mean Jaccard)={genres['auc_mean_jaccard']:.4f}")


if __name__ == "__main__":
    main()
