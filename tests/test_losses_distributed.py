"""InfoNCE across 2 CPU processes (gloo): space negatives, detached remote rows, exact reduction.

Each process holds its slice of one global batch; the parent then checks the processes'
results against the single-process loop reference computed on the concatenated batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from contrastive_reference import reference_infonce, reference_row_losses
from spawned_workers import free_port, run_workers
from mim_hf.csft.losses import InfoNCELoss

WORLD_SIZE, BATCH, DIM, NUM_HARD, QUEUE_SIZE, TAU = 2, 4, 8, 2, 16, 0.1


def _global_step(step: int) -> dict[str, torch.Tensor]:
    """The global batch of a step (same on every process): rank r owns rows r*B:(r+1)*B."""
    generator = torch.Generator().manual_seed(100 + step)
    n = WORLD_SIZE * BATCH
    batch = {
        "anchors": torch.randn(n, DIM, generator=generator),
        "positives": torch.randn(n, DIM, generator=generator),
        "hard": torch.randn(n, NUM_HARD, DIM, generator=generator),
        "anchor_ids": torch.randint(0, 12, (n,), generator=generator),
        "positive_ids": torch.randint(0, 12, (n,), generator=generator),
        "hard_ids": torch.randint(0, 12, (n, NUM_HARD), generator=generator),
        "pair_mask": torch.ones(n, dtype=torch.bool),
    }
    batch["positive_ids"][BATCH] = batch["positive_ids"][0]  # a duplicate target across processes
    if step == 1:
        batch["pair_mask"][1] = False  # unequal valid counts per process: 3 vs 4
    return batch


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        loss_fn = InfoNCELoss(temperature=TAU, gather_across_devices=True, queue_size=QUEUE_SIZE)
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        results = {}
        for step in range(2):
            batch = _global_step(step)
            anchors = batch["anchors"][rows].clone().requires_grad_(True)
            positives = batch["positives"][rows].clone().requires_grad_(True)
            hard = batch["hard"][rows].clone().requires_grad_(True)
            args = (anchors, positives, batch["anchor_ids"][rows], batch["positive_ids"][rows])
            kwargs = {"hard_negatives": hard, "hard_negative_ids": batch["hard_ids"][rows],
                      "pair_mask": batch["pair_mask"][rows]}
            num_candidates = loss_fn.similarity_logits(*args, **kwargs).logits.shape[1]
            loss = loss_fn(*args, **kwargs)
            loss.backward()
            results.update({
                f"loss_{step}": loss.detach(), f"num_candidates_{step}": torch.tensor(num_candidates),
                f"anchors_grad_{step}": anchors.grad, f"positives_grad_{step}": positives.grad,
                f"hard_grad_{step}": hard.grad,
            })
        results["queue_ids"] = loss_fn.queue.ordered_candidates()[1].clone()
        batch = _global_step(0)
        symmetric = InfoNCELoss(temperature=TAU, gather_across_devices=True, symmetric=True)
        results["symmetric_loss"] = symmetric(batch["anchors"][rows], batch["positives"][rows],
                                              batch["anchor_ids"][rows], batch["positive_ids"][rows]).detach()
        try:  # unequal local batch sizes must fail loudly on every process, not hang
            short = BATCH - rank
            loss_fn(torch.randn(short, DIM), torch.randn(short, DIM),
                    torch.arange(short), torch.arange(short))
        except ValueError as error:
            results["unequal_error"] = torch.tensor(list(str(error).encode()), dtype=torch.uint8)
        save_file({k: v.contiguous() for k, v in results.items()}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("infonce_ddp")
    run_workers(_worker, WORLD_SIZE, free_port(), str(out_dir))
    return [load_file(out_dir / f"rank{rank}.safetensors") for rank in range(WORLD_SIZE)]


def _reference(step: int, queue=None, queue_ids=None):
    batch = _global_step(step)
    leaves = {name: batch[name].clone().requires_grad_(True) for name in ("anchors", "positives", "hard")}
    loss = reference_infonce(leaves["anchors"], leaves["positives"], batch["anchor_ids"], batch["positive_ids"],
                             TAU, hard=leaves["hard"], hard_ids=batch["hard_ids"], queue=queue,
                             queue_ids=queue_ids, pair_mask=batch["pair_mask"])
    loss.backward()
    return batch, loss, {name: leaf.grad for name, leaf in leaves.items()}


def _positives_grad_with_remote_rows_detached(step: int, queue=None, queue_ids=None) -> torch.Tensor:
    """Reference gradient on positives when anchors see other processes' positives detached."""
    batch = _global_step(step)
    positives = batch["positives"].clone().requires_grad_(True)
    total, num_valid = 0.0, int(batch["pair_mask"].sum())
    for rank in range(WORLD_SIZE):
        rows = range(rank * BATCH, (rank + 1) * BATCH)
        local = torch.zeros(WORLD_SIZE * BATCH, dtype=torch.bool)
        local[rank * BATCH:(rank + 1) * BATCH] = True
        seen = torch.where(local[:, None], positives, positives.detach())
        row_losses = reference_row_losses(batch["anchors"], seen, batch["anchor_ids"], batch["positive_ids"], TAU,
                                          hard=batch["hard"], hard_ids=batch["hard_ids"], queue=queue,
                                          queue_ids=queue_ids, pair_mask=batch["pair_mask"], rows=rows)
        total = total + sum(row_losses.values())
    (total / num_valid).backward()
    return positives.grad


