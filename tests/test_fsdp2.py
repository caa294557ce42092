"""FSDP2 (``--trainer.strategy fsdp2``) beyond the conformance suite's tiny BERT: GPT-2's fused ``qkv``
and LLaMA's grouped-query attention, a global top-k, which blocks are sharded, what is refused, and
that ``export`` and ``report`` read a sharded checkpoint into the model the same run under DDP gives.

Every multi-process test runs 2 CPU processes over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from sparseft.backbones import build_config, load_backbone
from sparseft.cli.command import main
from sparseft.cli.report import report_command
from sparseft.strategies import Magnitude
from sparseft.testing import tiny_config
from sparseft.testing.conformance import check_fsdp2
from sparseft.training.checkpoint_checks import is_sharded_checkpoint, load_checkpoint
from sparseft.training.sharding import FSDP2Strategy, transformer_blocks
from tests.test_cli import fit_args, sst2_dir  # noqa: F401  (fixture)


@pytest.mark.parametrize("model_type, blocks", [("bert", "BertLayer"), ("gpt2", "GPT2Block"),
                                                ("llama", "LlamaDecoderLayer")])
def test_the_blocks_sharded_are_the_backbones_transformer_blocks(model_type, blocks):
    task = "sequence-classification" if model_type == "bert" else "causal-lm"
    model = load_backbone(task, config=build_config(tiny_config(model_type), task, 2), num_labels=2)
    found = transformer_blocks(model)
    assert [type(block).__name__ for block in found] == [blocks, blocks]


def test_fsdp2_is_a_registered_trainer_strategy_over_every_process():
    trainer = Trainer(strategy="fsdp2", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy) and isinstance(trainer.strategy, ModelParallelStrategy)
    assert trainer.strategy._tensor_parallel_size == 1


class UnshardableMagnitude(Magnitude):
    """A strategy that declares it cannot train under FSDP2 (as a third-party one may)."""

    def fsdp2_refusal(self) -> str | None:
        return "its scores need the whole model on one device; use --trainer.strategy ddp"


def test_a_strategy_that_cannot_shard_is_refused_in_one_line_before_the_data_is_read(
    tiny_bert_dir, sst2_dir, tmp_path, monkeypatch  # noqa: F811
):
    def no_reading(*args, **kwargs):
        raise AssertionError("the data was read before the refusal")

    monkeypatch.setattr("sparseft.datamodules.glue.GLUEDataModule.setup", no_reading)
    args = [a for a in fit_args(tiny_bert_dir, sst2_dir, tmp_path) if not a.startswith("--sparsity")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"--sparsity={__name__}.UnshardableMagnitude", "--sparsity.sparsity=0.5",
              "--trainer.strategy=fsdp2"])
    assert exit_info.value.code == 2
    Magnitude(sparsity=0.5).check_trainer(Trainer(strategy="fsdp2", accelerator="cpu", devices=1, logger=False))


def test_the_refusal_names_the_option_the_strategy_and_its_reason(capsys, tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    args = [a for a in fit_args(tiny_bert_dir, sst2_dir, tmp_path) if not a.startswith("--sparsity")]
    with pytest.raises(SystemExit):
        main([*args, f"--sparsity={__name__}.UnshardableMagnitude", "--trainer.strategy=fsdp2"])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sparseft: error:")]
    assert line == ("sparseft: error: --trainer.strategy fsdp2 with sparsity strategy 'magnitude': its scores need "
                    "the whole model on one device; use --trainer.strategy ddp")


@pytest.mark.slow
@pytest.mark.parametrize("model_type, strategy, init_args", [
    ("gpt2", "sparseft.strategies.PST", dict(sparsity=0.8, learning_rate=1e-2,
                                              schedule=dict(kind="cubic", initial_warmup=0.1, final_warmup=0.3))),
    ("llama", "sparseft.strategies.Magnitude", dict(sparsity=0.6, pattern="global",
                                                    schedule=dict(kind="cubic", initial_warmup=0.1, final_warmup=0.3))),
    ("llama", "sparseft.strategies.S2FT", dict(sparsity=0.75, allocation="layer", learning_rate=1e-2)),
    # 95% over the whole model selects no head at all: empty trainable slices, which FSDP2 cannot shard
    ("llama", "sparseft.strategies.S2FT", dict(sparsity=0.95, learning_rate=1e-2)),
    ("llama", "sparseft.strategies.Movement", dict(sparsity=0.5, pattern="2:4", schedule=dict(
        kind="cubic", initial_warmup=0.1, final_warmup=0.3))),
], ids=["gpt2-pst", "llama-magnitude-global", "llama-s2ft-gqa", "llama-s2ft-empty-slices", "llama-movement-2:4"])
def test_gpt2_and_llama_under_fsdp2_give_the_masks_and_weights_of_ddp(model_type, strategy, init_args, tmp_path):
    module_name, _, class_name = strategy.rpartition(".")
    strategy_class = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    check_fsdp2(strategy_class, init_args, tmp_path, model_type)


def two_process_fit(model_dir: Path, data_dir: Path, root: Path, strategy: str, *extra: str, devices: int = 2,
                    says: str | None = None) -> Path:
    """``sparseft fit`` on ``devices`` CPU processes under ``strategy``, in processes of its own (a process
    group started in the test process would hold its port for later tests); returns its ``last.ckpt``.
    ``says``: a line its output must contain."""
    args = [a for a in fit_args(model_dir, data_dir, root, *extra) if not a.startswith("--trainer.max_steps")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "sparseft", *args, "--trainer.max_steps=6",
                             f"--trainer.strategy={strategy}", f"--trainer.devices={devices}"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert says is None or says in result.stdout + result.stderr, f"no {says!r} in {result.stderr[-3000:]}"
    (last,) = root.rglob("last.ckpt")
    return last


@pytest.mark.slow
def test_export_and_report_of_a_sharded_checkpoint_are_the_ddp_runs(tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    ddp = two_process_fit(tiny_bert_dir, sst2_dir, tmp_path / "ddp", "ddp")
    # magnitude attaches to a backbone without weights: each rank reads its own rows of the checkpoint
    fsdp2 = two_process_fit(tiny_bert_dir, sst2_dir, tmp_path / "fsdp2", "fsdp2",
                            says="FSDP2 sharded loading: each process reads only its own shards")
    assert ddp.is_file() and is_sharded_checkpoint(fsdp2)
    inputs = {"input_ids": torch.tensor([[2, 17, 40, 99, 3], [2, 250, 31, 3, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}
    logits = {}
    for name, checkpoint in (("ddp", ddp), ("fsdp2", fsdp2)):
        for weight_format in ("dense", "compressed"):
            output = tmp_path / f"{name}-{weight_format}"
            main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={output}", f"--format={weight_format}"])
            model = AutoModelForSequenceClassification.from_pretrained(output, trust_remote_code=True).eval()
            with torch.no_grad():
                logits[name, weight_format] = model(**inputs).logits
    for key, value in logits.items():
        torch.testing.assert_close(value, logits["ddp", "dense"], rtol=0, atol=1e-5, msg=lambda text, key=key: f"{key}")
    reports = {name: report_command([str(checkpoint), f"--output_dir={tmp_path / name}-report"])
               for name, checkpoint in (("ddp", ddp), ("fsdp2", fsdp2))}
    assert reports["fsdp2"]["table"] == reports["ddp"]["table"].replace(str(ddp), str(fsdp2))
    assert "50.00%" in reports["fsdp2"]["table"]


@pytest.mark.slow
def test_s2ft_adapter_of_a_sharded_checkpoint_is_the_ddp_runs(tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    s2ft = ["--sparsity=s2ft", "--sparsity.sparsity=0.75", "--sparsity.allocation=layer"]
    adapters = {}
    for name in ("ddp", "fsdp2"):  # the seeded random selection reads shapes: each rank reads its own rows
        says = "FSDP2 sharded loading: each process reads only its own shards" if name == "fsdp2" else None
        checkpoint = two_process_fit(tiny_bert_dir, sst2_dir, tmp_path / name, name, *s2ft, says=says)
        adapter = tmp_path / f"{name}.safetensors"
        main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / name}-export",
              f"--adapter_path={adapter}"])
        adapters[name] = load_file(adapter)
    assert adapters["ddp"].keys() == adapters["fsdp2"].keys() and adapters["ddp"]
    for key, value in adapters["ddp"].items():
        torch.testing.assert_close(adapters["fsdp2"][key], value, rtol=0, atol=1e-5, msg=lambda text, key=key: key)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_fsdp2_trains_in_bf16(precision, tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    """Both bf16 precisions train under FSDP2 and reach the masks' target (every rank checkpoints the same
    masks: they are buffers, written whole)."""
    checkpoint = two_process_fit(tiny_bert_dir, sst2_dir, tmp_path, "fsdp2", f"--trainer.precision={precision}")
    state = load_checkpoint(checkpoint)["state_dict"]
    masks = [value for value in state.values() if value.dtype == torch.bool]
    assert len(masks) == 12 and all((~mask).float().mean().item() == 0.5 for mask in masks)
    weights = [value for key, value in state.items() if key.endswith("parametrizations.weight.original")]
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert weights and all(weight.dtype == expected for weight in weights)


def test_a_sharded_checkpoint_outside_fsdp2_is_refused_with_what_works(tiny_bert_dir, sst2_dir, tmp_path, capsys):  # noqa: F811
    """One process under fsdp2 writes a sharded checkpoint too; DDP or one device cannot read it."""
    checkpoint = two_process_fit(tiny_bert_dir, sst2_dir, tmp_path / "run", "fsdp2", devices=1)
    assert is_sharded_checkpoint(checkpoint)
    for command, advice in (("fit", "resume it with --trainer.strategy fsdp2 and as many processes as wrote it"),
                            ("validate", "python -m lightning.fabric.utilities.consolidate_checkpoint")):
        args = [command, *fit_args(tiny_bert_dir, sst2_dir, tmp_path / command)[1:], f"--ckpt_path={checkpoint}"]
        with pytest.raises(SystemExit):
            main(args)
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sparseft: error:")]
        assert "is a sharded checkpoint (written under fsdp2)" in line and advice in line
        assert not (tmp_path / command).exists(), "nothing may be written before the refusal"


@pytest.mark.slow
def test_fsdp2_mixed_precision_computes_in_bf16_and_keeps_float32_shards(tiny_bert_dir, sst2_dir, tmp_path):  # noqa: F811
    """``param_dtype: bfloat16`` (FSDP2's MixedPrecisionPolicy, float32 gradient reduction): the masks reach
    their target exactly, the trained shards stay float32, and the weights are not the float32 run's (the
    forward and backward ran in bfloat16) while staying close to them."""
    runs = {}
    for name, init_args in (("fp32", {}), ("bf16", {"param_dtype": "bfloat16"})):
        strategy = json.dumps({"class_path": "sparseft.training.sharding.FSDP2Strategy", "init_args": init_args})
        runs[name] = load_checkpoint(two_process_fit(tiny_bert_dir, sst2_dir, tmp_path / name, strategy))["state_dict"]
    masks = [key for key, value in runs["bf16"].items() if value.dtype == torch.bool]
    assert len(masks) == 12 and all((~runs["bf16"][key]).float().mean().item() == 0.5 for key in masks)
    weights = [key for key in runs["bf16"] if key.endswith("parametrizations.weight.original")]
    assert all(runs["bf16"][key].dtype == torch.float32 for key in weights)
    differences = [(runs["bf16"][key] - runs["fp32"][key]).abs().max().item() for key in weights]
    assert max(differences) > 0 and max(differences) < 0.05


def test_fsdp2_reduce_dtype_needs_a_param_dtype():
    with pytest.raises(ValueError, match="reduce_dtype needs --trainer.strategy.param_dtype"):
        FSDP2Strategy(reduce_dtype="float32")
    policy = FSDP2Strategy(param_dtype="bfloat16").mp_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
