"""Shared training utilities: configs from YAML/CLI, progress state, atomic pickle-free checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from accelerate import Accelerator
from spawned_workers import free_port, run_workers
from unpickling_guard import forbid_unpickling

from mim_hf.csft.losses import InfoNCELoss
from mim_hf.common import checkpoints as common
from mim_hf.common.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    restore_checkpoint,
    restore_folder,
    save_checkpoint,
    start_run,
)
from mim_hf.common.config import config_field, load_config, parse_config
from mim_hf.common.loop import TrainingProgress, hold_output_dir, train_batches
from mim_hf.csft.train import BestWeights


@dataclasses.dataclass
class ToyConfig:
    learning_rate: float = config_field(1e-3, "step size")
    epochs: int = config_field(2, "passes over the data")
    use_queue: bool = config_field(False, "keep a queue")
    levels: list[str] = config_field(["item"], "levels")
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


@dataclasses.dataclass
class RunConfig:
    """What a stage config looks like to the checkpoints: an output_dir and fields that change results."""

    output_dir: str = config_field("", "where checkpoints go")
    seed: int = config_field(0, "seed")
    batch_size: int = config_field(4, "batch size")
    learning_rate: float = config_field(0.1, "step size")
    keep_checkpoints: int = config_field(2, "newest checkpoints kept")


def run_config(output_dir, **values) -> RunConfig:
    return RunConfig(output_dir=str(output_dir), **values)


def resume_into(accelerator, output_dir, resume, state, per_process=(), **config_values):
    """What a stage does: start_run (checks, config.json), then restore_checkpoint once objects exist."""
    checkpoint = start_run(accelerator, run_config(output_dir, **config_values), resume)
    return restore_checkpoint(accelerator, checkpoint, state, per_process)


class Counter:
    """A registered object whose state is pure Python (ints as dict keys, tuples, nested lists)."""

    def __init__(self):
        self.seen = {}

    def state_dict(self):
        return {"seen": dict(self.seen), "shape": (2, 3), "nan": float("nan"), "order": [[1, None], ["a", True]]}

    def load_state_dict(self, state):
        self.seen = state["seen"]
        assert state["shape"] == (2, 3) and state["order"] == [[1, None], ["a", True]]
        assert math.isnan(state["nan"])


def toy_training(tmp_path, queue_size=6):
    """A prepared model + AdamW + warm-up scheduler, a queue-holding loss, progress and a plain object."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    loss = InfoNCELoss(temperature=0.1, learnable_temperature=True, queue_size=queue_size, embed_dim=2)
    optimizer = torch.optim.AdamW([*model.parameters(), *loss.parameters()], lr=0.1)
    scheduler = transformers.get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=20)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress, counter, best = TrainingProgress(), Counter(), BestWeights()
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress,
             "counter": counter, "best_weights": best, "loss": loss}

    def step():
        x = torch.randn(4, 3)
        value = loss(model(x), model(x + 0.1), torch.arange(4), torch.arange(4) + progress.step * 4)
        value.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        progress.step += 1
        progress.batches_in_epoch += 1
        counter.seen[progress.step] = (float(value.detach()), [progress.step])
        progress.record({"loss": float(value.detach())}, key="loss", higher_is_better=False)
        if progress.best_step == progress.step:
            best.capture(accelerator.unwrap_model(model), {"loss": float(value.detach())})

    return accelerator, state, step


def snapshot(state):
    """Deep copies of every entry's state (tensors cloned) for exact comparison."""
    def copy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value
    return {name: copy(obj.state_dict()) for name, obj in state.items() if name != "counter"} | {
        "counter": copy(state["counter"].seen)}


def assert_same(actual, expected, where=""):
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}.{i}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), where
    else:
        assert actual == expected, where