def _stack(rank_results, name):
    return torch.cat([result[name] for result in rank_results])


def test_candidates_are_world_times_batch_plus_queue(rank_results):
    for result in rank_results:
        assert int(result["num_candidates_0"]) == WORLD_SIZE * BATCH + NUM_HARD
        # step 1 also sees the queue: the gathered positives of step 0 (all valid)
        assert int(result["num_candidates_1"]) == WORLD_SIZE * BATCH + NUM_HARD + WORLD_SIZE * BATCH
    # the queue is filled from gathered candidates, so it is the same on every process
    assert torch.equal(rank_results[0]["queue_ids"], rank_results[1]["queue_ids"])
    valid_1 = _global_step(1)["pair_mask"]
    expected_queue = torch.cat([_global_step(0)["positive_ids"], _global_step(1)["positive_ids"][valid_1]])
    assert torch.equal(rank_results[0]["queue_ids"], expected_queue)


@pytest.mark.parametrize("step", [0, 1])
def test_matches_single_process_reference(rank_results, step):
    queue = queue_ids = None
    if step == 1:
        previous = _global_step(0)
        queue, queue_ids = previous["positives"], previous["positive_ids"]
    batch, reference_loss, reference_grads = _reference(step, queue, queue_ids)
    # Reduction: the mean of the per-process losses is the global mean over valid anchors,
    # also with unequal valid counts per process (step 1).
    losses = torch.stack([result[f"loss_{step}"] for result in rank_results])
    assert losses.mean().item() == pytest.approx(reference_loss.item(), rel=1e-5)
    if step == 1:
        assert losses[0].item() != pytest.approx(losses[1].item())
    # Gradients as DDP averages them (sum over processes / W): anchors and hard negatives
    # (only ever seen by their own process) match the reference exactly.
    for name in ("anchors", "hard"):
        torch.testing.assert_close(_stack(rank_results, f"{name}_grad_{step}") / WORLD_SIZE,
                                   reference_grads[name], rtol=1e-4, atol=1e-6)
    # Positives: gradient comes only from local anchors (remote copies are detached), so it
    # equals the reference with other processes' positives detached -- and not the full one.
    positives_grad = _stack(rank_results, f"positives_grad_{step}") / WORLD_SIZE
    torch.testing.assert_close(positives_grad, _positives_grad_with_remote_rows_detached(step, queue, queue_ids),
                               rtol=1e-4, atol=1e-6)
    assert not torch.allclose(positives_grad, reference_grads["positives"], rtol=1e-3, atol=1e-5)


def test_symmetric_matches_reference(rank_results):
    batch = _global_step(0)
    forward = reference_infonce(batch["anchors"], batch["positives"], batch["anchor_ids"], batch["positive_ids"], TAU)
    reverse = reference_infonce(batch["positives"], batch["anchors"], batch["positive_ids"], batch["anchor_ids"], TAU)
    losses = torch.stack([result["symmetric_loss"] for result in rank_results])
    assert losses.mean().item() == pytest.approx(0.5 * (forward + reverse).item(), rel=1e-5)


def test_unequal_batch_sizes_raise_on_every_process(rank_results):
    for result in rank_results:
        message = bytes(result["unequal_error"].tolist()).decode()
        assert "rows per rank [4, 3]" in message
