"""How a text-generation example is laid out in tokens: the prompt the model is given, the target
it learns to write (the only tokens with labels), the tokens that end its answer, and how a
generated continuation becomes the answer's text.

Two formats, picked by :func:`make_prompt_format`:

* :class:`ChatPrompt` — the tokenizer's chat template (instruct backbones: SmolLM2-Instruct,
  Qwen, Llama-3-Instruct...). The input is the user turn; the prompt ends with the template's
  assistant header (``add_generation_prompt``); the target is the assistant turn's text and the
  template's end-of-turn token (``<|im_end|>`` for ChatML), which also stops generation.
* :class:`PlainPrompt` — the GPT-2 convention of LoRA's and PST's E2E code, for tokenizers
  without a template: ``input, EOS`` then ``" " + target, EOS``.

In both, a generated continuation is the answer up to its first special token
(:func:`answer_text`): the end of turn, EOS, or the header of a next turn (``<|im_start|>``),
so no role word of a following turn reaches the prediction, while the answer's own words are
never touched.
"""

from __future__ import annotations

from typing import Protocol

from transformers import PreTrainedTokenizerBase

#: assistant content used to find where the template's assistant turn closes
_PROBE = "\x00sparseft-probe\x00"


class PromptFormat(Protocol):
    """The token layout of one generation task's examples."""

    tokenizer: PreTrainedTokenizerBase
    #: generation stops at any of these ids (the first is the one training targets end with)
    stop_ids: list[int]

    def prompts(self, inputs: list[str]) -> list[list[int]]:
        """The prompt's token ids of each input: what the model is given to continue."""
        ...

    def targets(self, inputs: list[str], outputs: list[str]) -> list[list[int]]:
        """The token ids that follow each prompt in training, ending with ``stop_ids[0]``."""
        ...


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every special token id: the named ones (BOS, EOS, PAD...) and the added ones marked special
    (a chat template's role markers)."""
    added = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def answer_text(tokenizer: PreTrainedTokenizerBase, generated: list[int], specials: set[int]) -> str:
    """The text of a generated continuation up to its first special token, on one line (whitespace
    runs, newlines too, collapsed to one space: the E2E challenge's output files)."""
    end = next((position for position, token in enumerate(generated) if token in specials), len(generated))
    return " ".join(tokenizer.decode(generated[:end]).split())


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end inputs and outputs with")
    return tokenizer.eos_token_id


class PlainPrompt:
    """``input, EOS`` → ``" " + output, EOS`` (LoRA's and PST's GPT-2 E2E layout)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = [_eos_id(tokenizer)]

    def prompts(self, inputs: list[str]) -> list[list[int]]:
        return [ids + self.stop_ids for ids in self.tokenizer(inputs)["input_ids"]]

    def targets(self, inputs: list[str], outputs: list[str]) -> list[list[int]]:
        ids = self.tokenizer([" " + text for text in outputs], add_special_tokens=False)["input_ids"]
        return [target + self.stop_ids for target in ids]


class ChatPrompt:
    """The input as the user turn of the tokenizer's chat template (with the template's own system
    turn, if it writes one), the output as the assistant turn up to its end-of-turn token.

    The end-of-turn token is the first special token after the assistant's text in a rendered turn;
    a template that closes the turn with none (rare) ends it with EOS. Text the template writes after
    that token (ChatML's newline) is not part of the target: the model stops at the token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        closing = self._assistant_turn("x", _PROBE).split(_PROBE)[-1]
        closing_ids = tokenizer(closing, add_special_tokens=False)["input_ids"]
        specials = special_ids(tokenizer)
        end = next((position for position, token in enumerate(closing_ids) if token in specials), None)
        self.closing = closing
        self.end_ids = closing_ids[: end + 1] if end is not None else [_eos_id(tokenizer)]
        eos = tokenizer.eos_token_id
        self.stop_ids = [self.end_ids[-1]] + ([eos] if eos is not None and eos != self.end_ids[-1] else [])

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _prompt_text(self, user: str) -> str:
        return self._render([{"role": "user", "content": user}], generation_prompt=True)

    def _assistant_turn(self, user: str, assistant: str) -> str:
        """The text the template adds after the prompt for the assistant's answer."""
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        whole, prompt = self._render(messages, generation_prompt=False), self._prompt_text(user)
        if not whole.startswith(prompt):
            raise ValueError(
                f"the chat template of {self.tokenizer.name_or_path!r} does not continue its generation prompt "
                "with the assistant's turn; set data.chat_template false to use the plain format"
            )
        return whole[len(prompt) :]

    def prompts(self, inputs: list[str]) -> list[list[int]]:
        texts = [self._prompt_text(text) for text in inputs]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template writes any BOS

    def targets(self, inputs: list[str], outputs: list[str]) -> list[list[int]]:
        answers = []
        for user, assistant in zip(inputs, outputs):
            turn = self._assistant_turn(user, assistant)
            answers.append(turn[: -len(self.closing)] if self.closing and turn.endswith(self.closing) else turn)
        return [ids + self.end_ids for ids in self.tokenizer(answers, add_special_tokens=False)["input_ids"]]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def make_prompt_format(tokenizer: PreTrainedTokenizerBase, chat_template: bool = True) -> PromptFormat:
    """:class:`ChatPrompt` when ``chat_template`` is on and the tokenizer has a template, else :class:`PlainPrompt`."""
    return ChatPrompt(tokenizer) if chat_template and has_chat_template(tokenizer) else PlainPrompt(tokenizer)
