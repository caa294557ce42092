"""Turn a GGUF file into a cached, plain Hugging Face model directory.

A GGUF file (llama.cpp's format, often 4- or 8-bit quantized) holds the weights, the config and
the tokenizer of a decoder model. transformers reads it with ``from_pretrained(dir,
gguf_file=name)`` once ``gguf`` and ``accelerate`` are installed (``pip install
'sparseft[gguf]'``), and dequantizes every weight to **float32**: sparse fine-tuning trains and
masks dense weights, so the quantized blocks are not kept. Reading the file takes from half a
minute to two minutes (most of it parsing the tokenizer's metadata), so it is done once:

* the model and its tokenizer are saved to ``<cache>/<file stem>-<first 16 hex of the file's
  SHA-256>``, a normal directory that ``from_pretrained`` loads in about a second, with no
  ``gguf`` or ``accelerate`` needed any more;
* ``<cache>`` is the ``cache_dir`` argument, else ``$SPARSEFT_GGUF_CACHE``, else
  ``$XDG_CACHE_HOME/sparseft/gguf`` (``~/.cache/sparseft/gguf``);
* the directory is written to a temporary sibling and renamed into place, so a killed
  conversion never leaves a half cache; concurrent conversions (DDP ranks) race harmlessly:
  the first rename wins and the others use it. Temporary directories a kill left behind are
  removed by the next conversion after a day.

Naming a GGUF file (hub, local path or ``pkg:``) is :mod:`sparseft.backbones.loading`'s job; this module
starts from a local file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

GGUF_SUFFIX = ".gguf"
EXTRAS = ("gguf", "accelerate")
CACHE_ENV = "SPARSEFT_GGUF_CACHE"
MARKER = "sparseft_gguf.json"
STALE_SECONDS = 24 * 3600

logger = logging.getLogger(__name__)
_digests: dict[tuple[str, int, int], str] = {}


def is_gguf(name_or_path: str) -> bool:
    """True when a backbone name points at a GGUF file (by its ``.gguf`` suffix)."""
    return name_or_path.lower().endswith(GGUF_SUFFIX)


def default_cache_dir() -> Path:
    """``$SPARSEFT_GGUF_CACHE``, else ``$XDG_CACHE_HOME/sparseft/gguf`` (``~/.cache/sparseft/gguf``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sparseft" / "gguf"


def file_digest(path: Path) -> str:
    """SHA-256 of a file (hex), remembered per (path, size, mtime) within the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def cache_path(gguf_file: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the converted directory of ``gguf_file`` lives (whether or not it exists yet)."""
    path = Path(gguf_file)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{path.stem}-{file_digest(path)[:16]}"


def missing_extras() -> list[str]:
    """The packages of the ``gguf`` extra that cannot be imported."""
    missing = []
    for name in EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def gguf_to_pretrained(gguf_file: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached HF directory (model + tokenizer, float32) of a local GGUF file; converts it once.

    Args:
        gguf_file: path of a ``.gguf`` file on this machine.
        cache_dir: parent of the converted directories; None: :func:`default_cache_dir`.
    """
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    target = cache_path(path, cache_dir)
    if (target / MARKER).is_file():
        return target
    missing = missing_extras()
    if missing:
        raise ImportError(
            f"converting {path.name} needs the package(s) {', '.join(missing)}: pip install 'sparseft[gguf]'"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target.parent)
    if target.exists() and not (target / MARKER).is_file():  # not written by our rename: replace it
        shutil.rmtree(target, ignore_errors=True)
    _convert(path, target)
    return target


def _convert(path: Path, target: Path) -> None:
    """Dequantize into a temporary sibling of ``target``, then rename it into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, __version__

    logger.warning("converting %s to a float32 model directory %s (once; later loads read it)", path, target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, **_dequantize_kwargs()
        )
        if getattr(model, "hf_quantizer", None) is not None:  # a plain dense model from here on
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": str(path.resolve()), "sha256": file_digest(path), "dtype": "float32",
                  "transformers": __version__, "seconds": round(time.perf_counter() - start, 1)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        _make_public(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER).is_file():  # not another process's finished conversion
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_public(directory: Path) -> None:
    """The permissions of a normal directory (mkdtemp and safetensors create private ones)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _dequantize_kwargs() -> dict[str, object]:
    """Ask transformers for dense weights even where it could keep GGUF blocks (transformers 5)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4 always dequantizes
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _remove_stale_temporaries(root: Path) -> None:
    """Delete temporary directories that a killed conversion left behind more than a day ago."""
    for tmp in root.glob(".*.tmp-*"):
        try:
            if tmp.is_dir() and time.time() - tmp.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue
