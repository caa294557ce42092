"""Random pruning for sparseft, shipped as a package of its own (see docs/custom_strategy.md)."""

from sparseft_random_pruning.strategy import RandomPruning

__all__ = ["RandomPruning"]
