"""The training-loop skeleton the three stages share: progress, epoch sampler, batch stream, run lock.

Every stage trains the same way::

    with hold_output_dir(config.output_dir):           # one run per output folder
        checkpoint = start_run(accelerator, config, resume)   # mim_hf.common.checkpoints
        ... build model, optimizer, loader ...
        restore_checkpoint(accelerator, checkpoint, state)
        for batch in train_batches(accelerator, progress, loader, stop=lambda: progress.step >= total):
            ... forward, backward, optimizer step ...
            progress.advance()
            ... evaluate / save_checkpoint every N steps; break at the last step ...

The data position (``progress.epoch``, ``progress.batches_in_epoch``) travels in the checkpoint
and :func:`train_batches` skips what the checkpointed run already saw; the sampler is a function
of ``(seed, epoch)`` alone, so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import typing
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from mim_hf.common.config import json_default

LOCK_NAME = ".lock"


class TrainingProgress:
    """Step/epoch counters, data position, best validation metric and a metric history.

    ``epoch`` and ``batches_in_epoch`` are the data loader's position; put the object in the
    checkpoint state (``save_checkpoint``) and a resumed run continues from there.
    """

    def __init__(self):
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"json": json.dumps(self.__dict__, default=json_default)}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(json.loads(state["json"]))

    def advance(self, batches_per_epoch: int | None = None) -> None:
        """One optimizer step done. With ``batches_per_epoch``, the position rolls over to the next
        epoch as soon as its last batch is done (so an evaluation there records the new epoch);
        without, :func:`train_batches` moves on when the loader is exhausted."""
        self.step += 1
        self.batches_in_epoch += 1
        if self.batches_in_epoch == batches_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def record(self, metrics: dict, key: str | None = None, higher_is_better: bool = True) -> bool:
        """Append ``metrics`` to the history; returns True when ``metrics[key]`` is a new best."""
        self.history.append({"step": self.step, "epoch": self.epoch, **metrics})
        if key is None or metrics.get(key) is None:
            return False
        value = float(metrics[key])
        better = self.best_metric is None or (value > self.best_metric if higher_is_better else value < self.best_metric)
        if better:
            self.best_metric, self.best_step, self.evals_without_improvement = value, self.step, 0
        else:
            self.evals_without_improvement += 1
        return better


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)`` alone: reproducible without the
    global RNG, so resuming mid-epoch replays exactly the same order.

    ``generator="numpy"`` (pre-training, C-SFT) draws ``default_rng([seed, epoch]).permutation(n)``;
    ``"torch"`` (CTR) draws ``randperm(n)`` seeded with ``seed * 100_003 + epoch``. Both stay as they
    were so that each stage's batches, and so its results, are unchanged."""

    def __init__(self, n: int, seed: int, generator: str = "numpy"):
        if generator not in ("numpy", "torch"):
            raise ValueError(f"generator must be 'numpy' or 'torch', got {generator!r}")
        # not named "generator": accelerate takes a sampler's .generator for a torch.Generator to synchronise
        self.n, self.seed, self.epoch, self.kind = n, seed, 0, generator

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.kind == "torch":
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            return iter(torch.randperm(self.n, generator=generator).tolist())
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())


def train_batches(accelerator, progress: TrainingProgress, loader, stop: typing.Callable[[], bool]):
    """Training batches from ``progress``'s data position on, epoch after epoch, until ``stop()``.

    ``loader``: a (prepared) data loader whose ``set_epoch`` picks the epoch's order, or a function
    ``epoch -> loader``. A resumed run's first epoch skips the ``progress.batches_in_epoch`` batches
    already trained on; a position past the end of the epoch (the data or batch size changed
    under a checkpoint) is an error, never an endless loop. The caller calls ``progress.advance``
    after each step and breaks out at its last step.
    """
    while not stop():
        if callable(getattr(loader, "set_epoch", None)):
            loader.set_epoch(progress.epoch)
            epoch_loader = loader
        else:
            epoch_loader = loader(progress.epoch)
        if len(epoch_loader) == 0:
            raise ValueError("the training data loader yields no batch (fewer samples than one batch?)")
        if progress.batches_in_epoch > len(epoch_loader):
            raise ValueError(f"the checkpointed position (epoch {progress.epoch}, batch {progress.batches_in_epoch}) "
                             f"is past the end of this run's epoch of {len(epoch_loader)} batches: the data or the "
                             "batch size differ from the checkpointed run's")
        if progress.batches_in_epoch:
            epoch_loader = accelerator.skip_first_batches(epoch_loader, progress.batches_in_epoch)
        yield from epoch_loader
        if progress.batches_in_epoch:  # not already rolled over by progress.advance(batches_per_epoch)
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # accelerate launch / torchrun set RANK


@contextmanager
def torch_threads(num_threads: int):
    """torch's intra-op thread count set to ``num_threads`` for the ``with`` block (0 = leave it),
    the previous count restored after."""
    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def hold_output_dir(output_dir: str | os.PathLike):
    """Hold an exclusive lock on ``output_dir`` (``fcntl.flock`` on ``<output_dir>/.lock``) for the
    ``with`` block. A second run into the same folder is refused at once (``RuntimeError`` naming the
    holder's pid, host and start time); the lock goes away with the process, even after a SIGKILL.
    Only the main process of a multi-process run locks."""
    if not _main_process():
        yield
        return
    path = Path(output_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown (no holder recorded)"
            raise RuntimeError(f"{output_dir} is in use by another training run ({holder}); wait for it to end or "
                               "choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, started "
                     f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock
