"""A test guard that makes any unpickling fail loudly (used in-process and in subprocesses).

Inside ``forbid_unpickling()``:
* ``pickle.load`` / ``pickle.loads`` (and the C versions in ``_pickle``) and the pure-Python
  ``pickle._Unpickler.load`` raise ``UnpicklingForbidden``;
* ``torch.load`` raises unless called with ``weights_only=True`` (the project's one allowed form);
* an audit hook raises on the ``pickle.find_class`` event, which every unpickler fires when a
  pickle names a class or function -- the step that lets a pickle run code. This catches the
  C ``Unpickler`` class (its type cannot be patched; replacing the class would break modules
  that subclass it at import) and code that imported ``loads`` by name before the patch.

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


def _fail(message: str):
    _attempts.append(message)
    raise UnpicklingForbidden(message)


def _audit(event, args):
    if _active and event == "pickle.find_class":
        _fail(f"unpickling reached pickle.find_class{args}")


def _refuse(name):
    def refuse(*args, **kwargs):
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
        setattr(module, name, _refuse(f"{getattr(module, '__qualname__', module.__name__)}.{name}"))
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
