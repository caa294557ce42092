"""Prompts of the generation datamodules (E2E): the tokenizer's chat template when it has one, the GPT-2
format otherwise or when turned off; labels on the answer only; generation stops at the end of turn and
the prediction carries no role words. The chat tokenizer is word-level with a fixed vocabulary
(``sparseft.testing.CHAT_VOCAB``), so every id below is written by hand from it."""

from __future__ import annotations

import pytest
import torch

from sparseft.backbones.loading import load_backbone
from sparseft.datamodules.e2e import E2EDataModule
from sparseft.datamodules.prompts import ChatPrompt, PlainPrompt
from sparseft.testing import CHAT_VOCAB, make_tiny_model_dir, make_tiny_tokenizer

ID = {word: index for index, word in enumerate(CHAT_VOCAB)}
START, END, NL, PAD = ID["<|im_start|>"], ID["<|im_end|>"], ID["\n"], ID["<|endoftext|>"]
MR, REF = "name[Aromi]", "Aromi is a cheap restaurant."
MR_IDS = [ID["name"], ID["["], ID["aromi"], ID["]"]]
REF_IDS = [ID[word] for word in ("aromi", "is", "a", "cheap", "restaurant", ".")]
# <|im_start|>user\n MR <|im_end|>\n <|im_start|>assistant\n
CHAT_PROMPT = [START, ID["user"], NL, *MR_IDS, END, NL, START, ID["assistant"], NL]


def e2e(tokenizer, **kwargs) -> E2EDataModule:
    data = E2EDataModule(max_length=64, **kwargs)
    data.tokenizer = tokenizer
    return data


@pytest.fixture(scope="module")
def chat_tokenizer():
    return make_tiny_tokenizer("chat")


def test_chat_example_token_ids_and_labels_by_hand(chat_tokenizer):
    data = e2e(chat_tokenizer)
    assert isinstance(data.prompt_format, ChatPrompt) and data.stop_ids == [END]
    features = data.encode({"mr": [MR, "name[The Eagle]"], "ref": [REF, "The Eagle."]})
    # the assistant turn ends with its end-of-turn token; the template's newline after it is not trained
    assert features["input_ids"][0] == CHAT_PROMPT + REF_IDS + [END]
    assert features["labels"][0] == [-100] * len(CHAT_PROMPT) + REF_IDS + [END]
    rows = [{key: torch.tensor(values[i]) for key, values in features.items()} for i in range(2)]
    batch = data.collate(rows)  # right padding with the tokenizer's pad token, labels -100 there
    assert batch["input_ids"][1].tolist() == [START, ID["user"], NL, ID["name"], ID["["], ID["the"], ID["eagle"],
                                              ID["]"], END, NL, START, ID["assistant"], NL, ID["the"], ID["eagle"],
                                              ID["."], END, PAD, PAD]
    assert batch["labels"][1].tolist() == [-100] * 13 + [ID["the"], ID["eagle"], ID["."], END] + [-100] * 2
    prompts = data.encode_eval({"mr": [MR]}, [0])  # generation starts right after the assistant header
    assert prompts["input_ids"] == [CHAT_PROMPT]


def test_chat_template_off_restores_the_gpt2_format(chat_tokenizer, tiny_gpt2_dir):
    data = e2e(chat_tokenizer, chat_template=False)
    assert isinstance(data.prompt_format, PlainPrompt) and data.stop_ids == [END]  # the tokenizer's EOS
    features = data.encode({"mr": [MR], "ref": [REF]})
    assert features["input_ids"][0] == MR_IDS + [END] + REF_IDS + [END]  # MR, EOS, " " + reference, EOS
    assert features["labels"][0] == [-100] * 5 + REF_IDS + [END]
    gpt2 = E2EDataModule(tokenizer=str(tiny_gpt2_dir))  # no template: the GPT-2 format, chat_template on
    assert isinstance(gpt2.prompt_format, PlainPrompt) and gpt2.stop_ids == [gpt2.tokenizer.eos_token_id]


