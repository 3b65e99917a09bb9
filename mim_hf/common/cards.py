"""Model and dataset cards generated from a saved artefact and the run's metrics, never by hand.

Each card = YAML front matter built with huggingface_hub (``ModelCardData``/``EvalResult``/
``DatasetCardData``) + a markdown body from a ``string.Template`` file in ``hub_cards/``
(``encoder.md``, ``adapters.md``, ``ctr.md``, ``center.md``, ``data.md``).

Inputs are plain dicts read from the artefact (``config.json``, center ``metadata.json``,
``prepared.json``/``stats.json``) and an optional metrics dict shaped like the CTR training's
``metrics.json``::

    {"protocol": "item-cold", "mode": "ciubm", "dataset": "movielens-100k",
     "test": {"overall": {"auc", "gauc", "logloss", "n"}, "cold": {...}, "long_tail": {...}, "head": {...}},
     "valid": {...}, "config": {...hyper-parameters}}

or, for encoders, ``{"retrieval": {"recall@10": ..., ...}, ...}``. What is present is shown; what
is absent is left out (a card without metrics says so); a template placeholder with no value,
or a template lacking a placeholder its kind requires, is a ``ValueError``.
"""

from __future__ import annotations

import json
import math
import os
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import importlib.resources

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from mim_hf.common.offline import OFFLINE_MODEL_PACKAGES, resolve_model_path

# hub_cards/ is installed as mim_hf.card_templates (pyproject package-dir), editable or not.
TEMPLATE_DIR = Path(importlib.resources.files("mim_hf.card_templates"))
CARD_KINDS = ("encoder", "adapters", "ctr", "center", "data")
# Placeholders each template must use: the parts of a card a reader relies on.
REQUIRED_PLACEHOLDERS = {
    "encoder": ("title", "metrics_section", "how_to_load", "intended_use"),
    "adapters": ("title", "base_model", "metrics_section", "how_to_load", "intended_use"),
    "ctr": ("title", "requirements_table", "hyperparameters_section", "metrics_section", "how_to_load",
            "intended_use"),
    "center": ("title", "contents_table", "how_to_load", "intended_use"),
    "data": ("title", "splits_table", "how_to_load", "intended_use"),
}
BUCKET_ORDER = ("overall", "cold", "long_tail", "head")
CTR_METRIC_ORDER = ("auc", "gauc", "logloss", "n")
# metrics.json key -> (model-index metric type, display name)
CTR_METRIC_TYPES = {"auc": ("roc_auc", "AUC"), "gauc": ("gauc", "GAUC"), "logloss": ("log_loss", "Logloss")}
SPLIT_ORDER = ("test", "valid")
LIBRARY_NAME = "transformers"


# ------------------------------------------------------------------------------------------
# templates
# ------------------------------------------------------------------------------------------
def render_template(kind: str, values: Mapping[str, Any], template_dir: str | os.PathLike | None = None) -> str:
    """Fill ``<template_dir>/<kind>.md`` with ``values``; returns the markdown body.

    Raises ``ValueError`` if the template is missing, uses a placeholder absent from ``values``,
    or lacks one of ``REQUIRED_PLACEHOLDERS[kind]``.
    """
    if kind not in CARD_KINDS:
        raise ValueError(f"card kind {kind!r} is not one of {CARD_KINDS}")
    path = Path(template_dir or TEMPLATE_DIR) / f"{kind}.md"
    if not path.is_file():
        raise ValueError(f"card template {path} does not exist (expected one per kind: {CARD_KINDS})")
    template = string.Template(path.read_text(encoding="utf-8"))
    if not template.is_valid():
        raise ValueError(f"card template {path} has an invalid placeholder (use $name or ${{name}}; $$ for a '$')")
    used = set(template.get_identifiers())
    lacking = [name for name in REQUIRED_PLACEHOLDERS[kind] if name not in used]
    if lacking:
        raise ValueError(f"card template {path} lacks required placeholder(s) {['$' + n for n in lacking]} "
                         f"for a {kind} card")
    unknown = sorted(used - set(values))
    if unknown:
        raise ValueError(f"card template {path} uses placeholder(s) {['$' + n for n in unknown]} that a {kind} "
                         f"card has no value for; available: {sorted(values)}")
    return template.substitute({k: str(v) for k, v in values.items()})


