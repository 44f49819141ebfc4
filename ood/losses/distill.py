"""Knowledge-distillation KL term of OAL (released code HengGao12/OAL `openood/trainers/oal_trainer.py`).

H. Gao et al., arXiv 2406.16525. Both distillation terms are `nn.KLDivLoss(reduction="batchmean")` applied to
(log_softmax(student), softmax(teacher)) at temperature 1:

  KL(S(t) || S(s)) = 1/N sum_i sum_c S(t_i)_c (log S(t_i)_c - log S(s_i)_c)

once on logits (teacher under no_grad) and once on features: the student's penultimate h treated as logits
against the projected teacher feature DT(u) (gradients reach DT through the target, as in the released code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(softmax(teacher) || softmax(student)) over rows of [N, C] (0 when the two are equal)."""
    return F.kl_div(F.log_softmax(student, dim=1), F.softmax(teacher, dim=1), reduction="batchmean")
