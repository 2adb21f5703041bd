"""megatron-core gap (every device): the MTP loss's token count under context parallelism.

GPTModel's MTP loss should be the token mean of the whole sequence under context parallelism (CP), as one process
has it (DeepSeek-V3 §2.2, eq. 24). megatron-core 0.16 divides each rank's MTP loss sum by the rank's own count of
MTP targets (`roll_tensor`'s sum of the shifted loss mask), then averages the ranks. The rank holding the sequence's
end has one target fewer per depth, so that mean of means weights the ranks' tokens unequally (the LM loss has no
such gap: its counts are equal). Here the count becomes the CP group's mean count, so the average over ranks is the
exact token mean. A no-op for CP = 1 and for packed sequences, so it is applied everywhere, once per process.
"""
from __future__ import annotations

MEGATRON_CORE = "0.16.1"   # the release whose GPTModel MTP loss (models/gpt/gpt_model.py) this was checked against


def apply() -> None:
    """Idempotent: the replacement is marked, and a marked `roll_tensor` is left as it is."""
    import torch.distributed as dist
    from megatron.core.models.gpt import gpt_model

    original = gpt_model.roll_tensor
    if getattr(original, "counts_over_cp_group", False):
        return

    def roll_tensor(tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
        rolled, total = original(tensor, shifts=shifts, dims=dims, cp_group=cp_group,
                                 packed_seq_params=packed_seq_params)
        if cp_group is not None and cp_group.size() > 1 and packed_seq_params is None:
            total = total.detach().clone()
            dist.all_reduce(total, group=cp_group)
            total = total / cp_group.size()
        return rolled, total

    roll_tensor.counts_over_cp_group = True
    gpt_model.roll_tensor = roll_tensor
