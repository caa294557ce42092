"""The training layer: :class:`SparseFTModule` (backbone, task, metrics, optimizer groups), the optimizer
and learning-rate schedule, callbacks, checkpointing and what a checkpoint may change on resume,
TensorBoard, distillation and the run summary."""

from sparseft.training.module import SparseFTModule

__all__ = ["SparseFTModule"]
