"""DSEE against hand-computed tensors, and its three stages inside one Lightning run."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn
from transformers import AutoModelForSequenceClassification

from sparseft.backbones.loading import load_backbone
from sparseft.export.pretrained import export_pretrained
from sparseft.sparse.deltas import LowRank, RowBlocks, ScaledSum, SparseResidual
from sparseft.sparse.masks import global_topk_masks, pruned_count
from sparseft.sparse.measure import count_parameters
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.structured import HeadLayout, head_scores
from sparseft.strategies import DSEE
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.training.module import SparseFTModule

W0 = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.5, -6.0]])
B = torch.tensor([[1.0], [-1.0]])       # out x r, zero-initialised in training
A = torch.tensor([[0.5, 0.0, -1.0]])    # r x in


def one_layer(**kwargs) -> tuple[nn.Sequential, DSEE]:
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(W0)
    settings = dict(sparsity=0.0, targets="0", rank=1, alpha=4.0, num_sparse=2, support="magnitude")
    strategy = DSEE(**{**settings, **kwargs})
    strategy.attach(model)
    return model, strategy


def test_delta_is_alpha_over_r_times_ba_plus_sparse_values_on_the_support():
    model, strategy = one_layer()
    delta = strategy.layers[0].param.delta
    low_rank, residual = delta.parts
    assert isinstance(delta, ScaledSum) and delta.scale == 4.0  # α / r = 4 / 1
    assert not low_rank.left.abs().sum() and low_rank.right.std() > 0  # B = 0, A ~ N(0, 0.02²)
    assert residual.indices.tolist() == [3, 5]  # Ω: the 2 largest |W0| (4 and -6)
    with torch.no_grad():
        low_rank.left.copy_(B)
        low_rank.right.copy_(A)
        residual.values.copy_(torch.tensor([0.25, -0.5]))
    sparse = torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.0, -0.5]])
    expected = 4.0 * (B @ A + sparse)  # the α/r scale applies to S2 as well
    assert torch.allclose(delta(), expected)
    x = torch.tensor([[1.0, 2.0, -1.0]])
    assert torch.allclose(model(x), x @ (W0 + expected).T + model[0].bias)


def test_lora_only_has_no_sparse_part_and_prunes_nothing():
    _, strategy = one_layer(num_sparse=0)
    delta = strategy.layers[0].param.delta
    assert len(delta.parts) == 1 and isinstance(delta.parts[0], LowRank)


def make_module(model_type: str = "bert", lr: float = 1e-2, warmup_ratio: float = 0.0) -> SparseFTModule:
    torch.manual_seed(0)
    extra = {"pad_token_id": 0} if model_type in ("gpt2", "llama") else {}
    config = tiny_config(model_type, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)
    return SparseFTModule(config=config, num_labels=2, learning_rate=lr, warmup_ratio=warmup_ratio)


def fit(strategy: DSEE, tmp_path, steps: int = 12, callbacks=(), ckpt_path=None, **module_kwargs) -> SparseFTModule:
    module = make_module(**module_kwargs)
    trainer = Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
                      callbacks=[strategy, *callbacks])
    trainer.fit(module, SyntheticClassificationData(size=32), ckpt_path=ckpt_path)  # 4 batches per epoch
    return module


def test_only_the_support_changes_and_w0_stays_frozen(tmp_path):
    strategy = DSEE(sparsity=0.0, rank=2, num_sparse=8)
    module = make_module()
    w0 = {name: p.detach().clone() for name, p in module.model.named_parameters() if "classifier" not in name}
    trainer = Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[strategy])
    trainer.fit(module, SyntheticClassificationData(size=32))
    assert [layer.layer.role for layer in strategy.layers] == ["q", "v", "q", "v"]  # nothing else touched
    for layer in strategy.layers:
        residual = layer.param.delta.parts[1]
        changed = residual().flatten().nonzero().flatten()
        assert residual.values.numel() == 8 and torch.equal(changed, residual.indices)  # all N move, nothing else
    for name, parameter in module.model.named_parameters():
        if name in w0:
            assert torch.equal(parameter, w0[name]), name  # W0, biases, LayerNorm, embeddings frozen


def test_reference_support_trains_and_warns_that_its_s2_is_dense_on_small_matrices(tmp_path):
    # 32×32 q and v: the official loop's rank passes 32 long before its 100 iterations end, its S is
    # 0 and `kthvalue >=` selects all 1024 entries, so S2 is a dense update -- reproduced, and said
    strategy = DSEE(sparsity=0.5, rank=2, num_sparse=8, support="grebsmo_reference")
    with pytest.warns(UserWarning, match=r"grebsmo_reference: bert\.encoder\.layer\.0\.attention\.self\.query "
                                         r"selects 1024 of 1024 entries, not 8 \(dense S2"):
        module = fit(strategy, tmp_path, steps=8)
    updated = [layer for layer in strategy.layers if layer.param.delta is not None]
    assert len(updated) == 4
    for layer in updated:
        residual = layer.param.delta.parts[1]
        assert residual.indices.numel() == 1024 and residual.values.abs().min() > 0  # every entry trained
    assert strategy.applied_sparsity == 0.5 and strategy.stage == "retune"
    assert module.model.bert.encoder.layer[0].attention.self.query.parametrizations.weight[0].mask.any()


def test_trainable_parameters_are_2r_out_plus_in_plus_n_per_matrix_and_the_head():
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    DSEE(sparsity=0.5, rank=4, num_sparse=8, support="random").attach(model)
    assert count_parameters(model)[0] == 4 * (4 * (32 + 32) + 8) + 32 * 2 + 2


@pytest.mark.slow
def test_bert_base_trains_589_824_plus_24_n_parameters_plus_head():
    model = load_backbone("sequence-classification", config=dict(model_type="bert"), num_labels=2)
    DSEE(support="magnitude").attach(model)  # r = 16, N = 64 on q and v of 12 layers
    trainable, total = count_parameters(model)
    assert trainable == 589_824 + 24 * 64 + 768 * 2 + 2
    assert (trainable - 1538) / total == pytest.approx(0.0054, abs=2e-4)


def test_head_scores_by_hand():
    layout = HeadLayout(num_heads=2, num_kv_heads=2, head_dim=2)
    delta_q = torch.tensor([[1.0, -1.0], [0.5, 0.0], [0.0, 2.0], [-1.0, 1.0]])  # rows 0-1: head 0
    delta_v = torch.tensor([[0.0, 0.5], [0.5, 0.5], [-3.0, 0.0], [0.0, 0.0]])
    # head 0: |1|+|-1|+|.5| + |.5|+|.5|+|.5| = 4 ; head 1: |2|+|-1|+|1| + |-3| = 7
    assert head_scores(delta_q, delta_v, layout).tolist() == [4.0, 7.0]
    assert head_scores(delta_q, None, layout).tolist() == [2.5, 4.0]
    grouped = HeadLayout(num_heads=4, num_kv_heads=2, head_dim=1)  # query heads {0, 1} share KV head 0
    assert head_scores(delta_q, delta_v[:2], grouped).tolist() == [2.5 + 0.5, 4.0 + 1.0]


def test_heads_pattern_drops_the_lowest_scoring_heads_of_every_block():
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    strategy = DSEE(sparsity=0.5, pattern="heads", rank=2, num_sparse=4, support="random")
    strategy.attach(model)
    torch.manual_seed(1)
    for parameter in strategy.update_parameters():
        nn.init.normal_(parameter)
    layout = HeadLayout.of(model)
    expected = {}
    for index, layer in enumerate(model.bert.encoder.layer):
        attention = layer.attention.self
        scores = head_scores(attention.query.parametrizations.weight[0].delta(),
                             attention.value.parametrizations.weight[0].delta(), layout)
        expected[index] = scores.argsort()[:2].sort().values.tolist()  # 2 of 4 heads
    strategy.update_masks(0.5)
    for index, layer in enumerate(model.bert.encoder.layer):
        rows = layer.attention.self.key.parametrizations.weight[0].mask.all(1).view(4, 8).all(1)
        columns = layer.attention.output.dense.parametrizations.weight[0].mask.all(0).view(4, 8).all(1)
        assert (~rows).nonzero().flatten().tolist() == expected[index]
        assert torch.equal(rows, columns)
        assert layer.attention.output.dense.parametrizations.weight[0].mask.any(0).view(4, 8).any(1).tolist() \
            == rows.tolist()  # whole columns: the dropped heads contribute nothing


def test_weight_criterion_is_one_global_magnitude_ranking_of_w0_plus_delta():
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    strategy = DSEE(sparsity=0.5, rank=2, num_sparse=4, support="random")
    strategy.attach(model)
    for parameter in strategy.update_parameters():
        nn.init.normal_(parameter, std=0.1)
    expected = global_topk_masks([layer.dense().abs() for layer in strategy.layers], 0.5)
    strategy.update_masks(0.5)
    assert len(strategy.layers) == 12  # every block linear is pruned
    for layer, keep in zip(strategy.layers, expected):
        assert torch.equal(layer.mask, keep)


def test_update_criterion_ranks_updated_and_plain_layers_in_two_pools():
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    strategy = DSEE(sparsity=0.5, criterion="update", rank=2, num_sparse=4, support="random")
    strategy.attach(model)
    for parameter in strategy.update_parameters():
        nn.init.normal_(parameter, std=1e-3)  # |ΔW| far below |W0|: one pool would prune only q and v
    strategy.update_masks(0.5)
    updated = [layer for layer in strategy.layers if layer.param.delta is not None]
    plain = [layer for layer in strategy.layers if layer.param.delta is None]
    for pool, scores in ((updated, [layer.param.delta().abs() for layer in updated]),
                         (plain, [layer.stored_weight.abs() for layer in plain])):
        numel = sum(layer.mask.numel() for layer in pool)
        assert sum(int((~layer.mask).sum()) for layer in pool) == pruned_count(numel, 0.5)
        for layer, keep in zip(pool, global_topk_masks(scores, 0.5)):
            assert torch.equal(layer.mask, keep)


class OptimizerTrace(Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, int, list[float], int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        steps = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
        lrs = [group["lr"] for group in optimizer.param_groups]
        self.rows.append((trainer.global_step, id(optimizer), lrs, max(steps, default=0)))


def test_one_shot_boundary_prunes_and_restarts_optimizer_and_lr_schedule(tmp_path):
    trace = OptimizerTrace()
    strategy = DSEE(sparsity=0.5, rank=2, num_sparse=4, retune_learning_rate=5e-3)
    module = fit(strategy, tmp_path, steps=12, callbacks=[trace], warmup_ratio=1 / 6)  # LR warm-up: 2 steps
    assert strategy.stage == "retune" and strategy.boundary_step == 6  # one shot at half of 12 steps
    before, after = trace.rows[:6], trace.rows[6:]
    assert len({row[1] for row in before}) == 1 and len({row[1] for row in after}) == 1
    assert before[0][1] != after[0][1]  # a new optimizer ...
    assert after[0][3] == 0 and after[-1][3] == 5  # ... with fresh Adam state
    # module schedule over 12 steps: warm-up s/2 for s < 2 (transformers' shape), then (12 - s)/10
    assert [row[2][-1] for row in before] == pytest.approx([1e-2 * f for f in (0, 1 / 2, 1, .9, .8, .7)])
    # restarted and stretched over the 6 steps left: factor 2, so s -> f(2s)
    assert [row[2][-1] for row in after] == pytest.approx([1e-2 * f for f in (0, 1, .8, .6, .4, .2)])
    assert [row[2][0] for row in after] == pytest.approx([5e-3 * f for f in (0, 1, .8, .6, .4, .2)])
    assert strategy.measured_sparsity() == pytest.approx(0.5, abs=1e-3)
    assert module.model.bert.encoder.layer[0].attention.self.query.parametrizations.weight[0].mask.float().mean() < 1


class SaveAt(Callback):
    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("save_step", [4, 8], ids=["before-boundary", "after-boundary"])
def test_resume_across_the_one_shot_boundary_gives_identical_masks_and_weights(save_step, tmp_path):
    settings = dict(sparsity=0.5, rank=2, num_sparse=4, retune_learning_rate=5e-3)
    ckpt = tmp_path / "mid.ckpt"
    straight = DSEE(**settings)
    fit(straight, tmp_path / "straight", callbacks=[SaveAt(save_step, ckpt)], warmup_ratio=1 / 6)
    resumed = DSEE(**settings)
    fit(resumed, tmp_path / "resumed", ckpt_path=str(ckpt), warmup_ratio=1 / 6)
    assert resumed.stage == "retune" and resumed.boundary_step == straight.boundary_step == 6
    for a, b in zip(straight.layers, resumed.layers, strict=True):
        assert torch.equal(a.mask, b.mask), a.name
        assert torch.allclose(a.layer.weight(), b.layer.weight(), atol=1e-6), a.name


def test_heads_run_exports_a_smaller_model_with_the_same_logits(tmp_path):
    strategy = DSEE(sparsity=0.25, pattern="heads", ffn_sparsity=0.25, rank=2, num_sparse=4, support="random")
    module = fit(strategy, tmp_path, steps=6)
    inputs = torch.randint(7, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    module.eval()
    with torch.no_grad():
        expected = module.model(input_ids=inputs).logits
    report = export_pretrained(module.model, tmp_path / "exported", shrink=strategy.structured)
    assert report["structured"]["ffn_channels"] == {0: 16, 1: 16}
    assert all(len(heads) == 1 for heads in report["structured"]["heads"].values())  # 1 of 4 heads per block
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported", trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(input_ids=inputs).logits, expected, atol=1e-5)


def test_gpt2_scores_heads_on_the_q_and_v_blocks_of_the_fused_projection():
    model = load_backbone("sequence-classification", config=tiny_config("gpt2", pad_token_id=0), num_labels=2)
    strategy = DSEE(sparsity=0.5, pattern="heads", rank=2, num_sparse=4, support="random")
    strategy.attach(model)
    torch.manual_seed(2)
    for parameter in strategy.update_parameters():
        nn.init.normal_(parameter)
    c_attn = strategy.layers[0]
    assert c_attn.layer.role == "qkv"  # the default targets on GPT-2
    assert isinstance(c_attn.param.delta, RowBlocks) and len(c_attn.param.delta.blocks) == 3
    query, _, value = c_attn.param.delta().chunk(3)
    expected = head_scores(query, value, HeadLayout.of(model)).argsort()[:2].sort().values
    strategy.update_masks(0.5)
    kept_rows = c_attn.mask.all(1).view(3, 4, 8).all(2)  # [q; k; v] x 4 heads
    assert (~kept_rows[0]).nonzero().flatten().tolist() == expected.tolist()
    assert torch.equal(kept_rows[0], kept_rows[1]) and torch.equal(kept_rows[0], kept_rows[2])


def test_supports_come_from_the_rank_zero_broadcast(tmp_path):
    module = make_module()
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    names = [f"bert.encoder.layer.{i}.attention.self.{role}" for i in range(2) for role in ("query", "value")]
    chosen = {name: [torch.arange(4) * 7] for name in names}
    trainer.strategy.broadcast = lambda obj, src=0: chosen  # what rank 0 sent
    strategy = DSEE(sparsity=0.0, rank=2, num_sparse=4)
    strategy.setup(trainer, module, "fit")
    for layer in strategy.layers:
        assert layer.param.delta.parts[1].indices.tolist() == [0, 7, 14, 21]


def test_rejects_settings_that_mean_nothing():
    with pytest.raises(ValueError, match="one_shot"):
        DSEE(pattern="heads", schedule=SparsitySchedule(kind="cubic"))
    with pytest.raises(ValueError, match="ffn_sparsity"):
        DSEE(pattern="global", ffn_sparsity=0.4)
    with pytest.raises(ValueError, match="criterion"):
        DSEE(criterion="ABS")
    assert isinstance(SparseResidual((2, 2), torch.tensor([3])), nn.Module)
    with pytest.raises(ValueError, match="distinct"):
        SparseResidual((2, 2), torch.tensor([1, 1]))
