"""The sparsity report (``report.json``) of an export: overall and per-layer sparsity, parameters, FLOPs.

Every number is measured by :mod:`sparseft.sparse.measure` on the effective weights, never copied
from a target, so a report can be trusted after any merge or export.
"""

from __future__ import annotations

from dataclasses import asdict

from torch import nn

from sparseft.sparse.measure import count_parameters, linear_flops_per_token, measure_layers, remaining_weights
from sparseft.sparse.parametrize import sparse_layers

#: what the numbers of :func:`build_report` count, written into report.json as ``units``
REPORT_UNITS = {
    "target_sparsity": "fraction (0 to 1) of the target layers' weights that are exactly zero",
    "target_weights": "count of weights in the target layers",
    "trainable_parameters": "count of parameters fine-tuning trained (shared tensors once)",
    "total_parameters": "count of parameters of the saved model (shared tensors once)",
    "linear_flops_per_token": "FLOPs per token of all linear layers, 2 per weight (multiply and add); "
                              "sparse: with every zero weight skipped",
    "remaining_weights": "fraction (0 to 1) of weights that are not zero: over the targets, and over every "
                         "parameter of the transformer blocks as movement pruning's paper counts",
    "layers": "shape: [out, in] in weights; nonzero: count; sparsity: fraction (0 to 1); target: sparsified",
}


def build_report(model: nn.Module, target_names: list[str] | None = None, trainable: int | None = None) -> dict:
    """A JSON-ready summary: overall and per-layer sparsity, parameters, FLOPs.

    ``target_names`` are the layers the overall ``target_sparsity`` is measured over; the
    default is the layers currently sparsified (pass them explicitly after a merge).
    ``trainable`` is what fine-tuning trained, counted before a merge folded the strategy's
    tensors (LoRA factors, scores, slices) into frozen weights; the default counts ``model`` now.
    """
    layers = measure_layers(model, only_sparsified=False)
    names = set(target_names) if target_names is not None else {s.name for s in sparse_layers(model)}
    targets = [s for s in layers if s.name in names]
    target_numel = sum(s.numel for s in targets)
    trainable_now, total = count_parameters(model)
    dense_flops, sparse_flops = linear_flops_per_token(model)
    return {
        "target_sparsity": 1.0 - sum(s.nonzero for s in targets) / max(target_numel, 1),
        "target_weights": target_numel,
        "trainable_parameters": trainable_now if trainable is None else trainable,
        "total_parameters": total,
        "linear_flops_per_token": {"dense": dense_flops, "sparse": sparse_flops},
        "remaining_weights": remaining_weights(model, [s.name for s in targets]),
        "layers": [{**asdict(s), "sparsity": s.sparsity, "target": s.name in names} for s in layers],
        "units": REPORT_UNITS,
    }
