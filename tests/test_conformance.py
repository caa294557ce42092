"""sparseft's own strategies through the conformance suite (:mod:`sparseft.testing.conformance`).

One ``Test<Class>`` per strategy that sparseft ships, with its settings from SETTINGS: a strategy
added to sparseft without an entry fails here. Strategies that other installed packages register
(entry points) are theirs to test, with the same suite, and do not change this module.
"""

from __future__ import annotations

from sparseft.strategies import Magnitude, Movement, SparsityStrategy
from sparseft.strategies.registry import sparseft_strategies
from sparseft.testing.conformance import StrategyConformance

# Constructor arguments used to test each strategy: a short schedule that reaches its target.
SETTINGS: dict[str, dict] = {
    "magnitude": dict(sparsity=0.6, schedule=dict(kind="cubic", initial_warmup=0.1, final_warmup=0.3)),
    "pst": dict(sparsity=0.8, learning_rate=1e-2, schedule=dict(kind="cubic", initial_warmup=0.1, final_warmup=0.3)),
    "movement": dict(sparsity=0.7, schedule=dict(kind="cubic", initial_warmup=0.1, final_warmup=0.3)),
    # DSEE prunes in one shot by default; a cubic ramp puts the mid-run checkpoint after the stage
    # boundary (optimizer restarted at step 3) and mid-schedule. The one-shot boundary is in test_dsee.py.
    "dsee": dict(sparsity=0.6, pattern="layer", rank=2, num_sparse=8, learning_rate=1e-2,
                 schedule=dict(kind="cubic", initial_warmup=0.2, final_warmup=0.3)),
    # LoRA prunes nothing: its sparsity is 0 and every check holds with no mask at all
    "lora": dict(rank=2, alpha=4.0, targets=["q", "k", "v", "ffn_out"], learning_rate=1e-2),
    # S²FT's sparsity is of the update: 1 of 4 heads and 16 of 64 channels trained in every block
    "s2ft": dict(sparsity=0.75, allocation="layer", learning_rate=1e-2),
    # SPDF's static mask is chosen at setup: the final sparsity from step 0
    "spdf": dict(sparsity=0.75, seed=3),
}

# Checks that do not apply to a strategy: strategy -> {check: why}. Each runs as a strict xfail.
NOT_APPLICABLE: dict[str, dict[str, str]] = {
    "s2ft": {
        "zeros": "S²FT's sparsity is of the update: untrained weights keep their pre-trained values, they are not "
                 "zero (test_s2ft.py checks they never change and that the trained fraction is exact)",
        "export": "merged S²FT weights are dense: report.json's target_sparsity (zeros in the weights) is 0, not the "
                  "update's sparsity (test_s2ft.py checks identical logits after export)",
    },
}


def conformance_class(name: str, cls: type[SparsityStrategy]) -> type[StrategyConformance]:
    """The suite for one of sparseft's strategies, with its SETTINGS entry (an empty one if missing:
    ``test_every_sparseft_strategy_has_settings`` fails then)."""
    attributes = {"strategy_class": cls, "init_args": SETTINGS.get(name, {}),
                  "not_applicable": NOT_APPLICABLE.get(name, {}), "__module__": __name__}
    return type(f"Test{cls.__name__}", (StrategyConformance,), attributes)


SUITES = {name: conformance_class(name, cls) for name, cls in sparseft_strategies().items()}
globals().update({suite.__name__: suite for suite in SUITES.values()})


def make_strategy(name: str) -> SparsityStrategy:
    """One of sparseft's strategies, built from its SETTINGS as a config would build it."""
    return SUITES[name]().make_strategy()


class TestMagnitudeOneShot(StrategyConformance):
    """The suite on a one-shot schedule: dense for 5 steps, pruned at step 5, after the resume
    check's checkpoint (step 4), so the resumed run does the pruning."""

    strategy_class = Magnitude
    init_args = dict(sparsity=0.6, schedule=dict(kind="one_shot", initial_warmup=0.5))


class TestMovementSoft(StrategyConformance):
    """The suite on movement's soft variant: masks σ(S) > τ_t and the penalty ``λ_t · mean σ(S)`` on the
    scores, computed outside the forward (on shards under FSDP2). Uniform scores in (-1, 1) put
    σ(S) on both sides of τ = 0.4, so the run prunes (about a third) and the penalty moves every score."""

    strategy_class = Movement
    init_args = dict(variant="soft", final_threshold=0.4, final_lambda=10.0, score_init="uniform",
                     score_init_scale=1.0, schedule=dict(kind="cubic", initial_warmup=0.1, final_warmup=0.3))
    not_applicable = {
        "zeros": "soft movement's final sparsity is what the threshold yields, not `sparsity` (test_movement.py "
                 "checks the threshold and the reported sparsity)",
        "precision": "the check counts each mask's pruned entries at `sparsity`; soft movement prunes what the "
                     "threshold yields (as for `zeros`)",
        "logging": "the check compares the last logged sparsity with the masks after training; soft masks are "
                   "recomputed from the final scores at the end, and a threshold's count moves with them",
        "fresh_masks": "the check recomputes masks as a top-k at the applied sparsity; soft masks are a threshold "
                       "on σ(S) (refresh_masks recomputes that threshold)",
    }


def test_every_sparseft_strategy_has_settings():
    missing = sorted(set(sparseft_strategies()) - set(SETTINGS))
    assert not missing, f"strategies with no conformance SETTINGS entry: {missing}; add them in {__file__}"
    assert set(NOT_APPLICABLE) <= set(SETTINGS)
