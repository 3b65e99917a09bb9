"""Training throughput of CiUBMForCTR against FuxiCTR's DIN on the same shapes, same run.

What is timed: one full training step (forward, BCE loss, backward,
grad-norm clip 10, Adam step) on a fixed random batch built before timing: batch 1024,
sequence 50 (lengths uniform in 1..50, so about half the positions are padding), ID dim 16,
content dim 384, attention MLP [64], fusion MLP [200, 80], ReLU, no dropout. Models are timed
in interleaved rounds and the fastest round of each is kept: on a shared machine other load
only ever adds time, so the minimum is the least noisy estimate, and interleaving exposes all
models to the same load.

Content reaches CiUBM as in ``mim_hf.ctr``: the model holds the content table (100,000 x 384,
``set_content_table``) and each batch carries ``target_content_rows`` (B,) and
``behavior_content_rows`` (B, L); the step itself reads the table.

Reference: FuxiCTR 2.3.10's DIN (``model_zoo/LongCTR/DIN``) run unchanged: a plain ``import
fuxictr`` when it is installed, else imported from a separate venv (``--fuxictr-site``, default
``/tmp/fxvenv/lib/python3.11/site-packages``; it must hold the same torch version). FuxiCTR imports ``ray`` only for its dataset
building; when ray is absent a placeholder module is registered so the import succeeds
(the DIN forward/backward never touches it; this is printed). If FuxiCTR cannot be imported,
a textbook DIN written below in plain torch is timed instead, labelled as such.

Also: SIM step time at sequence 1000 (lengths uniform in 1..1000, top-k 50) over full CiUBM at
sequence 50. The two steps alternate within each of ``--sim-rounds`` rounds; the verdict uses the ratio of the
fastest rounds, and the per-round ratios (each SIM step over the seq-50 step just before it,
same load) are printed with their median, so a verdict that holds only in the minimum shows.
Goals: din >= 1.5x the reference, ciubm >= 1.0x, SIM(1000)/seq-50 <= 2.0.

``--device cuda`` puts the models, optimizers, batches and the content table on the GPU
(FuxiCTR's DIN with ``gpu=0``) and synchronises before every timer read.

    .venv/bin/python benchmarks/bench_ctr.py [--rounds 8] [--sim-rounds 12] [--steps 3] [--threads N] [--device cpu|cuda]
    .venv/bin/python benchmarks/bench_ctr.py --density-sweep   # packed vs padded attention by density
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch
from torch import nn

from mim_hf.modeling import CiUBMConfig, CiUBMForCTR

N_USERS, N_ITEMS = 10_000, 100_000
ID_DIM, CONTENT_DIM = 16, 384
ATTENTION_UNITS, DNN_UNITS = [64], [200, 80]


# ---------------------------------------------------------------- references
def install_ray_placeholder() -> bool:
    """Register an empty ``ray`` package if ray is missing; returns True when it did."""
    try:
        import ray  # noqa: F401
        return False
    except ImportError:
        pass
    names = ["ray", "ray.data", "ray.data.datasource", "ray.data.datasource.filename_provider"]
    modules = {name: types.ModuleType(name) for name in names}
    modules["ray.data.datasource.filename_provider"].FilenameProvider = type("FilenameProvider", (), {})
    modules["ray.data"].SaveMode = types.SimpleNamespace()
    modules["ray.data"].TaskPoolStrategy = type("TaskPoolStrategy", (), {})
    modules["ray"].data = modules["ray.data"]
    modules["ray.data"].datasource = modules["ray.data.datasource"]
    modules["ray.data.datasource"].filename_provider = modules["ray.data.datasource.filename_provider"]
    sys.modules.update(modules)
    return True


def import_fuxictr_din(site: str):
    """(fuxictr module, its DIN class, whether a ray placeholder was registered): a plain import
    first (fuxictr installed here, e.g. from a wheel), else from the site dir of a separate venv."""
    placeholder = install_ray_placeholder()
    try:
        import fuxictr
    except ImportError:
        if not (site and os.path.isdir(site)):
            raise
        if site not in sys.path:
            sys.path.append(site)  # after our own site-packages: torch stays ours (same version required)
        import fuxictr
    # the DIN model lives in FuxiCTR's model_zoo, next to the package (wheel or source tree)
    for root in {os.path.dirname(os.path.dirname(fuxictr.__file__)), site}:
        zoo = os.path.join(root or "", "model_zoo", "LongCTR")
        if os.path.isdir(zoo) and zoo not in sys.path:
            sys.path.append(zoo)
    try:
        from DIN.DIN import DIN
    except ImportError:
        from model_zoo.LongCTR.DIN.DIN import DIN  # a wheel that ships model_zoo as a package
    return fuxictr, DIN, placeholder


def build_fuxictr_din(site: str, device: str = "cpu"):
    """FuxiCTR's DIN on user_id + item_id features; returns (model, step_fn, label) or raises ImportError."""
    fuxictr, DIN, placeholder = import_fuxictr_din(site)
    from fuxictr.features import FeatureMap

    feature_map = FeatureMap("bench", "/tmp/fuxictr_bench")
    feature_map.features = {
        "user_id": {"type": "categorical", "source": "user", "vocab_size": N_USERS, "padding_idx": 0},
        "item_id": {"type": "categorical", "source": "item", "vocab_size": N_ITEMS, "padding_idx": 0},
    }
    feature_map.labels = ["label"]
    feature_map.num_fields, feature_map.default_emb_dim = 2, ID_DIM
    model = DIN(feature_map, model_id="DIN_bench", gpu=0 if device == "cuda" else -1, model_root="/tmp/fuxictr_bench",
                dnn_hidden_units=DNN_UNITS, dnn_activations="ReLU", attention_hidden_units=ATTENTION_UNITS,
                attention_hidden_activations="ReLU", embedding_dim=ID_DIM, net_dropout=0, batch_norm=False,
                din_use_softmax=True, optimizer="adam", loss="binary_crossentropy", learning_rate=1e-3,
                verbose=0, metrics=["AUC"])
    model.train()
    model._batch_index, model._max_gradient_norm = 0, 10.0  # set by FuxiCTR's fit(); same clip as ours

    def step(data):
        batch_dict = {"user_id": data["user_ids"], "label": data["labels"].float()}
        item_dict = {"item_id": torch.cat([data["behavior_item_ids"], data["target_item_ids"][:, None]], 1).flatten()}
        model.train_step((batch_dict, item_dict, data["behavior_mask"].float()))

    label = f"FuxiCTR {fuxictr.__version__} DIN" + (" (ray placeholder module)" if placeholder else "")
    return model, step, label


