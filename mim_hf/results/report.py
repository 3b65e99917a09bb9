"""The results report: per protocol and model, test metrics (mean ± std over seeds x folds) per
popularity bucket, paired AUC differences to DIN-ID, the chosen settings, commit, environment.

``report.json`` (and ``docs/results.json``) layout::

    {"protocols": {"temporal/rating": {"din": {"overall": {"auc", "auc_std", "gauc", "logloss", "n"},
                                               "cold": {...}, "long_tail": {...}, "head": {...}},
                                       "fuxictr_din": {...}, ...}, ...},
     "paired": {"<protocol>": {"<model>": {"auc_diff", "ci_low", "ci_high", "n_pairs"}}},
     "levers": {"<protocol>": {"<model+levers>": {...}}},   (against the model without its levers)
     "folds": K, "folds_run": k, "lever_folds": N, "seeds": [...], "budget", "grid", "epochs", "patience",
     "row_folds": {"<protocol>": {"<model>": [folds]}},   (rows that ran in fewer folds than the protocol)
     "settings": {"<protocol>": {"<model>": {"fold<k>": setting}}},
     "tuning_valid_auc": {"<protocol>": {"<model>": {"fold<k>": {"<setting id>": valid AUC}}}},
     "wall_time_s", "compute_time_s", "commit", "run_commits", "config_digest", "environment",
     "carried": {"<protocol>": {"commit", "run_commits", "compute_time_s"}},    (only with keep_docs_protocols)
     "carried_rows": {"<protocol>": {"rows": [...], "commit", ...}}}

``n`` is the number of test samples summed over the folds that ran.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from mim_hf.common.config import write_json_atomic
from mim_hf.report import BUCKET_ORDER, METRICS, aggregate_seeds, model_label, plot_auc_by_bucket, results_table
from mim_hf.results import tuning
from mim_hf.results.levers import parse_model
from mim_hf.results.paired import paired_difference


def current_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def digest_inputs(world: str, overrides: dict, epochs: int | None = None) -> dict:
    """What the runs of an invocation train under: ``{"configs": {file name: fields}, "world": {...},
    "cap": {"epochs", "patience"} or None}`` — each shipped stage config ``world`` reads, as parsed (a
    comment edit does not change it) with its stage's ``--set`` overrides applied (so a ``--set`` value
    later written into the YAML is no change), the world's overrides, and, when given, the epoch cap and
    early-stopping patience of the CTR runs. Thread counts are left out: they do not change what is
    trained. An archive keeps it beside the runs (``<archive>/<digest>/configs.json``)."""
    import importlib.resources

    import yaml

    def kept(fields: dict) -> dict:
        return json.loads(json.dumps({f: v for f, v in fields.items() if f != "num_threads"}, default=str))

    key = "ml100k" if world == "movielens-100k" else world
    configs = {}
    for path in importlib.resources.files("mim_hf.configs").iterdir():
        if path.name.endswith(".yaml") and key in path.name:
            stage = path.name.split("_")[0]  # ctr_*, csft_*, pretrain_*
            configs[path.name] = kept({**yaml.safe_load(path.read_text()), **overrides.get(stage, {})})
    return {"configs": dict(sorted(configs.items())), "world": kept(overrides.get("world", {})),
            "cap": None if epochs is None else {"epochs": epochs, "patience": tuning.PATIENCE}}


def inputs_digest(inputs: dict) -> str:
    """sha256 (first 16 hex) of :func:`digest_inputs`' dict over every config file."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(inputs["configs"]):
        digest.update(name.encode() + b"\0" + json.dumps(inputs["configs"][name], sort_keys=True).encode() + b"\0")
    digest.update(json.dumps(inputs["world"], sort_keys=True).encode())
    if inputs["cap"] is not None:
        digest.update(json.dumps(inputs["cap"]).encode())
    return digest.hexdigest()[:16]


