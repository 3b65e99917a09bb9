"""LoRA (peft) for the content encoder's towers: apply, save/load adapters, merge.

Kept outside ``modeling/`` because those files may import only torch and transformers.
Adapters are injected into the towers in place (``peft.inject_adapter_in_model``), so the
encoder's module tree and forward are unchanged; only tower Linear layers gain LoRA branches.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from mim_hf.modeling.modeling_mim_encoder import MIMContentEncoder, has_injected_adapters

ADAPTER_NAME = "default"
TOWERS = ("text", "vision")
HEAD_WEIGHTS_NAME = "head_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PeftModel names its wrapped model's weights


def _towers(encoder: MIMContentEncoder) -> dict[str, torch.nn.Module]:
    towers = {"text": encoder.text_model}
    if encoder.vision_model is not None:
        towers["vision"] = encoder.vision_model
    return towers


def tower_lora_config(encoder: MIMContentEncoder, tower: str, last_layers: int = 0) -> LoraConfig:
    """The peft ``LoraConfig`` for one tower ("text" or "vision") from the encoder config.

    ``last_layers`` > 0 restricts LoRA to the tower's last ``last_layers`` layers (peft's
    ``layers_to_transform``, counted from the tower config's ``num_hidden_layers``)."""
    config = encoder.config
    targets = config.lora_text_target_modules if tower == "text" else config.lora_vision_target_modules
    tower_config = config.text_config if tower == "text" else config.vision_config
    if not targets:
        raise ValueError(
            f"no LoRA target modules known for {tower} tower model_type={tower_config.model_type!r}; "
            f"set config.lora_{tower}_target_modules (e.g. ['query', 'value'])"
        )
    layers = None
    if last_layers:
        num_layers = getattr(tower_config, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"lora_last_layers={last_layers}: the {tower} tower config "
                             f"(model_type={tower_config.model_type!r}) has no num_hidden_layers to count from; "
                             f"use lora_last_layers=0")
        layers = list(range(max(num_layers - last_layers, 0), num_layers))
    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(targets), layers_to_transform=layers, bias="none",
    )


def _head_parameters(encoder: MIMContentEncoder) -> dict[str, torch.nn.Parameter]:
    """Projection and fusion parameters (everything outside the towers)."""
    return {
        name: param for name, param in encoder.named_parameters()
        if not name.startswith(("text_model.", "vision_model."))
    }


def apply_lora(encoder: MIMContentEncoder, towers: tuple[str, ...] = TOWERS, last_layers: int = 0) -> MIMContentEncoder:
    """Inject LoRA into the encoder's towers (in place) and set what trains.

    Each tower gets :func:`tower_lora_config` (``last_layers`` > 0: only its last N layers).
    Trainable afterwards: LoRA matrices, projections and fusion. Frozen: tower base weights.
    Returns the same encoder.
    """
    present = _towers(encoder)
    return _inject(encoder, {name: tower_lora_config(encoder, name, last_layers) for name in towers if name in present})


def freeze_towers(encoder: MIMContentEncoder) -> MIMContentEncoder:
    """Freeze both towers; projections and fusion train (in place). Returns the same encoder."""
    for tower in _towers(encoder).values():
        tower.requires_grad_(False)
    for param in _head_parameters(encoder).values():
        param.requires_grad_(True)
    return encoder


def _inject(encoder: MIMContentEncoder, configs: dict[str, LoraConfig]) -> MIMContentEncoder:
    """Inject ``configs`` ({tower: LoraConfig}) and freeze the towers' base weights."""
    if has_injected_adapters(encoder):
        raise ValueError("LoRA is already applied to this encoder")
    freeze_towers(encoder)
    for name, tower in _towers(encoder).items():
        if name in configs:
            inject_adapter_in_model(configs[name], tower, adapter_name=ADAPTER_NAME)
            for param_name, param in tower.named_parameters():
                param.requires_grad_("lora_" in param_name)
    # Injected layers start in training mode; keep the encoder's mode (eval -> no LoRA dropout).
    encoder.train(encoder.training)
    return encoder


def trainable_parameter_counts(encoder: MIMContentEncoder) -> dict[str, int]:
    """{'lora': n, 'head': n, 'frozen': n, 'total': n} parameter counts."""
    counts = {"lora": 0, "head": 0, "frozen": 0, "total": 0}
    for name, param in encoder.named_parameters():
        counts["total"] += param.numel()
        if not param.requires_grad:
            counts["frozen"] += param.numel()
        elif "lora_" in name:
            counts["lora"] += param.numel()
        else:
            counts["head"] += param.numel()
    return counts


