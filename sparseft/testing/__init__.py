"""Tiny random models and locally trained tokenizers for tests and offline examples.

Nothing here touches a hub: a tokenizer is trained in well under a second on a built-in
corpus, a model is built from a config dict with random weights, and both are saved to a
directory that every sparseft entry point accepts as ``backbone``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import Accuracy
from transformers import PreTrainedTokenizerFast

# TINY_BPE: the byte-level BPE of make_tiny_tokenizer("bpe"), shipped as files inside the package so that configs
# name it (model.tokenizer: pkg:sparseft/testing/tiny-bpe) with no set-up step and no hub; a test checks it is
# what make_tiny_tokenizer builds
from sparseft.backbones.loading import TINY_BPE as TINY_BPE
from sparseft.backbones.loading import build_config, load_backbone
from sparseft.datamodules.order import TrainingOrder
from sparseft.sparse.parametrize import sparse_layers

_CORPUS = """
the movie was a delight from start to finish and the actors were great
a dull , lifeless film with no story and bad acting
it is not good but it is not bad either
what a wonderful , moving and funny picture
the plot makes no sense and the ending is terrible
one of the best films of the year , full of heart
question : who wrote the book ? answer : the author wrote it in paris in 1900
the restaurant serves cheap italian food near the city centre and is family friendly
name [ the eagle ] eattype [ coffee shop ] food [ french ] pricerange [ high ] area [ riverside ]
""".strip().splitlines()

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": dict(
        model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    ),
    "roberta": dict(
        model_type="roberta", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=130, pad_token_id=1,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0),
    "llama": dict(
        model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
    ),
}


def _wordpiece_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _byte_bpe_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


#: a ChatML template (SmolLM2's, Qwen's) without a default system turn
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: the chat tokenizer's whole vocabulary, id = position: ids can be written down by hand in tests
CHAT_VOCAB = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "\n", "user", "assistant", "system", "name", "[", "]",
              "aromi", "the", "eagle", "is", "a", "cheap", "french", "restaurant", ".", ",", "food", "[UNK]"]


def _chat_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-cased words, punctuation and newlines, one token each (no merges); ChatML's markers special,
    ``<|im_end|>`` the EOS (as SmolLM2-Instruct)."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(CHAT_VOCAB)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True)
    tokenizer.add_special_tokens(CHAT_VOCAB[:3])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]",
        chat_template=CHATML_TEMPLATE,
    )


def make_tiny_tokenizer(kind: str = "wordpiece", corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A small tokenizer: ``wordpiece`` (BERT-style) or ``bpe`` (GPT-2-style byte-level), trained on
    ``corpus``; or ``chat``: a fixed word-level vocabulary (:data:`CHAT_VOCAB`) with a ChatML chat template."""
    corpus = corpus or _CORPUS
    if kind == "wordpiece":
        return _wordpiece_tokenizer(corpus)
    if kind == "bpe":
        return _byte_bpe_tokenizer(corpus)
    if kind == "chat":
        return _chat_tokenizer()
    raise ValueError(f"unknown tokenizer kind {kind!r}; use 'wordpiece', 'bpe' or 'chat'")


def tiny_config(model_type: str = "bert", **overrides: Any) -> dict[str, Any]:
    """A config dict for a 2-layer model with hidden size 32, vocabulary 400."""
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; choose one of {sorted(TINY_CONFIGS)}")
    return {**TINY_CONFIGS[model_type], "vocab_size": 400, **overrides}


def make_tiny_model_dir(
    path: str | Path, model_type: str = "bert", task: str = "sequence-classification", num_labels: int = 2,
    tokenizer_kind: str | None = None,
) -> Path:
    """Save a random tiny model with a matching tokenizer (``tokenizer_kind``: a :func:`make_tiny_tokenizer`
    kind; default ``bpe`` for decoders, ``wordpiece`` otherwise) to ``path`` and return it."""
    path = Path(path)
    tokenizer = make_tiny_tokenizer(tokenizer_kind or ("bpe" if model_type in ("gpt2", "llama") else "wordpiece"))
    config = tiny_config(model_type)
    for special in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, special) is not None:
            config[special] = getattr(tokenizer, special)
    model = load_backbone(task, config=build_config(config, task, num_labels), num_labels=num_labels)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class SyntheticClassificationData(LightningDataModule):
    """A learnable toy task on random token ids: is token 5 more frequent than token 6?

    No tokenizer and no files: fast, deterministic (seeded data; fixed order, or with ``shuffle``
    the text datamodules' resumable per-epoch order) batches for strategy tests that need real
    gradient signal. Exposes the same task interface as the text datamodules (``num_labels``,
    ``task_type``, ``val_names``, ``build_metrics``).
    """

    num_labels = 2
    task_type = "sequence-classification"
    val_names = ["validation"]

    def __init__(
        self, size: int = 64, seq_len: int = 12, vocab_size: int = 400, batch_size: int = 8, seed: int = 0,
        shuffle: bool = False,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(7, vocab_size, (size, seq_len), generator=generator)
        ids[:, 1:5] = torch.randint(5, 7, (size, 4), generator=generator)
        labels = ((ids == 5).sum(1) > (ids == 6).sum(1)).long()
        self.examples = [
            {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": label}
            for row, label in zip(ids, labels)
        ]
        self.batch_size, self.shuffle = batch_size, shuffle
        self.training_order = TrainingOrder(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"training_order": self.training_order.state_dict(self.trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.training_order.load_state_dict(state_dict.get("training_order"), self.trainer)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"accuracy": Accuracy(task="multiclass", num_classes=2)})

    def _loader(self) -> DataLoader:
        return DataLoader(self.examples, batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        if not self.shuffle:
            return self._loader()
        sampler = self.training_order.sampler(len(self.examples), self.batch_size, self.trainer)
        return DataLoader(self.examples, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader()


class MaskDigest(Callback):
    """Write a SHA-256 of every sparsity mask to ``<directory>/masks-rank<r>.txt`` when training ends.

    Used to check that all DDP ranks hold identical masks.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        masks = ((sparse.name, sparse.mask) for sparse in sparse_layers(pl_module.model))
        _write_digest(Path(self.directory) / f"masks-rank{trainer.global_rank}.txt", masks)


class ParameterDigest(Callback):
    """Write a SHA-256 of every parameter of the model to ``<directory>/weights-rank<r>.txt`` when
    training ends: all DDP ranks must hold bitwise identical weights.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _write_digest(Path(self.directory) / f"weights-rank{trainer.global_rank}.txt",
                      pl_module.model.named_parameters())


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (hex) of the names and bytes of whole ``tensors``, in order: what :class:`MaskDigest` and
    :class:`ParameterDigest` write, so a test can compare a checkpoint's tensors with a rank's."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _write_digest(path: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """:func:`tensor_digest` of ``tensors`` as text at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tensor_digest(tensors))


class StepDelay(Callback):
    """Sleep after every training step: gives a test time to kill a run at a chosen point.

    Args:
        seconds: how long to sleep after each step.
    """

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        time.sleep(self.seconds)