def random_draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_checkpoint_restores_every_state_exactly_without_unpickling(tmp_path):
    accelerator, state, step = toy_training(tmp_path)
    for _ in range(3):
        step()
    path = save_checkpoint(accelerator, run_config(tmp_path), step=3, state=state, per_process=("loss",))
    assert path.name == "step_3" and len(state["loss"].queue) == 6
    expected, expected_draws = snapshot(state), random_draws()
    for _ in range(2):  # moves every state on
        step()
    assert state["progress"].step == 5
    with forbid_unpickling():
        assert resume_into(accelerator, tmp_path, resume=True, state=state, per_process=("loss",)) == path
    # every entry, including AdamW's moments and step counts, the scheduler, the queue and the
    # best weights, equals the saved state bit for bit; the RNGs continue where they were
    assert_same(snapshot(state), expected)
    assert random_draws() == expected_draws
    files = sorted(p.name for p in path.iterdir())
    assert files == ["best_weights.safetensors", "counter.safetensors", "loss_0.safetensors", "manifest.json",
                     "model.safetensors", "optimizer.safetensors", "progress.safetensors", "rng_state_0.safetensors",
                     "scheduler.safetensors"]
    assert json.loads((path / "manifest.json").read_text())["entries"]["loss"] == {"per_process": True}


def test_resumed_toy_training_equals_uninterrupted(tmp_path):
    """Dropout (global RNG), AdamW, warm-up and the queue: 3 steps + resume + 3 = 6 straight steps."""
    accelerator, state, step = toy_training(tmp_path)
    for _ in range(6):
        step()
    straight = snapshot(state)
    accelerator, state, step = toy_training(tmp_path)
    for _ in range(3):
        step()
    save_checkpoint(accelerator, run_config(tmp_path / "run"), step=3, state=state, per_process=("loss",))
    accelerator, state, step = toy_training(tmp_path)  # a new process: fresh objects, then resume
    resume_into(accelerator, tmp_path / "run", resume=True, state=state, per_process=("loss",))
    for _ in range(3):
        step()
    assert_same(snapshot(state), straight)


def evil_pickle(marker: Path) -> bytes:
    """A pickle that, when unpickled, creates ``marker`` (stands for any code an attacker runs)."""
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))
    return pickle.dumps({"state": Payload()})


def test_pickles_in_a_checkpoint_folder_are_never_opened(tmp_path):
    accelerator, state, step = toy_training(tmp_path)
    step()
    path = save_checkpoint(accelerator, run_config(tmp_path), step=1, state=state, per_process=("loss",))
    marker = tmp_path / "pwned"
    # the file names accelerate's save_state uses, and a torch.save-style .bin
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "pytorch_model.bin",
                 "scheduler.bin", "model.pkl"):
        (path / name).write_bytes(evil_pickle(marker))
    with forbid_unpickling():
        resume_into(accelerator, tmp_path, resume=True, state=state, per_process=("loss",))
    assert not marker.exists()
    # an Accelerator.save_state-style folder (pickles, no manifest) is refused, not loaded
    legacy = tmp_path / "legacy" / "checkpoints" / "step_7"
    legacy.mkdir(parents=True)
    (legacy / "custom_checkpoint_0.pkl").write_bytes(evil_pickle(marker))
    (legacy / "model.safetensors").write_bytes(b"")
    with forbid_unpickling(), pytest.raises(ValueError, match="no manifest.json: not a mim-hf checkpoint"):
        resume_into(accelerator, tmp_path / "legacy", resume=True, state=state, per_process=("loss",))
    assert not marker.exists()


