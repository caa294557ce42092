"""The sparsity machinery in plain PyTorch (no Lightning, no file formats): layers, targets, the
parametrization ``W_eff = M ⊙ (W0 + ΔW)``, deltas, slices, masks, schedules and measurements.

What leaves a run (Hugging Face directories, the compressed format, reports) is :mod:`sparseft.export`.
"""

from sparseft.sparse.layers import LinearLayer, find_linear_layers
from sparseft.sparse.masks import global_topk_masks, nm_mask, topk_mask
from sparseft.sparse.measure import count_parameters
from sparseft.sparse.parametrize import SparseLayer, SparseWeight, merge_, sparse_layers
from sparseft.sparse.prune import MaskPattern, prune_, sparsify
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.targets import describe_targets, select_targets

__all__ = [
    "LinearLayer", "MaskPattern", "SparseLayer", "SparseWeight", "SparsitySchedule", "count_parameters",
    "describe_targets", "find_linear_layers", "global_topk_masks", "merge_", "nm_mask", "prune_",
    "select_targets", "sparse_layers", "sparsify", "topk_mask",
]
