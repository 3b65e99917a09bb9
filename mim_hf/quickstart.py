"""The main job: the whole MIM chain on one dataset, both protocols, ending in a report.

Per protocol, under ``<out>/<protocol>/``::

    data/                      prepare (samples, pairs, vocabularies; train-only statistics)
    pretrain/encoder           stage 1: domain adaptation + modal alignment (LoRA)
    csft/encoder               stage 2: C-SFT from the stage-1 encoder
    centers/{pretrained,csft}  Representation Centers of both encoders (every catalogue item)
    ctr/<model>/seed<k>/       stage 3: DIN-ID, content-as-feature, CiUBM(pre-trained), CiUBM(C-SFT)

then ``<out>/report.{json,md}`` and PNG plots. A stage whose artefact already exists is
reused (so one stage can be re-run alone with ``--stages``); ``--force`` recomputes.
Encoders and centers are trained once per protocol (seed 0); CTR models once per seed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.resources
import json
import multiprocessing
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml

from mim_hf.common.config import load_config, write_json_atomic

OVERRIDABLE = ("world", "pretrain", "csft", "ctr")
STAGES = ("data", "pretrain", "csft", "centers", "retrieval", "ctr", "report")
CTR_MODELS = {  # model name -> (mode, center)
    "din": ("din", None),
    "content_feature": ("content_feature", "pretrained"),
    "ciubm_pretrained": ("ciubm", "pretrained"),
    "ciubm_csft": ("ciubm", "csft"),
}


@dataclasses.dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    world: str = "movielens-100k"  # or "synthetic" (tiny text + vision towers, images end to end)
    protocols: tuple[str, ...] = ("temporal", "item-cold")
    seeds: tuple[int, ...] = (0, 1, 2)
    stages: tuple[str, ...] = STAGES
    force: bool = False
    source: str | None = None
    cache_dir: str | None = None
    show_progress: bool = True
    # Protocol chains are independent: run up to `jobs` of them in parallel processes, each with
    # cores // jobs torch threads (0 = one job per protocol, capped by the cores).
    jobs: int = 0
    # Field overrides on top of the shipped configs, per stage ("pretrain", "csft", "ctr") and
    # "world" (make_synthetic_world arguments), e.g. {"ctr": {"epochs": 1}}.
    overrides: dict = dataclasses.field(default_factory=dict)


def stage_config(cls, name: str, **overrides):
    """A stage config from the shipped YAML ``training/configs/<name>.yaml`` (installed as
    ``mim_hf.configs``) with the quickstart's paths and seeds on top."""
    path = importlib.resources.files("mim_hf.configs") / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no shipped config {name!r} (looked for {path})")
    return load_config(cls, path, overrides)


def parse_overrides(assignments: list[str]) -> dict:
    """``["ctr.epochs=1", "pretrain.max_steps=10"]`` -> ``{"ctr": {"epochs": 1}, ...}`` (YAML-typed)."""
    overrides: dict = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        stage, dot, field = key.partition(".")
        if not sep or not dot or stage not in OVERRIDABLE:
            raise ValueError(f"override {assignment!r} must look like STAGE.FIELD=VALUE with STAGE in {list(OVERRIDABLE)}")
        overrides.setdefault(stage, {})[field] = yaml.safe_load(value)
    return overrides


def config_names(world: str, protocol: str) -> dict[str, str]:
    """Shipped config file per stage for ``world`` / ``protocol`` (CTR names get the model appended)."""
    if world == "movielens-100k":
        return {"pretrain": "pretrain_ml100k", "csft": "csft_ml100k", "ctr": f"ctr_ml100k_{protocol.replace('-', '_')}_"}
    return {"pretrain": "pretrain_synthetic", "csft": "csft_synthetic", "ctr": "ctr_synthetic_"}


