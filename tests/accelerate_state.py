"""Reset of accelerate's process-wide state, used by tests/conftest.py after every test."""

import sys


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons (``PartialState``, ``AcceleratorState``,
    ``GradientState``), so that the next ``Accelerator(...)`` is configured afresh.

    Without it a test's ``Accelerator(cpu=True)`` (or another ``mixed_precision``) fails on a CUDA
    host after an earlier test in the same process built a CUDA ``Accelerator`` (``train_ctr``,
    ``train_csft``, ``train_pretrain``): "AcceleratorState has already been initialized and cannot
    be changed". A no-op when accelerate was never imported."""
    if "accelerate.state" not in sys.modules:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
