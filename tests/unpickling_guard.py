"""A test guard that makes any unpickling fail loudly (used in-process and in subprocesses).

Inside ``forbid_unpickling()``:
* ``pickle.load`` / ``pickle.loads`` (and the C versions in ``_pickle``) and the pure-Python
  ``pickle._Unpickler.load`` raise ``UnpicklingForbidden``;
* ``torch.load`` raises unless called with ``weights_only=True`` (the project's one allowed form);
* an audit hook raises on the ``pickle.find_class`` event, which every unpickler fires when a
  pickle names a class or function -- the step that lets a pickle run code. This catches the
  C ``Unpickler`` class (its type cannot be patched; replacing the class would break modules
  that subclass it at import) and code that imported ``loads`` by name before the patch.

One reader is let through: numba's own on-disk cache of compiled machine code (the optional
``fast`` look-up kernel, ``mim_hf/center/numba_lookup.py``). numba writes it on this machine beside the
module (``__pycache__``, like Python's own bytecode cache) or in ``NUMBA_CACHE_DIR``, and reads its
index with pickle; it is never a file from a download or the Hub, and it carries the same trust as
the ``.pyc`` files next to it. The exemption is by caller (a frame of ``numba.core.caching``), so
any other unpickling stays refused; ``allowed_numba_cache_reads()`` counts the reads let through.

Every refusal is also recorded, and leaving the guard raises if any happened: code that
catches the error (``except Exception``) cannot hide an attempt.
"""

from __future__ import annotations

import contextlib
import pickle
import sys

import _pickle


class UnpicklingForbidden(AssertionError):
    pass


_active = 0
_hook_installed = False
_attempts: list[str] = []


_numba_cache_reads = 0
_NUMBA_CACHE_MODULE = "numba.core.caching"


def _from_numba_cache() -> bool:
    """True when a frame of numba's cache loader is on the stack (see the module docstring)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == _NUMBA_CACHE_MODULE:
            return True
        frame = frame.f_back
    return False


def allowed_numba_cache_reads() -> int:
    """How many pickle reads by numba's cache loader the guard let through so far."""
    return _numba_cache_reads


def _fail(message: str):
    _attempts.append(message)
    raise UnpicklingForbidden(message)


def _audit(event, args):
    if _active and event == "pickle.find_class":
        if _from_numba_cache():
            return
        _fail(f"unpickling reached pickle.find_class{args}")


def _refuse(name, real):
    def refuse(*args, **kwargs):
        global _numba_cache_reads
        if _from_numba_cache():
            _numba_cache_reads += 1
            return real(*args, **kwargs)
        _fail(f"{name} called while unpickling is forbidden")
    return refuse


@contextlib.contextmanager
def forbid_unpickling():
    global _active, _hook_installed
    import torch

    if not _hook_installed:  # audit hooks cannot be removed: install once, active only inside the guard
        sys.addaudithook(_audit)
        _hook_installed = True
    real_torch_load = torch.load

    def guarded_torch_load(*args, **kwargs):
        if kwargs.get("weights_only") is not True:
            _fail(f"torch.load without weights_only=True (kwargs {kwargs})")
        return real_torch_load(*args, **kwargs)

    patched = [(module, name) for module in (pickle, _pickle) for name in ("load", "loads")]
    patched.append((pickle._Unpickler, "load"))
    saved = [(module, name, getattr(module, name)) for module, name in patched]
    for module, name in patched:
        setattr(module, name, _refuse(f"{getattr(module, '__qualname__', module.__name__)}.{name}", getattr(module, name)))
    torch.load = guarded_torch_load
    _active += 1
    already = len(_attempts)
    try:
        yield
    finally:
        _active -= 1
        torch.load = real_torch_load
        for module, name, value in saved:
            setattr(module, name, value)
    if len(_attempts) > already:
        raise UnpicklingForbidden(f"unpickling was attempted (and refused): {_attempts[already:]}")
