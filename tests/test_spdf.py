"""SPDF: exact static masks, pruned weights / gradients / Adam moments exactly zero, the dense
phase and the Variable-SPDF switch from zero, kill-and-resume, DDP ranks, the switch under FSDP2,
FLOP accounting."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from sparseft.export.pretrained import export_pretrained
from sparseft.sparse.flops import TransformerShape, flop_reduction, model_training_flops
from sparseft.sparse.inplace import stored_keep
from sparseft.sparse.masks import pruned_count
from sparseft.sparse.parametrize import sparse_layers
from sparseft.sparse.prune import prune_, sparsify
from sparseft.sparse.static import PARAMETRIZED_SUFFIX, random_scores
from sparseft.strategies import SPDF
from sparseft.testing import tiny_config
from sparseft.testing.conformance import (
    SaveAt,
    assert_states_match,
    build_from_config,
    fit_and_save_state,
    fsdp2_and_ddp_runs,
    fsdp2_runs,
    tiny_module,
)
from sparseft.testing.processes import run_ddp_script
from sparseft.training.module import SparseFTModule

GPT2 = tiny_config("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


# ---- FLOPs -------------------------------------------------------------------------------------
def test_gpt3_xl_at_75_percent_needs_2_49x_fewer_training_flops():
    xl = TransformerShape(n_layer=24, d_model=2048, n_head=24, n_ctx=2048, vocab_size=50257)
    assert round(flop_reduction(xl, 0.75), 2) == 2.49  # the paper's "2.5x"
    assert round(flop_reduction(xl, 0.5), 2) == 1.66
    small = TransformerShape(n_layer=12, d_model=768, n_head=12, n_ctx=2048, vocab_size=50257)
    assert (round(flop_reduction(small, 0.5), 2), round(flop_reduction(small, 0.75), 2)) == (1.36, 1.65)


def test_measured_model_flops_equal_the_formula():
    module = SparseFTModule(config=GPT2, task="causal-lm")
    strategy = SPDF(sparsity=0.75)
    strategy.attach(module.model)
    strategy.choose_masks()
    measured = model_training_flops(module.model, n_ctx=64)
    shape = TransformerShape.from_config(module.model.config, 64)
    assert measured.reduction == pytest.approx(flop_reduction(shape, 0.75), rel=1e-12)
    assert measured.dense == pytest.approx(3 * (
        2 * 32 * 32 * 12 * 2 + 2 * (4 * 64 * 32 + 3 * 4 * 64) + 2 * 32 * 400), rel=1e-12)


# ---- masks ------------------------------------------------------------------------------------
def test_exact_per_matrix_density_on_every_block_linear_and_nothing_else():
    module = SparseFTModule(config=GPT2, task="causal-lm")
    strategy = SPDF(sparsity=0.7)
    strategy.attach(module.model)
    strategy.choose_masks()
    names = [layer.name for layer in strategy.layers]
    assert names == [f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")]
    for layer in strategy.layers:
        blocks = layer.mask.chunk(layer.row_blocks)  # q, k and v of c_attn each exactly
        for block in blocks:
            assert int((~block).sum()) == pruned_count(block.numel(), 0.7, "round") == round(block.numel() * 0.7)
        assert torch.equal(layer.stored_weight == 0, ~stored_keep(layer))  # W0 zeroed where pruned
    model = module.model
    for dense in (model.lm_head, model.transformer.wte, model.transformer.wpe, model.transformer.h[0].ln_1):
        assert not parametrize.is_parametrized(dense)


def test_masks_depend_on_seed_and_parameter_name_only():
    a = random_scores(0, "transformer.h.1.mlp.c_fc.weight", (8, 4))
    assert torch.equal(a, random_scores(0, "transformer.h.1.mlp.c_fc.weight", (8, 4)))
    assert not torch.equal(a, random_scores(1, "transformer.h.1.mlp.c_fc.weight", (8, 4)))
    assert not torch.equal(a, random_scores(0, "transformer.h.0.mlp.c_fc.weight", (8, 4)))
    every, only = SPDF(), SPDF(targets=r"transformer\.h\.1\.mlp\.c_fc")
    for strategy in (every, only):
        strategy.attach(SparseFTModule(config=GPT2, task="causal-lm").model)
        strategy.choose_masks()
    assert torch.equal(next(s for s in every.layers if s.name == only.layers[0].name).mask, only.layers[0].mask)


def test_magnitude_init_keeps_the_largest_weights():
    module = SparseFTModule(config=GPT2, task="causal-lm")
    strategy = SPDF(sparsity=0.5, init="magnitude")
    strategy.attach(module.model)
    before = [layer.dense().abs() for layer in strategy.layers]
    strategy.choose_masks()
    for layer, magnitude in zip(strategy.layers, before, strict=True):
        for keep, block in zip(layer.mask.chunk(layer.row_blocks), magnitude.chunk(layer.row_blocks), strict=True):
            assert block[keep].min() >= block[~keep].max(), layer.name


def test_plain_adamw_keeps_pruned_weights_and_moments_zero_without_any_hook():
    """The arithmetic alone: zero W0 and zero gradient give zero moments and zero weights forever."""
    torch.manual_seed(0)
    model = SparseFTModule(config=GPT2, task="causal-lm").model
    layers = sparsify(model)
    prune_(layers, [random_scores(0, s.name, tuple(s.mask.shape)) for s in layers], 0.75)
    with torch.no_grad():
        for layer in layers:
            layer.stored_weight.mul_(stored_keep(layer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, 400, (4, 16))
    for _ in range(30):
        model(input_ids=ids, labels=ids).loss.backward()
        for layer in layers:
            assert (layer.stored_weight.grad[~stored_keep(layer)] == 0).all()
        optimizer.step()
        optimizer.zero_grad()
    for layer in layers:
        pruned = ~stored_keep(layer)
        state = optimizer.state[layer.stored_weight]
        assert (layer.stored_weight[pruned] == 0).all()
        assert (state["exp_avg"][pruned] == 0).all() and (state["exp_avg_sq"][pruned] == 0).all()
        assert (state["exp_avg"][~pruned] != 0).float().mean() > 0.9


# ---- Lightning runs -------------------------------------------------------------------------
class TokenBlocks(LightningDataModule):
    """Fixed random token blocks in a fixed order (4 batches an epoch), for a causal LM."""

    task_type, num_labels, val_names = "causal-lm", 0, ["validation"]

    def __init__(self, size: int = 32, length: int = 16, batch_size: int = 8) -> None:
        super().__init__()
        ids = torch.randint(0, 400, (size, length), generator=torch.Generator().manual_seed(0))
        self.rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.batch_size)


def fit_gpt2(spdf: SPDF, root: Path, steps: int, callbacks=(), ckpt_path=None, init_seed: int = 0, before=(),
             **kwargs) -> SparseFTModule:
    torch.manual_seed(init_seed)
    module = SparseFTModule(config=GPT2, task="causal-lm", learning_rate=1e-2, weight_decay=0.1,
                            adam_betas=(0.9, 0.95))
    trainer = Trainer(max_steps=steps, accelerator="cpu", devices=kwargs.pop("devices", 1), logger=kwargs.pop(
        "logger", False), enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[*before, spdf, *callbacks], **kwargs)
    trainer.fit(module, TokenBlocks(), ckpt_path=ckpt_path)
    return module


def adam_state(trainer: Trainer, weight: torch.Tensor) -> dict:
    return trainer.optimizers[0].state.get(weight, {})


class ZeroCheck(Callback):
    """After every optimizer step: pruned W_eff, W0, its gradient and both Adam moments exactly 0."""

    def __init__(self, strategy: SPDF) -> None:
        self.strategy, self.steps = strategy, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for layer in self.strategy.layers:
            assert (layer.stored_weight.grad[~stored_keep(layer)] == 0).all(), layer.name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for layer in self.strategy.layers:
            pruned = ~stored_keep(layer)
            assert (layer.layer.weight()[~layer.mask] == 0).all() and (layer.stored_weight[pruned] == 0).all()
            state = adam_state(trainer, layer.stored_weight)
            assert (state["exp_avg"][pruned] == 0).all() and (state["exp_avg_sq"][pruned] == 0).all()
        self.steps += 1


def test_pruned_weights_and_adam_moments_stay_exactly_zero_with_momentum_and_weight_decay(tmp_path):
    strategy = SPDF(sparsity=0.75)
    check = ZeroCheck(strategy)
    fit_gpt2(strategy, tmp_path, 40, callbacks=[check])
    assert check.steps == 40 and strategy.measured_sparsity() == 0.75


class Snapshot(Callback):
    """Records the previously pruned entries' values and Adam moments around one optimizer step."""

    def __init__(self, pruned: dict[str, torch.Tensor], step: int) -> None:
        self.pruned, self.step, self.seen = pruned, step, {}

    def weights(self, pl_module) -> dict[str, torch.Tensor]:
        return {name: pl_module.model.get_submodule(name).weight for name in self.pruned}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for name, weight in self.weights(pl_module).items():
                assert not parametrize.is_parametrized(pl_module.model.get_submodule(name)), name
                assert (weight[self.pruned[name]] == 0).all(), name  # zero value at the start
                state = adam_state(trainer, weight)
                assert not state or (state["exp_avg"][self.pruned[name]] == 0).all()  # zero moments
                assert not state or (state["exp_avg_sq"][self.pruned[name]] == 0).all()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            self.seen = {name: w.grad.clone() for name, w in self.weights(pl_module).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1:
            for name, weight in self.weights(pl_module).items():
                pruned, state = self.pruned[name], adam_state(trainer, weight)
                grad = self.seen[name][pruned]
                torch.testing.assert_close(state["exp_avg"][pruned], 0.1 * grad, rtol=1e-6, atol=0)
                torch.testing.assert_close(state["exp_avg_sq"][pruned], 0.05 * grad * grad, rtol=1e-5, atol=0)
                assert (weight[pruned] != 0).float().mean() > 0.9, name  # they train again


def pruned_entries(strategy: SPDF) -> dict[str, torch.Tensor]:
    return {layer.name: ~stored_keep(layer).clone() for layer in strategy.layers}


def test_dense_phase_from_a_sparse_checkpoint_trains_pruned_weights_from_zero(tmp_path):
    sparse = SPDF(sparsity=0.75)
    fit_gpt2(sparse, tmp_path / "sparse", 6)
    (ckpt,) = (tmp_path / "sparse").rglob("*.ckpt")
    dense = SPDF(phase="dense", checkpoint=str(ckpt))
    snapshot = Snapshot(pruned_entries(sparse), 0)
    module = fit_gpt2(dense, tmp_path / "dense", 3, callbacks=[snapshot])
    assert snapshot.seen and not sparse_layers(module.model) and dense.flops.reduction == 1.0


@pytest.mark.parametrize("init", ["random", "magnitude"])
def test_sparse_fine_tuning_from_a_checkpoint_keeps_the_pre_training_mask(tmp_path, init):
    pretrain = SPDF(sparsity=0.75, init=init, seed=4)
    fit_gpt2(pretrain, tmp_path / "pre", 4)
    (ckpt,) = (tmp_path / "pre").rglob("*.ckpt")
    ablation = SPDF(sparsity=0.75, init=init, seed=4, checkpoint=str(ckpt))
    fit_gpt2(ablation, tmp_path / "ft", 2, callbacks=[ZeroCheck(ablation)])
    for a, b in zip(pretrain.layers, ablation.layers, strict=True):
        assert torch.equal(a.mask, b.mask), a.name


def test_dense_phase_refuses_a_checkpoint_of_another_model(tmp_path):
    sparse = SPDF()
    fit_gpt2(sparse, tmp_path / "sparse", 1)
    (ckpt,) = (tmp_path / "sparse").rglob("*.ckpt")
    module = SparseFTModule(config={**GPT2, "n_embd": 16}, task="causal-lm")
    with pytest.raises(ValueError, match="do not fit this model"):
        SPDF(phase="dense", checkpoint=str(ckpt)).setup(None, module, "fit")


def switch_snapshot(step: int, seed: int = 0) -> Snapshot:
    """A :class:`Snapshot` around a switch at ``step`` of the entries that ``SPDF(sparsity=0.75, seed=seed)``
    prunes, found on a model of its own: the masks are seeded by parameter name, whatever the weights."""
    sparse = SPDF(sparsity=0.75, seed=seed)
    sparse.attach(SparseFTModule(config=GPT2, task="causal-lm").model)
    sparse.choose_masks()
    return Snapshot(pruned_entries(sparse), step)


def test_variable_spdf_switches_to_dense_with_zero_optimizer_state(tmp_path):
    strategy = SPDF(sparsity=0.75, dense_from_step=5)
    snapshot = switch_snapshot(5)
    module = fit_gpt2(strategy, tmp_path, 9, callbacks=[snapshot])
    assert snapshot.seen and strategy.switched_at == 5 and strategy.dense and not sparse_layers(module.model)
    assert strategy.flops.reduction == 1.0 and strategy.measured_sparsity() == 0.0


def test_a_switch_after_the_last_step_is_warned_at_train_start(tmp_path):
    strategy = SPDF(sparsity=0.75, dense_from_step=3)  # steps 0..2: the switch would come after the run
    with pytest.warns(UserWarning, match="dense_from_step 3 is not before the run's last optimizer step") as warned:
        fit_gpt2(strategy, tmp_path, 3)
    assert len([w for w in warned if "dense_from_step" in str(w.message)]) == 1
    assert strategy.switched_at is None and not strategy.dense


def test_a_checkpoint_written_after_the_optimizer_step_counts_the_batchs_tokens(tmp_path):
    """``SaveAt`` placed before SPDF writes the checkpoint where an interrupt between the optimizer step and
    SPDF's ``on_train_batch_end`` would: step 4 is done, so its tokens are in the count (it was 3 batches')."""
    ckpt = tmp_path / "mid.ckpt"
    strategy = SPDF(sparsity=0.75)
    fit_gpt2(strategy, tmp_path / "run", 6, before=[SaveAt(4, ckpt)])
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"][strategy.state_key]
    assert saved["tokens"] == 4 * 8 * 16 and strategy.tokens == 6 * 8 * 16


@pytest.mark.parametrize("dense_from_step, saved_at", [(None, 4), (6, 4), (2, 4)],
                         ids=["sparse", "across-the-switch", "after-the-switch"])
def test_kill_and_resume_gives_identical_masks_weights_and_optimizer_state(tmp_path, dense_from_step, saved_at):
    ckpt = tmp_path / "mid.ckpt"
    straight = SPDF(sparsity=0.75, dense_from_step=dense_from_step)
    a = fit_gpt2(straight, tmp_path / "a", 10, callbacks=[SaveAt(saved_at, ckpt)])
    resumed = SPDF(sparsity=0.75, dense_from_step=dense_from_step)
    b = fit_gpt2(resumed, tmp_path / "b", 10, ckpt_path=str(ckpt))
    for x, y in zip(straight.layers, resumed.layers, strict=True):
        assert torch.equal(x.mask, y.mask), x.name
    assert straight.dense == resumed.dense and straight.tokens == resumed.tokens == 10 * 8 * 16
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


DDP_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from test_spdf import fit_gpt2, switch_snapshot
from sparseft.strategies import SPDF
from sparseft.testing import MaskDigest, ParameterDigest

rank = int(os.environ.get("LOCAL_RANK", 0))  # different random weights on each rank at setup
callbacks = [MaskDigest({root!r}), ParameterDigest({root!r})]
if {dense_from_step!r} is not None:  # asserts zero values and moments at the switch on every rank
    callbacks.append(switch_snapshot({dense_from_step!r}, seed=7))
fit_gpt2(SPDF(sparsity=0.75, seed=7, init={init!r}, dense_from_step={dense_from_step!r}), {root!r}, {steps},
         callbacks=callbacks, init_seed=rank, strategy="ddp", devices=2)
"""


def run_ddp(root: Path, steps: int = 4, init: str = "random", dense_from_step: int | None = None) -> list[list[str]]:
    """Train SPDF on 2 gloo ranks (in a script of its own); returns each rank's mask and weight digests."""
    run_ddp_script(DDP_SCRIPT.format(tests=str(Path(__file__).parent), root=str(root), init=init, steps=steps,
                                     dense_from_step=dense_from_step), root)
    return [[(root / f"{kind}-rank{rank}.txt").read_text() for kind in ("masks", "weights")] for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("init", ["random", "magnitude"])
def test_ddp_two_processes_hold_identical_masks(tmp_path, init):
    """Each rank starts from other random weights: random masks agree with no communication (seeded
    by parameter name), magnitude masks because rank 0's are broadcast."""
    (masks0, _), (masks1, _) = run_ddp(tmp_path, init=init)
    assert masks0 == masks1 != hashlib.sha256().hexdigest()


@pytest.mark.slow
def test_ddp_variable_spdf_switches_to_dense_on_both_ranks(tmp_path):
    """DDP wrapped the model with the masks among its buffers; at the switch they are removed, and
    DDP's next forward used to broadcast an empty buffer list and die on both ranks. Now both ranks
    train on to the end, dense from zero values and zero Adam moments at the switch (the snapshot
    asserts it on each rank), with no mask left and bitwise identical weights."""
    (masks0, weights0), (masks1, weights1) = run_ddp(tmp_path, steps=5, dense_from_step=2)
    assert masks0 == masks1 == hashlib.sha256().hexdigest()  # no mask on either rank
    assert weights0 == weights1


# ---- Variable SPDF under FSDP2 ------------------------------------------------------------------
#: the conformance runs' SPDF (10 steps; 2 ranks, 2 steps per epoch) switching to dense at step 2
VARIABLE = dict(sparsity=0.75, seed=3, dense_from_step=2)
SAVED_AT = 4  # after the switch, on an epoch boundary

FSDP2_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_spdf import variable_spdf_runs
variable_spdf_runs({root!r})
"""


class NothingMaskedAfterSwitch(Callback):
    """From the switch on, the strategy masks nothing: no layers of its own, and every mask left on
    the model (FSDP2 keeps the parametrizations) keeps every weight."""

    def __init__(self, strategy: SPDF) -> None:
        self.strategy, self.checked = strategy, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > VARIABLE["dense_from_step"]:
            assert self.strategy.dense and not self.strategy.layers
            assert all(layer.mask.all() for layer in sparse_layers(pl_module.model))
            self.checked += 1


def variable_spdf_runs(root: str) -> None:
    """On each of 2 ranks: the Variable-SPDF run under DDP and under FSDP2 (which writes a sharded
    checkpoint after the switch), then the FSDP2 run resumed from that checkpoint; whole states saved."""
    checkpoint = Path(root) / "after-switch"
    checks: list[NothingMaskedAfterSwitch] = []

    def callbacks(strategy: SPDF, trainer_strategy: str) -> list[Callback]:
        checks.append(NothingMaskedAfterSwitch(strategy))
        return [checks[-1], *([SaveAt(SAVED_AT, checkpoint)] if trainer_strategy == "fsdp2" else [])]

    fsdp2_and_ddp_runs("sparseft.strategies.SPDF", VARIABLE, root, callbacks=callbacks)
    resumed = build_from_config(SPDF, VARIABLE)
    fit_and_save_state(resumed, Path(root), "resumed", "fsdp2", ckpt_path=str(checkpoint),
                       callbacks=callbacks(resumed, "resumed"))
    # the steps after the switch, each run (the sharded-loading run too: random masks attach to shapes)
    assert [check.checked for check in checks] == [8] * len(fsdp2_runs(SPDF, VARIABLE)) + [6]


def plain_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state whose masks all keep every weight, as plain weights: ``<layer>.weight`` for each
    ``<layer>.parametrizations.weight.original``, the masks left out."""
    plain = {}
    for key, value in state.items():
        if key.endswith(PARAMETRIZED_SUFFIX):
            plain[key[: -len(PARAMETRIZED_SUFFIX)] + ".weight"] = value
        elif value.dtype == torch.bool:
            assert value.all(), key
        else:
            plain[key] = value
    return plain


@pytest.mark.slow
def test_fsdp2_variable_spdf_trains_as_ddp_and_resumes_and_exports_after_the_switch(tmp_path):
    """Under FSDP2 the switch keeps the parametrizations (FSDP2 holds W0 in them) with all-ones masks:
    both ranks end with DDP's weights (masks kept nothing out after the switch), so do the run resumed
    from a sharded checkpoint written after the switch, and the final state rebuilds and exports as
    plain weights, as ``sparseft export`` does it (attach, load, ``dense: True``)."""
    run_ddp_script(FSDP2_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path)), tmp_path)
    reference = torch.load(tmp_path / "ddp-rank0.pt")
    assert not any(key.endswith(PARAMETRIZED_SUFFIX) for key in reference)  # DDP removed the masks
    runs = [f"{run}-rank{rank}" for run in (*fsdp2_runs(SPDF, VARIABLE), "resumed") for rank in (0, 1)][1:]
    assert "fsdp2-loaded-rank0" in runs  # Variable-SPDF with sharded loading gives the same states
    states = {run: torch.load(tmp_path / f"{run}.pt") for run in runs}
    assert all(any(key.endswith(PARAMETRIZED_SUFFIX) for key in states[run]) for run in runs[1:])
    assert_states_match(reference, {run: plain_weights(state) for run, state in states.items()})
    module, strategy = tiny_module(), build_from_config(SPDF, VARIABLE)
    strategy.attach(module.model)
    module.model.load_state_dict(states["resumed-rank0"])
    strategy.load_state_dict({**strategy.state_dict(), "dense": True})
    export_pretrained(module.model, tmp_path / "exported")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported")
    assert_states_match(reference, {"exported": {key: plain.state_dict()[key] for key in reference}})