def test_kill_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    accelerator, state, step = toy_training(tmp_path)
    step()
    save_checkpoint(accelerator, run_config(tmp_path), step=1, state=state, per_process=("loss",))
    expected = snapshot(state)
    step()

    written = []

    def write_then_crash(path, value):
        real_write(path, value)
        written.append(path.name)
        if len(written) == 3:
            raise KeyboardInterrupt("killed mid-write")

    real_write = common._write_state_file
    monkeypatch.setattr(common, "_write_state_file", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, run_config(tmp_path), step=2, state=state, per_process=("loss",))
    monkeypatch.setattr(common, "_write_state_file", real_write)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp_step_2", "step_1"]
    assert latest_checkpoint(tmp_path).name == "step_1"
    resume_into(accelerator, tmp_path, resume=True, state=state, per_process=("loss",))
    assert_same(snapshot(state), expected)
    # the next complete save removes the dead temporary
    save_checkpoint(accelerator, run_config(tmp_path), step=2, state=state, per_process=("loss",))
    assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_2"]


def test_damaged_or_mismatching_checkpoints_are_refused_by_name(tmp_path):
    accelerator, state, step = toy_training(tmp_path)
    step()
    path = save_checkpoint(accelerator, run_config(tmp_path), step=1, state=state, per_process=("loss",))
    with pytest.raises(ValueError, match=r"holds entries .* this run expects"):
        load_checkpoint(accelerator, path, {k: v for k, v in state.items() if k != "counter"}, per_process=("loss",))
    with pytest.raises(ValueError, match=r"holds entries .*'loss': True.* this run expects .*'loss': False"):
        load_checkpoint(accelerator, path, state)
    other_model = {**state, "model": torch.nn.Linear(3, 3)}
    with pytest.raises(ValueError, match=r"checkpoint entry 'model' .* does not fit this run's Linear"):
        load_checkpoint(accelerator, path, other_model, per_process=("loss",))
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "num_processes": 2}))
    with pytest.raises(ValueError, match=r"written by 2 process\(es\); resuming with 1"):
        load_checkpoint(accelerator, path, state, per_process=("loss",))
    (path / "manifest.json").write_text(json.dumps(manifest))
    optimizer_file = path / "optimizer.safetensors"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:-10])  # truncated by a failing disk or copy
    with pytest.raises(ValueError, match=r"optimizer.safetensors is damaged: \d+ bytes, the manifest says"):
        load_checkpoint(accelerator, path, state, per_process=("loss",))


def test_tied_and_non_contiguous_tensors_round_trip(tmp_path):
    """Tied weights (one storage, two names) and transposed views: safetensors refuses both as-is."""
    accelerator = Accelerator(cpu=True)
    embedding, decoder = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
    decoder.weight = embedding.weight  # tied, as in language-model heads
    model = torch.nn.ModuleDict({"embedding": embedding, "decoder": decoder})
    holder = TrainingProgress()
    holder.state_dict = lambda: {"view": embedding.weight.detach().T, "again": embedding.weight.detach()}
    holder.load_state_dict = lambda state: holder.__dict__.update(loaded=state)
    save_checkpoint(accelerator, run_config(tmp_path), step=1, state={"model": model, "holder": holder})
    expected = embedding.weight.detach().clone()
    with torch.no_grad():
        embedding.weight.zero_()
    resume_into(accelerator, tmp_path, resume=True, state={"model": model, "holder": holder})
    assert model.decoder.weight is model.embedding.weight and torch.equal(model.embedding.weight, expected)
    assert torch.equal(holder.loaded["view"], expected.T) and torch.equal(holder.loaded["again"], expected)


def test_state_that_needs_pickle_is_refused_at_save_time(tmp_path):
    class Opaque:
        def state_dict(self):
            return {"fn": print}

        def load_state_dict(self, state):
            pass

    accelerator = Accelerator(cpu=True)
    with pytest.raises(TypeError, match=r"checkpoint state 'fn': a builtin_function_or_method cannot be stored"):
        save_checkpoint(accelerator, run_config(tmp_path), step=1, state={"opaque": Opaque()})
    with pytest.raises(ValueError, match="checkpoint entry name 'model_0' must match"):
        save_checkpoint(accelerator, run_config(tmp_path), step=1, state={"model_0": TrainingProgress()})
    with pytest.raises(TypeError, match="entry 'x': a int has no state_dict"):
        save_checkpoint(accelerator, run_config(tmp_path), step=1, state={"x": 3})


