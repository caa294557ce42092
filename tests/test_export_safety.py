"""Export writes a whole model directory or nothing, and never into a directory it was not given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from sparseft.backbones.loading import load_backbone
from sparseft.cli.command import run_command
from sparseft.export.pretrained import export_pretrained
from sparseft.sparse import sparsify
from sparseft.testing import tiny_config


def tiny_model() -> PreTrainedModel:
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    sparsify(model)
    return model


def listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def occupied(tmp_path: Path) -> Path:
    """A directory that already holds someone's model files."""
    path = tmp_path / "target"
    path.mkdir()
    (path / "config.json").write_text('{"mine": true}')
    (path / "notes.txt").write_text("keep me")
    return path


def test_an_empty_output_dir_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="output_dir is empty"):
        export_pretrained(tiny_model(), "")
    with pytest.raises(ValueError, match="output_dir is empty"):
        run_command(["export", "--ckpt_path=unused.ckpt", "--output_dir="])
    with pytest.raises(ValueError, match=f"output_dir . holds {tmp_path}, which the export would replace"):
        export_pretrained(tiny_model(), ".")  # the current directory, although empty
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_directory_is_refused_without_overwrite(occupied):
    before = listing(occupied)
    with pytest.raises(FileExistsError, match="is not empty: choose a new directory, or pass --overwrite"):
        export_pretrained(tiny_model(), occupied)
    assert listing(occupied) == before
    assert sorted(p.name for p in occupied.parent.iterdir()) == ["target"]


def test_overwrite_replaces_the_directory_whole(occupied):
    model = tiny_model()
    export_pretrained(model, occupied, overwrite=True)
    assert not (occupied / "notes.txt").exists() and "mine" not in (occupied / "config.json").read_text()
    assert json.loads((occupied / "report.json").read_text())["target_sparsity"] == 0.0
    AutoModelForSequenceClassification.from_pretrained(occupied)
    assert sorted(p.name for p in occupied.parent.iterdir()) == ["target"]  # no staging or replaced copies left


@pytest.mark.parametrize("exists", [False, True])
def test_a_failure_midway_leaves_the_target_untouched(exists, occupied, tmp_path, monkeypatch):
    target = occupied if exists else tmp_path / "new"
    before = listing(occupied)
    original = PreTrainedModel.save_pretrained

    def save_then_fail(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)  # the weights are written, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_pretrained(tiny_model(), target, overwrite=True)
    assert listing(occupied) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no partial directory anywhere


def test_overwrite_never_deletes_the_checkpoint_being_exported(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    checkpoint = run / "last.ckpt"
    torch.save({}, checkpoint)
    with pytest.raises(ValueError, match=r"output_dir .* holds .*last.ckpt, which the export would replace"):
        run_command(["export", f"--ckpt_path={checkpoint}", f"--output_dir={run}", "--overwrite=true"])
    assert checkpoint.exists()
