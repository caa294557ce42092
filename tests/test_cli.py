"""The ``sparseft`` command end to end on a tiny model: fit, resume checks, export, dry run, DDP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForSequenceClassification

from sparseft.backbones.loading import load_tokenizer
from sparseft.cli.command import main
from sparseft.sparse.masks import pruned_count
from sparseft.testing import tensor_digest
from sparseft.testing.processes import launch_nodes
from sparseft.training.module import SparseFTModule

SENTENCES = [
    ("the movie was a delight from start to finish", 1),
    ("a dull , lifeless film with no story", 0),
    ("what a wonderful , moving and funny picture", 1),
    ("the plot makes no sense and the ending is terrible", 0),
    ("one of the best films of the year", 1),
    ("bad acting and a terrible story", 0),
]


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SST-2-format folder (train.tsv, dev.tsv) in the original GLUE layout."""
    path = tmp_path_factory.mktemp("sst2")
    rows = "".join(f"{text}\t{label}\n" for text, label in SENTENCES * 8)
    for split in ("train", "dev"):
        (path / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    (path / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{t}\n" for i, (t, _) in enumerate(SENTENCES)))
    return path


def fit_args(model_dir: Path, data_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        f"--model.backbone={model_dir}",
        "--model.learning_rate=1e-3",
        "--data=sparseft.datamodules.GLUEDataModule",
        "--data.task=sst2",
        f"--data.data_dir={data_dir}",
        "--data.batch_size=8",
        "--data.max_length=32",
        "--sparsity=magnitude",
        "--sparsity.sparsity=0.5",
        "--sparsity.schedule.update_every=2",
        "--trainer.max_steps=12",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={root}",
        "--seed_everything=0",
        *extra,
    ]


def last_checkpoint(root: Path) -> Path:
    checkpoints = sorted(root.rglob("*.ckpt"), key=os.path.getmtime)
    assert checkpoints, f"no checkpoint under {root}"
    return checkpoints[-1]


def test_strategies_command_lists_the_registry(capsys):
    main(["strategies"])
    out = capsys.readouterr().out
    assert "magnitude" in out and "Gradual magnitude pruning" in out


def test_fit_export_roundtrip(tiny_bert_dir, sst2_dir, tmp_path, capsys):
    root = tmp_path / "run"
    main(fit_args(tiny_bert_dir, sst2_dir, root))
    ckpt = last_checkpoint(root)
    module, strategy = SparseFTModule.from_sparseft_checkpoint(ckpt)
    assert strategy.strategy_name == "magnitude" and strategy.applied_sparsity == 0.5
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    batch = tokenizer([text for text, _ in SENTENCES], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = module(**batch).logits

    out_dir = tmp_path / "exported"
    main(["export", f"--ckpt_path={ckpt}", f"--output_dir={out_dir}"])
    assert "target sparsity 0.5000" in capsys.readouterr().out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["strategy"]["name"] == "magnitude"

    plain = AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
    targets = {layer["name"] for layer in report["layers"] if layer["role"]}
    weights = dict(plain.named_parameters())
    for name in targets:
        weight = weights[f"{name}.weight"]
        assert int((weight == 0).sum()) == pruned_count(weight.numel(), 0.5), name
    assert report["target_sparsity"] == pytest.approx(0.5)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, expected, atol=1e-6)
    assert load_tokenizer(str(out_dir)) is not None


def test_predict_writes_the_glue_submission_file_beside_the_checkpoints(tiny_bert_dir, sst2_dir, tmp_path, capsys):
    root = tmp_path / "run"
    main(fit_args(tiny_bert_dir, sst2_dir, root, "--trainer.max_steps=2"))
    args = [a for a in fit_args(tiny_bert_dir, sst2_dir, root) if "max_steps" not in a]
    main(["predict", *args[1:], f"--ckpt_path={last_checkpoint(root)}"])
    written = Path(capsys.readouterr().out.split("predictions written to ")[1].split("\n")[0])
    assert written == root / "lightning_logs" / "version_0" / "predict" / "SST-2.tsv"  # the training run's
    assert sorted(path.name for path in (root / "lightning_logs").iterdir()) == ["version_0"]
    lines = written.read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == len(SENTENCES) + 1
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(len(SENTENCES))]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}  # SST-2's labels as GLUE's website reads them


