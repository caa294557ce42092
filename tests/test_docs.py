"""Code in README.md and docs/ runs: every ```python block is executed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparseft.strategies import registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def python_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in DOCS:
        blocks += [(f"{path.relative_to(ROOT)}#{i}", code) for i, code in enumerate(BLOCK.findall(path.read_text()))]
    return blocks


@pytest.mark.parametrize("where, code", python_blocks(), ids=[w for w, _ in python_blocks()])
def test_python_block_runs(where, code, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # examples may register strategies
    exec(compile(code, where, "exec"), {"__name__": "docs_example"})


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "ruff check . && python -m pytest -q"
    assert command in readme and command in ci.splitlines()
