"""Fill the gaps of megatron-core's "local" layer spec (pure torch, no Transformer Engine), on any device.

seekflow builds every model from the local spec, on CPUs and GPUs alike, so these patches are applied wherever a
stage runs (`training.parallel.setup.prepare_backend`); the CPU shim (`cpu_compat`) is a separate, CPU-only layer.
Each gap is a megatron-core 0.16 code path that only works when Transformer Engine provides the module:

- MLA passes `k_channels`/`v_channels` to its core attention, which only TE's attention accepts (seekflow's layers
  attend through `training/model/attention.py`, which takes them; the patch keeps megatron's own `DotProductAttention`
  usable as the reference it is tested and benchmarked against), and tests `isinstance(..., TELinear)` against a
  stand-in that is not a class without TE;
- the torch RMSNorm refuses sequence parallelism, which only TE/Apex norms accept;
- selective recompute of the RMSNorms (and MoE activations) builds `CheckpointWithoutOutput()`, whose default
  `fp8=False` it reads as "FP8 on" (`fp8 is not None`) and then calls TE's FP8 state manager: a NameError without TE.
"""
from __future__ import annotations

import math

_applied = False


def is_applied() -> bool:
    return _applied


def _patch_mla_local_attention() -> None:
    import megatron.core.transformer.multi_latent_attention as mla
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if not isinstance(getattr(mla, "TELinear", None), type):   # 0.16: TELinear is a MagicMock without TE
        mla.HAVE_TE = False
    original_init = DotProductAttention.__init__

    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        original_init(self, *args, **kwargs)
        if k_channels is not None and kwargs.get("softmax_scale") is None:
            self.softmax_scale = 1.0 / math.sqrt(k_channels)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    DotProductAttention.__init__ = __init__


def _patch_torch_norm_sequence_parallel() -> None:
    from megatron.core.transformer import torch_norm

    wrapped = torch_norm.WrappedTorchNorm
    original_new = wrapped.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, **kwargs)
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True   # so their grads are all-reduced over the TP group
        return norm

    wrapped.__new__ = staticmethod(__new__)


def _patch_recompute_fp8_flag() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    checkpoint = tp_random.CheckpointWithoutOutput
    original_init = checkpoint.__init__

    def __init__(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = fp8 not in (None, False)   # FP8 recipes are strings ("e4m3", "hybrid"); None/False mean off

    checkpoint.__init__ = __init__


def apply() -> None:
    """Install the patches (idempotent). Imports megatron-core: on a CPU, `cpu_compat.apply()` runs first."""
    global _applied
    if _applied:
        return
    _patch_mla_local_attention()
    _patch_torch_norm_sequence_parallel()
    _patch_recompute_fp8_flag()
    _applied = True
