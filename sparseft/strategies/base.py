"""``SparsityStrategy``: the Lightning callback every sparsification method is.

The base class owns everything methods share: target selection, the parametrization and its
masks, the schedule position, checkpoint state, logging and export metadata. A method
overrides one or two of:

* :meth:`layer_scores` (or :meth:`compute_scores` for all layers at once) — importance of each
  weight (the mask keeps the top ones);
* :meth:`make_delta` / :meth:`make_score` — ΔW and straight-through score modules to attach;
* :meth:`param_groups` — optimizer groups for what it adds (e.g. scores at lr 1e-2);
* ``freeze_base`` (class attribute) — freeze ``W0`` for parameter-efficient methods.

Runs on: ``setup`` (attach to targets, before the optimizer and DDP exist),
``on_train_start`` (training length), ``on_train_batch_start`` (schedule step, mask update),
``on_train_batch_end`` (logging), ``on_train_end`` (final sparsity exactly); with
``holds_masks_in_place``, ``on_before_optimizer_step`` (and ``on_train_batch_end`` for an optimizer
that is not elementwise) keep pruned gradients and weights at zero (the masks live in ``W0``; the
forward is the dense one); with
``masks_follow_scores``, ``on_validation_start`` / ``on_test_start`` / ``on_predict_start`` /
``on_save_checkpoint`` too (masks recomputed from the scores the last optimizer step left).

Under FSDP2 the parameters are shards outside the forward; mask updates gather what they read
(:meth:`whole_layers`, one layer at a time through :meth:`layer_scores`), and settings that
cannot shard are refused at start (:meth:`fsdp2_refusal`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparseft.sparse.inplace import can_hold, hold_, mask_gradients_, mask_weights_, pruned_stay_zero, release_
from sparseft.sparse.layers import LinearLayer
from sparseft.sparse.masks import CountRule, check_sparsity
from sparseft.sparse.measure import count_parameters
from sparseft.sparse.parametrize import SparseLayer
from sparseft.sparse.prune import MaskPattern, prune_, prune_on_next_forward_, sparsify
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.sharding import has_meta_parameters, whole_parameters
from sparseft.sparse.targets import TargetSpec, describe_targets, select_targets

CHECKPOINT_KEY = "sparseft_strategy"


class SparsityStrategy(Callback):
    """Base of all sparsity strategies (see the module docstring for the contract).

    Args:
        sparsity: final fraction of target weights removed, in [0, 1).
        targets: layers to sparsify: role names (``q``, ``k``, ``v``, ``qkv``, ``o``, ``ffn_in``,
            ``ffn_out``, ``all``) or regular expressions matching whole module names. Default:
            every linear of the transformer blocks.
        schedule: how sparsity grows over training (default: cubic, dense for the first 10% of
            steps, final sparsity for the last 30%).
        pattern: ``layer`` (exact top-k per layer), ``global`` (one top-k over all targets) or
            ``N:M`` such as ``2:4`` (``sparsity`` must be ``1 − N/M``; on a ramp every group of M
            keeps M, then fewer, then N weights: :func:`~sparseft.sparse.masks.nm_kept_per_group`).
        log_layers: also log every target layer's sparsity (``sparsity/layer/<name>``).
    """

    strategy_name: ClassVar[str] = ""
    freeze_base: ClassVar[bool] = False
    #: The masks are the per-layer top-k of the score modules' output ``score(W0 + ΔW)``, so
    #: during training the forward, which computes those scores for the straight-through
    #: gradient, sets them (:func:`prune_on_next_forward_`): one score computation per step, not two.
    masks_from_forward_scores: ClassVar[bool] = False
    #: The masks are a selection of scores that move at every optimizer step (movement, PST); the
    #: references recompute them in every forward. The mask a training step used is stale once
    #: its optimizer step has moved the scores, so validation, test, predict, the end of training
    #: and every checkpoint first recompute it (:meth:`refresh_masks`): the model evaluated and
    #: exported is the one the final scores define.
    masks_follow_scores: ClassVar[bool] = False
    #: How a sparsity becomes a count of pruned weights, as the method's reference code rounds it
    #: (:func:`~sparseft.sparse.masks.pruned_count`): ``round`` is ``torch.nn.utils.prune``'s.
    pruned_count_rule: ClassVar[CountRule] = "round"
    #: This class's own ``update_masks`` / ``refresh_masks`` gather the sharded tensors they read
    #: (FSDP2), one layer at a time where they can; otherwise the base class gathers every target
    #: layer around an overridden one (correct, but a whole copy of the targets for the update).
    gathers_what_it_reads: ClassVar[bool] = False
    #: A weight once pruned never returns (a static mask, or scores that include the mask, as
    #: magnitude's ``|W| ⊙ M``), so during training the masks are held in ``W0`` itself
    #: (:mod:`sparseft.sparse.inplace`): ``W0`` and its optimizer state zero where pruned, gradients
    #: masked before every optimizer step, and the plain dense forward. Only for methods without
    #: ΔW and straight-through scores; the results are the masking forward's, bit for bit (the
    #: conformance suite checks it), except ``W0`` and its state where pruned (0, not values nothing reads).
    holds_masks_in_place: ClassVar[bool] = False
    #: ``attach`` reads shapes only, never the weights' values, so it can attach to a backbone built without
    #: its weights (parameters on the meta device), read shard by shard after FSDP2 splits it (sharded loading,
    #: :mod:`sparseft.training.sharding`). A strategy that reads weights when it attaches (data-driven or
    #: magnitude selections at setup) leaves it False: under ``fsdp2`` every process then loads the whole
    #: backbone, and a module built without weights is refused at setup.
    attaches_to_empty_weights: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Record each instance's constructor arguments, so a checkpoint can rebuild it."""
        super().__init_subclass__(**kwargs)
        init = cls.__init__

        @functools.wraps(init)
        def recording_init(self: SparsityStrategy, *args: Any, **init_kwargs: Any) -> None:
            if not hasattr(self, "_init_args"):
                bound = inspect.signature(init).bind(self, *args, **init_kwargs)
                bound.apply_defaults()
                self._init_args = dict(list(bound.arguments.items())[1:])
            init(self, *args, **init_kwargs)

        cls.__init__ = recording_init

    def __init__(
        self,
        sparsity: float = 0.9,
        targets: TargetSpec = None,
        schedule: SparsitySchedule | None = None,
        pattern: str = "layer",
        log_layers: bool = True,
    ) -> None:
        super().__init__()
        self.final_sparsity = check_sparsity(sparsity)
        self.targets = targets
        self.schedule = schedule or SparsitySchedule()
        if self.schedule.ramps and self.schedule.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"schedule.initial_sparsity {self.schedule.initial_sparsity} is above sparsity {self.final_sparsity}: "
                "the ramp would un-prune weights during the run; set initial_sparsity <= sparsity"
            )
        self.pattern = pattern
        self.mask_pattern = MaskPattern.parse(pattern)
        self._check_pattern(self.mask_pattern)
        self.log_layers = log_layers
        self.layers: list[SparseLayer] = []
        self.applied_sparsity = 0.0
        self.total_steps = 0
        self.lr_warmup_steps = 0
        self.step = 0  # current optimizer step, set at every training batch
        self._measured: dict[str, float] = {}
        self._masks_pending = False  # set by the coming forward (masks_from_forward_scores)
        self._masks_stale = False  # an optimizer step moved the scores since the masks were set
        self._trainer: Trainer | None = None  # the fit's, from on_train_start (see _optimizers)

    def _check_pattern(self, pattern: MaskPattern) -> None:
        if pattern.scope != "nm":
            return
        if abs(pattern.nm_sparsity - self.final_sparsity) > 1e-9:
            raise ValueError(f"pattern {self.pattern!r} means sparsity {pattern.nm_sparsity}; set sparsity to it")

    @property
    def strategy_id(self) -> str:
        """The registry name, or the class path of a strategy never registered (used by class path)."""
        cls = type(self)
        return self.strategy_name or f"{cls.__module__}.{cls.__qualname__}"

    # ---- what a method overrides -------------------------------------------------------
    def make_delta(self, layer: LinearLayer) -> nn.Module | None:
        """ΔW module for ``layer`` (``forward()`` returns ``[out, in]``), or None."""
        return None

    def make_score(self, layer: LinearLayer) -> nn.Module | None:
        """Straight-through score module for ``layer`` (``forward(w)`` returns scores), or None."""
        return None

    def layer_scores(self, layer: SparseLayer) -> torch.Tensor:
        """Importance of one target layer's weights, ``[out, in]``; higher is kept.

        A method implements this or :meth:`compute_scores`. With this one, a per-layer or N:M mask
        update under FSDP2 gathers one layer's tensors at a time, not every target layer's.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement layer_scores() or compute_scores()")

    def compute_scores(self) -> list[torch.Tensor]:
        """Importance of every target weight, one ``[out, in]`` tensor per layer; higher is kept."""
        return [self.layer_scores(layer) for layer in self.layers]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups for tensors this strategy adds (default: none)."""
        return []

    def loss_term(self) -> torch.Tensor | None:
        """An extra training loss the method needs (e.g. a penalty on scores), or None."""
        return None

    @property
    def structured(self) -> bool:
        """Whether the masks remove whole heads or FFN channels, so export can shrink the model."""
        return False

    def fsdp2_refusal(self) -> str | None:
        """Why this strategy, with these settings, cannot train under FSDP2, or None (it can).

        A method that touches parameters outside the forward other than through mask updates (which
        :meth:`whole_layers` covers) must handle their shards or say here why it cannot."""
        return None

    def check_trainer(self, trainer: Trainer) -> None:
        """Refuse, in one line, a trainer strategy this strategy cannot run under (FSDP2 where
        :meth:`fsdp2_refusal` says why). The CLI calls it before the data is read, ``setup`` again."""
        reason = self.fsdp2_refusal() if isinstance(trainer.strategy, ModelParallelStrategy) else None
        if reason:
            raise ValueError(f"--trainer.strategy fsdp2 with sparsity strategy {self.strategy_id!r}: {reason}")

    def needs_update(self, sparsity: float) -> bool:
        """Whether masks must be recomputed for this step's target sparsity."""
        return sparsity != self.applied_sparsity

    # ---- plain PyTorch part ---------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Refuse options that cannot work on ``model`` before anything is attached or trained:
        targets that match no layer, an ``N:M`` pattern on a layer whose input width M does not divide.

        The CLI calls it before the data is read (:mod:`sparseft.cli.preflight`), ``attach`` before attaching.

        Raises:
            ValueError: naming the option, the layer and the fix.
        """
        pattern = self.mask_pattern
        for layer in select_targets(model, self.targets):
            if pattern.scope == "nm" and layer.shape[1] % pattern.m:
                raise ValueError(
                    f"sparsity.pattern {self.pattern!r} groups every {pattern.m} inputs, but layer {layer.name} has "
                    f"{layer.shape[1]}: choose an M that divides it, or leave the layer out of sparsity.targets"
                )

    def attach(self, model: nn.Module) -> list[SparseLayer]:
        """Select targets and attach the parametrization (idempotent)."""
        if not self.layers:
            self.check_model(model)
            self.layers = sparsify(model, self.targets, self.make_delta, self.make_score, self.freeze_base)
            if self.holds_masks_in_place and not all(can_hold(layer) for layer in self.layers):
                raise ValueError(
                    f"{type(self).__name__} sets holds_masks_in_place, but its layers have ΔW or scores, which "
                    "only a masking forward applies: set holds_masks_in_place = False"
                )
            self._measure()
        return self.layers

    @torch.no_grad()
    def update_masks(self, sparsity: float) -> None:
        """Recompute every mask to keep the top scores at ``sparsity``.

        Per-layer and N:M masks of a method that implements :meth:`layer_scores` are computed one
        layer at a time, each gathered whole under FSDP2 just for its own mask; a global top-k needs
        every layer's scores at once (:meth:`gathered_scores`: the scores whole, the layers gathered
        one at a time); :meth:`compute_scores` overridden reads every target layer gathered at once.
        """
        if _overrides(self, "compute_scores"):
            with self.whole_layers():
                prune_(self.layers, self.compute_scores(), sparsity, self.pattern, self.pruned_count_rule)
        elif self.mask_pattern.scope == "global":
            prune_(self.layers, self.gathered_scores(), sparsity, self.pattern, self.pruned_count_rule)
        else:
            for layer in self.layers:
                with whole_parameters([layer.layer.module]):
                    prune_([layer], [self.layer_scores(layer)], sparsity, self.pattern, self.pruned_count_rule)
        self.applied_sparsity = sparsity
        self._masks_stale = False
        self._measure()

    def refresh_masks(self) -> None:
        """Recompute the masks from the current scores at the applied sparsity (the schedule does
        not move): what the references' forward does outside training steps."""
        self.update_masks(self.applied_sparsity)

    def _refresh_if_stale(self) -> None:
        if self._masks_stale:
            with self._gathered_unless_base("refresh_masks", "update_masks"):
                self.refresh_masks()
            self._masks_stale = False

    def _gathered_unless_base(self, *methods: str) -> AbstractContextManager[None]:
        """:meth:`whole_layers` around a call of ``methods`` that a subclass overrides, unless it says it
        gathers what it reads (``gathers_what_it_reads``); nothing around the base ones, which do."""
        overridden = any(_overrides(self, name) for name in methods)
        return self.whole_layers() if overridden and not self.gathers_what_it_reads else nullcontext()

    def gathered_scores(self) -> list[torch.Tensor]:
        """:meth:`layer_scores` of every target layer, each layer gathered whole under FSDP2 only while
        its scores are computed: what a global top-k needs, without every layer's weights at once."""
        scores = []
        for layer in self.layers:
            with whole_parameters([layer.layer.module]):
                scores.append(self.layer_scores(layer))
        return scores

    @contextmanager
    def whole_layers(self) -> Iterator[None]:
        """Within the block, the target layers' parameters (``W0``, ΔW, scores) are whole tensors: under
        FSDP2 they are shards outside the forward, and every mask is computed from whole matrices
        (:func:`~sparseft.sparse.sharding.whole_parameters`; the same masks on every rank as in one
        process). Without sharding it does nothing. Mask updates run inside it; a method that reads
        weights outside the forward elsewhere must too."""
        with whole_parameters([layer.layer.module for layer in self.layers]):
            yield

    def _measure(self) -> None:
        if not self.layers:
            return
        kept = torch.stack([s.mask.count_nonzero() for s in self.layers]).tolist()  # one device sync, not one per layer
        self._measured = {s.name: 1.0 - k / s.mask.numel() for s, k in zip(self.layers, kept)}

    def measured_sparsity(self) -> float:
        """Fraction of target weights currently masked (measured from the masks)."""
        total = sum(s.mask.numel() for s in self.layers)
        return sum(self._measured[s.name] * s.mask.numel() for s in self.layers) / max(total, 1)

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check_trainer(trainer)
        self.check_weights_present(pl_module.model)
        self.attach(pl_module.model)
        trainable, total = count_parameters(pl_module)
        rank_zero_info(
            f"sparseft: strategy {self.strategy_id!r}, final sparsity {self.final_sparsity:.2%}\n"
            f"{describe_targets([s.layer for s in self.layers])}\n"
            f"trainable parameters {trainable:,} of {total:,} ({trainable / total:.2%})"
        )

    @classmethod
    def attaches_to_empty(cls, init_args: Mapping[str, Any]) -> bool:
        """Whether the strategy built from ``init_args`` attaches to a backbone without its weights (sharded
        loading): ``attaches_to_empty_weights``, unless a subclass knows better for some settings."""
        return cls.attaches_to_empty_weights

    def check_weights_present(self, model: nn.Module) -> None:
        """Refuse, in one line, a backbone built without its weights (sharded loading) unless this strategy
        attaches to one (:meth:`attaches_to_empty`); a ``setup`` that reads weights before the base one calls
        it first."""
        attaches = self.attaches_to_empty(getattr(self, "_init_args", {}))
        if not attaches and not self.layers and has_meta_parameters(model):
            raise ValueError(
                f"sparsity strategy {self.strategy_id!r} reads the backbone's weights when it attaches, but the model "
                "was built without them (sharded loading, trainer.init_module(empty_init=True)): build the module "
                "outside that context, so every process loads the whole backbone"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total = int(trainer.estimated_stepping_batches)
        if self.total_steps and self.total_steps != total:
            rank_zero_warn(f"resumed run has {total} optimizer steps, the checkpoint's had {self.total_steps}")
        self.total_steps = total
        self.lr_warmup_steps = int(getattr(pl_module, "warmup_steps", 0))
        if self.schedule.warmup_unit == "lr_warmup" and self.schedule.kind != "constant" and not self.lr_warmup_steps:
            raise ValueError(self._no_lr_warmup(float(pl_module.hparams.get("warmup_ratio", 0.0)), total))
        if self.schedule.kind != "constant":
            self.schedule.window(total, self.lr_warmup_steps)  # fail now, not silently mid-run
        trainable, all_params = count_parameters(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({"params/trainable": trainable, "params/total": all_params}, step=trainer.global_step)
        self._trainer = trainer
        self._hold_if_fixed()

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        """The fit's optimizers as they are now, none outside a fit: read at each use, since a strategy or
        callback may replace them mid-run (the old ones' state is no longer what a step reads)."""
        return list(self._trainer.optimizers) if self._trainer is not None else []

    def _hold_if_fixed(self) -> None:
        """Hold the masks in ``W0`` (``holds_masks_in_place``), zeroing the newly pruned weights and their
        optimizer state: after the checkpoint, if any, was loaded and after every mask update, outside
        any gathering of sharded layers."""
        if self.holds_masks_in_place and self.layers:
            hold_(self.layers, self._optimizers())

    def _no_lr_warmup(self, warmup_ratio: float, total: int) -> str:
        """Why a schedule counted in learning-rate warm-ups cannot run: the warm-up rounds to 0 steps (a short
        run) or there is none; and a fix that works (:meth:`SparsitySchedule.fewest_steps_with_lr_warmup`)."""
        cause = (f"int(warmup_ratio × optimizer steps) = int({warmup_ratio:g} × {total}) = 0 warm-up steps"
                 if warmup_ratio > 0 else "--model.warmup_ratio is 0 (no warm-up)")
        fewest = self.schedule.fewest_steps_with_lr_warmup(warmup_ratio)
        fix = f"train at least {fewest} optimizer steps (--trainer.max_steps {fewest}), or " if fewest else ""
        return (f"the sparsity schedule counts its warm-ups in learning-rate warm-ups (warmup_unit: lr_warmup), and "
                f"{cause}, so pruning would start at step 0: {fix}set --model.warmup_ratio so that it rounds to at "
                "least one step, or count the warm-ups in steps or fractions (--sparsity.schedule.warmup_unit)")

    def target_sparsity(self, step: int) -> float:
        """The scheduled sparsity; the last step always has the final one, so it is checkpointed."""
        if step >= self.total_steps - 1:
            return self.final_sparsity
        return self.schedule(step, self.total_steps, self.final_sparsity, self.lr_warmup_steps)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.step = trainer.global_step
        self.prepare_masks(self.target_sparsity(self.step))

    def prepare_masks(self, sparsity: float) -> None:
        """Masks for the coming training step at ``sparsity``, if they need to change: computed
        now, or, with ``masks_from_forward_scores``, by the step's forward."""
        if not self.needs_update(sparsity):
            return
        if self.masks_from_forward_scores and self.mask_pattern.scope != "global":
            prune_on_next_forward_(self.layers, sparsity, self.pruned_count_rule, self.pattern)
            self.applied_sparsity = sparsity
            self._masks_pending = True
        else:
            with self._gathered_unless_base("update_masks"):
                self.update_masks(sparsity)
            self._hold_if_fixed()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.holds_masks_in_place:  # what the masking forward's backward gives
            mask_gradients_(self.layers)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.holds_masks_in_place and not pruned_stay_zero(self._optimizers()):  # Muon's update is dense
            mask_weights_(self.layers)
        if self._masks_pending:  # the forward has set them
            self._measure()
            self._masks_pending = False
        self._masks_stale = self.masks_follow_scores  # the optimizer step has moved the scores
        pl_module.log("sparsity/target", self.applied_sparsity)
        pl_module.log("sparsity/actual", self.measured_sparsity(), prog_bar=True)
        if self.log_layers and _loggers_write_this_step(trainer):
            pl_module.log_dict({f"sparsity/layer/{name}": value for name, value in self._measured.items()})

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        release_(self.layers)  # what runs after training may load other weights (the best checkpoint)
        if self.applied_sparsity != self.final_sparsity:
            rank_zero_warn(
                f"training ended at sparsity {self.applied_sparsity:.4f} before the schedule reached "
                f"{self.final_sparsity}; masks are set to the final sparsity now, with no recovery steps. "
                "Train longer or raise schedule.final_warmup."
            )
            with self._gathered_unless_base("update_masks"):
                self.update_masks(self.final_sparsity)
        self._refresh_if_stale()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refresh_if_stale()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refresh_if_stale()

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refresh_if_stale()

    # ---- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy_id,
            "applied_sparsity": self.applied_sparsity,
            "total_steps": self.total_steps,
            "step": self.step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("strategy")
        if saved != self.strategy_id:
            raise ValueError(f"checkpoint state is from strategy {saved!r}, this run uses {self.strategy_id!r}")
        self.applied_sparsity = state_dict["applied_sparsity"]
        self.total_steps = state_dict["total_steps"]
        self.step = state_dict.get("step", self.step)
        self._measure()

    def describe(self) -> dict[str, Any]:
        """Name, class path and constructor arguments: enough to rebuild this strategy."""
        cls = type(self)
        init_args = {k: _plain(v) for k, v in getattr(self, "_init_args", {}).items()}
        return {"name": self.strategy_name, "class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": init_args}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Record how to rebuild this strategy; save the masks of the current scores, not stale ones.

        Lightning has already copied the model's ``state_dict`` into ``checkpoint``, so refreshed
        masks are written into it explicitly.
        """
        checkpoint[CHECKPOINT_KEY] = self.describe()
        if not self._masks_stale:
            return
        self._refresh_if_stale()
        keys = {id(buffer): name for name, buffer in pl_module.named_buffers()}
        saved = checkpoint.get("state_dict", {})
        for layer in self.layers:
            key = keys.get(id(layer.mask))
            if key in saved:
                saved[key] = layer.mask.detach().clone()


def _overrides(strategy: SparsityStrategy, method: str) -> bool:
    """Whether ``strategy``'s class replaces :class:`SparsityStrategy`'s ``method``."""
    return getattr(type(strategy), method) is not getattr(SparsityStrategy, method)


def refresh_ddp_buffers(trainer: Trainer | None) -> None:
    """Have DDP collect the model's buffers again after a strategy removed some (SPDF's masks).

    Before every forward, DDP decides to broadcast rank 0's buffers by testing the list it
    collected last (at wrapping: the masks), then collects the list again and broadcasts it.
    Once the last buffers are gone, that broadcast gets an empty list and dies on both ranks
    (``!tensors.empty() INTERNAL ASSERT FAILED`` in ``_sync_buffers``; a GPT-2 has no buffers but
    the masks). Collecting right after the removal, with the method DDP's own forward uses,
    makes the next forward skip the broadcast when nothing is left and send what is otherwise.
    Nothing happens without DDP (one process, or no trainer).
    """
    wrapper = getattr(getattr(trainer, "strategy", None), "model", None)
    if isinstance(wrapper, DistributedDataParallel):
        wrapper._assign_modules_buffers()


def check_learning_rates(group: str, **rates: float | None) -> None:
    """Refuse a negative (or NaN) learning rate, naming its option ``--<group>.<name>``.

    torch's optimizers refuse one only when they are built, after the run has started, in a
    traceback; a strategy or the model checks its rates in its constructor instead. None (use the
    model's rate) passes.
    """
    for name, rate in rates.items():
        if rate is not None and not rate >= 0:
            raise ValueError(f"--{group}.{name} is {rate}: a learning rate must be >= 0; give e.g. 2e-5")


def _loggers_write_this_step(trainer: Trainer) -> bool:
    """Whether Lightning sends this step's logged values to any logger (every ``log_every_n_steps``).

    Per-layer sparsities are logged only then: each ``log`` call costs a fraction of a
    millisecond, and one per target layer at every step was 3% of a MiniLM step on a CPU.
    """
    connector = getattr(trainer, "_logger_connector", None)  # Lightning's own test for the same
    return bool(trainer.loggers) and bool(getattr(connector, "should_update_logs", True))


def _plain(value: Any) -> Any:
    """Constructor arguments as plain data (dataclasses such as schedules become dicts)."""
    return asdict(value) if is_dataclass(value) else value
