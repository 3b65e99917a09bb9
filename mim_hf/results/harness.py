"""The results protocol: protocol x fold x model x tuning setting x seed, resumable run by run.

Under ``<out>/<split>/<labels>/fold<k>/``::

    data/                          prepare(data, protocol=split, labels=..., folds=K, fold=k)
    pretrain/ csft/ centers/       one encoder chain per fold, shared by the content models
    runs/<model>/<setting>/seed<s> a CTR training in progress (removed once its result exists)
    results/<model>/<setting>/seed<s>.json   the result (valid + test metrics), written atomically

A result file that exists is never recomputed, so a killed run continues where it stopped
(a CTR training in progress also resumes from its own checkpoint). Tuning (see
:mod:`mim_hf.results.tuning`): every grid setting with the first seed, the best on valid AUC
with the other seeds. ``run_results`` ends with ``<out>/report.{md,json}`` and plots.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from mim_hf.common.checkpoints import check_finished_run, field_defaults, latest_checkpoint
from mim_hf.common.config import write_json_atomic
from mim_hf.quickstart import config_names, load_world, stage_config
from mim_hf.results import levers as lever_specs
from mim_hf.results import tuning

# model -> (CiUBM mode, the fold's center it reads, the shipped CTR config its architecture comes from);
# "raw" is the foundation encoder as it ships (no pre-training, no C-SFT): the center to beat
ROWS = {
    "din": ("din", None, "din"),
    "fuxictr_din": (None, None, "din"),  # FuxiCTR's own DIN class, DIN-ID's widths
    "content_feature": ("content_feature", "pretrained", "content_feature"),
    "ciubm_raw": ("ciubm", "raw", "ciubm_pretrained"),
    "ciubm_pretrained": ("ciubm", "pretrained", "ciubm_pretrained"),
    "ciubm_csft": ("ciubm", "csft", "ciubm_csft"),
}
MODELS = tuple(ROWS)
PROTOCOLS = ("temporal/rating", "item-cold/rating", "temporal/implicit", "item-cold/implicit")


@dataclasses.dataclass
class ResultsConfig:
    out: str = "runs/results"
    world: str = "movielens-100k"  # or "synthetic"
    protocols: tuple[str, ...] = PROTOCOLS
    models: tuple[str, ...] = MODELS
    seeds: tuple[int, ...] = (0, 1, 2)
    folds: int = 5
    fold_limit: int = 0  # run only the first N folds (0 = all); the report says how many ran
    only_folds: tuple[int, ...] = ()  # or run only these item folds (e.g. one process per fold group)
    lever_folds: int = 0  # lever rows (model+lever) run only in item folds 0..N-1 (0 = every fold that runs)
    budget: str = "small"
    epochs: int = 0  # 0 = the budget's
    source: str | None = None
    cache_dir: str | None = None
    show_progress: bool = True
    docs_dir: str | None = None  # also write <docs_dir>/results.{md,json}
    keep_docs_protocols: bool = False  # keep the protocols of <docs_dir>/results.json this invocation does not run
    archive: str | None = None  # finished run results are kept (and found) here too, e.g. a committed folder
    # shipped-config overrides per stage ("pretrain", "csft", "ctr") and "world", as in the quickstart
    overrides: dict = dataclasses.field(default_factory=dict)
    threads: int = 0  # torch threads in every stage and CTR run (0 = the stage configs'); a --set num_threads wins

    def validate(self) -> None:
        for protocol in self.protocols:
            split_labels(protocol)
        if self.folds == 2 or self.folds < 1:
            raise ValueError(f"folds must be 1 (one seeded hold-out) or >= 3 (K item folds: one test part, one "
                             f"valid part, the rest train); got {self.folds}")
        unknown = sorted({lever_specs.parse_model(m)[0] for m in self.models} - set(MODELS))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODELS)} (optionally with levers: "
                             f"ciubm_csft+{'+'.join(lever_specs.LEVERS)})")
        if "din" not in self.models:
            raise ValueError("models must include 'din': every paired comparison is against DIN-ID")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        if self.fold_limit < 0 or self.epochs < 0 or self.threads < 0 or self.lever_folds < 0:
            raise ValueError(f"fold_limit, epochs, threads and lever_folds must be >= 0; got {self.fold_limit}, "
                             f"{self.epochs}, {self.threads}, {self.lever_folds}")
        if self.only_folds and (self.fold_limit or self.folds < 3
                                or any(not 0 <= k < self.folds for k in self.only_folds)):
            raise ValueError(f"only_folds {list(self.only_folds)} must name item folds in [0, {self.folds}) of K >= 3 "
                             f"folds, without fold_limit (got folds={self.folds}, fold_limit={self.fold_limit})")
        tuning.budget(self.budget)

    @property
    def item_folds(self) -> list[int]:
        """The item folds that run: ``only_folds``, else the first ``fold_limit`` (0 = all ``folds``)."""
        if self.only_folds:
            return sorted(set(self.only_folds))
        return list(range(min(self.folds, self.fold_limit) if self.fold_limit else self.folds))

    @property
    def run_folds(self) -> int:
        return len(self.item_folds)

    def fold_models(self, protocol: str, fold: int) -> tuple[str, ...]:
        """The rows that run in ``fold`` of ``protocol``: every model, except that lever rows run only in
        item folds ``0 .. lever_folds - 1`` (``temporal``'s one split is fold 0)."""
        levers_here = not self.lever_folds or fold < self.lever_folds
        return tuple(m for m in self.models if levers_here or not lever_specs.parse_model(m)[1])

    def stage_overrides(self, stage: str) -> dict:
        """The ``--set`` fields of ``stage`` ("pretrain", "csft", "ctr"), with ``num_threads`` from ``threads``
        where the stage's own is not set."""
        return {**({"num_threads": self.threads} if self.threads else {}), **self.overrides.get(stage, {})}

    @property
    def epoch_cap(self) -> int:
        """The most epochs a CTR run trains: ``epochs``, else the budget's."""
        return self.epochs or tuning.budget(self.budget)["epochs"]


def split_labels(protocol: str) -> tuple[str, str]:
    """``"item-cold/implicit"`` -> ``("item-cold", "implicit")``, checked."""
    split, _, labels = protocol.partition("/")
    if split not in ("temporal", "item-cold") or labels not in ("rating", "implicit"):
        raise ValueError(f"protocol {protocol!r} must be SPLIT/LABELS with SPLIT in ['temporal', 'item-cold'] "
                         "and LABELS in ['rating', 'implicit']")
    return split, labels


def prepare_kwargs(split: str, labels: str, folds: int, fold: int, seed: int = 0) -> dict:
    """``prepare`` arguments for one fold. ``temporal`` has one split (folds do not apply);
    ``item-cold`` with ``folds`` >= 3 takes fold ``fold`` of K, with ``folds`` == 1 the single
    seeded 80/10/10 hold-out of the quickstart."""
    kwargs = {"protocol": split, "labels": labels, "seed": seed}
    if split == "item-cold" and folds > 1:
        kwargs.update(folds=folds, fold=fold)
    return kwargs


def protocol_folds(config: "ResultsConfig", protocol: str) -> list[int]:
    """The folds of ``protocol`` that run: [0] for ``temporal``, else ``config.item_folds``."""
    return [0] if split_labels(protocol)[0] == "temporal" else config.item_folds


class _Progress:
    """Progress lines of one invocation, the commit its code was loaded from (recorded in every
    result it makes: the checkout may move on while a long invocation runs), what its runs train
    from (:func:`mim_hf.results.report.run_inputs`) and its archive."""

    def __init__(self, total: int, inputs: dict, archive: str | None = None):
        from mim_hf.results.report import current_commit, inputs_digest

        self.total, self.done, self.started, self.commit = total, 0, time.perf_counter(), current_commit()
        self.inputs, self.config_digest = inputs, inputs_digest(inputs)  # every result made here is made under it
        self.archive = Path(archive) if archive else None
        self._archived_inputs: dict[str, dict] = {}
        self._row_digests: dict[tuple, str | None] = {}
        if self.archive is not None:
            write_archive_inputs(self.archive, inputs)

    def sources(self, world: str, protocol: str, fold: int, model: str) -> list[tuple[str, str]]:
        """The archived rows whose runs are ``model``'s runs in ``fold`` of ``protocol``: ``(digest,
        row)`` for every row archived under any digest whose :func:`row_inputs` equal ``model``'s here
        (its own name under this invocation's digest first). A C-SFT change leaves DIN-ID's runs as
        they are, and a lever adopted into a shipped config brings its runs with it
        (``ciubm_csft+cooccurrence_pairs`` before = ``ciubm_csft`` after)."""
        if self.archive is None or not self.archive.is_dir():
            return []
        wanted = row_digest(self.inputs, world, protocol, model)
        found = [(self.config_digest, model)]
        for folder in sorted(self.archive.iterdir()):
            results = folder / protocol / f"fold{fold}" / "results"
            if not (folder / ARCHIVE_INPUTS).exists() or not results.is_dir():
                continue  # digests made before configs.json was kept are never reused for another
            if folder.name not in self._archived_inputs:
                self._archived_inputs[folder.name] = read_archive_inputs(folder)
            for row in sorted(p.name for p in results.iterdir() if p.is_dir()):
                key = (folder.name, protocol, row)
                if key not in self._row_digests:
                    try:
                        self._row_digests[key] = row_digest(self._archived_inputs[folder.name], world, protocol, row)
                    except (ValueError, KeyError):  # a lever since removed, a config file since renamed
                        self._row_digests[key] = None
                if self._row_digests[key] == wanted and (folder.name, row) not in found:
                    found.append((folder.name, row))
        return found

    def step(self, what: str, reused: bool) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        print(f"[results] {self.done}/{self.total} {what} {'(reused)' if reused else ''} [{elapsed:.0f}s]", flush=True)


ARCHIVE_INPUTS = "configs.json"  # <archive>/<digest>/configs.json: what the runs under that digest train from


def row_files(world: str, protocol: str, model: str) -> set[str]:
    """The shipped config files ``model``'s runs under ``protocol`` read: its CTR config, and the
    pre-training (and C-SFT) config of the encoder chain behind its center."""
    names = config_names(world, split_labels(protocol)[0])
    base, levers = lever_specs.parse_model(model)
    _, center, ctr_name = ROWS[base]
    files = [names["ctr"] + ctr_name] + [names["pretrain"]] * bool(center) + [names["csft"]] * (center == "csft")
    id_model = lever_specs.overrides(levers, "csft").get("id_model")  # C-SFT pairs from the fold's DIN-ID
    return {name + ".yaml" for name in files + ([names["ctr"] + id_model] if id_model else [])}


def row_inputs(inputs: dict, world: str, protocol: str, model: str) -> dict:
    """What ``model``'s runs under ``protocol`` train from, out of an invocation's inputs
    (:func:`mim_hf.results.report.run_inputs`): its base row, the configs it reads (:func:`row_files`)
    with its levers' fields applied, the channels added to its center, the world's overrides and the
    epoch cap. Rows with equal row inputs make the same runs, whatever their names. A "setting"
    lever is not here: it changes the setting, which names each run."""
    names = config_names(world, split_labels(protocol)[0])
    base, levers = lever_specs.parse_model(model)
    # each config with its class's defaults under it: a field a YAML leaves out is the same field at
    # its default (a config that later writes `pair_source: behaviour` out trains what it trained)
    configs = {name: {**_stage_defaults(name), **inputs["configs"][name]}
               for name in sorted(row_files(world, protocol, model))}
    ctr_fields = lever_specs.overrides(levers, "ctr")
    if ctr_fields:  # on top of the model_overrides in effect, as _train_one applies them
        ctr_file = names["ctr"] + ROWS[base][2] + ".yaml"
        in_effect = configs[ctr_file].get("model_overrides") or {}
        configs[ctr_file] = {**configs[ctr_file], "model_overrides": {**in_effect, **ctr_fields}}
    csft_fields = lever_specs.overrides(levers, "csft")
    if csft_fields:
        configs[names["csft"] + ".yaml"] = {**configs[names["csft"] + ".yaml"], **csft_fields}
    channels = sorted(lever_specs.overrides([lever], "center")["add"] for lever in levers
                      if lever_specs.LEVERS[lever][0] == "center")
    return {"base": base, "configs": configs, "channels": channels, "world": inputs["world"], "cap": inputs["cap"]}


def _stage_defaults(file_name: str) -> dict:
    """The field defaults of the stage config class a shipped config file (``ctr_*``, ``csft_*``,
    ``pretrain_*``) is read into, thread counts left out as in the digest."""
    from mim_hf.csft.train import CSFTConfig
    from mim_hf.ctr.train import CTRTrainConfig
    from mim_hf.pretrain.train import PretrainConfig

    cls = {"ctr": CTRTrainConfig, "csft": CSFTConfig, "pretrain": PretrainConfig}[file_name.split("_")[0]]
    return {field: value for field, value in field_defaults(cls).items() if field != "num_threads"}


def row_digest(inputs: dict, world: str, protocol: str, model: str) -> str:
    """sha256 (first 16 hex) of :func:`row_inputs`."""
    import hashlib

    text = json.dumps(row_inputs(inputs, world, protocol, model), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_archive_inputs(archive: Path, inputs: dict) -> None:
    """``<archive>/<digest>/configs.json`` from ``inputs``, unless there (then it must be the same)."""
    from mim_hf.results.report import inputs_digest

    path = archive / inputs_digest(inputs) / ARCHIVE_INPUTS
    if path.exists():
        read_archive_inputs(path.parent)
    else:
        write_json_atomic(path, inputs)


def read_archive_inputs(folder: Path) -> dict:
    """An archive digest folder's ``configs.json``, checked against the folder's name."""
    from mim_hf.results.report import inputs_digest

    inputs = json.loads((folder / ARCHIVE_INPUTS).read_text())
    if inputs_digest(inputs) != folder.name:
        raise ValueError(f"{folder / ARCHIVE_INPUTS} hashes to {inputs_digest(inputs)}, not to its folder's name "
                         f"{folder.name}: it was edited; restore it from git")
    return inputs


def model_center(model: str) -> str | None:
    """The fold's center ``model`` reads (None for the ID-only models): "pretrained", "csft" or
    "csft+<C-SFT levers>"."""
    base, levers = lever_specs.parse_model(model)
    center = ROWS[base][1]
    return lever_specs.center_name(center, levers) if center else None


def frozen_encoder(config):
    """The pre-training config's towers as they ship, not trained here: LoRA off, ``embed_dim`` = the
    text tower's width and an identity text projection, so a text-only item embedding IS the
    tower's pooled output (plain all-MiniLM-L6-v2 mean pooling on MovieLens)."""
    import torch

    from mim_hf.pretrain.train import build_encoder_and_processor

    config = dataclasses.replace(config, lora=False)
    torch.manual_seed(config.seed)
    encoder, processor = build_encoder_and_processor(config)
    width = encoder.text_projection.in_features
    if width != config.embed_dim:
        torch.manual_seed(config.seed)
        encoder, processor = build_encoder_and_processor(dataclasses.replace(config, embed_dim=width))
    with torch.no_grad():
        encoder.text_projection.weight.copy_(torch.eye(width))
    encoder.processor = processor
    return encoder.eval(), processor


def _run_stage(run, stage_config, build: bool = True) -> None:
    """Run an encoder stage, resume it from its checkpoint, or reuse it when finished; a finished
    one made with another configuration (a shipped config changed since) is an error naming the fields.
    With ``build=False`` only that check is made."""
    output_dir = Path(stage_config.output_dir)
    if (output_dir / "metrics.json").exists():
        check_finished_run(output_dir, stage_config)
    elif build:
        run(stage_config, resume=latest_checkpoint(output_dir) is not None)


def _encoder_chain(config: ResultsConfig, root: Path, names: dict, wanted: set[str],
                   build: bool = True) -> dict[str, Path]:
    """Pre-training, C-SFT and the centers ``wanted`` ("pretrained", "csft", "csft+<levers>") for one
    fold. ``build=False`` only checks the finished stages on disk against this invocation's configs."""
    from mim_hf.center.build import STAGING_DIR, build_center
    from mim_hf.csft import train as csft
    from mim_hf.ctr import train as ctr
    from mim_hf.encoder.build import load_encoder_and_processor
    from mim_hf.pretrain import train as pretrain

    combined = {name: channels for name, channels in ((n, lever_specs.center_channels(n)) for n in wanted) if channels[1]}
    wanted = (wanted - set(combined)).union(*({stage, *added} for stage, added in combined.values()))
    data_dir, pretrain_dir = root / "data", root / "pretrain"
    common = {"data_dir": str(data_dir), "show_progress": config.show_progress}
    pretrain_config = stage_config(pretrain.PretrainConfig, names["pretrain"], **config.stage_overrides("pretrain"),
                                   **common, output_dir=str(pretrain_dir))
    csft_fields = {name: {**config.stage_overrides("csft"), **lever_specs.overrides(name.split("+")[1:], "csft")}
                   for name in sorted(c for c in wanted if c.startswith("csft"))}
    # the encoder each C-SFT starts from: pre-training's, or the frozen towers' (lever "from_raw")
    starts = {name: root / fields.pop("start", "pretrain") / "encoder" for name, fields in csft_fields.items()}
    raw_encoder = root / "raw" / "encoder"
    # the CTR model whose item-ID embeddings align a C-SFT's pairs (lever "id_aligned_pairs"): trained once
    # per fold from its shipped config, under <fold>/id_model_<model>/
    id_models = {}
    for fields in csft_fields.values():
        if "id_model" in fields:
            model = fields.pop("id_model")
            id_models[model] = root / f"id_model_{model}"
            fields["id_model_path"] = str(id_models[model] / "model")
    # (runner, stage config) in the order they run: the ID model and pre-training where a C-SFT or a
    # center needs them, then each C-SFT
    stages = [(ctr.run, stage_config(ctr.CTRTrainConfig, names["ctr"] + model, **{
        "epochs": config.epoch_cap, "patience": tuning.PATIENCE, **config.stage_overrides("ctr")},
        **common, output_dir=str(path), mode="din", seed=config.seeds[0])) for model, path in sorted(id_models.items())]
    stages += [(pretrain.run, pretrain_config)] * ("pretrained" in wanted or pretrain_dir / "encoder" in starts.values())
    stages += [(csft.run, stage_config(csft.CSFTConfig, names["csft"], **fields, **common, output_dir=str(root / name),
                                       encoder_path=str(starts[name]))) for name, fields in csft_fields.items()]
    if not build:
        for run, stage in stages:
            _run_stage(run, stage, build=False)
        return {}
    if ("raw" in wanted or raw_encoder in starts.values()) and not (raw_encoder / "config.json").exists():
        frozen_encoder(pretrain_config)[0].save_pretrained(raw_encoder)
    for run, stage in stages:
        _run_stage(run, stage)
    centers = {}
    for name in sorted(wanted):
        path = root / "centers" / name
        if not (path / "CURRENT").exists():
            from mim_hf.data import PreparedData

            encoder, processor = load_encoder_and_processor(
                (pretrain_dir if name == "pretrained" else root / name) / "encoder")
            build_center(encoder, processor, PreparedData.load(data_dir).items, path,
                         show_progress=config.show_progress, resume=(path / STAGING_DIR).is_dir())
        centers[name] = path
    for name, (stage, added) in sorted(combined.items()):  # extra content channels (lever "raw_channel")
        path = root / "centers" / name
        if not (path / "CURRENT").exists():
            from mim_hf.center import RepresentationCenter
            from mim_hf.center.combine import concat_centers

            concat_centers([RepresentationCenter.load(centers[c]) for c in (stage, *added)], path)
        centers[name] = path
    return centers


def _train_one(config: ResultsConfig, root: Path, names: dict, model: str, setting: dict, seed: int,
               centers: dict, epochs: int) -> dict:
    """One CTR training; returns the result (valid/test metrics, training facts, setting)."""
    from mim_hf.ctr import train as ctr

    run_dir = root / "runs" / model / tuning.setting_id(setting) / f"seed{seed}"
    base, levers = lever_specs.parse_model(model)
    ctr_config_name = names["ctr"] + ROWS[base][2]
    fields = {"epochs": epochs, "patience": tuning.PATIENCE, **setting, **config.stage_overrides("ctr")}
    if levers:
        # on top of the model_overrides in effect (a --set value, else the shipped config's), not instead
        in_effect = stage_config(ctr.CTRTrainConfig, ctr_config_name, **fields).model_overrides
        fields["model_overrides"] = {**in_effect, **lever_specs.overrides(levers, "ctr")}
    if base == "fuxictr_din":
        from mim_hf.ctr.collator import CTRCollator
        from mim_hf.data import PreparedData
        from mim_hf.results import fuxictr

        base = stage_config(ctr.CTRTrainConfig, ctr_config_name, **fields, data_dir=str(root / "data"))
        prepared = PreparedData.load(base.data_dir)
        user_features, item_features = ctr.infer_features(prepared, base)
        collator = CTRCollator(prepared.vocabs, items=prepared.items, max_len=base.max_len,
                               user_features=user_features, item_features=item_features)
        metrics = fuxictr.train_and_evaluate(
            prepared, collator, {f: getattr(base, f) for f in tuning.TUNED_FIELDS},
            {"attention_hidden_sizes": base.attention_hidden_sizes, "fusion_hidden_sizes": base.fusion_hidden_sizes},
            seed=seed, epochs=base.epochs, patience=base.patience, batch_size=base.batch_size,
            eval_batch_size=base.eval_batch_size, max_grad_norm=base.max_grad_norm, num_threads=base.num_threads)
    else:
        center = model_center(model)
        metrics = ctr.run(stage_config(ctr.CTRTrainConfig, ctr_config_name, **fields, data_dir=str(root / "data"),
                                       output_dir=str(run_dir), mode=ROWS[base][0], seed=seed,
                                       center_path=str(centers[center]) if center else None,
                                       show_progress=config.show_progress),
                          resume=latest_checkpoint(run_dir) is not None)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"model": model, "seed": seed, "setting": setting, "valid": metrics["valid"], "test": metrics["test"],
            "training": metrics["training"], "timings_s": metrics["timings_s"]}


class _Lazy:
    """A mapping whose value for a key is built by ``build({key})`` (a dict) the first time it is read."""

    def __init__(self, build):
        self._build, self._built = build, {}

    def __getitem__(self, key):
        if key not in self._built:
            self._built.update(self._build({key}))
        return self._built[key]


def _result(config, root, names, model, setting, seed, centers, epochs, progress) -> dict:
    """The stored result of one run (under ``out``, else in the archive), or train it and store it.
    With an archive, every result used is also kept there, under the config digest of the invocation
    (``archive/<config_digest>/<split>/<labels>/fold<k>/results/...``), so runs made under other
    configs or ``--set`` values sit beside each other and are never mixed; a run archived under
    another digest, or under another row name, is reused when its row trains from the same configs
    (``_Progress.sources``)."""
    fold_dir = Path(root.relative_to(config.out))  # <split>/<labels>/fold<k>

    def relative(row: str) -> Path:
        return fold_dir / "results" / row / tuning.setting_id(setting) / f"seed{seed}.json"

    protocol, fold = "/".join(fold_dir.parts[:2]), int(fold_dir.name.removeprefix("fold"))
    path = Path(config.out) / relative(model)
    archived = Path(config.archive) / progress.config_digest / relative(model) if config.archive else None
    what = f"{fold_dir} {model} {tuning.setting_id(setting)} seed{seed}"
    sources = progress.sources(config.world, protocol, fold, model)
    if not path.exists() and archived is not None:
        found = [(Path(config.archive) / d / relative(row), row) for d, row in sources]
        found = [(p, row) for p, row in found if p.exists()]
        if found:
            result = json.loads(found[0][0].read_text())
            if found[0][1] != model:  # the same runs under the row's earlier name
                result = {**result, "model": model, "trained_as": found[0][1]}
            write_json_atomic(path, result)
    if path.exists():
        result = json.loads(path.read_text())
        made = result.get("config_digest")  # absent in results made before digests were recorded
        if made is not None and made != progress.config_digest and made not in {d for d, _ in sources}:
            raise ValueError(f"{path} was made under other shipped configs, --set values or epoch cap (config_digest {made}, "
                             f"this invocation {progress.config_digest}); delete it to train it again, or use "
                             "another --out")
        progress.step(what, reused=True)
    else:
        result = {**_train_one(config, root, names, model, setting, seed, centers, epochs), "commit": progress.commit,
                  "config_digest": progress.config_digest}
        write_json_atomic(path, result)
        progress.step(what + f" valid_auc={result['valid']['overall']['auc']:.4f}", reused=False)
    if archived is not None and not archived.exists():
        write_json_atomic(archived, result)
    return result


def run_fold(config: ResultsConfig, data, protocol: str, fold: int, progress: _Progress) -> dict:
    """Every model of one (protocol, fold): ``{model: {"chosen": setting id, "setting": {...},
    "valid_auc_by_setting": {setting id: valid AUC}, "runs": {seed: result}}}``."""
    split, labels = split_labels(protocol)
    root = Path(config.out) / split / labels / f"fold{fold}"
    names = config_names(config.world, split)
    if not (root / "data" / "prepared.json").exists():
        from mim_hf.data import prepare

        prepare(data, **prepare_kwargs(split, labels, config.folds, fold)).save(root / "data")
    models = config.fold_models(protocol, fold)
    wanted = {center for center in map(model_center, models) if center}
    # each center built on first use, with only the stages behind it: a fold whose runs are all stored
    # (or archived) needs no encoder stage, and a lever row left to train needs only its own C-SFT; the
    # finished stages on disk are still checked against this invocation's configs first
    if wanted:
        _encoder_chain(config, root, names, wanted, build=False)
    centers = _Lazy(lambda centers_wanted: _encoder_chain(config, root, names, centers_wanted))
    epochs = config.epoch_cap
    from mim_hf.ctr.train import CTRTrainConfig

    out = {}
    for model in sorted(models, key=lambda m: "+" in m):  # base rows first: lever rows take their setting
        base, levers = lever_specs.parse_model(model)
        if levers and base in out:  # an ablation: the base row's chosen setting, the lever added, not re-tuned
            grid = [lever_setting(out[base]["setting"], split, model)]
        else:
            shipped = stage_config(CTRTrainConfig, names["ctr"] + ROWS[base][2])
            grid = tuning.settings_grid(config.budget, {f: getattr(shipped, f) for f in tuning.TUNED_FIELDS},
                                        split_grid(split, model))
        fixed = lever_specs.overrides(levers, "setting")  # a lever that fixes a training field overrides the grid's
        grid = list({tuning.setting_id(s): s for s in ({**s, **fixed} for s in grid)}.values())
        first, *others = config.seeds
        tried = {tuning.setting_id(s): _result(config, root, names, model, s, first, centers, epochs, progress)
                 for s in grid}
        chosen = tuning.choose({sid: r["valid"]["overall"]["auc"] for sid, r in tried.items()})
        setting = tried[chosen]["setting"]
        runs = {first: tried[chosen]}
        runs.update({seed: _result(config, root, names, model, setting, seed, centers, epochs, progress) for seed in others})
        out[model] = {"chosen": chosen, "setting": setting,
                      "valid_auc_by_setting": {sid: r["valid"]["overall"]["auc"] for sid, r in tried.items()},
                      "runs": runs}
    return out


def lever_setting(base_setting: dict, split: str, model: str) -> dict:
    """The setting a lever row trains at: its base row's chosen one, except a split-grid value the
    lever cannot take (``content_to_id`` needs unknown-ID dropout > 0), which becomes the first it can."""
    setting = dict(base_setting)
    for field, values in split_grid(split, model).items():
        if field in setting and setting[field] not in values:
            setting[field] = values[0]
    return setting


def split_grid(split: str, model: str) -> dict:
    """The fields ``split`` adds to ``model``'s grid (:data:`tuning.SPLIT_GRID`): none for FuxiCTR's
    DIN (it has no unknown-ID dropout), and only dropout > 0 where a lever needs it (``content_to_id``)."""
    base, levers = lever_specs.parse_model(model)
    if base == "fuxictr_din":
        return {}
    extra = dict(tuning.SPLIT_GRID.get(split, {}))
    if "unknown_id_dropout" in extra and lever_specs.overrides(levers, "ctr").get("content_to_id"):
        extra["unknown_id_dropout"] = [v for v in extra["unknown_id_dropout"] if v > 0]
    return extra


def total_runs(config: ResultsConfig) -> int:
    zeros = dict.fromkeys(tuning.TUNED_FIELDS, 0)

    def runs(protocol, model):
        base, levers = lever_specs.parse_model(model)
        tuned = 1 if levers and base in config.models else len(
            tuning.settings_grid(config.budget, zeros, split_grid(split_labels(protocol)[0], model)))
        return tuned + len(config.seeds) - 1

    return sum(runs(p, m) for p in config.protocols for k in protocol_folds(config, p) for m in config.fold_models(p, k))


def run_results(config: ResultsConfig) -> dict:
    """Run (or resume) every selected run, then write the report; returns report.json's dict."""
    from mim_hf.results.report import build_report, carry_protocols, write_report

    config.validate()
    earlier = Path(config.docs_dir or "", "results.json")
    if config.keep_docs_protocols and config.docs_dir and earlier.exists():  # refuse before the runs, not after
        carry_protocols(build_report(config, {}, 0.0), json.loads(earlier.read_text()))
    started = time.perf_counter()
    data = load_world(config)
    from mim_hf.results.report import run_inputs

    progress = _Progress(total_runs(config), run_inputs(config), config.archive)
    folds = {protocol: {fold: run_fold(config, data, protocol, fold, progress) for fold in protocol_folds(config, protocol)}
             for protocol in config.protocols}
    report = build_report(config, folds, wall_time_s=time.perf_counter() - started)
    return write_report(report, Path(config.out), Path(config.docs_dir) if config.docs_dir else None,
                        keep_docs_protocols=config.keep_docs_protocols)