class TextbookDIN(nn.Module):
    """Reference DIN in plain torch (used only when FuxiCTR is unavailable): concat attention input,
    MLP score, masked softmax, DNN over [user, target, interest]."""

    def __init__(self):
        super().__init__()
        self.user_embeddings = nn.Embedding(N_USERS, ID_DIM, padding_idx=0)
        self.item_embeddings = nn.Embedding(N_ITEMS, ID_DIM, padding_idx=0)
        self.attention = nn.Sequential(nn.Linear(4 * ID_DIM, ATTENTION_UNITS[0]), nn.ReLU(), nn.Linear(ATTENTION_UNITS[0], 1))
        layers, width = [], 3 * ID_DIM
        for units in DNN_UNITS:
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        self.dnn = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, user_ids, target_item_ids, behavior_item_ids, behavior_mask):
        target = self.item_embeddings(target_item_ids)
        keys = self.item_embeddings(behavior_item_ids)
        query = target.unsqueeze(1).expand_as(keys)
        scores = self.attention(torch.cat([query, keys, query - keys, query * keys], -1)).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~behavior_mask, -1e9), -1) * behavior_mask
        interest = (weights.unsqueeze(-1) * keys).sum(1)
        return self.dnn(torch.cat([self.user_embeddings(user_ids), target, interest], -1)).squeeze(-1)


def build_textbook_din(device: str = "cpu"):
    model = TextbookDIN().to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(data):
        logits = model(data["user_ids"], data["target_item_ids"], data["behavior_item_ids"], data["behavior_mask"])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, data["labels"].float())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10)
        optimizer.step()
        optimizer.zero_grad()

    return model, step, "textbook DIN in plain torch (FuxiCTR unavailable)"


