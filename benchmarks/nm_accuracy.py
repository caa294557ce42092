"""2:4 (N:M) against unstructured pruning at the same sparsity, for the gradual strategies.

Every run fine-tunes the same backbone on the same task, with the same steps, batch, data order,
seed and sparsity schedule; only the mask pattern differs: ``layer`` (unstructured top-k per
matrix) or ``N:M`` (top-N of every M consecutive inputs, the kept count per group stepping
from M down to N as the schedule's sparsity rises; docs/strategies/magnitude.md). Each run has
a process of its own (``compare.py``'s helpers) and is evaluated on the full dev set. Example
(the numbers in RESULTS.md come from it)::

    python benchmarks/nm_accuracy.py --data_dir ../shared/data/glue/SST-2 --steps 300 \\
        --methods magnitude movement pst --patterns 2:4 layer --out benchmarks/results/nm_sst2.json
"""

from __future__ import annotations

import argparse
import json
import sys

from compare import add_run_arguments, format_table, rerun_this_script, run_one

#: The quickstart's schedule (configs/quickstart.yaml): dense for 10% of the steps, the cubic
#: ramp, the final sparsity for the last 30%, masks moved every 10 steps.
SCHEDULE = "{kind: cubic, initial_warmup: 0.1, final_warmup: 0.3, update_every: 10, warmup_unit: fraction}"


def run_spec(method: str, pattern: str, sparsity: float) -> str:
    """A ``compare.py`` run spec; ``pattern: layer`` is every strategy's default and is left out."""
    pattern_arg = "" if pattern == "layer" else f",pattern='{pattern}'"  # quoted: YAML reads 2:4 as 124
    return f"{method}:sparsity={sparsity}{pattern_arg},schedule={SCHEDULE}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=["magnitude", "movement", "pst"])
    parser.add_argument("--patterns", nargs="+", default=["2:4", "layer"])
    parser.add_argument("--sparsity", type=float, default=0.5, help="must be 1 - N/M for the N:M patterns")
    args = parser.parse_args()
    args.max_eval_samples, args.export_dir = None, None  # the full dev set; no export
    if args.one:
        print("RESULT " + json.dumps(run_one(args, args.one)))
        return
    results = []
    for method in args.methods:
        for pattern in args.patterns:
            results.append(rerun_this_script("--one", run_spec(method, pattern, args.sparsity)))
            print(format_table(results[-1:]), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=2))
    print(format_table(results))


if __name__ == "__main__":
    main()
