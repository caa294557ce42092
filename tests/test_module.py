"""SparseFTModule's optimizer and learning-rate schedule."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer

from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.training.module import SparseFTModule


def test_lr_warmup_is_step_over_warmup_then_linear_decay_as_transformers(tmp_path):
    module = SparseFTModule(config=tiny_config("bert"), num_labels=2, learning_rate=1.0, warmup_ratio=0.4)
    trainer = Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, SyntheticClassificationData(size=80))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    factors = [scheduler.lr_lambdas[0](step) for step in range(11)]
    # get_linear_schedule_with_warmup(4, 10): step / 4 up to step 4, then (10 - step) / 6
    assert factors == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    assert module.warmup_steps == 4