# ---------------------------------------------------------------- ours
def build_ciubm(mode: str, table: torch.Tensor, base: str = "din", device: str = "cpu"):
    """A CiUBM training step; content modes hold ``table`` and read batch rows from it."""
    config = CiUBMConfig(mode=mode, base=base, sim_top_k=50, n_users=N_USERS, n_items=N_ITEMS, id_embed_dim=ID_DIM,
                         content_dim=CONTENT_DIM, content_proj_dim=32, attention_hidden_sizes=ATTENTION_UNITS,
                         fusion_hidden_sizes=DNN_UNITS, dropout=0.0)
    torch.manual_seed(0)
    model = CiUBMForCTR(config).to(device).train()
    if model.needs_content_inputs:
        model.set_content_table(table)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(data):
        loss = model(**data).loss
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10)
        optimizer.step()
        optimizer.zero_grad()

    return model, step, f"CiUBMForCTR mode={mode} base={base}"


def content_table(seed: int = 2, device: str = "cpu") -> torch.Tensor:
    """(N_ITEMS, CONTENT_DIM) random content, row i = item i; row 0 (padding/unknown) zeros."""
    table = torch.randn(N_ITEMS, CONTENT_DIM, generator=torch.Generator().manual_seed(seed))
    table[0] = 0.0
    return table.to(device)


def random_batch(batch_size: int, seq_len: int, seed: int = 0, device: str = "cpu") -> dict:
    """Random ids, lengths uniform in 1..seq_len, content rows = item ids (0 at padding). Drawn on
    the CPU (same numbers on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq_len + 1, (batch_size,), generator=g)
    mask = torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)
    batch = {
        "user_ids": torch.randint(1, N_USERS, (batch_size,), generator=g),
        "target_item_ids": torch.randint(1, N_ITEMS, (batch_size,), generator=g),
        "behavior_item_ids": torch.randint(1, N_ITEMS, (batch_size, seq_len), generator=g) * mask,
        "behavior_mask": mask,
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }
    batch.update(target_content_rows=batch["target_item_ids"], behavior_content_rows=batch["behavior_item_ids"])
    return {key: value.to(device) for key, value in batch.items()}


def clock(device: str) -> float:
    """perf_counter after the device's queued work has finished (CUDA runs asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def time_rounds(entries, rounds: int, steps: int, device: str = "cpu") -> dict:
    """entries: name -> (step_fn, batch), run in turn in each round (every model sees the same
    load). Returns name -> list of seconds per step, one per round (after one warm-up step each)."""
    for step, data in entries.values():  # warm-up
        step(data)
    per_round = {name: [] for name in entries}
    for _ in range(rounds):
        for name, (step, data) in entries.items():
            start = clock(device)
            for _ in range(steps):
                step(data)
            per_round[name].append((clock(device) - start) / steps)
    return per_round


def time_interleaved(entries, rounds: int, steps: int, device: str = "cpu") -> dict:
    """entries: name -> (step_fn, batch). Returns name -> seconds per step of the fastest round."""
    return {name: min(times) for name, times in time_rounds(entries, rounds, steps, device).items()}


def density_sweep(batch_size: int, seq_len: int, rounds: int) -> None:
    """Attention unit forward+backward, packed vs padded path, at several fractions of real behaviours,
    for the bench shape (D = 16, H = 64) and the MovieLens quickstart shape (D = 48: item id, genres
    and year; H = 32); prints the times and the density limit the automatic rule picks."""
    from mim_hf.modeling.modeling_ciubm import CiUBMTargetAttention

    for dim, hidden in ((ID_DIM, ATTENTION_UNITS[0]), (3 * ID_DIM, 32)):
        torch.manual_seed(0)
        unit = CiUBMTargetAttention(dim, [hidden], "relu", "softmax")
        query = torch.randn(batch_size, dim, requires_grad=True)
        keys = torch.randn(batch_size, seq_len, dim, requires_grad=True)
        print(f"attention D={dim} H={hidden}: automatic rule packs up to density {unit.packing_density_limit():.2f}")
        for density in (0.3, 0.5, 0.63, 0.8, 1.0):
            lengths = torch.full((batch_size,), float(round(density * seq_len)), dtype=torch.float32)
            mask = torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)
            runs = {"packed": [], "padded": []}
            for round_index in range(rounds + 1):  # interleaved, round 0 is a warm-up
                for name, limit in (("packed", 1.0), ("padded", -1.0)):
                    unit.packing_max_density = limit
                    start = time.perf_counter()
                    interest, _ = unit(query, keys, mask)
                    interest.sum().backward()
                    if round_index:
                        runs[name].append(time.perf_counter() - start)
            times = {name: min(values) * 1000 for name, values in runs.items()}
            unit.packing_max_density = None
            print(f"  density {density:.2f}: packed {times['packed']:6.1f} ms, padded {times['padded']:6.1f} ms "
                  f"(packed / padded = {times['packed'] / times['padded']:.2f})")


