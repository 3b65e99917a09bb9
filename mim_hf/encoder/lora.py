"""LoRA (peft) for the content encoder's towers: apply, save/load adapters, merge.

Kept outside ``modeling/`` because those files may import only torch and transformers.
Adapters are injected into the towers in place (``peft.inject_adapter_in_model``), so the
encoder's module tree and forward are unchanged; only tower Linear layers gain LoRA branches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from mim_hf.modeling.modeling_mim_encoder import MIMContentEncoder, has_injected_adapters

ADAPTER_NAME = "default"
TOWERS = ("text", "vision")
HEAD_WEIGHTS_NAME = "head_model.safetensors"


def _towers(encoder: MIMContentEncoder) -> dict[str, torch.nn.Module]:
    towers = {"text": encoder.text_model}
    if encoder.vision_model is not None:
        towers["vision"] = encoder.vision_model
    return towers


def tower_lora_config(encoder: MIMContentEncoder, tower: str) -> LoraConfig:
    """The peft ``LoraConfig`` for one tower ("text" or "vision") from the encoder config."""
    config = encoder.config
    targets = config.lora_text_target_modules if tower == "text" else config.lora_vision_target_modules
    tower_config = config.text_config if tower == "text" else config.vision_config
    if not targets:
        raise ValueError(
            f"no LoRA target modules known for {tower} tower model_type={tower_config.model_type!r}; "
            f"set config.lora_{tower}_target_modules (e.g. ['query', 'value'])"
        )
    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=list(targets), bias="none",
    )


def _head_parameters(encoder: MIMContentEncoder) -> dict[str, torch.nn.Parameter]:
    """Projection and fusion parameters (everything outside the towers)."""
    return {
        name: param for name, param in encoder.named_parameters()
        if not name.startswith(("text_model.", "vision_model."))
    }


def apply_lora(encoder: MIMContentEncoder, towers: tuple[str, ...] = TOWERS) -> MIMContentEncoder:
    """Inject LoRA into the encoder's towers (in place) and set what trains.

    Trainable afterwards: LoRA matrices, projections and fusion. Frozen: tower base weights.
    Returns the same encoder.
    """
    if has_injected_adapters(encoder):
        raise ValueError("LoRA is already applied to this encoder")
    for name, tower in _towers(encoder).items():
        tower.requires_grad_(False)
        if name in towers:
            inject_adapter_in_model(tower_lora_config(encoder, name), tower, adapter_name=ADAPTER_NAME)
            for param_name, param in tower.named_parameters():
                param.requires_grad_("lora_" in param_name)
    for param in _head_parameters(encoder).values():
        param.requires_grad_(True)
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
    tower and ``<dir>/head_model.safetensors`` (projections + fusion, which train fully).
    Returns {tower: folder}."""
    directory = Path(directory)
    written = {}
    for name, tower in _towers(encoder).items():
        if not has_injected_adapters(tower):
            continue
        tower_dir = directory / name
        tower_dir.mkdir(parents=True, exist_ok=True)
        tower_lora_config(encoder, name).save_pretrained(str(tower_dir))
        state = get_peft_model_state_dict(tower, adapter_name=ADAPTER_NAME)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  str(tower_dir / "adapter_model.safetensors"))
        written[name] = tower_dir
    if not written:
        raise ValueError("the encoder holds no LoRA adapters to save; call apply_lora first")
    head = {k: v.detach().contiguous().cpu() for k, v in _head_parameters(encoder).items()}
    save_file(head, str(directory / HEAD_WEIGHTS_NAME))
    return written


def load_adapters(encoder: MIMContentEncoder, directory: str | os.PathLike) -> MIMContentEncoder:
    """Inverse of :func:`save_adapters` on an encoder with the same base towers (in place)."""
    directory = Path(directory)
    found = [name for name in _towers(encoder) if (directory / name / "adapter_config.json").is_file()]
    if not found:
        raise ValueError(f"no <tower>/adapter_config.json under {directory}; expected one of {list(_towers(encoder))}")
    if not has_injected_adapters(encoder):
        apply_lora(encoder, towers=tuple(found))
    towers = _towers(encoder)
    for name in found:
        saved = json.loads((directory / name / "adapter_config.json").read_text())
        expected = tower_lora_config(encoder, name)
        if int(saved["r"]) != expected.r or set(saved["target_modules"]) != set(expected.target_modules):
            raise ValueError(
                f"{name} adapter in {directory} has r={saved['r']}, targets={saved['target_modules']}; "
                f"encoder config expects r={expected.r}, targets={sorted(expected.target_modules)}"
            )
        result = set_peft_model_state_dict(
            towers[name], load_file(str(directory / name / "adapter_model.safetensors")), adapter_name=ADAPTER_NAME
        )
        if result.unexpected_keys:
            raise ValueError(f"{name} adapter has keys the tower lacks: {result.unexpected_keys[:5]}")
    head_file = directory / HEAD_WEIGHTS_NAME
    if head_file.is_file():
        missing, unexpected = encoder.load_state_dict(load_file(str(head_file)), strict=False)
        if unexpected:
            raise ValueError(f"{head_file} has keys the encoder lacks: {unexpected[:5]}")
    return encoder


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
    "apply_lora", "save_adapters", "load_adapters", "merge_adapters", "tower_lora_config",
    "trainable_parameter_counts",
]