def _front_matter_card(card_cls, card_data, body: str):
    return card_cls(f"---\n{card_data.to_yaml()}\n---\n\n{body.strip()}\n")


# ------------------------------------------------------------------------------------------
# small formatting helpers
# ------------------------------------------------------------------------------------------
def load_metrics(metrics: str | os.PathLike | Mapping | None) -> dict:
    """A metrics dict from a path to a JSON file, a mapping, or None (-> {})."""
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        return dict(metrics)
    path = Path(metrics)
    if not path.is_file():
        raise ValueError(f"metrics file {path} does not exist")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"metrics file {path} is not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"metrics file {path} holds a {type(loaded).__name__}, expected a JSON object")
    return loaded


def _fmt(value: Any, metric: bool = False) -> str:
    """Markdown cell: metrics with 4 decimals (None = undefined -> "n/a"); settings in full precision."""
    if metric and value is None:
        return "n/a"
    if isinstance(value, bool) or value is None:
        return f"`{value}`"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else (f"{value:.4f}" if metric else f"{value:.6g}")
    if isinstance(value, (list, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{_portable(value)}`"


def _portable(value: Any) -> Any:
    """An absolute local path shortened to its last two parts (``…/run/data``): a card never shows
    the machine's folders (``/home/<user>/...``); any other value unchanged."""
    if isinstance(value, str) and os.path.isabs(value) and len(Path(value).parts) > 3:
        return "…/" + "/".join(Path(value).parts[-2:])
    return value


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _key_value_table(pairs: Mapping[str, Any]) -> str:
    return _table(("Field", "Value"), [(k, _fmt(v)) for k, v in pairs.items()])


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ordered(keys, preferred) -> list[str]:
    return [k for k in preferred if k in keys] + sorted(k for k in keys if k not in preferred)


def ctr_metrics_table(metrics: Mapping[str, Any]) -> str | None:
    """Markdown table split x bucket x (AUC, GAUC, logloss, n) of what ``metrics`` holds; None if nothing."""
    rows, columns = [], set()
    for split in _ordered([s for s in metrics if s in SPLIT_ORDER], SPLIT_ORDER):
        buckets = metrics[split]
        if not isinstance(buckets, Mapping):
            raise ValueError(f"metrics[{split!r}] must map bucket -> metrics, got {type(buckets).__name__}")
        for bucket in _ordered(list(buckets), BUCKET_ORDER):
            values = buckets[bucket]
            if not isinstance(values, Mapping):
                raise ValueError(f"metrics[{split!r}][{bucket!r}] must map metric -> value, got {values!r}")
            columns.update(k for k, v in values.items() if _is_number(v) or v is None)
            rows.append((split, bucket, values))
    if not rows:
        return None
    names = _ordered(columns, CTR_METRIC_ORDER)
    header = ("Split", "Items") + tuple(CTR_METRIC_TYPES.get(n, (n, n))[1] for n in names)
    return _table(header, [(s, b.replace("_", "-")) + tuple(_fmt(v.get(n), metric=True) if n in v else "" for n in names)
                           for s, b, v in rows])


def ctr_eval_results(metrics: Mapping[str, Any], dataset_type: str, dataset_name: str) -> list[EvalResult]:
    """model-index entries: one per (split, bucket, metric) with a numeric value (``n`` excluded)."""
    results = []
    for split in _ordered([s for s in metrics if s in SPLIT_ORDER], SPLIT_ORDER):
        for bucket in _ordered(list(metrics[split]), BUCKET_ORDER):
            for name, value in metrics[split][bucket].items():
                if name not in CTR_METRIC_TYPES or not _is_number(value) or math.isnan(value):
                    continue
                metric_type, display = CTR_METRIC_TYPES[name]
                results.append(EvalResult(
                    task_type="tabular-classification", task_name="Click-through-rate prediction",
                    dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=split,
                    dataset_config=metrics.get("protocol"), metric_type=metric_type,
                    metric_name=f"{display} ({bucket.replace('_', '-')} items)" if bucket != "overall" else display,
                    metric_config=bucket, metric_value=float(value),
                ))
    return results


def retrieval_metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``metrics["retrieval"]`` as {row name: {metric: value}} (flat -> one row named "encoder")."""
    retrieval = metrics.get("retrieval")
    if retrieval is None:
        return {}
    if not isinstance(retrieval, Mapping):
        raise ValueError(f"metrics['retrieval'] must be a mapping, got {type(retrieval).__name__}")
    flat = {k: v for k, v in retrieval.items() if _is_number(v)}
    nested = {k: {m: x for m, x in v.items() if _is_number(x)} for k, v in retrieval.items() if isinstance(v, Mapping)}
    return ({"encoder": flat} if flat else {}) | nested


def retrieval_section(metrics: Mapping[str, Any]) -> str | None:
    rows = retrieval_metrics(metrics)
    if not rows:
        return None
    names = sorted({m for values in rows.values() for m in values})
    table = _table(("Encoder",) + tuple(names),
                   [(row,) + tuple(_fmt(values[n], metric=True) if n in values else "" for n in names) for row, values in rows.items()])
    pairs = metrics.get("pairs") or metrics.get("eval_pairs")
    note = f"\n\nRetrieval of the true target item given the trigger item on {_fmt(pairs)} held-out later pairs." \
        if pairs is not None else "\n\nRetrieval of the true target item given the trigger item on held-out later pairs."
    return table + note


def _no_metrics(what: str) -> str:
    return f"No {what} were recorded for this upload (no metrics file was given)."


def _data_line(metrics: Mapping[str, Any]) -> str:
    parts = [f"{label}: {_fmt(metrics[key])}" for key, label in (("dataset", "dataset"), ("protocol", "protocol"))
             if key in metrics]
    return ", ".join(parts)


def _hyperparameters(metrics: Mapping[str, Any]) -> str:
    config = metrics.get("config")
    if not config:
        return "No training hyper-parameters were recorded (the metrics file has no `config`)."
    if not isinstance(config, Mapping):
        raise ValueError(f"metrics['config'] must be a mapping of hyper-parameters, got {type(config).__name__}")
    return _key_value_table(_flatten(config))


def _ctr_intended_use(mode: str) -> str:
    content = "" if mode == "din" else (
        " Content embeddings must come from the Representation Center named above: embeddings of another "
        "encoder have another geometry and loading refuses them (fingerprint check).")
    return (
        "Ranking and CTR estimation for the catalogue and population it was trained on, and research on "
        "cold-start / long-tail recommendation. Users and items absent from its vocabularies map to one "
        "unknown row; new items are scored through their content only." + content +
        " Not for decisions about people; the training data are interaction logs, with their popularity and "
        "exposure biases. Re-evaluate before using it on another catalogue or period.")


def _hub_id(name: str | None) -> str | None:
    """A Hub model id for ``name`` (a known offline copy maps back to its id), else None (local path)."""
    if not name:
        return None
    for hub_id in OFFLINE_MODEL_PACKAGES:
        if "/" in hub_id and os.path.realpath(resolve_model_path(hub_id)) == os.path.realpath(name):
            return hub_id
    if os.path.exists(name) or name.startswith(("/", ".")):
        return None
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(name)
    except ValueError:
        return None
    return name if "/" in name else None


def _tower_name(tower_config: Mapping[str, Any] | None) -> str | None:
    if not tower_config:
        return None
    name = tower_config.get("_name_or_path") or ""
    return _hub_id(name) or (f"{tower_config.get('model_type')} (local, {_portable(name)})" if name else
                             f"{tower_config.get('model_type')} (randomly initialised)")


# ------------------------------------------------------------------------------------------
# cards
# ------------------------------------------------------------------------------------------
def encoder_card(config: Mapping[str, Any], repo_id: str, metrics: Mapping[str, Any] | None = None,
                 has_processor: bool = False, template_dir=None) -> ModelCard:
    """Card of a pushed ``MIMContentEncoder`` from its ``config.json`` dict and metrics."""
    metrics = dict(metrics or {})
    text_config, vision_config = config.get("text_config") or {}, config.get("vision_config")
    base_models = [b for b in (_hub_id(text_config.get("_name_or_path")),
                               _hub_id((vision_config or {}).get("_name_or_path"))) if b]
    architecture = {
        "text tower": _tower_name(text_config), "vision tower": _tower_name(vision_config) or "none (text only)",
        "embed_dim": config.get("embed_dim"), "fusion_type": config.get("fusion_type"),
        "text_pooling": config.get("text_pooling"), "vision_pooling": config.get("vision_pooling") if vision_config else None,
        "LoRA r / alpha": f"{config.get('lora_r')} / {config.get('lora_alpha')}",
        "LoRA text targets": config.get("lora_text_target_modules"),
        "LoRA vision targets": config.get("lora_vision_target_modules") if vision_config else None,
    }
    architecture = {k: v for k, v in architecture.items() if v is not None}
    training = []
    if _data_line(metrics):
        training.append(f"Data: {_data_line(metrics)}.")
    training.append(_hyperparameters(metrics))
    retrieval = retrieval_section(metrics)
    how_to_load = f"""With the package (`pip install mim-hf`):

```python
import mim_hf  # registers the MIM classes with AutoModel
from transformers import AutoModel

encoder = AutoModel.from_pretrained("{repo_id}")
```

Without it (the model code travels with the weights):

```python
from transformers import AutoModel

encoder = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
```
"""
    if has_processor:
        how_to_load += f"""
Encoder and processor together, then encoding items (L2-normalised, `(items, {config.get('embed_dim')})`;
`level="text"` / `"image"` for the other levels):

```python
from mim_hf.encoder.hub import load_encoder_from_hub

encoder, processor = load_encoder_from_hub("{repo_id}")
item_embeds = encoder.encode([{{"title": "Toy Story (1995)", "genres": ["Animation"]}}, "GoldenEye (1995)"])
```"""
    else:
        how_to_load += "\nNo processor was saved with this encoder: tokenise item text with the text tower's tokenizer."
    values = {
        "title": repo_id.split("/")[-1], "embed_dim": config.get("embed_dim"),
        "image_clause": " and image" if vision_config else "",
        "architecture_table": _key_value_table(architecture),
        "training_section": "\n\n".join(training),
        "metrics_section": retrieval or _no_metrics("retrieval metrics"),
        "how_to_load": how_to_load,
        "intended_use": (
            "Item content embeddings for recommendation: building a Representation Center, retrieval of items "
            "a user is likely to want next, cold-start CTR features. Similarity here is *interest* similarity "
            "learned from behaviour logs of one catalogue; it is not a general semantic-similarity model and "
            "carries the popularity and exposure biases of those logs."),
    }
    eval_results = [EvalResult(task_type="feature-extraction", task_name="Trigger -> target item retrieval",
                               dataset_type=str(metrics.get("dataset")),
                               dataset_name=str(metrics.get("dataset")), dataset_split="test",
                               dataset_config=metrics.get("protocol"), metric_type=name,
                               metric_name=f"{name} ({row})" if row != "encoder" else name, metric_config=row,
                               metric_value=float(value))
                    for row, row_values in retrieval_metrics(metrics).items() for name, value in row_values.items()
                    if "dataset" in metrics]  # model-index needs the evaluation dataset
    data = ModelCardData(
        library_name=LIBRARY_NAME, tags=["mim-hf", "recommendation", "content-encoder", "feature-extraction",
                                         "custom_code"],
        base_model=base_models or None, pipeline_tag="feature-extraction",
        datasets=[metrics["dataset"]] if "dataset" in metrics else None,
        model_name=repo_id.split("/")[-1], eval_results=eval_results or None,
    )
    return _front_matter_card(ModelCard, data, render_template("encoder", values, template_dir))


def adapters_card(adapter_configs: Mapping[str, Mapping[str, Any]], repo_id: str, base_model: str,
                  base_revision: str | None, metrics: Mapping[str, Any] | None = None,
                  template_dir=None) -> ModelCard:
    """Card of pushed LoRA adapters; ``adapter_configs``: tower -> its adapter_config.json dict."""
    metrics = dict(metrics or {})
    rows = [(tower, cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout"), _fmt(cfg.get("target_modules")))
            for tower, cfg in adapter_configs.items()]
    training = ([f"Data: {_data_line(metrics)}."] if _data_line(metrics) else []) + [_hyperparameters(metrics)]
    revision_arg = f", base_revision={base_revision!r}" if base_revision else ""
    values = {
        "title": repo_id.split("/")[-1], "base_model": base_model, "base_revision": base_revision or "main",
        "adapters_table": _table(("Tower", "r", "alpha", "dropout", "target modules"), rows)
        + "\n\n`head_model.safetensors` holds the projections and fusion trained with the adapters.",
        "training_section": "\n\n".join(training),
        "metrics_section": retrieval_section(metrics) or _no_metrics("retrieval metrics"),
        "how_to_load": f"""```python
from mim_hf.encoder.hub import load_adapters_from_hub

# downloads the base encoder {base_model}, injects the adapters and loads the head
encoder = load_adapters_from_hub("{repo_id}"{revision_arg})
```

Each `<tower>/` folder is a standard peft LoRA adapter (`adapter_config.json`,
`adapter_model.safetensors`) for that tower of the base encoder; `mim_hf.encoder.lora.merge_adapters(encoder)`
folds them into the weights.""",
        "intended_use": "As for the base encoder: item content embeddings for recommendation on the catalogue "
                        "the adapters were trained on. They only apply to the base encoder named above.",
    }
    data = ModelCardData(library_name="peft", tags=["mim-hf", "recommendation", "lora", "content-encoder"],
                         base_model=base_model, datasets=[metrics["dataset"]] if "dataset" in metrics else None,
                         model_name=repo_id.split("/")[-1])
    return _front_matter_card(ModelCard, data, render_template("adapters", values, template_dir))


def ctr_card(config: Mapping[str, Any], repo_id: str, metrics: Mapping[str, Any] | None = None,
             dataset_repo_id: str | None = None, template_dir=None) -> ModelCard:
    """Card of a pushed ``CiUBMForCTR`` from its (pushed) ``config.json`` dict and metrics."""
    metrics = dict(metrics or {})
    mode, base = config.get("mode", "ciubm"), config.get("base", "din")
    vocabularies = config.get("vocabularies") or {}
    requirements = {
        "user ids (vocabulary rows)": len(vocabularies["user_id"]) if "user_id" in vocabularies else config.get("n_users"),
        "item ids (vocabulary rows)": len(vocabularies["item_id"]) if "item_id" in vocabularies else config.get("n_items"),
        "user side features": sorted(config.get("user_feature_sizes") or {}) or None,
        "item side features": sorted(config.get("item_feature_sizes") or {}) or None,
        "content dim": config.get("content_dim"),
        "Representation Center": config.get("center_repo") or "none (ID-only model)",
        "center revision": config.get("center_revision"),
        "center encoder fingerprint": config.get("center_fingerprint"),
    }
    requirements = {k: v for k, v in requirements.items() if v is not None}
    dataset = metrics.get("dataset")
    data_lines = []
    if dataset or metrics.get("protocol"):
        data_lines.append(f"Trained and evaluated on {_data_line(metrics)}"
                          + (f" (processed data: [`{dataset_repo_id}`](https://huggingface.co/datasets/{dataset_repo_id}))"
                             if dataset_repo_id else "") + ".")
    if metrics.get("protocol") == "item-cold":
        data_lines.append("`item-cold`: items are split 80/10/10 at random; valid/test hold only interactions with "
                          "items never seen in training, so their IDs are unknown and only their content is known.")
    elif metrics.get("protocol") == "temporal":
        data_lines.append("`temporal`: interactions sorted by time, 80/10/10 train/valid/test.")
    data_lines.append("Popularity buckets are counted on the training period only: *cold* = unseen in training, "
                      "*long-tail* = few training interactions, *head* = the rest.")
    table = ctr_metrics_table(metrics)
    metrics_section = (table + "\n\nAUC and logloss over all samples; GAUC = per-user AUC averaged with weights "
                       "given by each user's number of samples (users with one class only are skipped).") \
        if table else _no_metrics("evaluation metrics")
    center = config.get("center_repo")
    how_to_load = f"""```python
from mim_hf.ctr.predict import load_ctr_model

bundle = load_ctr_model("{repo_id}")   # model + vocabularies{' + its Representation Center (' + center + ')' if center else ''}
collator = bundle.collator(items=items_table)  # items_table: the catalogue, for item side features
batch = collator([{{"user_id": "42", "item_id": "1", "behavior_item_ids": ["7", "9"]}}])
probs = bundle.model(**batch).probs
```

The model alone: `import mim_hf; AutoModel.from_pretrained("{repo_id}")`, or
`AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)` without the package."""
    dataset_type = dataset_repo_id or str(dataset or "unknown")
    eval_results = ctr_eval_results(metrics, dataset_type, str(dataset or dataset_type))
    values = {
        "title": repo_id.split("/")[-1], "mode": mode, "base": base,
        "requirements_table": _key_value_table(requirements),
        "data_section": "\n\n".join(data_lines),
        "hyperparameters_section": _hyperparameters(metrics),
        "metrics_section": metrics_section, "how_to_load": how_to_load,
        "intended_use": _ctr_intended_use(mode),
    }
    datasets = [d for d in (dataset_repo_id, ) if d] or ([dataset] if dataset else None)
    data = ModelCardData(library_name=LIBRARY_NAME, tags=["mim-hf", "recommendation", "ctr-prediction", "ciubm",
                                                          f"mode-{mode}", "custom_code"],
                         datasets=datasets, base_model=None, model_name=repo_id.split("/")[-1],
                         eval_results=eval_results or None, metrics=sorted({r.metric_type for r in eval_results}) or None)
    if center:
        data.center = {"repo": center, "revision": config.get("center_revision"),
                       "fingerprint": config.get("center_fingerprint")}
    return _front_matter_card(ModelCard, data, render_template("ctr", values, template_dir))


def center_card(metadata: Mapping[str, Any], repo_id: str, template_dir=None) -> DatasetCard:
    """Card of a pushed Representation Center from its ``metadata.json`` dict."""
    contents = {
        "items": metadata.get("num_items"), "embedding dim": metadata.get("embed_dim"),
        "storage dtype": metadata.get("dtype"), "L2-normalised": metadata.get("normalized"),
        "levels": metadata.get("levels"), "encoder": metadata.get("encoder_name"),
        "encoder revision": metadata.get("encoder_revision"),
        "encoder fingerprint": metadata.get("encoder_fingerprint"),
        "created": metadata.get("created_at"), "updated": metadata.get("updated_at"),
        "format version": metadata.get("format_version"),
    }
    contents = {k: v for k, v in contents.items() if v is not None}
    n, dim = metadata.get("num_items"), metadata.get("embed_dim")
    values = {
        "title": repo_id.split("/")[-1],
        "contents_table": _key_value_table(contents),
        "files_section": (
            f"- `embeddings.safetensors`: one `({n}, {dim})` {metadata.get('dtype')} tensor per level.\n"
            "- `item_index.safetensors`: item ids (UTF-8 bytes + offsets; id *i* is row *i* of every level) "
            "and a sorted 64-bit hash table for vectorised look-up.\n"
            "- `metadata.json`: the fields above plus file checksums."),
        "how_to_load": f"""```python
from mim_hf.center.store import RepresentationCenter

center = RepresentationCenter.load("{repo_id}", revision="main")   # memory-mapped
embeds, found = center.lookup(["item-1", "item-2"])                 # (2, {dim}) float32 + found mask
center.check_fingerprint(model.config.center_fingerprint, {dim})     # refuse another encoder's table
```""",
        "intended_use": "Frozen item features for CTR models trained against this exact table (the model records "
                        "its fingerprint) and nearest-neighbour analysis. Unknown ids get a zero row and are "
                        "counted. Embeddings inherit the encoder's and the behaviour logs' biases.",
    }
    encoder = metadata.get("encoder_name")
    data = DatasetCardData(pretty_name=f"Representation Center ({n} items, {dim}-d)",
                           tags=["mim-hf", "representation-center", "embeddings", "recommendation"],
                           size_categories=[_size_category(n)] if isinstance(n, int) else None)
    data.viewer = False  # safetensors tensors, not a table the viewer can show
    if encoder and _hub_id(str(encoder)):
        data.base_model = _hub_id(str(encoder))
    return _front_matter_card(DatasetCard, data, render_template("center", values, template_dir))


def data_card(prepared_meta: Mapping[str, Any], stats: Mapping[str, Any], split_rows: Mapping[str, Mapping[str, int]],
              columns: Mapping[str, list[str]], repo_id: str, card_data: DatasetCardData | None = None,
              template_dir=None) -> DatasetCard:
    """Card of pushed prepared data.

    ``prepared_meta``: prepared.json dict; ``stats``: stats.json dict; ``split_rows``: config ->
    split -> rows; ``columns``: config -> column names; ``card_data``: the YAML ``datasets`` wrote
    (``configs``/``dataset_info``), kept and extended.
    """
    dataset, protocol = prepared_meta.get("name"), (prepared_meta.get("config") or {}).get("protocol")
    rows = [(config, split, f"{n:,}") for config, splits in split_rows.items() for split, n in splits.items()]
    protocol_lines = {
        "item-cold": "Items are split 80/10/10 at random; valid/test hold only interactions with items never seen "
                     "in training (unknown IDs: only their content is known).",
        "temporal": "Interactions are sorted by time and split 80/10/10 into train/valid/test.",
    }
    config = prepared_meta.get("config") or {}
    if protocol == "item-cold" and config.get("folds") is not None:
        protocol_lines["item-cold"] = (f"Items are cut into {config['folds']} folds at random; this is fold {config.get('fold')}: "
                                       "its part is test, the next part valid, the rest train. Valid/test hold only "
                                       "interactions with items never seen in training.")
    if config.get("labels") == "implicit":
        protocol_lines[protocol] = protocol_lines.get(protocol, "") + (
            f" Labels are implicit: every interaction is a positive, with {config.get('neg_ratio')} drawn negative(s) "
            "per positive (items the user never touched, from the positive's split under item-cold, from items "
            "seen by then under temporal).")
    split_stats = stats.get("splits") or {}
    bucket_rows = [(s, *(f"{v['popularity_buckets'].get(b, 0):,}" for b in BUCKET_ORDER[1:]),
                    _fmt(v.get("positive_rate"))) for s, v in split_stats.items() if "popularity_buckets" in v]
    protocol_section = "\n\n".join(filter(None, [
        protocol_lines.get(protocol, f"Protocol `{protocol}`."),
        "Behaviour sequences hold the user's earlier positives only (most recent last); popularity buckets, "
        "vocabularies and C-SFT training pairs come from the training split only.",
        ("Rows per popularity bucket (counted on the training period):\n\n"
         + _table(("split", "cold", "long-tail", "head", "positive rate"), bucket_rows)) if bucket_rows else None,
        "Preparation settings: " + ", ".join(f"`{k}={v}`" for k, v in (prepared_meta.get("config") or {}).items()),
    ]))
    values = {
        "title": repo_id.split("/")[-1], "dataset": dataset or "unknown", "protocol": protocol or "unknown",
        "splits_table": _table(("config", "split", "rows"), rows),
        "protocol_section": protocol_section,
        "columns_section": "\n".join(f"- `{config}`: " + ", ".join(f"`{c}`" for c in cols)
                                     for config, cols in columns.items()),
        "how_to_load": f"""```python
from datasets import load_dataset

samples = load_dataset("{repo_id}", "samples")   # DatasetDict train / valid / test
pairs = load_dataset("{repo_id}", "pairs")

from mim_hf.data.hub import load_prepared_from_hub
prepared = load_prepared_from_hub("{repo_id}")   # + items, vocabularies, stats (PreparedData)
```""",
        "intended_use": "Training and evaluating CTR models and C-SFT content encoders with mim-hf, and comparing "
                        "methods under the same split. The source data's licence applies.",
    }
    data = card_data if card_data is not None else DatasetCardData()
    data.pretty_name = f"{dataset} ({protocol}) processed for MIM"
    data.tags = sorted(set((data.to_dict().get("tags") or [])) | {"mim-hf", "recommendation", "ctr-prediction"})
    data.task_categories = ["tabular-classification"]
    total = sum(n for splits in split_rows.values() for n in splits.values())
    data.size_categories = [_size_category(total)]
    return _front_matter_card(DatasetCard, data, render_template("data", values, template_dir))


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "10M<n<100M"


__all__ = [
    "TEMPLATE_DIR", "REQUIRED_PLACEHOLDERS", "render_template", "load_metrics", "ctr_metrics_table",
    "ctr_eval_results", "retrieval_metrics", "encoder_card", "adapters_card", "ctr_card", "center_card", "data_card",
]
