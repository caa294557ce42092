"""Run configs/*.yaml for a few steps each, all in one process: ``python -m tests.config_runs PLAN.json OUT.json``.

The plan is a JSON list of ``[name, argv]``; each ``argv`` goes to ``sparseft.cli.command.main`` in turn, in
the current directory (so the runs' relative paths, ``runs/...``, land there and a later config can start
from an earlier one's checkpoint). One process pays for importing torch, transformers and Lightning once
instead of once per config. A run refused with an error that names ``(--trainer.max_steps N)`` (a schedule
that needs more steps, :meth:`SparsitySchedule.fewest_steps_with_lr_warmup`) is run again with it, as a user
would. Writes ``{name: {"seconds": s, "error": None or the message, "retried_with": None or the override}}``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import re
import sys
import time
import traceback
from pathlib import Path

from sparseft.cli.command import main

NAMED_STEPS = re.compile(r"\(--trainer\.max_steps (\d+)\)")


def run_one(argv: list[str]) -> str | None:
    """Run one command line; None when it succeeds, else its error (the one-line report or the traceback)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            main(argv)
    except SystemExit as stop:
        return stderr.getvalue().strip().splitlines()[-1] if stop.code else None
    except Exception:  # a bug: keep the whole traceback for the test's report
        return traceback.format_exc()
    return None


def run_plan(plan: list[tuple[str, list[str]]]) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    for name, argv in plan:
        start, retried_with = time.perf_counter(), None
        error = run_one(argv)
        if error and (named := NAMED_STEPS.search(error)):
            retried_with = f"--trainer.max_steps={named.group(1)}"
            error = run_one([*argv, retried_with])
        results[name] = {"seconds": round(time.perf_counter() - start, 1), "error": error, "retried_with": retried_with}
        gc.collect()  # the previous run's model, before the next one is built
    return results


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(run_plan(json.loads(Path(sys.argv[1]).read_text())), indent=1))
