"""The distributed tests' process helper fails by rank, with the stuck stack, instead of hanging."""

from __future__ import annotations

import pytest
from torch.multiprocessing import ProcessExitedException

from spawned_workers import run_workers, stuck_worker


def test_a_stuck_worker_fails_the_run_by_rank_with_its_stack(capfd):
    with pytest.raises(ProcessExitedException, match="process 1 terminated with exit code 1"):
        run_workers(stuck_worker, 2, 1, deadline_s=2.0)
    assert "in stuck_worker" in capfd.readouterr().err  # faulthandler's dump of where it was stuck