def test_folders_travel_with_the_checkpoint(tmp_path):
    accelerator = Accelerator(cpu=True)
    progress = TrainingProgress()
    best = tmp_path / "model"
    save_checkpoint(accelerator, run_config(tmp_path), step=1, state={"progress": progress}, folders={"best_model": best})
    best.mkdir()
    (best / "weights.safetensors").write_bytes(b"step-2 best")
    second = save_checkpoint(accelerator, run_config(tmp_path), step=2, state={"progress": progress}, folders={"best_model": best})
    (best / "weights.safetensors").unlink()  # writers replace files: the checkpoint's link keeps the old bytes
    (best / "weights.safetensors").write_bytes(b"step-3 best, written after the checkpoint")
    assert restore_folder(second, "best_model", best)
    assert (best / "weights.safetensors").read_bytes() == b"step-2 best"
    first = tmp_path / "checkpoints" / "step_1"
    assert not restore_folder(first, "best_model", best) and not best.exists()  # absent at step 1
    with pytest.raises(ValueError, match="holds no folder entry 'other'"):
        restore_folder(second, "other", best)


def _ddp_worker(rank: int, port: int, root: str) -> None:
    """One of 2 data-parallel CPU processes: train, checkpoint, move on, resume, report."""
    torch.set_num_threads(1)  # two processes on a 2-core machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(10 + rank)  # each process draws its own dropout masks and data
    progress, local = TrainingProgress(), Counter()
    state = {"model": model, "optimizer": optimizer, "progress": progress, "local": local}

    def step():
        model(torch.randn(4, 3)).square().mean().backward()  # DDP averages gradients across the 2 processes
        optimizer.step()
        optimizer.zero_grad()
        progress.step += 1
        local.seen[progress.step] = (rank, float(torch.rand(1)))

    step()
    path = save_checkpoint(accelerator, run_config(root), step=1, state=state, per_process=("local",))
    expected = {"model": {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()},
                "seen": dict(local.seen), "draw": torch.rand(3)}
    step()
    step()
    with forbid_unpickling():
        assert resume_into(accelerator, root, resume=True, state=state, per_process=("local",)) == path
    restored = accelerator.unwrap_model(model).state_dict()
    ok = (accelerator.num_processes == 2 and isinstance(model, torch.nn.parallel.DistributedDataParallel)
          and all(torch.equal(restored[k], v) for k, v in expected["model"].items()) and local.seen == expected["seen"]
          and progress.step == 1 and torch.equal(torch.rand(3), expected["draw"]))
    Path(root, f"rank{rank}.json").write_text(json.dumps({"ok": ok, "seen": {str(k): v for k, v in local.seen.items()}}))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_data_parallel_checkpoint_saves_shared_state_once_and_per_process_state_per_rank(tmp_path):
    run_workers(_ddp_worker, 2, free_port(), str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [report["ok"] for report in reports] == [True, True]
    assert reports[0]["seen"] != reports[1]["seen"]  # the per-process entry really differed per rank
    checkpoint = tmp_path / "checkpoints" / "step_1"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "local_0.safetensors", "local_1.safetensors", "manifest.json", "model.safetensors",
        "optimizer.safetensors", "progress.safetensors", "rng_state_0.safetensors", "rng_state_1.safetensors"]
    # a single process cannot continue a 2-process run exactly: refused by name
    with pytest.raises(ValueError, match=r"written by 2 process\(es\); resuming with 1"):
        load_checkpoint(Accelerator(cpu=True), checkpoint, {"progress": TrainingProgress()})


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resume_into(Accelerator(cpu=True), tmp_path, resume=True, state={"progress": TrainingProgress()})


