"""Compressed exports: the bitmask layout, and the round trip through both loaders to identical logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from sparseft.backbones.loading import load_backbone
from sparseft.cli.command import run_command
from sparseft.export.compressed import REMOTE_CODE_FILE, check_weight_format, load_compressed
from sparseft.export.compressed_modeling import (
    DIGESTS_KEY,
    SHAPES_KEY,
    WEIGHTS_FILE,
    decode_state_dict,
    encode_state_dict,
    pack_bitmask,
    read_metadata,
    unpack_bitmask,
)
from sparseft.export.pretrained import export_pretrained
from sparseft.sparse.prune import prune_, sparsify
from sparseft.testing import make_tiny_tokenizer, tiny_config
from sparseft.testing.isolated import python_without_sparseft, run_without_sparseft
from sparseft.training.module import SparseFTModule

TASKS = {"bert": "sequence-classification", "gpt2": "causal-lm", "llama": "causal-lm"}
AUTO = {"sequence-classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM}
PATTERNS = {"unstructured": ("layer", 0.9), "2:4": ("2:4", 0.5)}


def pruned_tiny(model_type: str, pattern: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"pad_token_id": 0} if model_type != "bert" else {}
    model = load_backbone(TASKS[model_type], config=tiny_config(model_type, **extra), num_labels=2).eval()
    layers = sparsify(model)
    scope, sparsity = PATTERNS[pattern]
    prune_(layers, [layer.dense().abs() for layer in layers], sparsity, pattern=scope)
    return model


def test_bitmask_is_numpy_packbits_little_endian_and_unpacks_back():
    keep = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) > 0.6  # 35 bits: a padded last byte
    packed = pack_bitmask(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == 5
    assert np.array_equal(packed.numpy(), np.packbits(keep.numpy().ravel(), bitorder="little"))
    assert torch.equal(unpack_bitmask(packed, keep.numel()).view(5, 7), keep)


def test_only_tensors_that_get_smaller_are_compressed_and_decoding_restores_them():
    sparse = torch.tensor([[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]])
    dense = torch.arange(1.0, 9.0).view(2, 4)
    ids = torch.zeros(3, dtype=torch.long)
    tensors, metadata = encode_state_dict({"a.weight": sparse, "b.weight": dense, "ids": ids})
    assert json.loads(metadata[SHAPES_KEY]) == {"a.weight": [2, 4]}
    assert torch.equal(tensors["a.weight.values"], torch.tensor([1.5, -2.0]))
    assert set(tensors) == {"a.weight.bitmask", "a.weight.values", "b.weight", "ids"}
    decoded = decode_state_dict(dict(tensors), metadata)
    assert torch.equal(decoded["a.weight"], sparse) and torch.equal(decoded["b.weight"], dense)


def test_decoding_refuses_a_foreign_or_corrupt_file():
    tensors, metadata = encode_state_dict({"w": torch.tensor([0.0, 0.0, 0.0, 3.0])})
    with pytest.raises(ValueError, match="not a sparseft compressed weight file"):
        decode_state_dict(dict(tensors), {"format": "pt"})
    tensors["w.values"] = torch.tensor([3.0, 4.0])
    with pytest.raises(ValueError, match="corrupt compressed tensor w"):
        decode_state_dict(tensors, metadata)


def _flip_four_bits(tensors: dict, metadata: dict, name: str) -> None:
    """XOR 4 bits of a byte, 2 of them set and 2 clear: the set-bit count is unchanged."""
    bitmask = tensors[f"{name}.bitmask"]
    index = next(i for i, byte in enumerate(bitmask.tolist()) if bin(byte & 0b00111100).count("1") == 2)
    bitmask[index] ^= 0b00111100


def _move_a_kept_bit(tensors: dict, metadata: dict, name: str) -> None:
    """Clear one set bit and set one clear bit of the same byte."""
    bitmask = tensors[f"{name}.bitmask"]
    index = next(i for i, byte in enumerate(bitmask.tolist()) if 0 < byte < 255)
    byte = int(bitmask[index])
    low_set = byte & -byte
    low_clear = ~byte & (byte + 1)
    bitmask[index] = byte ^ low_set ^ low_clear


def _values_as_float16(tensors: dict, metadata: dict, name: str) -> None:
    tensors[f"{name}.values"] = tensors[f"{name}.values"].half()


def _name_removed_from_shapes(tensors: dict, metadata: dict, name: str) -> None:
    shapes = json.loads(metadata[SHAPES_KEY])
    del shapes[name]
    metadata[SHAPES_KEY] = json.dumps(shapes)


CORRUPTIONS = {"4 bits XOR'd": (_flip_four_bits, "its bytes differ"), "kept bit moved": (_move_a_kept_bit, "bytes"),
               "values as float16": (_values_as_float16, "stored as float16, exported as float32"),
               "name removed from shapes": (_name_removed_from_shapes, SHAPES_KEY)}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corruptions_that_keep_the_bit_count_are_refused_by_both_loaders(corruption, tmp_path):
    """Each corruption keeps the mask's set-bit count equal to the number of values, so only the
    per-tensor digest, the dtype check or the refusal of leftover entries can find it."""
    export_pretrained(pruned_tiny("bert", "unstructured"), tmp_path, weight_format="compressed")
    path = tmp_path / WEIGHTS_FILE
    tensors, metadata = load_file(path), read_metadata(str(path))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    corrupt, words = CORRUPTIONS[corruption]
    corrupt(tensors, metadata, name)
    save_file(tensors, path, metadata=metadata)
    remote = AutoModelForSequenceClassification.from_pretrained
    for load in (load_compressed, lambda path: remote(path, trust_remote_code=True)):
        with pytest.raises(ValueError, match=f"corrupt compressed tensor {name}: .*{words}"):
            load(tmp_path)


def test_an_export_without_digests_still_loads_and_keeps_the_checks_that_need_none():
    sparse = torch.tensor([[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, -2.0, 0.0]])
    tensors, metadata = encode_state_dict({"a.weight": sparse})
    del metadata[DIGESTS_KEY]  # as exports written before the digests
    assert torch.equal(decode_state_dict(dict(tensors), metadata)["a.weight"], sparse)
    with pytest.raises(ValueError, match="corrupt compressed tensor a.weight: values are torch.int64"):
        decode_state_dict({**tensors, "a.weight.values": torch.tensor([1, 2])}, metadata)
    with pytest.raises(ValueError, match=f"corrupt compressed tensor a.weight: .*not in {SHAPES_KEY}"):
        decode_state_dict(dict(tensors), {**metadata, SHAPES_KEY: "{}"})


def test_compressing_a_model_with_nothing_sparse_is_refused_before_writing(tmp_path):
    torch.manual_seed(0)
    dense = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    with pytest.raises(ValueError, match="nothing would be compressed.*use --format dense"):
        export_pretrained(dense, tmp_path / "out", weight_format="compressed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("model_type", list(TASKS))
def test_compressed_export_reloads_to_identical_logits_with_both_loaders(model_type, pattern, tmp_path):
    model = pruned_tiny(model_type, pattern)
    inputs = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
    report = export_pretrained(model, tmp_path, weight_format="compressed")
    assert report["weights"]["bytes"] < report["weights"]["dense_bytes"]
    targets = [layer for layer in report["layers"] if layer["role"]]
    assert report["weights"]["compressed_tensors"] >= len(targets)
    assert (tmp_path / WEIGHTS_FILE).exists() and (tmp_path / REMOTE_CODE_FILE).exists()
    assert not (tmp_path / "model.safetensors").exists()

    auto = AUTO[TASKS[model_type]]
    remote = auto.from_pretrained(tmp_path, trust_remote_code=True).eval()
    native = load_compressed(tmp_path).eval()
    assert type(native) is type(model) and isinstance(remote, type(model))
    with torch.no_grad():
        assert torch.equal(remote(input_ids=inputs).logits, expected)
        assert torch.equal(native(input_ids=inputs).logits, expected)
    weights = dict(native.named_parameters())
    for layer in targets:
        assert int(weights[f"{layer['name']}.weight"].count_nonzero()) == layer["nonzero"]
    with pytest.raises(OSError, match="model.safetensors"):
        type(native).from_pretrained(tmp_path)  # without the remote code nothing half-loads


def test_a_dense_resave_of_a_loaded_compressed_model_still_loads(tmp_path):
    model = pruned_tiny("bert", "unstructured")
    export_pretrained(model, tmp_path / "compressed", weight_format="compressed")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "compressed", trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "resaved")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "resaved", trust_remote_code=True)
    for (name, expected), actual in zip(loaded.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(expected, actual), name
    with pytest.raises(ValueError, match="not a compressed export"):
        load_compressed(tmp_path / "resaved")


def test_both_loaders_pass_from_pretrained_options_through(tmp_path):
    model = pruned_tiny("bert", "2:4")
    export_pretrained(model, tmp_path, weight_format="compressed")
    remote = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float16)
    native = load_compressed(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in remote.parameters()} == {torch.float16}
    assert {p.dtype for p in native.parameters()} == {torch.bfloat16}
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(remote.state_dict()[query], model.state_dict()[query].half())


WITHOUT_SPARSEFT = """
import json, re
import torch
from transformers import AutoModel, pipeline