def config_digest(world: str, overrides: dict, epochs: int | None = None) -> str:
    """The digest of :func:`digest_inputs` over every shipped config of ``world``."""
    return inputs_digest(digest_inputs(world, overrides, epochs))


def run_inputs(config) -> dict:
    """:func:`digest_inputs` of a results invocation (its epoch cap included)."""
    return digest_inputs(config.world, config.overrides, epochs=config.epoch_cap)


def run_digest(config) -> str:
    """The digest every run of a results invocation is made, stored and archived under."""
    return inputs_digest(run_inputs(config))


def aggregate_model(per_fold: dict) -> dict:
    """``{fold: {"runs": {seed: result}}}`` -> mean/std over every (fold, seed) run per bucket, with
    ``n`` = test samples summed over folds."""
    tables = [run["test"] for fold in per_fold.values() for run in fold["runs"].values()]
    merged = aggregate_seeds(tables)
    merged.pop("seeds")
    for bucket in BUCKET_ORDER:
        if bucket in merged:
            merged[bucket]["n"] = sum((next(iter(f["runs"].values()))["test"].get(bucket) or {}).get("n") or 0
                                      for f in per_fold.values())
    merged["runs"] = len(tables)
    return merged


CENTER_ON_VALID = "ciubm_center_on_valid"  # a derived row: per fold, the CiUBM center with the best valid AUC


def center_candidate(model: str) -> bool:
    """A CiUBM row that differs from the others only by its center: the frozen-encoder, pre-trained or
    C-SFT center, with C-SFT or center levers (not CTR ones)."""
    from mim_hf.results.levers import LEVERS

    base, levers = parse_model(model)
    return base in ("ciubm_raw", "ciubm_pretrained", "ciubm_csft") and all(
        LEVERS[lever][0] in ("csft", "center") for lever in levers)


def center_chosen_on_valid(models: dict) -> dict | None:
    """One fold's ``run_fold`` output -> the entry of the CiUBM center row with the best valid AUC
    (mean over its seeds; ties to the first) among :func:`center_candidate` rows: a C-SFT variant,
    or none, chosen by the CTR valid AUC it gives rather than by retrieval recall. Its runs are that
    row's, unchanged; the test metrics play no part in the choice. None with fewer than two candidates."""
    candidates = [m for m in models if center_candidate(m)]
    if len(candidates) < 2:
        return None
    valid = {m: float(sum(r["valid"]["overall"]["auc"] for r in models[m]["runs"].values()) / len(models[m]["runs"]))
             for m in candidates}
    best = max(candidates, key=lambda m: valid[m])  # max keeps the first of equal values
    return {**models[best], "chosen": best, "valid_auc_by_setting": valid}


