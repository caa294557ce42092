"""What ``sparseft fit|validate|test|predict`` checks before Lightning starts the run.

Lightning creates the run's log directory before it reads the data, and strategies attach in
``setup``, after the data has been tokenized. A mistake found there leaves a run directory
behind and costs the tokenization. So the command first checks, in this order, cheapest first:

1. Trainer options that Lightning accepts but fails on mid-run (:func:`check_trainer_options`);
2. every strategy against the trainer strategy (:meth:`SparsityStrategy.check_trainer`: settings
   that cannot shard under FSDP2) and the model (:meth:`SparsityStrategy.check_model`: targets that
   match nothing, an N:M pattern that does not divide a layer, DSEE's ``num_sparse`` too large);
3. that the data's ``max_length`` (or ``block_size``) fits the backbone's learned positions;
4. that ``--ckpt_path`` names an existing file, not empty, truncated or corrupted, or a sharded (FSDP2)
   checkpoint directory under FSDP2, trained with this run's sparsity strategy and mask settings and
   for this task and model (tensor shapes);
5. the data: the datamodule's ``setup`` for the command's stage reads and tokenizes it now
   (Lightning's own call then finds it done), so a missing, empty or malformed file is reported
   with its name and line before anything is written.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from sparseft.backbones.loading import position_limit
from sparseft.strategies.base import CHECKPOINT_KEY, SparsityStrategy
from sparseft.training.checkpoint_checks import (
    check_checkpoint_file,
    is_checkpoint_path,
    is_sharded_checkpoint,
    load_checkpoint,
    shape_mismatch,
)
from sparseft.training.resume import check_checkpoint_strategies

# values of --ckpt_path that Lightning resolves itself
NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")


def check_checkpoint_path(ckpt_path: str | None, trainer: Trainer, stage: str = "fit") -> None:
    """Refuse a ``--ckpt_path`` that is neither a file nor a sharded checkpoint directory, and a sharded
    one outside FSDP2 (only ``ModelParallelStrategy`` reads its shards)."""
    if ckpt_path is None or ckpt_path in NAMED_CHECKPOINTS or "://" in str(ckpt_path):
        return
    if not is_checkpoint_path(ckpt_path):
        raise FileNotFoundError(
            f"--ckpt_path {ckpt_path}: no such file; give a checkpoint written by sparseft fit "
            "(e.g. <default_root_dir>/lightning_logs/version_0/checkpoints/last.ckpt)"
        )
    if is_sharded_checkpoint(ckpt_path) and not isinstance(trainer.strategy, ModelParallelStrategy):
        what = f"--ckpt_path {ckpt_path} is a sharded checkpoint (written under fsdp2)"
        if stage == "fit":
            raise ValueError(f"{what}: resume it with --trainer.strategy fsdp2 and as many processes as wrote it "
                             "(its optimizer state is sharded)")
        raise ValueError(f"{what}: run with --trainer.strategy fsdp2, or join its shards into one file first: "
                         f"python -m lightning.fabric.utilities.consolidate_checkpoint {ckpt_path}")
    check_checkpoint_file(ckpt_path)  # Lightning's torch.load checks no checksum


def check_checkpoint_fits(ckpt_path: str | None, trainer: Trainer, model: nn.Module) -> None:
    """Refuse now, from the checkpoint's metadata and tensor shapes (no tensor is read: a file is
    memory-mapped), a ``--ckpt_path`` trained with another sparsity strategy or other mask settings, or for
    another task or model; Lightning would find it only when it loads the checkpoint, after the run has
    started writing. A sharded checkpoint's shapes are checked when it is loaded."""
    if ckpt_path is None or ckpt_path in NAMED_CHECKPOINTS or "://" in str(ckpt_path):
        return
    checkpoint = load_checkpoint(ckpt_path, tensors=False)
    strategies = [callback for callback in trainer.callbacks if isinstance(callback, SparsityStrategy)]
    check_checkpoint_strategies(checkpoint.get(CHECKPOINT_KEY), strategies)
    expected = {f"model.{key}": tensor for key, tensor in model.state_dict().items()}
    mismatch = shape_mismatch(checkpoint.get("state_dict") or {}, expected)
    if mismatch:
        raise mismatch


def check_trainer_options(trainer: Trainer) -> None:
    """Refuse Trainer options that Lightning accepts and then fails on mid-run with a traceback:
    ``accumulate_grad_batches`` 0 divides by zero at the first training step."""
    if trainer.accumulate_grad_batches < 1:
        raise ValueError(
            f"--trainer.accumulate_grad_batches is {trainer.accumulate_grad_batches}: it is the number of batches "
            "per optimizer step and must be at least 1"
        )


def check_sequence_length(model: nn.Module, datamodule: LightningDataModule | None) -> None:
    """Refuse inputs longer than the backbone has learned positions for (``data.max_length`` 192 on a
    GPT-2 with 128): the embedding would fail with an ``IndexError`` in the middle of training."""
    length, limit = getattr(datamodule, "max_length", None), position_limit(model)
    if length is None or limit is None or length <= limit:
        return
    option = "data.block_size" if hasattr(datamodule, "block_size") else "data.max_length"
    raise ValueError(
        f"--{option} {length} is longer than the backbone's {limit} positions (its position embedding has "
        f"{limit} rows): set --{option} to at most {limit}"
    )


def check_before_run(
    model: nn.Module, datamodule: LightningDataModule | None, trainer: Trainer, stage: str, ckpt_path: str | None
) -> None:
    """Run the checks of the module docstring; ``model`` is the LightningModule's backbone."""
    check_trainer_options(trainer)
    for callback in trainer.callbacks:
        if isinstance(callback, SparsityStrategy) and not callback.layers:
            callback.check_trainer(trainer)
            callback.check_model(model)
    check_sequence_length(model, datamodule)
    check_checkpoint_path(ckpt_path, trainer, stage)
    check_checkpoint_fits(ckpt_path, trainer, model)
    if datamodule is not None:
        datamodule.setup(stage)
