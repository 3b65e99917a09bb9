"""Shared training utilities: configs from YAML/CLI, atomic checkpoints, progress state."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from mim_hf.train.common import (
    TrainingProgress,
    config_field,
    latest_checkpoint,
    load_config,
    parse_config,
    resume_if_requested,
    save_checkpoint,
)


@dataclasses.dataclass
class ToyConfig:
    learning_rate: float = config_field(1e-3, "step size")
    epochs: int = config_field(2, "passes over the data")
    use_queue: bool = config_field(False, "keep a queue")
    levels: list = config_field(["item"], "levels")
    output_dir: str | None = config_field(None, "where to write")
    weights: dict = config_field({"item": 1.0}, "a bare-dict field")


def test_yaml_then_cli_overrides(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("learning_rate: 0.01\nepochs: 5\nlevels: [item, text]\n")
    config, resume = parse_config(ToyConfig, "toy", ["--config", str(config_file), "--epochs", "7", "--use-queue", "true", "--resume"])
    assert config == ToyConfig(learning_rate=0.01, epochs=7, use_queue=True, levels=["item", "text"])
    config, _ = parse_config(ToyConfig, "toy", ["--weights", "{item: 1.0, text: 0.5}"])
    assert config.weights == {"item": 1.0, "text": 0.5}
    assert resume is True


def test_unknown_and_badly_typed_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown ToyConfig field\(s\) \['epohcs'\]"):
        load_config(ToyConfig, overrides={"epohcs": 3})
    with pytest.raises(ValueError, match=r"config field 'epochs': 'many' is not a valid int"):
        load_config(ToyConfig, overrides={"epochs": "many"})
    with pytest.raises(ValueError, match=r"config field 'use_queue': 'maybe' is not a boolean"):
        load_config(ToyConfig, overrides={"use_queue": "maybe"})


def test_checkpoint_is_atomic_and_resumable(tmp_path):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    progress.step = 1
    progress.record({"auc": 0.7}, key="auc")
    save_checkpoint(accelerator, tmp_path, step=1)
    # A crash mid-write leaves only a temporary folder, which is never picked up.
    (tmp_path / "checkpoints" / ".tmp_step_2").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_1"
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    progress.step = 99
    assert resume_if_requested(accelerator, tmp_path, resume=True).name == "step_1"
    assert progress.step == 1 and progress.best_metric == 0.7
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k])


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resume_if_requested(Accelerator(cpu=True), tmp_path, resume=True)


def test_keeps_newest_checkpoints_only(tmp_path):
    accelerator = Accelerator(cpu=True)
    for step in (1, 2, 3):
        save_checkpoint(accelerator, tmp_path, step=step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3"]


def test_progress_early_stopping_bookkeeping():
    progress = TrainingProgress()
    assert progress.record({"auc": 0.6}, key="auc")
    assert not progress.record({"auc": 0.5}, key="auc")
    assert progress.evals_without_improvement == 1 and progress.best_metric == 0.6


def test_every_package_is_installed():
    """pyproject lists packages explicitly (modeling/ is mapped); a new sub-package must be listed."""
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "mim_hf").rglob("__init__.py")}
    found |= {"mim_hf.modeling", "mim_hf.card_templates", "mim_hf.configs"}
    assert found == listed
