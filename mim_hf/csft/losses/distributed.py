"""Space negatives: gather candidates from every data-parallel process.

``gather_with_grad(tensor)`` concatenates ``tensor`` (shape ``(B, ...)``) from all
``W`` processes along dim 0 into ``(W * B, ...)``, ordered by rank. The slice that came from
this process is the *original* tensor, so gradient flows into it; the slices of the other
processes are received copies and are detached. Each process therefore back-propagates only
through its own encoder outputs (the other processes do that for theirs) -- the cheap form of
cross-device negatives (no all-reduce of gradients through the gather).

With ``torch.distributed`` not initialised, or a world size of 1, the tensor is returned
unchanged: the loss is then the plain in-batch loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def data_parallel_world() -> tuple[int, int]:
    """Return ``(world_size, rank)``; ``(1, 0)`` when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(tensor: torch.Tensor, check_sizes: bool = True) -> torch.Tensor:
    """All-gather ``tensor`` ``(B, ...)`` -> ``(world_size * B, ...)``, rank order.

    The local slice (rows ``rank * B : (rank + 1) * B``) keeps its autograd history; remote
    slices are detached. Works for float and integer tensors (ids gather the same way).
    Every process must pass the same shape; a mismatch raises ``ValueError`` naming the
    batch sizes of all ranks (instead of a collective hang or an opaque backend error);
    ``check_sizes=False`` skips that extra one-number collective when the caller already
    checked (the loss checks once per step, on its first gather).
    """
    world_size, rank = data_parallel_world()
    if world_size == 1:
        return tensor
    if check_sizes:
        _check_equal_rows(tensor, world_size)
    received = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(received, tensor.detach().contiguous())
    received[rank] = tensor  # keep the graph for the part this process computed
    return torch.cat(received, dim=0)


def _check_equal_rows(tensor: torch.Tensor, world_size: int) -> None:
    # A one-number collective: all_gather needs equal shapes on every rank.
    local_rows = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    all_rows = [torch.empty_like(local_rows) for _ in range(world_size)]
    dist.all_gather(all_rows, local_rows)
    rows_per_rank = [int(r.item()) for r in all_rows]
    if len(set(rows_per_rank)) != 1:
        raise ValueError(
            f"gather_with_grad needs the same batch size on every process, got rows per rank "
            f"{rows_per_rank} (use drop_last=True in the dataloader)"
        )
