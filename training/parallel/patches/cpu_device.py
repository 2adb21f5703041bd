"""CPU shim: CUDA devices become the CPU.

`device="cuda"`, `.cuda()` and `.to("cuda")` are hard-coded all over megatron-core, as are CUDA streams and events.
On a machine without CUDA, a `TorchFunctionMode` entered for the rest of the process sends those devices to the CPU,
and `torch.cuda` gets harmless stand-ins for the current device, streams, events, synchronisation and the caching
allocator. Autograd runs a custom Function's backward with an empty mode stack, so `BackwardCFunction.apply` is
wrapped to re-enter the mode there.

Only without CUDA: on a GPU `apply()` refuses to run.

The mode sees every torch call (~40% of a KV-cache decode step of the tiny model on CPU, measured); `suspended()`
lifts it for a block that creates no device tensors from a hard-coded "cuda" (decoding: training/eval/generate.py).
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode

from training.parallel.patches.once import once

MEGATRON_CORE = "0.16.1"   # the release whose device handling this was checked against


def _to_cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class CudaToCpu(TorchFunctionMode):
    """`device='cuda'`, `.cuda()` and `.to('cuda')` go to the CPU; `record_stream` does nothing."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron asserts tensor.type() == 'torch.cuda.FloatTensor' in a few places.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if kwargs.get("pin_memory"):   # no pinned-memory allocator without an accelerator (e.g. CP's rope slicing)
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


class _Event:
    def __init__(self, *args, **kwargs): pass
    def record(self, stream=None): pass
    def synchronize(self): pass
    def wait(self, stream=None): pass
    def query(self): return True
    def elapsed_time(self, other): return 0.0


class _Stream:
    def __init__(self, *args, **kwargs): pass
    def wait_stream(self, stream): pass
    def wait_event(self, event): pass
    def record_event(self, event=None): return event or _Event()
    def synchronize(self): pass
    def query(self): return True


_MODE = CudaToCpu()
_original_backward_apply = BackwardCFunction.apply


def _backward_apply_under_mode(self, *args):
    with _MODE:
        return _original_backward_apply(self, *args)


def _stand_in_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.current_stream = cuda.default_stream = lambda *a, **k: _Stream()
    cuda.Stream, cuda.Event = _Stream, _Event
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda *a, **k: None


@once
def apply() -> None:
    """Idempotent; refuses to run where CUDA is available (a GPU must use it, not this mode)."""
    if torch.cuda.is_available():
        raise RuntimeError(f"{__name__} is for CPU-only machines; CUDA is available here, use it directly")
    _stand_in_torch_cuda()
    BackwardCFunction.apply = _backward_apply_under_mode
    _MODE.__enter__()


@contextlib.contextmanager
def suspended():
    """The mode lifted for the block (when it is the innermost torch function mode; else nothing changes). For code
    that creates no tensor on a hard-coded "cuda" device: `torch.cuda.current_device()` still answers "cpu"."""
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if _get_current_function_mode() is not _MODE:
        yield
        return
    with _pop_mode_temporarily():
        yield
