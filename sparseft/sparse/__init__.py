"""The sparsity machinery in plain PyTorch (no Lightning): layers, targets, the
parametrization ``W_eff = M ⊙ (W0 + ΔW)``, masks, schedules, reports and export."""

from sparseft.sparse.export import export_pretrained
from sparseft.sparse.layers import LinearLayer, find_linear_layers
from sparseft.sparse.masks import global_topk_masks, nm_mask, topk_mask
from sparseft.sparse.parametrize import SparseLayer, SparseWeight, merge_, sparse_layers
from sparseft.sparse.prune import MaskPattern, prune_, sparsify
from sparseft.sparse.report import build_report, count_parameters
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.sparse.targets import describe_targets, select_targets

__all__ = [
    "LinearLayer", "MaskPattern", "SparseLayer", "SparseWeight", "SparsitySchedule", "build_report",
    "count_parameters", "describe_targets", "export_pretrained", "find_linear_layers", "global_topk_masks",
    "merge_", "nm_mask", "prune_", "select_targets", "sparse_layers", "sparsify", "topk_mask",
]