def build_report(config, folds: dict, wall_time_s: float) -> dict:
    """The report dict from ``{protocol: {fold: run_fold(...)}}``."""
    report = {"protocols": {}, "paired": {}, "levers": {}, "settings": {}, "tuning_valid_auc": {}, "folds": config.folds, "folds_run": config.run_folds,
              "lever_folds": config.lever_folds,
              "seeds": list(config.seeds), "budget": config.budget, "grid": tuning.budget(config.budget)["grid"],
              "split_grid": tuning.SPLIT_GRID,
              "epochs": config.epoch_cap, "patience": tuning.PATIENCE}
    compute = 0.0
    for protocol, per_fold in folds.items():
        compute += sum(r["timings_s"].get("total", 0.0) for f in per_fold.values() for m in f.values()
                       for r in m["runs"].values())
        # lever rows may run in fewer folds (``lever_folds``): the center chosen on valid picks among the
        # rows of every fold, so each fold chooses from the same candidates
        everywhere = set.intersection(*(set(f) for f in per_fold.values()))
        chosen = {k: center_chosen_on_valid({m: f[m] for m in f if m in everywhere}) for k, f in per_fold.items()}
        if all(chosen.values()):
            per_fold = {k: {**f, CENTER_ON_VALID: chosen[k]} for k, f in per_fold.items()}
            report.setdefault("center_on_valid", {})[protocol] = {f"fold{k}": c["chosen"] for k, c in chosen.items()}
        models = list(dict.fromkeys(m for f in per_fold.values() for m in f))
        ran = {m: {k: f[m] for k, f in per_fold.items() if m in f} for m in models}
        report["protocols"][protocol] = {m: aggregate_model(ran[m]) for m in models}
        report["settings"][protocol] = {m: {f"fold{k}": r["setting"] for k, r in ran[m].items()} for m in models}
        report["tuning_valid_auc"][protocol] = {m: {f"fold{k}": r["valid_auc_by_setting"] for k, r in ran[m].items()}
                                                for m in models}
        report.setdefault("row_folds", {})[protocol] = {m: sorted(ran[m]) for m in models if len(ran[m]) < len(per_fold)}
        auc = {m: {(k, seed): run["test"]["overall"]["auc"] for k, r in ran[m].items() for seed, run in r["runs"].items()}
               for m in models}
        report["paired"][protocol] = {m: paired_difference(auc[m], auc["din"]) for m in models if m != "din"}
        # each lever row against the same model without its levers (when that row ran too)
        bases = {m: parse_model(m)[0] for m in models}
        report["levers"][protocol] = {m: paired_difference(auc[m], auc[base]) for m, base in bases.items()
                                      if base != m and base in auc}
    from mim_hf.results.harness import PROTOCOLS

    report["protocols_missing"] = [p for p in PROTOCOLS if p not in report["protocols"]]
    report["wall_time_s"] = round(wall_time_s, 1)
    report["compute_time_s"] = round(compute, 1)  # the chosen runs' own training time, also from earlier sessions
    report["commit"] = current_commit()
    # a resumed protocol may hold runs made at other commits: name them all
    report["run_commits"] = sorted({r.get("commit", "unrecorded") for per_fold in folds.values() for f in per_fold.values()
                                    for m in f.values() for r in m["runs"].values()})
    report["config_digest"] = run_digest(config)
    report["environment"] = {"world": config.world, "python": platform.python_version(), "torch": torch.__version__,
                             "cpu_cores": os.cpu_count(), "machine": platform.machine(),
                             "device": "cuda" if torch.cuda.is_available() else "cpu"}
    return report


# what must be equal for two reports' protocols to sit in one table
COMPARABLE = ("seeds", "budget", "grid", "split_grid", "epochs", "patience", "folds")  # + world, config digest


REPRODUCED = 1e-4  # a row run again must land this close (mean and std of AUC) for another row to be carried beside it


def _provenance(earlier: dict, protocol: str) -> dict:
    return earlier.get("carried", {}).get(protocol) or {"commit": earlier["commit"], "run_commits": earlier["run_commits"],
                                                        "compute_time_s": earlier["compute_time_s"],
                                                        "config_digest": earlier.get("config_digest", "not recorded")}