def save_adapters(encoder: MIMContentEncoder, directory: str | os.PathLike) -> dict[str, Path]:
    """Write ``<dir>/<tower>/adapter_config.json`` + ``adapter_model.safetensors`` per adapted
    tower, in peft's own format (``PeftModel.from_pretrained(tower, "<dir>/<tower>")`` loads
    one onto the base tower), and ``<dir>/head_model.safetensors`` (projections + fusion, which
    train fully). Returns {tower: folder}."""
    directory = Path(directory)
    written = {}
    for name, tower in _towers(encoder).items():
        if not has_injected_adapters(tower):
            continue
        tower_dir = directory / name
        tower_dir.mkdir(parents=True, exist_ok=True)
        tower.peft_config[ADAPTER_NAME].save_pretrained(str(tower_dir))
        state = get_peft_model_state_dict(tower, adapter_name=ADAPTER_NAME)
        # PeftModel wraps the tower as base_model.model; its files name the weights that way.
        save_file({PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()},
                  str(tower_dir / SAFETENSORS_WEIGHTS_NAME))
        written[name] = tower_dir
    if not written:
        raise ValueError("the encoder holds no LoRA adapters to save; call apply_lora first")
    head = {k: v.detach().contiguous().cpu() for k, v in _head_parameters(encoder).items()}
    save_file(head, str(directory / HEAD_WEIGHTS_NAME))
    return written


def load_adapters(encoder: MIMContentEncoder, directory: str | os.PathLike) -> MIMContentEncoder:
    """Inverse of :func:`save_adapters` (in place) on an encoder with the same base towers.

    Without adapters yet, the saved ``LoraConfig`` of each tower is injected; with adapters,
    they must match the saved ones (rank, targets, layers)."""
    directory = Path(directory)
    found = [name for name in _towers(encoder) if (directory / name / CONFIG_NAME).is_file()]
    if not found:
        raise ValueError(f"no <tower>/{CONFIG_NAME} under {directory}; expected one of {list(_towers(encoder))}")
    saved = {name: LoraConfig.from_pretrained(str(directory / name)) for name in found}
    if not has_injected_adapters(encoder):
        _inject(encoder, saved)
    towers = _towers(encoder)
    for name in found:
        current = getattr(towers[name], "peft_config", {}).get(ADAPTER_NAME)
        described = {key: (getattr(saved[name], key), getattr(current, key, None))
                     for key in ("r", "target_modules", "layers_to_transform")}
        if any(_normalised(mine) != _normalised(theirs) for mine, theirs in described.values()):
            raise ValueError(
                f"{name} adapter in {directory} does not match the encoder's LoRA layers: "
                + ", ".join(f"{key}: saved {mine!r}, encoder {theirs!r}" for key, (mine, theirs) in described.items())
            )
        weights = load_file(str(directory / name / SAFETENSORS_WEIGHTS_NAME))
        weights = {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}  # unprefixed: older saves
        result = set_peft_model_state_dict(towers[name], weights, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise ValueError(f"{name} adapter has keys the tower lacks: {result.unexpected_keys[:5]}")
    head_file = directory / HEAD_WEIGHTS_NAME
    if head_file.is_file():
        missing, unexpected = encoder.load_state_dict(load_file(str(head_file)), strict=False)
        if unexpected:
            raise ValueError(f"{head_file} has keys the encoder lacks: {unexpected[:5]}")
    return encoder


def _normalised(value):
    """Sets and lists compare by content (peft stores target_modules as a set)."""
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def merge_adapters(encoder: MIMContentEncoder) -> MIMContentEncoder:
    """Fold LoRA updates into the tower weights and remove the LoRA layers (in place).

    Afterwards the encoder is a plain ``MIMContentEncoder`` again (``save_pretrained`` works,
    remote-code loading needs no peft). Returns the same encoder.
    """
    if not has_injected_adapters(encoder):
        raise ValueError("the encoder holds no LoRA adapters to merge")
    for tower in _towers(encoder).values():
        # Collect first: the tree is mutated while replacing.
        lora_layers = [(name, module) for name, module in tower.named_modules() if isinstance(module, LoraLayer)]
        for name, module in lora_layers:
            module.merge(safe_merge=True)
            parent_name, _, child_name = name.rpartition(".")
            parent = tower.get_submodule(parent_name) if parent_name else tower
            setattr(parent, child_name, module.get_base_layer())
        if hasattr(tower, "peft_config"):
            del tower.peft_config
    return encoder


__all__ = [
    "apply_lora", "freeze_towers", "save_adapters", "load_adapters", "merge_adapters", "tower_lora_config",
    "trainable_parameter_counts",
]
