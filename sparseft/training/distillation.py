"""Knowledge distillation from a fine-tuned teacher, available to every strategy.

Movement pruning's best numbers distil from a fine-tuned BERT-base teacher (Sanh et al. 2020,
following Hinton et al. 2015): ``L = α_ce · L_task + α_kd · L_kd`` with

    L_kd = T² · KL( softmax(z_teacher / T) ‖ softmax(z_student / T) ),

averaged over the batch; for question answering the mean of the start and end losses.
The paper's setting is α_ce = 0.1, α_kd = 0.9, T = 2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(p_teacher ‖ p_student)`` on logits softened by ``T``, mean over examples.

    The ``T²`` keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    rows = student.reshape(-1, student.shape[-1])
    kl = F.kl_div(rows, teacher.reshape_as(rows), log_target=True, reduction="batchmean")
    return kl * temperature**2


def distillation_loss(student_outputs: Any, teacher_outputs: Any, temperature: float) -> torch.Tensor:
    """Soft-target loss for a Hugging Face output: ``logits``, or QA ``start_logits``/``end_logits``."""
    if getattr(student_outputs, "start_logits", None) is not None:
        start = soft_target_loss(student_outputs.start_logits, teacher_outputs.start_logits, temperature)
        end = soft_target_loss(student_outputs.end_logits, teacher_outputs.end_logits, temperature)
        return (start + end) / 2
    return soft_target_loss(student_outputs.logits, teacher_outputs.logits, temperature)