def carry_protocols(report: dict, earlier: dict) -> dict:
    """``report`` plus what ``earlier`` (an earlier ``results.json``) holds and it does not — a report
    built over several sessions:

    - a protocol ``report`` did not run is kept whole and marked in ``carried`` with the commit and runs
      it came from;
    - a row (model) of a protocol both hold is kept beside this invocation's rows only when every row
      both ran is reproduced (overall AUC mean and std within ``REPRODUCED``), so its paired interval,
      computed against the earlier DIN-ID, still pairs with the DIN-ID shown; marked in ``carried_rows``.

    Refused (ValueError naming the values) when the two were made under another protocol (seeds,
    budget, grid, epochs, patience, folds, world, or shipped configs and ``--set`` overrides: the
    ``config_digest``, where the earlier report records one), or when a shared row is not reproduced."""
    differ = [k for k in COMPARABLE if earlier.get(k) != report.get(k)]
    if earlier.get("environment", {}).get("world") != report["environment"]["world"]:
        differ.append("environment.world")
    # a report written before digests were recorded has none: carried on its commit's word (see its section)
    if earlier.get("config_digest") not in (None, report.get("config_digest")):
        differ.append("config_digest")
    if differ:
        raise ValueError("cannot keep the earlier report's protocols: it was made under another protocol ("
                         + ", ".join(f"{k}: {earlier.get(k)!r} there, {report.get(k)!r} here" for k in differ) + ")")
    from mim_hf.results.harness import PROTOCOLS

    carried = {p: _provenance(earlier, p) for p in earlier["protocols"] if p not in report["protocols"]}
    rows = {p: [m for m in earlier["protocols"][p] if m not in report["protocols"][p]]
            for p in earlier["protocols"] if p in report["protocols"]}
    rows = {p: ms for p, ms in rows.items() if ms}
    for p in rows:
        for m in set(earlier["protocols"][p]) & set(report["protocols"][p]):
            was, now = earlier["protocols"][p][m]["overall"], report["protocols"][p][m]["overall"]
            if abs(was["auc"] - now["auc"]) > REPRODUCED or abs(was["auc_std"] - now["auc_std"]) > REPRODUCED:
                raise ValueError(f"cannot keep the earlier report's rows {rows[p]} of {p}: its row {m} is not reproduced "
                                 f"(AUC {was['auc']:.5f} ± {was['auc_std']:.5f} there, {now['auc']:.5f} ± "
                                 f"{now['auc_std']:.5f} here); run those rows again instead")
    if not carried and not rows:
        return report
    out = dict(report)
    for key in ("protocols", "paired", "levers", "settings", "tuning_valid_auc"):
        was = earlier.get(key, {})
        merged = {**report[key], **{p: was.get(p, {}) for p in carried}}
        for p, ms in rows.items():
            # the earlier report's row order, this invocation's values where it ran them, its new rows last
            order = [m for m in earlier["protocols"][p]] + [m for m in report["protocols"][p] if m not in earlier["protocols"][p]]
            both = {**{m: v for m, v in was.get(p, {}).items() if m in ms}, **report[key][p]}
            merged[p] = {m: both[m] for m in order if m in both}
        out[key] = {p: merged[p] for p in PROTOCOLS if p in merged}
    out["carried"] = {**report.get("carried", {}), **carried}
    if rows:
        out["carried_rows"] = {p: {"rows": ms, **_provenance(earlier, p)} for p, ms in rows.items()}
    out["protocols_missing"] = [p for p in PROTOCOLS if p not in out["protocols"]]
    return out