def test_targets_dry_run(tiny_bert_dir, sst2_dir, tmp_path, capsys):
    main(["targets", *fit_args(tiny_bert_dir, sst2_dir, tmp_path)[1:], "--sparsity.targets=[q, v]"])
    out = capsys.readouterr().out
    assert "bert.encoder.layer.1.attention.self.value" in out and "4 target layers" in out
    assert "key" not in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("--sparsity=no_such_method", "unknown sparsity strategy 'no_such_method'; available: .*magnitude"),
        ("--sparsity.sparsity=1.0", r"sparsity must be in \[0, 1\)"),
        ("--sparsity.targets=attention.query", "target pattern 'attention.query' matched no linear layer"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_bert_dir, sst2_dir, tmp_path, override, message, capsys):
    with pytest.raises((ValueError, SystemExit)) as error:
        main([*fit_args(tiny_bert_dir, sst2_dir, tmp_path), override])
    # argument errors are printed by the parser before it exits; the rest are raised
    text = capsys.readouterr().err if isinstance(error.value, SystemExit) else str(error.value)
    assert re.search(message, text), text


def test_checkpoint_from_another_strategy_is_refused(tiny_bert_dir, sst2_dir, tmp_path, capsys):
    root = tmp_path / "run"
    main(fit_args(tiny_bert_dir, sst2_dir, root, "--trainer.max_steps=2"))
    args = [a for a in fit_args(tiny_bert_dir, sst2_dir, root) if not a.startswith("--sparsity")]
    with pytest.raises(SystemExit):  # a resumed fit must name it (an evaluation takes it from the checkpoint)
        main([*args, f"--ckpt_path={last_checkpoint(root)}"])
    assert "trained with sparsity strategy 'magnitude', but this run uses none" in capsys.readouterr().err


def multi_process_fit_command(model_dir: Path, data_dir: Path, root: Path, *launch: str,
                              strategy: str = "ddp") -> list[str]:
    """``sparseft fit`` of :func:`fit_args` (magnitude, 12 steps, masks raised every 2) under the trainer
    ``strategy`` (DDP or FSDP2); every rank writes a digest of its final masks to ``root``."""
    args = [*fit_args(model_dir, data_dir, root), f"--trainer.strategy={strategy}", *launch,
            "--trainer.callbacks+=sparseft.testing.MaskDigest", f"--trainer.callbacks.directory={root}"]
    return [sys.executable, "-m", "sparseft", *args]


def read_checkpoint_anywhere(path: Path, scratch: Path) -> dict:
    """A checkpoint as one dict: a file (DDP, one process), or FSDP2's directory (a distributed checkpoint:
    every rank's shards of the tensors, consolidated through ``scratch``, and ``meta.pt``, the rest)."""
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=False)
    dcp_to_torch_save(path, scratch)
    return {**torch.load(path / "meta.pt", weights_only=False), **torch.load(scratch, weights_only=False)}


def assert_two_ranks_hold_the_checkpoint_masks(root: Path, strategy: str = "ddp") -> None:
    """Ranks 0 and 1 wrote equal mask digests, the last checkpoint holds those very masks at 50%
    sparsity, and it was written once: by rank 0 alone under DDP, as one shard per rank under FSDP2."""
    digests = [(root / f"masks-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]
    checkpoints = sorted(root.rglob("*.ckpt"))
    assert [path.name for path in checkpoints] == ["epoch=3-step=12.ckpt", "last.ckpt"]  # once each
    shards = [sorted(shard.name for shard in path.glob("*.distcp")) for path in checkpoints]
    assert shards == 2 * [["__0_0.distcp", "__1_0.distcp"] if strategy == "fsdp2" else []]
    checkpoint = read_checkpoint_anywhere(checkpoints[0], root / "consolidated.pt")
    suffix = ".parametrizations.weight.0.mask"
    masks = [(key[len("model."):-len(suffix)], value) for key, value in checkpoint["state_dict"].items()
             if key.endswith(suffix)]
    assert len(masks) == 12 and tensor_digest(masks) == digests[0]
    (state,) = [state for state in checkpoint["callbacks"].values() if state.get("strategy") == "magnitude"]
    assert state["applied_sparsity"] == 0.5 and all(mask.float().mean() == 0.5 for _, mask in masks)


@pytest.mark.slow
def test_ddp_two_processes_have_identical_masks(tiny_bert_dir, sst2_dir, tmp_path):
    root = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(multi_process_fit_command(tiny_bert_dir, sst2_dir, root, "--trainer.devices=2"), env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_two_ranks_hold_the_checkpoint_masks(root)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_nodes_on_loopback_have_identical_masks(tiny_bert_dir, sst2_dir, tmp_path, strategy):
    """Two launches of one run, as on two machines: ``num_nodes 2``, one process each, node ranks
    0 and 1, rank 0 listening on 127.0.0.1; magnitude masks chosen from the weights every 2 steps."""
    root = tmp_path / "nodes"
    root.mkdir()
    command = multi_process_fit_command(tiny_bert_dir, sst2_dir, root, "--trainer.num_nodes=2", "--trainer.devices=1",
                              strategy=strategy)
    codes = launch_nodes(command, 2, root)
    assert codes == [0, 0], "\n".join((root / f"node{rank}.log").read_text()[-3000:] for rank in (0, 1))
    assert_two_ranks_hold_the_checkpoint_masks(root, strategy)
