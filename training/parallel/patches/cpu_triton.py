"""CPU shim: a stand-in `triton` package.

Some megatron-core releases import triton unconditionally; the CPU torch wheel has none (the real one is ~1 GB).
The stand-in reports version 0.0.0 so megatron's own checks conclude "no usable triton", and torch is told it has
no triton either; any kernel launch raises. A machine with triton installed keeps it.
"""
from __future__ import annotations

import importlib.util
import sys
import types

from training.parallel.patches.once import once

MEGATRON_CORE = "0.16.1"   # the release whose triton imports this was checked against


def _jit(fn=None, **kwargs):
    def wrap(f):
        def launch(*a, **k):
            raise RuntimeError(f"Triton kernel {f.__name__} is unavailable on CPU")
        return type("Kernel", (), {"__getitem__": lambda s, grid: launch, "__call__": lambda s, *a, **k: launch()})()
    return wrap(fn) if callable(fn) else wrap


def _language_attr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return object


@once
def apply() -> None:
    """Idempotent; a no-op where triton is importable."""
    if "triton" in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    import torch.utils._triton as torch_triton

    torch_triton.has_triton_package = lambda: False
    torch_triton.has_triton = lambda: False
    triton, language = types.ModuleType("triton"), types.ModuleType("triton.language")
    triton.jit = triton.autotune = triton.heuristics = _jit
    triton.Config = lambda *a, **k: None
    triton.cdiv = lambda a, b: -(-a // b)
    triton.__version__ = "0.0.0"
    language.constexpr = object
    language.__getattr__ = _language_attr
    triton.language = language
    sys.modules["triton"], sys.modules["triton.language"] = triton, language