def test_fresh_run_refuses_an_earlier_runs_checkpoints(tmp_path):
    accelerator, progress = Accelerator(cpu=True), TrainingProgress()
    save_checkpoint(accelerator, run_config(tmp_path), step=40, state={"progress": progress})
    with pytest.raises(FileExistsError, match=r"earlier run \(step_40\): pass --resume"):
        resume_into(accelerator, tmp_path, resume=False, state={"progress": progress})
    assert latest_checkpoint(tmp_path).name == "step_40"  # nothing was deleted
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / ".tmp_step_3").mkdir(parents=True)  # a killed write: not a checkpoint
    assert resume_into(accelerator, tmp_path, resume=False, state={"progress": progress}) is None
    assert not (tmp_path / "checkpoints" / ".tmp_step_3").exists()


def test_keeps_newest_checkpoints_only(tmp_path):
    accelerator = Accelerator(cpu=True)
    for step in (1, 2, 3):
        save_checkpoint(accelerator, run_config(tmp_path), step=step, state={"progress": TrainingProgress()})
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


def test_accelerate_state_left_by_a_test():
    """With the next test: conftest's ``fresh_accelerate_state`` resets accelerate's state after each
    test. This one leaves a bf16 state behind and checks that accelerate refuses a changed
    configuration while it stands (what a CUDA Accelerator followed by ``Accelerator(cpu=True)`` meets
    on a GPU host)."""
    Accelerator(cpu=True, mixed_precision="bf16")
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(cpu=True, mixed_precision="no")


def test_accelerate_state_is_fresh_in_the_next_test():
    """Runs after the test above (pytest keeps file order): its bf16 state must be gone."""
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    assert accelerator.mixed_precision == "no"


# ---- HfArgumentParser configs of the three stages ----------------------------------------------
@pytest.mark.parametrize(("module", "cls", "config_file"), [
    ("mim_hf.pretrain.train", "PretrainConfig", "pretrain_synthetic.yaml"),
    ("mim_hf.csft.train", "CSFTConfig", "csft_synthetic.yaml"),
    ("mim_hf.ctr.train", "CTRTrainConfig", "ctr_synthetic_ciubm_csft.yaml"),
])
def test_every_stage_config_parses_yaml_plus_cli(module, cls, config_file):
    """The CTR config's bare ``list`` fields crashed HfArgumentParser; lists now parse as ``--field a b``."""
    import importlib

    config_cls = getattr(importlib.import_module(module), cls)
    path = Path(__file__).resolve().parents[1] / "training" / "configs" / config_file
    config, resume = parse_config(config_cls, "", ["--config", str(path), "--seed", "3", "--no-show-progress", "--resume"])
    assert config == load_config(config_cls, path, {"seed": 3, "show_progress": False}) and resume
    if cls == "CTRTrainConfig":
        config, resume = parse_config(config_cls, "", ["--config", str(path), "--attention-hidden-sizes", "8", "4",
                                                       "--model-overrides", "{sim_top_k: 5}"])
        assert config.attention_hidden_sizes == [8, 4] and config.model_overrides == {"sim_top_k": 5} and not resume


# ---- issue 21: resume checks the configuration, verifies every file, falls back ------------------
def test_resume_refuses_a_changed_configuration_naming_the_fields(tmp_path):
    accelerator, state, step = toy_training(tmp_path)
    assert resume_into(accelerator, tmp_path, resume=False, state=state) is None  # fresh run: writes config.json
    step()
    save_checkpoint(accelerator, run_config(tmp_path), step=1, state=state, per_process=("loss",))
    config_json = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match=r"differs from .*step_1's in learning_rate \(checkpoint: 0\.1, this run: "
                                         r"0\.05\), seed \(checkpoint: 0, this run: 7\)"):
        resume_into(accelerator, tmp_path, resume=True, state=state, per_process=("loss",), seed=7, learning_rate=0.05)
    assert (tmp_path / "config.json").read_text() == config_json  # not overwritten by the refused run
    # fields that do not change results may change
    assert resume_into(accelerator, tmp_path, resume=True, state=state, per_process=("loss",), keep_checkpoints=5)


@dataclasses.dataclass
class LongerScheduleConfig(RunConfig):
    RESUME_MAY_GROW = ("max_steps",)
    max_steps: int = config_field(10, "steps")


def test_resume_accepts_a_longer_schedule_only_where_the_config_allows_it(tmp_path):
    accelerator, state, step = toy_training(tmp_path)
    step()
    save_checkpoint(accelerator, LongerScheduleConfig(output_dir=str(tmp_path)), step=1, state=state,
                    per_process=("loss",))
    longer = LongerScheduleConfig(output_dir=str(tmp_path), max_steps=20)
    assert restore_checkpoint(accelerator, start_run(accelerator, longer, True), state, ("loss",))
    with pytest.raises(ValueError, match=r"in max_steps \(checkpoint: 10, this run: 5\).* max_steps may grow\)"):
        start_run(accelerator, LongerScheduleConfig(output_dir=str(tmp_path), max_steps=5), True)
    with pytest.raises(ValueError, match=r"in batch_size \(checkpoint: 4, this run: 8\)"):
        start_run(accelerator, LongerScheduleConfig(output_dir=str(tmp_path), max_steps=20, batch_size=8), True)


@dataclasses.dataclass
class ConfigWithANewField(RunConfig):
    lr_decay: float = config_field(1.0, "a field added after the checkpoint was written; 1.0 = the old behaviour")


def test_resume_accepts_a_field_added_later_only_at_its_default(tmp_path):
    """A checkpoint from before a config field existed resumes when the new field keeps its
    default (the old behaviour); another value is refused, naming the field."""
    accelerator, state, step = toy_training(tmp_path)
    step()
    save_checkpoint(accelerator, RunConfig(output_dir=str(tmp_path)), step=1, state=state, per_process=("loss",))
    assert restore_checkpoint(accelerator, start_run(accelerator, ConfigWithANewField(output_dir=str(tmp_path)), True),
                              state, ("loss",))
    with pytest.raises(ValueError, match=r"in lr_decay \(checkpoint: '<absent>', this run: 0\.1\)"):
        start_run(accelerator, ConfigWithANewField(output_dir=str(tmp_path), lr_decay=0.1), True)


def _flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a byte of tensor data: same size, same valid header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bit flip", "manifest not JSON", "manifest lacks files", "file removed"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage):
    accelerator, state, step = toy_training(tmp_path)
    step()
    older = save_checkpoint(accelerator, run_config(tmp_path), step=1, state=state, per_process=("loss",))
    expected = snapshot(state)
    step()
    newer = save_checkpoint(accelerator, run_config(tmp_path), step=2, state=state, per_process=("loss",))
    if damage == "bit flip":
        _flip_one_bit(newer / "model.safetensors")
        reason = r"model.safetensors is damaged: its sha256 differs"
    elif damage == "manifest not JSON":
        (newer / "manifest.json").write_text('{"format": "mim-hf-checkpoint", "ver')
        reason = r"manifest.json is damaged: not readable JSON"
    elif damage == "manifest lacks files":
        manifest = json.loads((newer / "manifest.json").read_text())
        (newer / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
        reason = r"manifest.json is damaged: it lacks \['files'\]"
    else:
        (newer / "optimizer.safetensors").unlink()
        reason = r"optimizer.safetensors is damaged: missing bytes"
    with pytest.warns(UserWarning, match=rf"skipped damaged checkpoint\(s\) \(step_2: .*{reason}.*resuming from the "
                                         r"older intact .*step_1"):
        assert resume_into(accelerator, tmp_path, resume=True, state=state, per_process=("loss",)) == older
    assert_same(snapshot(state), expected)


def test_resume_refuses_when_every_checkpoint_is_damaged(tmp_path):
    accelerator, state, step = toy_training(tmp_path)
    step()
    only = save_checkpoint(accelerator, run_config(tmp_path), step=1, state=state, per_process=("loss",))
    _flip_one_bit(only / "progress.safetensors")
    with pytest.raises(ValueError, match=r"every checkpoint .* is damaged .*progress.safetensors is damaged: its sha256"):
        resume_into(accelerator, tmp_path, resume=True, state=state, per_process=("loss",))


# ---- issue 21: a resume with another batch size ends (it used to loop forever) -------------------
@pytest.mark.timeout(120)
def test_position_past_the_end_of_the_epoch_is_an_error_not_a_hang():
    accelerator, progress = Accelerator(cpu=True), TrainingProgress()
    loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(12)), batch_size=4))
    progress.epoch, progress.batches_in_epoch = 0, 5  # written with a smaller batch: 5 of 12 batches
    with pytest.raises(ValueError, match=r"position \(epoch 0, batch 5\) is past the end of this run's epoch of 3"):
        next(train_batches(accelerator, progress, loader, stop=lambda: progress.step >= 100))
    progress.batches_in_epoch = 3  # checkpointed right at the end of an epoch: the next epoch starts
    batches = train_batches(accelerator, progress, loader, stop=lambda: progress.step >= 100)
    assert next(batches).tolist() == [0, 1, 2, 3] and (progress.epoch, progress.batches_in_epoch) == (1, 0)


