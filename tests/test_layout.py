"""The package layout: layers import only downwards, ``sparse/`` knows nothing of Lightning or of the
layers above, and what earlier versions wrote (before the move to packages) still loads.

The fixtures in ``tests/fixtures/before_layout`` were written by sparseft at commit 211ff37 (the last
flat layout), in a directory holding a tiny BERT saved by ``make_tiny_model_dir("tiny-bert", "bert")``:
``sparseft fit`` with ``--model.backbone=tiny-bert``, magnitude at 50% updated every step, 3 steps on an
8-row SST-2 file, then ``sparseft export --format compressed`` of its ``last.ckpt``.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from sparseft.cli import main
from sparseft.export import load_compressed
from sparseft.testing import make_tiny_model_dir

PACKAGE = Path(__file__).resolve().parents[1] / "sparseft"
BEFORE_LAYOUT = Path(__file__).resolve().parent / "fixtures" / "before_layout"

#: what each layer may import of sparseft (besides itself): dependencies point down, no cycles
ALLOWED = {
    "sparse": set(),
    "backbones": set(),
    "export": {"sparse"},
    "datamodules": {"backbones"},
    "strategies": {"sparse"},
    "training": {"sparse", "strategies", "datamodules", "backbones"},
    "cli": {"sparse", "strategies", "datamodules", "backbones", "export", "training"},
    "testing": {"sparse", "strategies", "datamodules", "backbones", "export", "training", "cli"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_module_lives_in_a_layer_package():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == [], f"modules at the package root belong in a layer package: {loose}"
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == set(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downwards(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "sparseft" and len(parts) > 1 and parts[1] != layer:
                assert parts[1] in ALLOWED[layer], f"{path.relative_to(PACKAGE)} imports {name} (upwards)"
            if layer in ("sparse", "export", "backbones"):
                assert parts[0] != "lightning", f"{path.relative_to(PACKAGE)} imports {name}"


def test_an_export_written_before_the_layout_loads_and_a_checkpoint_exports_to_the_same_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the fixture checkpoint names its backbone (for the tokenizer) as ./tiny-bert
    make_tiny_model_dir(tmp_path / "tiny-bert", "bert")
    old_export = tmp_path / "old-export"
    shutil.copytree(BEFORE_LAYOUT / "compressed_export", old_export)
    main(["export", f"--ckpt_path={BEFORE_LAYOUT / 'magnitude_tiny_bert.ckpt'}", "--output_dir=new-export"])

    inputs = {"input_ids": torch.tensor([[2, 17, 40, 99, 3], [2, 250, 31, 3, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}
    new = AutoModelForSequenceClassification.from_pretrained(tmp_path / "new-export").eval()
    old = load_compressed(old_export).eval()
    old_remote = AutoModelForSequenceClassification.from_pretrained(old_export, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = new(**inputs).logits
        torch.testing.assert_close(old(**inputs).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(old_remote(**inputs).logits, expected, rtol=0, atol=1e-6)
    weight = new.bert.encoder.layer[0].attention.self.query.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)  # the magnitude mask came along
