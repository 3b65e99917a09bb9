"""Shared pytest fixtures. Each helper keeps its fixtures in its own marked block."""

# ---- [hub-server] local Hub test double (tests/hub_server.py) -------------------------------
import atexit
import os
import shutil
import sys
import tempfile

import pytest

# huggingface_hub and datasets read HF_HOME (and HF_HUB_DISABLE_XET) when first imported, so these
# are set here, before any test module imports them: every test gets an empty, throw-away HF cache
# and no stored token, and never touches the user's ~/.cache/huggingface.
_TEST_HF_HOME = tempfile.mkdtemp(prefix="mim-hf-test-hf-home-")
atexit.register(shutil.rmtree, _TEST_HF_HOME, True)
os.environ["HF_HOME"] = _TEST_HF_HOME
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the test double speaks LFS, not Xet
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)  # a real token must never reach a test; hub_server sets a dummy one
os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)


@pytest.fixture(scope="session")
def hub_server():
    """A Hub-compatible HTTP server on 127.0.0.1 that the real HF clients talk to (no network).

    Yields a ``hub_server.LocalHub`` with ``.endpoint`` (``http://127.0.0.1:<port>``), ``.token``
    (the dummy write token, also exported as ``HF_TOKEN``) and ``.user`` (the namespace ``whoami``
    reports). While it runs, ``HF_ENDPOINT``/``HF_TOKEN`` and the constants huggingface_hub and
    datasets derived from them at import time point at it; all is restored at session end.
    """
    from huggingface_hub import constants

    from hub_server import LocalHub, point_hf_clients_at

    if os.path.realpath(constants.HF_HOME) != os.path.realpath(_TEST_HF_HOME):
        raise RuntimeError(
            f"huggingface_hub was imported before tests/conftest.py set HF_HOME (its HF_HOME is"
            f" {constants.HF_HOME!r}, expected {_TEST_HF_HOME!r}); imported by: "
            f"{sorted(m for m in sys.modules if m.startswith(('huggingface_hub', 'datasets', 'transformers')))[:5]}"
        )
    with LocalHub() as hub:
        undo = point_hf_clients_at(hub.endpoint, hub.token)
        try:
            yield hub
        finally:
            undo()


# ---- [/hub-server] ----------------------------------------------------------------------------


# ---- [accelerate-state] a fresh accelerate state for every test ---------------------------------
@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """After each test, forget accelerate's process-wide singletons (``PartialState``,
    ``AcceleratorState``, ``GradientState``), so the next ``Accelerator(...)`` is configured afresh.

    Without it a test's ``Accelerator(cpu=True)`` (or another ``mixed_precision``) fails on a CUDA
    host after an earlier test in the same process built a CUDA ``Accelerator`` (``train_ctr``,
    ``train_csft``, ``train_pretrain``): "AcceleratorState has already been initialized and cannot
    be changed". Nothing to do when accelerate was never imported."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# ---- [/accelerate-state] ----------------------------------------------------------------------
