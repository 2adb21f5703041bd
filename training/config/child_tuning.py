"""Child-Tuning (Xu et al., "Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning",
EMNLP 2021): fine-tuning that updates only a child network of the parameters, an option of the fine-tuning stages.
The engine is training/train/child_tuning.py.

Defaults: the paper's experimental setup searches p_F in {0.2, 0.3, 0.4} and p_D in {0.1, 0.2, 0.3}; the authors'
released script (AliceMind ChildTuning/run.sh) runs both modes with reserve_p = 0.3, the value taken here.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from training.config.base import Section


class ChildTuningConfig(Section):
    mode: Literal["off", "task_free", "task_driven"] = Field(
        "off", description="task_free (Child-Tuning_F): every step updates a fresh Bernoulli(p_f) share of the "
                           "parameter elements, its gradients scaled by 1/p_f. task_driven (Child-Tuning_D): the "
                           "p_d share with the largest Fisher information on the task batches, fixed before "
                           "training, is the only part ever updated. Elements left out of a step keep their value and "
                           "their AdamW moments bit for bit (no weight decay either).")
    p_f: float = Field(0.3, gt=0, le=1, description="task_free: the kept share of elements each step (paper: "
                                                    "{0.2, 0.3, 0.4}; 0.3 in the authors' script).")
    p_d: float = Field(0.3, gt=0, le=1, description="task_driven: the child network's share of all parameter "
                                                    "elements, chosen globally over every rank (paper: "
                                                    "{0.1, 0.2, 0.3}; 0.3 in the authors' script).")
    fisher_batches: int = Field(16, ge=1, description="task_driven: global batches of the run's data, from its "
                                                      "start, whose squared gradients are summed into the Fisher "
                                                      "estimate (the paper makes one pass over the training set: "
                                                      "set this to the steps of one epoch to do the same).")
