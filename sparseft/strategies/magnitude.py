"""Gradual magnitude pruning (Zhu & Gupta, 2017): the baseline every sparse fine-tuning paper uses."""

from __future__ import annotations

import torch

from sparseft.sparse.parametrize import SparseLayer
from sparseft.strategies.base import SparsityStrategy
from sparseft.strategies.registry import register_strategy


@register_strategy("magnitude")
class Magnitude(SparsityStrategy):
    """Gradual magnitude pruning: keep the largest ``|W|``, raising sparsity on a schedule.

    Score ``S = |W| ⊙ M``: weights are trained as usual (``W0`` is not frozen) and at every
    mask update the smallest-magnitude surviving weights are removed until the scheduled
    sparsity is reached, per layer or globally. Pruned weights stay pruned (their score is 0),
    so masks only shrink, as in Zhu & Gupta's TensorFlow implementation. The default schedule
    is their cubic ramp ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n·Δt))³`` (eq. 1).

    Since a pruned weight never returns, its mask is held in ``W`` itself during training
    (``holds_masks_in_place``, :mod:`sparseft.sparse.inplace`): pruned weights and their optimizer
    state stored as zeros, their gradients masked before every optimizer step, and the plain dense forward.

    Runs on: ``on_train_batch_start`` (mask update when the scheduled sparsity changes),
    ``on_before_optimizer_step`` (pruned gradients zeroed; with an optimizer that is not elementwise,
    such as Muon, pruned weights too, ``on_train_batch_end``),
    ``on_train_end`` (final sparsity exactly).

    Args:
        sparsity: final fraction of target weights removed, in [0, 1).
        targets: role names or whole-name regular expressions (default: all block linears).
        schedule: sparsity over training (default cubic, warm-ups 0.1 and 0.3).
        pattern: ``layer``, ``global`` or ``N:M`` (e.g. ``2:4``).
        log_layers: log every target layer's sparsity.
    """

    holds_masks_in_place = True
    attaches_to_empty_weights = True  # masks start all-ones; the first is chosen at the first step

    def layer_scores(self, layer: SparseLayer) -> torch.Tensor:
        return layer.dense().abs() * layer.mask