class _Stage:
    """Times a stage and says whether its artefact is reused."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()
        print(f"[quickstart] {self.name} ...", flush=True)
        return self

    def __exit__(self, *exc):
        self.timings[self.name] = round(time.perf_counter() - self.start, 1)
        if exc[0] is None:
            print(f"[quickstart] {self.name} done in {self.timings[self.name]:.1f}s", flush=True)


def _needed(config: QuickstartConfig, stage: str, artefact: Path, clear: Path | None = None) -> bool:
    """Run ``stage`` when selected and (forced or its artefact is missing); ``--force`` removes
    ``clear`` (default: the artefact) first."""
    if stage not in config.stages:
        return False
    doomed = artefact if clear is None else clear
    if config.force and doomed.exists():
        shutil.rmtree(doomed) if doomed.is_dir() else doomed.unlink()
    return not artefact.exists()


def _resume(config: QuickstartConfig, stage_dir: Path) -> bool:
    """Whether a training stage continues an interrupted run: yes when ``stage_dir`` holds a complete
    checkpoint (a killed quickstart picks up where it stopped), unless ``--force`` asked for a
    recomputation, which discards those checkpoints."""
    from mim_hf.common.checkpoints import checkpoint_dir, latest_checkpoint

    if config.force:
        shutil.rmtree(checkpoint_dir(stage_dir), ignore_errors=True)
        return False
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is not None:
        print(f"[quickstart] resuming {stage_dir} from {checkpoint.name}", flush=True)
    return checkpoint is not None


def load_world(config: QuickstartConfig):
    from mim_hf.data import load_movielens_100k, make_synthetic_world

    if config.world == "movielens-100k":
        return load_movielens_100k(config.source, cache_dir=config.cache_dir)
    if config.world == "synthetic":
        return make_synthetic_world(**{"n_users": 300, "n_items": 400, "seed": 0, **config.overrides.get("world", {})})
    raise ValueError(f"world {config.world!r} is not one of ['movielens-100k', 'synthetic']")


def run_protocol(config: QuickstartConfig, protocol: str, data, timings: dict) -> dict:
    """Every stage for one protocol; returns its slice of the report."""
    from mim_hf.center.build import STAGING_DIR, build_center
    from mim_hf.center.store import RepresentationCenter
    from mim_hf.data import PreparedData, prepare
    from mim_hf.data.prepare import format_stats
    from mim_hf.encoder.build import load_encoder_and_processor
    from mim_hf.report import aggregate_seeds
    from mim_hf.csft.retrieval import evaluate_pairs
    from mim_hf.csft import train as csft
    from mim_hf.ctr import train as ctr
    from mim_hf.pretrain import train as pretrain

    root = Path(config.out) / protocol
    names = config_names(config.world, protocol)
    stage_overrides = {stage: config.overrides.get(stage, {}) for stage in ("pretrain", "csft", "ctr")}
    data_dir, pretrain_dir, csft_dir = root / "data", root / "pretrain", root / "csft"

    if _needed(config, "data", data_dir / "prepared.json"):
        with _Stage(timings, f"{protocol}/data"):
            prepare(data, protocol=protocol).save(data_dir)
    prepared = PreparedData.load(data_dir)
    print(format_stats(prepared.stats), flush=True)

    if _needed(config, "pretrain", pretrain_dir / "metrics.json"):
        with _Stage(timings, f"{protocol}/pretrain"):
            pretrain.run(stage_config(pretrain.PretrainConfig, names["pretrain"], **stage_overrides["pretrain"],
                                      data_dir=str(data_dir), output_dir=str(pretrain_dir),
                                      show_progress=config.show_progress), resume=_resume(config, pretrain_dir))
    if _needed(config, "csft", csft_dir / "metrics.json"):
        with _Stage(timings, f"{protocol}/csft"):
            csft.run(stage_config(csft.CSFTConfig, names["csft"], **stage_overrides["csft"], data_dir=str(data_dir),
                                  output_dir=str(csft_dir), encoder_path=str(pretrain_dir / "encoder"),
                                  show_progress=config.show_progress), resume=_resume(config, csft_dir))

    centers = {}
    for name, encoder_dir in (("pretrained", pretrain_dir / "encoder"), ("csft", csft_dir / "encoder")):
        path = root / "centers" / name
        if _needed(config, "centers", path / "CURRENT", clear=path):
            with _Stage(timings, f"{protocol}/center_{name}"):
                encoder, processor = load_encoder_and_processor(encoder_dir)
                # A killed build left its finished chunks staged: continue from them.
                build_center(encoder, processor, prepared.items, path, show_progress=config.show_progress,
                             resume=(path / STAGING_DIR).is_dir())
        centers[name] = path

    retrieval_file = root / "retrieval.json"
    if _needed(config, "retrieval", retrieval_file):
        with _Stage(timings, f"{protocol}/retrieval_raw"):
            # The raw (off-the-shelf) encoder: the towers the stages start from, no training.
            pretrain_config = stage_config(pretrain.PretrainConfig, names["pretrain"], **stage_overrides["pretrain"],
                                           data_dir=str(data_dir))
            raw, processor = pretrain.build_encoder_and_processor(dataclasses.replace(pretrain_config, lora=False))
            raw_metrics = evaluate_pairs(raw, processor, prepared.items, prepared.pairs["test"])
            csft_metrics = json.loads((csft_dir / "metrics.json").read_text())["retrieval"]
            write_json_atomic(retrieval_file, {
                "raw": raw_metrics,
                "pretrained": csft_metrics["start"]["test"],
                "csft": csft_metrics["final"]["test"],
                "popularity": csft_metrics["popularity"]["test"],
            })

    results = {}
    for model, (mode, center) in CTR_MODELS.items():
        per_seed = []
        for seed in config.seeds:
            run_dir = root / "ctr" / model / f"seed{seed}"
            if _needed(config, "ctr", run_dir / "metrics.json"):
                with _Stage(timings, f"{protocol}/ctr_{model}_seed{seed}"):
                    ctr.run(stage_config(
                        ctr.CTRTrainConfig, names["ctr"] + model, **stage_overrides["ctr"],
                        data_dir=str(data_dir), output_dir=str(run_dir),
                        mode=mode, seed=seed, center_path=str(centers[center]) if center else None,
                        show_progress=config.show_progress), resume=_resume(config, run_dir))
            if (run_dir / "metrics.json").exists():
                per_seed.append(json.loads((run_dir / "metrics.json").read_text())["test"])
        if per_seed:
            results[model] = aggregate_seeds(per_seed)
    return {
        "results": results,
        "retrieval": json.loads(retrieval_file.read_text()) if retrieval_file.exists() else None,
        "csft_history": json.loads((csft_dir / "metrics.json").read_text()).get("history", [])
        if (csft_dir / "metrics.json").exists() else [],
        "data_stats": prepared.stats,
    }


def _jobs(config: QuickstartConfig) -> int:
    return max(1, min(len(config.protocols), config.jobs or os.cpu_count() or 1))


def _threads_per_job(config: QuickstartConfig) -> int:
    return max(1, (os.cpu_count() or 1) // _jobs(config))


def _protocol_worker(config: QuickstartConfig, protocol: str, data) -> tuple[dict, dict]:
    """One protocol chain in a worker process; returns (report part, stage timings)."""
    torch.set_num_threads(_threads_per_job(config))
    if not config.show_progress:
        _quiet_bars()
    timings: dict[str, float] = {}
    return run_protocol(config, protocol, data, timings), timings


def _run_protocols(config: QuickstartConfig, data, timings: dict) -> dict[str, dict]:
    """Every protocol chain, in parallel worker processes when ``jobs`` > 1 (spawned: a clean
    torch runtime per process), else in this process."""
    if _jobs(config) == 1:
        torch.set_num_threads(_threads_per_job(config))
        return {protocol: run_protocol(config, protocol, data, timings) for protocol in config.protocols}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(_jobs(config), mp_context=context) as pool:
        futures = {protocol: pool.submit(_protocol_worker, config, protocol, data) for protocol in config.protocols}
        parts = {}
        for protocol, future in futures.items():
            parts[protocol], protocol_timings = future.result()
            timings.update(protocol_timings)
    return parts


def _quiet_bars() -> None:
    """Silence transformers' / datasets' own weight-loading and saving bars."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run_quickstart(config: QuickstartConfig) -> dict:
    """Run every selected stage for every protocol, then write the report; returns report.json."""
    from mim_hf.report import terminal_table, write_markdown, write_plots

    unknown = sorted(set(config.stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    if not config.show_progress:
        _quiet_bars()
    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with _Stage(timings, "load_data"):
        data = load_world(config)
    report = {"protocols": {}, "retrieval": {}, "csft_history": {}, "data": {}}
    parts = _run_protocols(config, data, timings)
    for protocol in config.protocols:
        part = parts[protocol]
        report["protocols"][protocol] = part["results"]
        if part["retrieval"]:
            report["retrieval"][protocol] = part["retrieval"]
        report["csft_history"][protocol] = part["csft_history"]
        report["data"][protocol] = part["data_stats"]
    timings["total"] = round(time.perf_counter() - started, 1)
    report["timings_s"] = timings
    report["environment"] = {
        "world": config.world, "seeds": list(config.seeds), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_cores": os.cpu_count(), "parallel_protocol_jobs": _jobs(config),
        "threads_per_job": _threads_per_job(config), "machine": platform.machine(),
    }
    if "report" in config.stages:
        write_json_atomic(out / "report.json", report)
        plots = write_plots(report, out)
        write_markdown(report, out, plots)
        print(terminal_table(report))
        print(f"\n[quickstart] report: {out / 'report.md'} (+ report.json, {len(plots)} plots); total {timings['total']:.0f}s")
    return report