@pytest.mark.timeout(300)
def test_ctr_resume_with_another_batch_size_is_refused(tmp_path):
    """``--resume --batch-size 128`` on a checkpoint written with 32 spun forever at 100% CPU."""
    from mim_hf.ctr.train import CTRTrainConfig, run
    from mim_hf.data import make_synthetic_world, prepare

    world = make_synthetic_world(n_users=30, n_items=40, impressions_per_user=12)
    data_dir = prepare(world, protocol="temporal", max_len=10).save(tmp_path / "data")
    values = dict(data_dir=str(data_dir), output_dir=str(tmp_path / "ctr"), mode="din", max_len=10, id_embed_dim=4,
                  attention_hidden_sizes=[8], fusion_hidden_sizes=[16], batch_size=32, eval_batch_size=64,
                  max_steps=5, checkpoint_every=3, patience=0, show_progress=False, num_threads=1)
    train_samples = run(load_config(CTRTrainConfig, None, values))["fallbacks"]["train"]["samples"]
    assert math.ceil(train_samples / 128) <= 3 < math.ceil(train_samples / 32)
    shutil.rmtree(tmp_path / "ctr" / "checkpoints" / "step_5")  # as if killed after step 3
    assert json.loads((tmp_path / "ctr" / "checkpoints" / "step_3" / "manifest.json").read_text())["config"][
        "batch_size"] == 32
    # with 128 an epoch has at most 3 batches: skipping 3 left nothing to train on, and the loop spun forever
    with pytest.raises(ValueError, match=r"differs from .*step_3's in batch_size \(checkpoint: 32, this run: 128\)"):
        run(load_config(CTRTrainConfig, None, {**values, "batch_size": 128}), resume=True)


# ---- issue 21: one run per output folder -------------------------------------------------------
HOLD_LOCK = """
import sys, time
from mim_hf.common.loop import hold_output_dir
with hold_output_dir(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_into_a_held_output_dir_is_refused_naming_the_holder(tmp_path):
    import socket
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=rf"in use by another training run \(pid {holder.pid} on host "
                                               rf"{socket.gethostname()}, started 20\d\d-"):
            with hold_output_dir(tmp_path):
                pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with hold_output_dir(tmp_path):  # the holder ended: the folder is free again
        with pytest.raises(RuntimeError, match=rf"pid {os.getpid()} "):
            with hold_output_dir(tmp_path):
                pass
