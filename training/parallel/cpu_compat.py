"""Let megatron-core train on a CPU-only torch build with the gloo backend.

megatron-core assumes CUDA throughout: `device="cuda"`, `.cuda()`, CUDA streams, events and RNG state. On a machine
without CUDA we (1) rewrite cuda devices to cpu with a TorchFunctionMode, (2) give `torch.cuda` harmless stand-ins for
streams, events and RNG, (3) fill the gaps of megatron-core's non-Transformer-Engine "local" layer spec, which are
not CPU-specific and so live in `local_spec_gaps` (applied on GPUs too). Measured in ../shared/FACTS.md.

`apply()` must run before megatron is imported, and only when CUDA is absent: on a GPU it refuses to run.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode

from training.parallel import local_spec_gaps

_applied = False


def is_applied() -> bool:
    return _applied


def _to_cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class CudaToCpu(TorchFunctionMode):
    """`device='cuda'`, `.cuda()` and `.to('cuda')` are hard-coded all over megatron-core: send them to the CPU."""

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
    # Autograd runs a custom Function's backward with an empty mode stack, so re-enter the cuda->cpu mode there.
    with _MODE:
        return _original_backward_apply(self, *args)


def _stub_triton() -> None:
    """Some megatron-core releases import triton unconditionally; the CPU torch wheel has none (real one ~1 GB).

    The stub reports version 0.0.0 so megatron's own checks conclude "no usable triton"; any kernel launch raises.
    """
    if "triton" in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    import torch.utils._triton as torch_triton

    torch_triton.has_triton_package = lambda: False
    torch_triton.has_triton = lambda: False
    triton, language = types.ModuleType("triton"), types.ModuleType("triton.language")

    def jit(fn=None, **kwargs):
        def wrap(f):
            def launch(*a, **k):
                raise RuntimeError(f"Triton kernel {f.__name__} is unavailable on CPU")
            return type("Kernel", (), {"__getitem__": lambda s, grid: launch, "__call__": lambda s, *a, **k: launch()})()
        return wrap(fn) if callable(fn) else wrap

    def language_attr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return object

    triton.jit = triton.autotune = triton.heuristics = jit
    triton.Config = lambda *a, **k: None
    triton.cdiv = lambda a, b: -(-a // b)
    triton.__version__ = "0.0.0"
    language.constexpr = object
    language.__getattr__ = language_attr
    triton.language = language
    sys.modules["triton"], sys.modules["triton.language"] = triton, language


def _stub_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.current_stream = cuda.default_stream = lambda *a, **k: _Stream()
    cuda.Stream, cuda.Event = _Stream, _Event
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda *a, **k: None
    cuda.manual_seed = lambda seed: None          # the CPU generator is seeded by torch.manual_seed
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)


def _patch_megatron_cpu_paths() -> None:
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    # Tensor-parallel RNG tracker (dropout, recompute) on the CPU generator.
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # The alltoall dispatcher moves split sizes to host memory asynchronously; on CPU they already are.
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        return tensor.detach().cpu().numpy() if torch.is_tensor(tensor) and as_numpy else tensor

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if not hasattr(moe_utils, "te_general_gemm"):   # 0.16.1 refers to it without Transformer Engine
        moe_utils.te_general_gemm = None


def apply() -> None:
    """Install the shim (idempotent). Call before building any megatron-core model; never on a CUDA machine."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.apply() is for CPU-only machines; CUDA is available here, use it directly")
    # megatron's jit_fuser / torch.compile'd fusions build C++ with inductor on CPU: 5-21 s per cold step. Keep off.
    torch.compile = lambda fn=None, *a, **k: fn if callable(fn) else (lambda f: f)
    _stub_triton()
    _stub_torch_cuda()
    BackwardCFunction.apply = _backward_apply_under_mode
    _patch_megatron_cpu_paths()
    local_spec_gaps.apply()
    _MODE.__enter__()
    _applied = True