def verdict(ratio: float, goal: float, at_least: bool) -> str:
    met = ratio >= goal if at_least else ratio <= goal
    return f"goal {'>=' if at_least else '<='} {goal}: {'met' if met else 'NOT met'}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--sim-seq-len", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--sim-rounds", type=int, default=12, help="rounds of the SIM / seq-50 comparison (0 = skip)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--fuxictr-site", default=os.environ.get("FUXICTR_SITE", "/tmp/fxvenv/lib/python3.11/site-packages"))
    parser.add_argument("--density-sweep", action="store_true",
                        help="only time the attention unit's packed vs padded path at densities 0.3..1.0")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.density_sweep:
        if device != "cpu":
            parser.error("--density-sweep times the CPU-only packed attention path; run it with --device cpu")
        density_sweep(args.batch_size, args.seq_len, max(args.rounds, 5))
        return
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device} ({where}), batch {args.batch_size}, seq {args.seq_len}, "
          f"ID dim {ID_DIM}, content dim {CONTENT_DIM}, content table {N_ITEMS} x {CONTENT_DIM}")

    try:
        _, reference_step, reference_label = build_fuxictr_din(args.fuxictr_site, device)
    except Exception as error:  # noqa: BLE001 -- any import/constructor failure means: fall back, and say why
        print(f"FuxiCTR unavailable ({type(error).__name__}: {error}); falling back to the reference below")
        _, reference_step, reference_label = build_textbook_din(device)
    print(f"reference: {reference_label}")

    table = content_table(device=device)
    data = random_batch(args.batch_size, args.seq_len, device=device)
    entries = {"reference": (reference_step, data), "din": (build_ciubm("din", table, device=device)[1], data),
               "ciubm": (build_ciubm("ciubm", table, device=device)[1], data)}
    seconds = time_interleaved(entries, args.rounds, args.steps, device)
    samples_per_s = {name: args.batch_size / s for name, s in seconds.items()}
    for name, rate in samples_per_s.items():
        print(f"  {name:14s} {rate:10.0f} samples/s  ({seconds[name] * 1000:.1f} ms/step)")
    for name, goal in (("din", 1.5), ("ciubm", 1.0)):
        ratio = samples_per_s[name] / samples_per_s["reference"]
        print(f"ratio {name}/reference = {ratio:.2f}  ({verdict(ratio, goal, at_least=True)})")
    if not args.sim_rounds:
        return

    del entries  # free the first part's models before the long batches
    long_data = random_batch(args.batch_size, args.sim_seq_len, seed=1, device=device)
    short_name, sim_name = f"ciubm seq{args.seq_len}", f"ciubm+sim seq{args.sim_seq_len}"
    sim_entries = {short_name: (build_ciubm("ciubm", table, device=device)[1], data),
                   sim_name: (build_ciubm("ciubm", table, base="sim", device=device)[1], long_data)}
    sim_rounds = time_rounds(sim_entries, args.sim_rounds, max(1, args.steps // 2), device)
    for name, times in sim_rounds.items():
        print(f"  {name:26s} {min(times) * 1000:8.1f} ms/step (fastest round; median {statistics.median(times) * 1000:.1f})")
    sim_times, short_times = sim_rounds[sim_name], sim_rounds[short_name]
    ratio = min(sim_times) / min(short_times)
    per_round = [long / short for long, short in zip(sim_times, short_times)]
    print(f"ratio SIM(seq {args.sim_seq_len}, top-k 50) / seq {args.seq_len} step time = {ratio:.2f}  "
          f"({verdict(ratio, 2.0, at_least=False)}); per-round ratios: median {statistics.median(per_round):.2f}, "
          f"{sum(r <= 2.0 for r in per_round)}/{len(per_round)} rounds <= 2.0 [{' '.join(f'{r:.2f}' for r in per_round)}]")


if __name__ == "__main__":
    main()