for directory, tolerance in json.loads(EXPORTS).items():
    card = open(f"{directory}/README.md").read()
    exec(re.search(r"```python\\n(.*?)```", card, re.S).group(1), {})  # the card's own snippet
    expected = torch.load(f"{directory}.pt")
    model = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()  # the base model, as a dense export
    with torch.no_grad():
        hidden = model(input_ids=expected["inputs"]).last_hidden_state
    torch.testing.assert_close(hidden, expected["hidden"], atol=tolerance, rtol=0)
    features = pipeline("feature-extraction", model=directory, trust_remote_code=True)("a sentence")
    print(type(model).__name__, torch.tensor(features).shape[-1])
"""


def test_every_export_needing_remote_code_loads_by_its_card_automodel_and_feature_extraction_without_sparseft(
    tmp_path,
):
    from tests.test_shrink import masked_model

    exports = {"bert-2-4": (pruned_tiny("bert", "2:4"), "wordpiece", "compressed", False, 0.0),
               "gpt2-unstructured": (pruned_tiny("gpt2", "unstructured"), "bpe", "compressed", False, 0.0),
               "bert-heads-shrunk": (masked_model("bert")[0], "wordpiece", "dense", True, 1e-6)}
    inputs = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(1))
    for name, (model, tokenizer, weight_format, shrink, _) in exports.items():
        export_pretrained(model, tmp_path / name, make_tiny_tokenizer(tokenizer), weight_format=weight_format,
                          shrink=shrink)
        with torch.no_grad():
            hidden = model.base_model(input_ids=inputs).last_hidden_state
        torch.save({"inputs": inputs, "hidden": hidden}, tmp_path / f"{name}.pt")
        assert "trust_remote_code=True" in (tmp_path / name / "README.md").read_text()
    directories = json.dumps({str(tmp_path / name): tolerance for name, (*_, tolerance) in exports.items()})
    python_without_sparseft(tmp_path / "venv")
    out = run_without_sparseft(f"EXPORTS = {directories!r}\n{WITHOUT_SPARSEFT}", tmp_path / "venv").splitlines()
    assert out == ["CompressedBertModel 32", "CompressedGPT2Model 32", "ResizedBertModel 32"]


def test_unknown_formats_and_compressing_a_shrunk_export_are_refused():
    with pytest.raises(ValueError, match="unknown export format 'zip'"):
        check_weight_format("zip", shrink=False)
    with pytest.raises(ValueError, match="use --format dense"):
        check_weight_format("compressed", shrink=True)


@pytest.mark.slow
def test_cli_export_format_compressed(tiny_bert_dir, tmp_path):
    from tests.test_cli import SENTENCES, fit_args, last_checkpoint

    data = tmp_path / "sst2"
    data.mkdir()
    rows = "".join(f"{text}\t{label}\n" for text, label in SENTENCES * 4)
    for split in ("train", "dev"):
        (data / f"{split}.tsv").write_text("sentence\tlabel\n" + rows)
    run_command(fit_args(tiny_bert_dir, data, tmp_path / "run"))
    ckpt = last_checkpoint(tmp_path / "run")
    module, _ = SparseFTModule.from_sparseft_checkpoint(ckpt)
    inputs = torch.randint(5, 300, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = module.model(input_ids=inputs).logits
    run_command(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'out'}", "--format=compressed"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["weights"]["format"] == "compressed" and report["target_sparsity"] == pytest.approx(0.5)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=inputs).logits, expected)
