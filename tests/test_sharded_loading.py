"""Sharded loading: a backbone built without weights (meta device) and read from its checkpoint piece by piece.

The two-process runs (FSDP2, each rank reading only its rows) are in the conformance suite's FSDP2 check
(``fsdp2-loaded``, every strategy that attaches to a backbone without weights) and in tests/test_fsdp2.py; here,
in one process: the reading itself against ``from_pretrained``, the new-head and key-prefix cases, the
refusal of a strategy that reads weights when it attaches, and the CLI's choice.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import save_file
from transformers import AutoModel

from sparseft.backbones.empty import CheckpointTensors
from sparseft.backbones.loading import build_config, load_backbone
from sparseft.cli.checks import whole_backbone_reason
from sparseft.sparse.sharding import has_meta_parameters
from sparseft.strategies import build_strategy
from sparseft.testing import SyntheticClassificationData, make_tiny_model_dir, tiny_config
from sparseft.training.module import SparseFTModule
from sparseft.training.sharding import load_weights_, sharded_loading


def loaded_empty(task: str, directory: Path, num_labels: int = 2) -> tuple[torch.nn.Module, list[str]]:
    model = load_backbone(task, str(directory), num_labels=num_labels, empty=True)
    assert has_meta_parameters(model)
    return model, load_weights_(model, directory)


@pytest.mark.parametrize(("model_type", "task"), [("bert", "sequence-classification"), ("llama", "causal-lm"),
                                                  ("gpt2", "causal-lm")])
@pytest.mark.parametrize("files", ["safetensors", "safetensors-index", "pickle"])
def test_an_empty_backbone_read_from_its_checkpoint_is_from_pretrained(model_type, task, files, tmp_path):
    directory = make_tiny_model_dir(tmp_path / "model", model_type, task)
    if files != "safetensors":
        model = load_backbone(task, str(directory))
        (directory / "model.safetensors").unlink()
        if files == "pickle":  # pytorch_model.bin, memory-mapped when read
            torch.save(model.state_dict(), directory / "pytorch_model.bin")
        else:  # several files and model.safetensors.index.json, as large checkpoints are saved
            model.save_pretrained(directory, max_shard_size="20KB")
            assert len(list(directory.glob("model-*.safetensors"))) > 1
    reference = load_backbone(task, str(directory))
    model, new = loaded_empty(task, directory)
    assert new == [] and not has_meta_parameters(model)
    expected, state = reference.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    ids = torch.randint(0, 100, (2, 7))
    assert torch.equal(model.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


def tied_llama_dir(path: Path) -> Path:
    directory = make_tiny_model_dir(path, "llama", "causal-lm")
    config = build_config({**tiny_config("llama"), "tie_word_embeddings": True}, "causal-lm", None)
    (directory / "model.safetensors").unlink()
    load_backbone("causal-lm", config=config).save_pretrained(directory)  # one stored tensor for both
    return directory


def test_tied_embeddings_stay_one_parameter_read_once(tmp_path):
    directory = tied_llama_dir(tmp_path / "model")
    reference = load_backbone("causal-lm", str(directory))
    model, new = loaded_empty("causal-lm", directory)
    assert new == [] and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_a_checkpoint_storing_both_of_two_tied_tensors_is_refused(tmp_path):
    """from_pretrained unties them when their values differ; reading one into both would be silently wrong."""
    directory = tied_llama_dir(tmp_path / "model")
    state = load_backbone("causal-lm", str(directory)).state_dict()
    save_file({**state, "lm_head.weight": torch.zeros_like(state["lm_head.weight"])}, directory / "model.safetensors")
    model = load_backbone("causal-lm", str(directory), empty=True)
    with pytest.raises(ValueError, match="stores lm_head.weight and model.embed_tokens.weight with different values"):
        load_weights_(model, directory)


def test_a_base_model_checkpoint_fills_the_task_model_and_its_new_head_is_initialised(tmp_path):
    """A ``BertModel`` checkpoint (keys without ``bert.``, as the MiniLM package ships) under a classification
    model: every backbone weight read, the head new (normal(0, initializer_range) weight, zero bias), named."""
    directory = make_tiny_model_dir(tmp_path / "model", "bert")
    AutoModel.from_pretrained(directory).save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text((directory / "config.json").read_text())
    torch.manual_seed(3)
    model, new = loaded_empty("sequence-classification", tmp_path / "base", num_labels=3)
    assert sorted(new) == ["classifier.bias", "classifier.weight"]
    base = AutoModel.from_pretrained(tmp_path / "base").state_dict()
    state = model.state_dict()
    for key, value in base.items():
        assert torch.equal(state[f"bert.{key}"], value), key
    head = state["classifier.weight"]
    assert head.shape == (3, model.config.hidden_size) and torch.equal(state["classifier.bias"], torch.zeros(3))
    assert 0.5 * model.config.initializer_range < head.std() < 2 * model.config.initializer_range
    torch.manual_seed(3)  # the same seed draws the same head in every process
    assert torch.equal(loaded_empty("sequence-classification", tmp_path / "base", num_labels=3)[0]
                       .state_dict()["classifier.weight"], head)


def test_reading_rows_reads_the_rows(tmp_path):
    directory = make_tiny_model_dir(tmp_path / "model", "llama", "causal-lm")
    whole = load_backbone("causal-lm", str(directory)).state_dict()
    key = "model.layers.1.mlp.up_proj.weight"
    with CheckpointTensors(directory) as checkpoint:
        assert checkpoint.shape(key) == tuple(whole[key].shape)
        assert torch.equal(checkpoint.read(key, (slice(3, 9),)), whole[key][3:9])
        assert checkpoint.key_of("model.layers.1.mlp.up_proj.parametrizations.weight.original", "model") == key


def test_a_module_built_without_weights_trains_as_the_loaded_one_in_one_process(tmp_path):
    """Outside FSDP2, ``configure_model`` reads the whole tensors: the same run, bit for bit."""
    directory = make_tiny_model_dir(tmp_path / "model", "bert")
    states = []
    for empty in (False, True):
        with sharded_loading() if empty else torch.device("cpu"):
            module = SparseFTModule(backbone=str(directory), num_labels=2, learning_rate=1e-2)
        torch.manual_seed(0)
        strategy = build_strategy({"name": "magnitude", "init_args": {"sparsity": 0.5}})
        trainer = Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, callbacks=[strategy],
                          limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, SyntheticClassificationData(size=12))
        states.append(module.model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key


@pytest.mark.parametrize(("name", "init_args"), [("dsee", {}), ("spdf", {"init": "magnitude"}),
                                              ("s2ft", {"criterion": "weight"})])
def test_a_strategy_that_reads_weights_when_it_attaches_refuses_a_module_without_them(name, init_args, tiny_bert_dir):
    with sharded_loading():
        module = SparseFTModule(backbone=str(tiny_bert_dir), num_labels=2)
    strategy = build_strategy({"name": name, "init_args": {"sparsity": 0.5, **init_args}})
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[strategy])
    with pytest.raises(ValueError, match=f"sparsity strategy '{name}' reads the backbone's weights when it attaches"):
        trainer.fit(module, SyntheticClassificationData(size=4))


def test_the_cli_loads_shards_under_fsdp2_unless_the_strategy_reads_weights_when_it_attaches():
    def sparsity(name: str, **init_args: str) -> dict[str, object]:
        return {"class_path": f"sparseft.strategies.{name}", "init_args": init_args}

    assert whole_backbone_reason("fsdp2", None) is None
    assert whole_backbone_reason("fsdp2", sparsity("Magnitude")) is None
    assert whole_backbone_reason("lightning.pytorch.strategies.ModelParallelStrategy", sparsity("LoRA")) is None
    assert whole_backbone_reason("fsdp2", sparsity("S2FT")) is None  # the seeded random selection
    assert whole_backbone_reason("fsdp2", sparsity("S2FT", criterion="activation")) == (
        "sparsity strategy S2FT reads the backbone's weights when it attaches")
    assert whole_backbone_reason("fsdp2", sparsity("DSEE")) == (
        "sparsity strategy DSEE reads the backbone's weights when it attaches")
    assert whole_backbone_reason("fsdp2", sparsity("SPDF")) is None  # random static masks
    assert whole_backbone_reason("fsdp2", sparsity("SPDF", init="magnitude")) is not None
    assert whole_backbone_reason("ddp", sparsity("Magnitude")) == "not sharded"


def test_a_truncated_safetensors_file_is_named(tmp_path):
    directory = make_tiny_model_dir(tmp_path / "model", "bert")
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    model = load_backbone("sequence-classification", str(directory), num_labels=2, empty=True)
    with pytest.raises(ValueError, match="model.safetensors: the file ends inside a tensor"):
        load_weights_(model, directory)


def test_movements_constant_scores_are_born_without_storage_and_set_once_loaded(tiny_bert_dir):
    """No process holds movement's scores whole (as large as the weights): created on the meta device with
    the backbone, sharded, then set to their constant start; a random start stays real (drawn as before)."""
    with sharded_loading():
        module = SparseFTModule(backbone=str(tiny_bert_dir), num_labels=2)
    movement = build_strategy({"name": "movement", "init_args": {"sparsity": 0.5, "score_init_scale": 0.25}})
    layers = movement.attach(module.model)
    assert all(layer.param.score.scores.is_meta for layer in layers)
    load_weights_(module.model, tiny_bert_dir)
    assert all(torch.equal(layer.param.score.scores, torch.full(layer.mask.shape, 0.25)) for layer in layers)
    with sharded_loading():
        module = SparseFTModule(backbone=str(tiny_bert_dir), num_labels=2)
    uniform = build_strategy({"name": "movement", "init_args": {"sparsity": 0.5, "score_init": "uniform",
                                                                 "score_init_scale": 0.25}})
    assert not any(layer.param.score.scores.is_meta for layer in uniform.attach(module.model))


def test_a_backbone_weight_missing_from_the_checkpoint_is_refused_not_drawn(tmp_path):
    """Only a new task head may start at random; a backbone weight the file lacks (a renamed key) is refused."""
    directory = make_tiny_model_dir(tmp_path / "model", "bert")
    state = load_backbone("sequence-classification", str(directory), num_labels=2).state_dict()
    state.pop("bert.encoder.layer.1.attention.self.query.weight")
    save_file(state, directory / "model.safetensors")
    model = load_backbone("sequence-classification", str(directory), num_labels=2, empty=True)
    with pytest.raises(ValueError, match="no tensor for the backbone weight bert.encoder.layer.1.attention.self"):
        load_weights_(model, directory)
