"""Local-spec gap (every device): MLA with megatron-core's own local `DotProductAttention`.

megatron-core's MLA passes `k_channels`/`v_channels` to its core attention, which only Transformer Engine's
attention accepts, and tests `isinstance(..., TELinear)` against a stand-in that is not a class without TE.
seekflow's layers attend through `training/model/attention.py`, which takes those arguments; this patch keeps
megatron's own `DotProductAttention` usable with MLA's head sizes, as the reference that attention is tested and
benchmarked against: a key head size sets the default softmax scale, a value head size the output width.
"""
from __future__ import annotations

import math

from training.parallel.patches.once import once

MEGATRON_CORE = "0.16.1"   # the release whose multi_latent_attention / dot_product_attention this was checked against


@once
def apply() -> None:
    """Idempotent; imports megatron-core (on a CPU, after the CPU shim)."""
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
