"""sparseft's conformance suite on RandomPruning: every check of sparseft's own strategies."""

from sparseft_random_pruning import RandomPruning

from sparseft.testing.conformance import StrategyConformance


class TestRandomPruning(StrategyConformance):
    strategy_class = RandomPruning
    init_args = {"sparsity": 0.6, "schedule": {"kind": "cubic", "initial_warmup": 0.1, "final_warmup": 0.3}}
