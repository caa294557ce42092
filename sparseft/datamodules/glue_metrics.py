"""GLUE metrics that torchmetrics does not compute as GLUE's scorer does.

GLUE scores CoLA with scikit-learn's ``matthews_corrcoef``, which is 0 when either marginal of
the confusion matrix is constant (every prediction, or every label, the same class): the
correlation is undefined there and sklearn defines it as 0. torchmetrics'
``BinaryMatthewsCorrCoef`` instead returns a small non-zero value in that case (+0.0256 for an
all-"acceptable" predictor on CoLA dev) and 1 or -1 for a single-class set predicted all right
or all wrong, so a dead model would log a positive correlation.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


def matthews_corrcoef(confmat: list[list[int]]) -> float:
    """MCC of a confusion matrix ``confmat[true][predicted]`` by sklearn's formula, 0 when undefined.

    ``(c·s − Σ t_k p_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))`` with ``t_k`` / ``p_k`` the true /
    predicted count of class k, ``c`` the correct and ``s`` all predictions; for two classes this
    is ``(tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))``. The covariances are exact
    integers, so the 0 of a degenerate matrix is exact.
    """
    classes = range(len(confmat))
    true = [sum(row) for row in confmat]
    predicted = [sum(confmat[t][p] for t in classes) for p in classes]
    correct, total = sum(confmat[k][k] for k in classes), sum(true)
    cov_true_pred = correct * total - sum(t * p for t, p in zip(true, predicted))
    cov_pred = total * total - sum(p * p for p in predicted)
    cov_true = total * total - sum(t * t for t in true)
    if cov_pred * cov_true == 0:
        return 0.0
    return cov_true_pred / math.sqrt(cov_pred * cov_true)


class MatthewsCorrCoef(Metric):
    """Binary Matthews correlation exactly as GLUE's scorer (``sklearn.metrics.matthews_corrcoef``).

    The state is the 2×2 confusion matrix of counts, summed across processes, so the value under
    DDP is the one of the whole evaluation set.

    ``update(preds, target)`` takes class ids (0 or 1) of the same shape.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("confmat", default=torch.zeros(2, 2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.is_floating_point() or target.is_floating_point():
            raise ValueError("MatthewsCorrCoef expects class ids (0 or 1), not scores")
        if preds.shape != target.shape:
            raise ValueError(f"preds and target differ in shape: {tuple(preds.shape)} vs {tuple(target.shape)}")
        preds, target = preds.reshape(-1).long(), target.reshape(-1).long()
        if ((preds | target) & ~1).any():  # a bit other than the lowest: not 0 or 1
            raise ValueError("MatthewsCorrCoef expects class ids 0 or 1")
        self.confmat += torch.bincount(target * 2 + preds, minlength=4).reshape(2, 2)

    def compute(self) -> torch.Tensor:
        value = matthews_corrcoef(self.confmat.tolist())
        return torch.tensor(value, dtype=torch.float32, device=self.confmat.device)