class ScriptedModel:
    """``generate`` returns each prompt followed by a given continuation; records its arguments."""

    def __init__(self, continuations: list[list[int]]) -> None:
        self.continuations, self.kwargs = continuations, {}

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        self.kwargs = kwargs
        width = max(map(len, self.continuations))
        tails = [row + [kwargs["pad_token_id"]] * (width - len(row)) for row in self.continuations]
        return torch.cat([input_ids, torch.tensor(tails)], dim=1)


def test_predictions_stop_at_the_end_of_turn_and_carry_no_role_words(chat_tokenizer):
    data = e2e(chat_tokenizer, num_beams=1)
    features = data.encode_eval({"mr": [MR, MR, MR]}, [0, 1, 2])
    batch = data.collate([{**{k: torch.tensor(v[i]) for k, v in features.items()}, "references": []}
                          for i in range(3)])
    model = ScriptedModel([
        REF_IDS + [END, NL, START, ID["assistant"], NL, ID["aromi"]],  # ran on into a next turn
        [ID["the"], ID["assistant"], ID["is"], NL, ID["cheap"], START, ID["assistant"], NL],  # no end of turn
        [END, START, ID["assistant"]],  # an empty answer
    ])
    texts = data.generate(model, batch)
    assert model.kwargs["eos_token_id"] == [END] and model.kwargs["pad_token_id"] == PAD
    # cut at the first special token, never by matching words: "assistant" inside an answer stays
    assert texts == ["aromi is a cheap restaurant .", "the assistant is cheap", ""]


def test_beam_search_of_a_tiny_llama_with_a_chat_template(tmp_path):
    """The real ``generate`` takes the stop list with beams; outputs are answers only."""
    model_dir = make_tiny_model_dir(tmp_path, "llama", task="causal-lm", tokenizer_kind="chat")
    data = E2EDataModule(tokenizer=str(model_dir), num_beams=2, max_new_tokens=6)
    assert isinstance(data.prompt_format, ChatPrompt)  # the template travels with the saved tokenizer
    features = data.encode_eval({"mr": [MR, "name[The Eagle], food[French]"]}, [0, 1])
    batch = data.collate([{**{k: torch.tensor(v[i]) for k, v in features.items()}, "references": []}
                          for i in range(2)])
    model = load_backbone("causal-lm", str(model_dir)).eval()
    texts = data.generate(model, batch)
    assert len(texts) == 2 and not any("<|" in text for text in texts)


def test_an_end_of_turn_other_than_eos_ends_targets_and_stops_generation():
    """Gemma-style: turns end with <end_of_turn>, EOS is another token; a template with a system turn."""
    tokenizer = make_tiny_tokenizer("chat")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    sot, eot = tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])
    tokenizer.chat_template = (
        "<start_of_turn>system\nthe food<end_of_turn>\n{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n"
        "{% endif %}"
    )
    data = e2e(tokenizer)
    assert data.stop_ids == [eot, END]
    features = data.encode({"mr": [MR], "ref": [REF]})
    system = [sot, ID["system"], NL, ID["the"], ID["food"], eot, NL]
    prompt = system + [sot, ID["user"], NL, *MR_IDS, eot, NL, sot, ID["assistant"], NL]
    assert features["input_ids"][0] == prompt + REF_IDS + [eot]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}" \
                              "!{% endif %}"  # the prompt is not a prefix of the conversation
    with pytest.raises(ValueError, match="E2E: the chat template .* set data.chat_template false"):
        e2e(tokenizer).encode({"mr": [MR], "ref": [REF]})


@pytest.mark.slow
def test_real_smollm2_prompts_use_its_chatml_template(smollm2_dir):
    data = E2EDataModule(tokenizer=str(smollm2_dir))
    features = data.encode({"mr": ["name[Blue Spice]"], "ref": ["Blue Spice is a coffee shop."]})
    ids, labels = features["input_ids"][0], features["labels"][0]
    text = data.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nname[Blue Spice]<|im_end|>\n" in text
    answer = labels.index(next(label for label in labels if label != -100))
    assert data.tokenizer.decode(ids[:answer]).endswith("<|im_start|>assistant\n")
    assert data.tokenizer.decode(ids[answer:]) == "Blue Spice is a coffee shop.<|im_end|>"
    assert data.stop_ids == [data.tokenizer.convert_tokens_to_ids("<|im_end|>")]