def levers_summary(report: dict) -> str:
    """One table over every protocol: each lever row's paired AUC difference to its base model."""
    rows = sorted({m for per in report["levers"].values() for m in per})
    protocols = [p for p in report["protocols"] if p in report["levers"]]
    lines = ["| lever row vs its base model | " + " | ".join(f"`{p}`" for p in protocols) + " |",
             "|---|" + "---|" * len(protocols)]
    for m in rows:
        cells = [(f"{d['auc_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d else "not run")
                 for d in (report["levers"][p].get(m) for p in protocols)]
        lines.append(f"| {model_label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_table(report: dict) -> str:
    """Model × protocol test AUC (mean ± std) and, beside each row but DIN-ID's, its paired difference
    to DIN-ID with the 95 % interval; lever rows are left to the Levers table. The README's results
    table is this one, copied (a test checks it)."""
    from mim_hf.results.harness import PROTOCOLS

    protocols = [p for p in PROTOCOLS if p in report["protocols"]]
    models = list(dict.fromkeys(m for p in protocols for m in report["protocols"][p] if "+" not in m))
    lines = ["| model | " + " | ".join(f"`{p}`" for p in protocols) + " |", "|---|" + "---|" * len(protocols)]
    for model in models:
        cells = []
        for protocol in protocols:
            result = report["protocols"][protocol].get(model)
            if result is None:
                cells.append("not run")
                continue
            cell = f"{result['overall']['auc']:.4f} ± {result['overall']['auc_std']:.4f}"
            diff = report["paired"][protocol].get(model)
            if diff is not None:
                cell += f" ({diff['auc_diff']:+.4f} [{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}])"
            cells.append(cell)
        lines.append(f"| {model_label(model)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(paired: dict, against: str = "DIN-ID") -> str:
    lines = [f"| model vs {against} | mean AUC difference | 95 % interval | pairs (fold × seed) |", "|---|---|---|---|"]
    for model, p in paired.items():
        lines.append(f"| {model_label(model)} | {p['auc_diff']:+.4f} | [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] "
                     f"| {p['n_pairs']} |")
    return "\n".join(lines)


def reference_verdict(paired: dict) -> str:
    """Whether DIN-ID matches or beats FuxiCTR's DIN (``paired`` = FuxiCTR DIN minus DIN-ID)."""
    if paired["ci_low"] > 0:
        return (f"**FuxiCTR DIN beats DIN-ID** by {paired['auc_diff']:+.4f} (interval above 0): DIN-ID must match "
                "or beat it, so this needs an explanation before any other row is read.")
    if paired["ci_high"] < 0:
        return f"DIN-ID beats FuxiCTR DIN by {-paired['auc_diff']:.4f} (interval below 0)."
    return "DIN-ID matches FuxiCTR DIN (the interval of the difference includes 0)."


def settings_table(settings: dict) -> str:
    fields = tuning.TUNED_FIELDS + tuple(f for f in tuning.EXTRA_FIELDS
                                         if any(f in s for per_fold in settings.values() for s in per_fold.values()))
    lines = ["| model | fold | " + " | ".join(fields) + " |", "|" + "---|" * (len(fields) + 2)]
    for model, per_fold in settings.items():
        for fold, s in per_fold.items():
            lines.append(f"| {model_label(model)} | {fold} | "
                         + " | ".join(f"{s[f]:g}" if f in s else "shipped" for f in fields) + " |")
    return "\n".join(lines)


def markdown(report: dict, plots: list[Path]) -> str:
    n_runs = (f"{len(report['seeds'])} seed(s) × the folds: `temporal` has one split, `item-cold` ran "
              f"{report['folds_run']} of {report['folds']} item fold(s)")
    lines = ["# mim-hf results", "",
             f"Test metrics, mean ± std over {n_runs}; settings chosen on valid AUC from the `{report['budget']}` "
             f"grid {report['grid']}, plus {report.get('split_grid', {})} per split where the model has the field "
             f"(≤ {report['epochs']} epochs, early stopping patience {report['patience']}). "
             "How the protocol works: docs/results-protocol.md.", "",
             *([f"**Not in this report** (not run yet, or left out by `--protocols`): "
                f"{', '.join(f'`{p}`' for p in report['protocols_missing'])}.", ""] if report.get("protocols_missing") else []),
             f"Commit `{report['commit']}` (runs made at {', '.join(report['run_commits'])}); wall time {report['wall_time_s']:.0f} s this invocation, "
             f"{report['compute_time_s']:.0f} s of training in the reported runs; shipped-config digest "
             f"{report.get('config_digest', 'not recorded')}; "
             + ", ".join(f"{k}={v}" for k, v in report["environment"].items()), ""]
    carried = report.get("carried", {})
    if carried:
        lines += [f"Protocols {', '.join(f'`{p}`' for p in carried)} are carried from an earlier report of the same "
                  "protocol (its commit is named in each section); the rest were run by this invocation.", ""]
    lines += ["## Headline", "", "Test AUC over every item (mean ± std over folds × seeds) and, in brackets, the "
              "paired difference to DIN-ID with its 95 % bootstrap interval; per-bucket tables below.", "",
              headline_table(report), ""]
    if any(report["levers"].values()):
        lines += ["## Levers", "", "Mean test-AUC difference of each lever row to the same model without the lever, "
                  "paired over folds × seeds (95 % bootstrap interval); a lever row trains at its base row's chosen "
                  "setting. Per-bucket metrics are in each protocol's tables.", "", levers_summary(report), ""]
    for protocol, results in report["protocols"].items():
        lines += [f"## `{protocol}`", ""]
        if protocol in carried:
            c = carried[protocol]
            lines += [f"*Carried from the report written at commit `{c['commit']}` (runs made at "
                      f"{', '.join(c['run_commits'])}; {c['compute_time_s']:.0f} s of training in that report; "
                      f"shipped-config digest {c.get('config_digest', 'not recorded')}).*", ""]
        if protocol in report.get("carried_rows", {}):
            c = report["carried_rows"][protocol]
            lines += [f"*Rows {', '.join(model_label(m) for m in c['rows'])} are carried from the report written at "
                      f"commit `{c['commit']}`; every row run again here reproduced that report's AUC mean and std "
                      f"within {REPRODUCED:g}, so their intervals pair with the DIN-ID shown.*", ""]
        for metric in METRICS:
            lines += [f"**{metric.upper()}**", "", results_table(results, metric), ""]
        lines += ["**AUC difference to DIN-ID** (paired over matched folds × seeds, 95 % bootstrap interval)", "",
                  paired_table(report["paired"][protocol]), ""]
        if report["levers"][protocol]:
            lines += ["**Levers** (each row against the same model without them, paired over folds × seeds; a lever "
                      "row trains at its base row's chosen setting, not re-tuned)", "",
                      paired_table(report["levers"][protocol], against="its base model"), ""]
        fewer = report.get("row_folds", {}).get(protocol)
        if fewer:
            folds_of = {}
            for m, ks in fewer.items():
                folds_of.setdefault(", ".join(map(str, ks)), []).append(model_label(m))
            lines += [" ".join(f"Rows {', '.join(ms)} ran in fold(s) {ks} only (`--lever-folds`): their means and "
                               "paired differences are over those folds' runs." for ks, ms in folds_of.items()), ""]
        reference = report["paired"][protocol].get("fuxictr_din")
        if reference is not None:
            lines += [reference_verdict(reference), ""]
        if protocol in report.get("center_on_valid", {}):
            picks = ", ".join(f"{fold}: {model_label(m)}" for fold, m in report["center_on_valid"][protocol].items())
            lines += [f"{model_label(CENTER_ON_VALID)} is, per fold, the CiUBM center row with the best mean valid "
                      f"AUC (C-SFT variants, or none, chosen by the CTR valid AUC they give): {picks}.", ""]
        lines += ["**Chosen settings**", "",
                  settings_table(report["settings"][protocol]), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path, docs_dir: Path | None = None, keep_docs_protocols: bool = False) -> dict:
    """``out/report.{json,md}`` + one AUC plot per protocol; also ``docs_dir/results.{json,md}``, which
    with ``keep_docs_protocols`` keeps the protocols of the ``results.json`` already there that this
    report does not hold (``carry_protocols``). Returns the report as written to ``docs_dir``
    (else as built)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    runs = f"{report['folds_run']} fold(s) × {len(report['seeds'])} seed(s)"
    for protocol, results in report["protocols"].items():
        path = out / f"auc_by_bucket_{protocol.replace('/', '_')}.png"
        plots.append(plot_auc_by_bucket(results, f"test AUC by item popularity — {protocol}", path, runs))
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(markdown(report, plots))
    print(f"[results] report: {out / 'report.md'} (+ report.json, {len(plots)} plot(s))", flush=True)
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        if keep_docs_protocols and (docs_dir / "results.json").exists():
            report = carry_protocols(report, json.loads((docs_dir / "results.json").read_text()))
        write_json_atomic(docs_dir / "results.json", report)
        (docs_dir / "results.md").write_text(markdown(report, []))
        print(f"[results] docs: {docs_dir / 'results.md'} (+ results.json)", flush=True)
    return report
