"""Backbones: Hugging Face models and tokenizers for a task, from the hub, a directory, a ``pkg:``
name, a config dict (random initialisation) or a GGUF file."""

from sparseft.backbones.loading import Task, build_config, load_backbone, load_tokenizer

__all__ = ["Task", "build_config", "load_backbone", "load_tokenizer"]
