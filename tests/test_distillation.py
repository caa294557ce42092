import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer

from sparseft.testing import SyntheticClassificationData
from sparseft.training.distillation import distillation_loss, soft_target_loss
from sparseft.training.module import SparseFTModule


def test_soft_target_loss_by_hand():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: KL([.75, .25] || [.5, .5]) = .75 ln 1.5 + .25 ln .5
    assert soft_target_loss(student, teacher, 1.0).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # T = 2: teacher softens to [sqrt3, 1] / (sqrt3 + 1); times T^2 = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert soft_target_loss(student, teacher, 2.0).item() == pytest.approx(expected)
    assert soft_target_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_question_answering_uses_the_mean_of_start_and_end():
    zeros, peaked = torch.zeros(1, 4), torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    student = SimpleNamespace(start_logits=zeros, end_logits=zeros)
    teacher = SimpleNamespace(start_logits=peaked, end_logits=zeros)
    assert distillation_loss(student, teacher, 2.0) == pytest.approx(soft_target_loss(zeros, peaked, 2.0) / 2)


def test_module_distils_from_a_teacher_and_keeps_it_out_of_checkpoints(tiny_bert_dir, tmp_path):
    module = SparseFTModule(
        backbone=str(tiny_bert_dir), teacher=str(tiny_bert_dir), distill_alpha_ce=0.0, distill_alpha_kd=1.0
    )
    assert not any(name.startswith("teacher") for name in module.state_dict())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    trainer = Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, SyntheticClassificationData(size=24))
    logged = trainer.logged_metrics
    assert "train/distill_loss" in logged
    # with alpha_ce = 0 the training loss is the distillation loss alone, which the student moved away from 0
    assert float(logged["train/distill_loss"]) > 0
