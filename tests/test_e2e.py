"""E2E NLG: grouping and metrics on the real files against the official scripts, examples and
padding, metric states, malformed files, a tiny fit through the CLI."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sparseft.datamodules.e2e import E2EDataModule, group_references, pad_sequences, read_e2e_csv
from sparseft.datamodules.e2e_metrics import (
    E2EMetric,
    bleu,
    cider_d,
    coco_tokenize,
    meteor,
    meteor_available,
    mteval_tokenize,
    nist,
    rouge_l,
)
from sparseft.testing import make_tiny_model_dir
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def leave_one_out():
    """A known hypothesis set: for every test MR with several references, its first reference
    as the output, scored against the others (616 of the 630 MRs)."""
    grouped = group_references(read_e2e_csv(shared_data("e2e", "testset_w_refs.csv")))
    kept = [refs for refs in grouped["references"] if len(refs) > 1]
    return [refs[0] for refs in kept], [refs[1:] for refs in kept]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", task="causal-lm")


@pytest.mark.integration
def test_test_set_groups_4693_references_into_630_mrs():
    rows = read_e2e_csv(shared_data("e2e", "testset_w_refs.csv"))
    grouped = group_references(rows)
    assert len(rows["mr"]) == 4_693 and len(grouped["mr"]) == 630
    assert sum(map(len, grouped["references"])) == 4_693
    assert grouped["mr"][0] == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert grouped["references"][0][1] == "Blue Spice is a coffee shop in city centre."


@pytest.mark.integration
def test_bleu_and_nist_match_the_official_mteval_script(leave_one_out):
    hypotheses, references = leave_one_out
    assert len(hypotheses) == 616
    # the challenge's mteval-v13a-sig.pl (Perl, tuetschek/e2e-metrics) on the same set printed
    # "BLEU score = 0.6046" and "NIST score = 8.9029"
    assert bleu(hypotheses, references) == pytest.approx(60.46, abs=0.01)
    assert nist(hypotheses, references) == pytest.approx(8.9029, abs=0.01)


@pytest.mark.integration
def test_bleu_and_nist_keep_non_ascii_capitals_as_the_official_script(leave_one_out):
    hypotheses, references = leave_one_out
    hypotheses = [text.replace("é", "É") for text in hypotheses]  # 151 outputs write "CafÉ"
    # mteval-v13a-sig.pl on this set: "BLEU score = 0.5867", "NIST score = 8.7190" (Unicode
    # lower-casing had scored it as the unchanged set, 60.46 / 8.9029)
    assert bleu(hypotheses, references) == pytest.approx(58.67, abs=0.01)
    assert nist(hypotheses, references) == pytest.approx(8.7190, abs=0.001)


def test_mteval_lowercases_only_a_to_z():
    # the Perl script's tokenization sub printed exactly these tokens: tr/[A-Z]/[a-z]/ after the
    # entity conversion, so "É" stays and "&QUOT;" is not a quote
    assert mteval_tokenize('ÉCOLE &QUOT;Café&quot; É') == ["École", "&", "quot", ";", "café", '"', "É"]
    assert mteval_tokenize("Le CAFÉ is HERE, 20£-25.") == ["le", "cafÉ", "is", "here", ",", "20£-25", "."]


def test_bleu_and_nist_casing_by_hand():
    references = [["le café is here"]]
    assert bleu(["LE Café IS HERE"], references) == pytest.approx(100.0)  # A-Z lower-cased
    assert nist(["LE Café IS HERE"], references) == pytest.approx(2.0)  # 4 unigrams of info log2(4/1)
    # "cafÉ" matches nothing: unigrams 3/4, bigrams 1/3 ("is here"), no 3- or 4-gram, smoothed by
    # mteval's exp rule to 1/(2*2) and 1/(4*1): BLEU = (3/4 * 1/3 * 1/4 * 1/4)^(1/4) = 1/64^(1/4).
    # NIST: 3 matched unigrams of 2 bits over 4, the bigram's information log2(1/1) = 0.
    # mteval-v13a-sig.pl printed "NIST score = 1.5000  BLEU score = 0.3536"
    assert bleu(["Le CAFÉ is here"], references) == pytest.approx(100 / 64**0.25)
    assert nist(["Le CAFÉ is here"], references) == pytest.approx(1.5)


@pytest.mark.integration
def test_rouge_and_cider_match_coco_caption_on_the_same_tokens(leave_one_out):
    coco = pytest.importorskip("pycocoevalcap")  # the COCO scripts the challenge runs (optional here)
    del coco
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hypotheses = [coco_tokenize(text) for text in leave_one_out[0]]
    references = [[coco_tokenize(text) for text in refs] for refs in leave_one_out[1]]
    gold = {i: [" ".join(ref) for ref in refs] for i, refs in enumerate(references)}
    predicted = {i: [" ".join(hyp)] for i, hyp in enumerate(hypotheses)}
    assert rouge_l(hypotheses, references) == pytest.approx(100 * Rouge().compute_score(gold, predicted)[0])
    assert cider_d(hypotheses, references) == pytest.approx(Cider().compute_score(gold, predicted)[0])


def test_rouge_l_and_cider_d_by_hand():
    # LCS("a b c d", "a c d e f") = 3: P = 3/4, R = 3/5, F(beta=1.2) = 2.44 PR / (R + 1.44 P)
    assert rouge_l([["a", "b", "c", "d"]], [[["a", "c", "d", "e", "f"]]]) == pytest.approx(
        100 * 2.44 * 0.75 * 0.6 / (0.6 + 1.44 * 0.75)
    )
    # two MRs, every n-gram in one reference set: idf = log 2 everywhere. MR 1 is exact: cosine 1
    # for 1- and 2-grams, nothing of orders 3-4 -> 10 * 2/4. MR 2 "c" vs "c d": unigram cosine
    # 1/sqrt(2), length penalty exp(-1/72) on the bigram-count difference -> 10 * (1/sqrt 2)/4 * it
    score = cider_d([["a", "b"], ["c"]], [[["a", "b"]], [["c", "d"]]])
    assert score == pytest.approx((5.0 + 2.5 / math.sqrt(2) * math.exp(-1 / 72)) / 2)


def test_coco_tokenize_like_the_ptb_tokenizer():
    text = 'The Eagle isn\'t cheap (£20-25), it\'s "near" Café Rouge; rated 4.5-star.'
    assert coco_tokenize(text) == [
        "the", "eagle", "is", "n't", "cheap", "#", "20-25", "it", "'s", "near", "café", "rouge", "rated", "4.5-star",
    ]


@pytest.mark.slow
@pytest.mark.integration
def test_official_meteor_on_the_known_set(leave_one_out):
    if not meteor_available():
        pytest.skip("METEOR 1.5 needs pycocoevalcap and java")
    hypotheses = [coco_tokenize(text) for text in leave_one_out[0]]
    references = [[coco_tokenize(text) for text in refs] for refs in leave_one_out[1]]
    # 45.63 with the COCO scripts' own (Java PTB) tokens: 6 of the 4,693 references tokenize differently
    assert meteor(hypotheses, references) == pytest.approx(45.64, abs=0.01)


def test_metric_states_round_trip_and_drop_repeats():
    metric = E2EMetric(with_meteor=False)
    metric.update(torch.tensor([1, 0]), ["Café Rouge is cheap.", ""], [["Café Rouge is cheap."], ["x y", "z"]])
    metric.update(torch.tensor([1]), ["a repeat from a distributed sampler"], [["ignored"]])
    assert metric.outputs() == {0: ("", ["x y", "z"]), 1: ("Café Rouge is cheap.", ["Café Rouge is cheap."])}
    assert set(metric.compute()) == {"bleu", "nist", "rouge_l", "cider"}


def test_examples_mask_the_prompt_and_pad_by_side(tiny_gpt2):
    data = E2EDataModule(tokenizer=str(tiny_gpt2), max_length=64)
    mrs, refs = ["name[The Eagle], food[French]", "name[Aromi]"], ["The Eagle serves French food.", "Aromi."]
    features = data.encode({"mr": mrs, "ref": refs})
    eos = data.tokenizer.eos_token_id
    for ids, labels, mr, ref in zip(features["input_ids"], features["labels"], mrs, refs):
        prompt = data.tokenizer(mr)["input_ids"] + [eos]
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :] and labels[-1] == eos
        assert data.tokenizer.decode(labels[len(prompt) : -1]) == " " + ref
    rows = [{key: torch.tensor(values[i]) for key, values in features.items()} for i in range(2)]
    train = data.collate(rows)
    assert train["labels"][1, -1] == -100 and train["attention_mask"][1, -1] == 0  # right padding
    prompts = data.encode_eval({"mr": mrs}, [0, 1])
    rows = [{**{k: torch.tensor(v[i]) for k, v in prompts.items()}, "references": [refs[i]]} for i in range(2)]
    evaluation = data.collate(rows)
    assert evaluation["attention_mask"][1, 0] == 0 and evaluation["input_ids"][1, -1] == eos  # left padding
    assert evaluation["references"] == [[refs[0]], [refs[1]]]
    assert pad_sequences([torch.tensor([1, 2]), torch.tensor([3])], 0, left=True).tolist() == [[1, 2], [0, 3]]
    with pytest.raises(ValueError, match="leaves no room for its reference within max_length 4"):
        E2EDataModule(tokenizer=str(tiny_gpt2), max_length=4).encode({"mr": mrs, "ref": refs})


def test_references_cut_at_max_length_are_reported(tiny_gpt2, tmp_path):
    (tmp_path / "trainset.csv").write_text(
        'mr,ref\n"name[Aromi]",Aromi.\n"name[The Eagle]",The Eagle is a French restaurant near the river.\n')
    data = E2EDataModule(tokenizer=str(tiny_gpt2), data_dir=str(tmp_path), max_length=20)
    with pytest.warns(UserWarning, match="1 of 2 training examples in a batch are longer than max_length 20"):
        data._prepare("train", "train").__getitems__([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data._prepare("train", "train").__getitems__([0, 1])  # said once
        E2EDataModule(tokenizer=str(tiny_gpt2), data_dir=str(tmp_path), max_length=64)._prepare(
            "train", "train").__getitems__([0, 1])


def test_a_training_mr_that_leaves_no_room_is_refused_when_the_split_is_prepared(tiny_gpt2, tmp_path):
    """Training rows are tokenized lazily; the check on their MRs ran at the batch that held one, after the
    run had written config.yaml and checkpoints. Preflight prepares the split, so it runs before the run."""
    long_mr = "name[The Eagle], food[French], area[riverside]"
    (tmp_path / "trainset.csv").write_text(f'mr,ref\n"name[A]",A.\n"{long_mr}",B.\n')
    data = E2EDataModule(tokenizer=str(tiny_gpt2), data_dir=str(tmp_path), max_length=8)
    with pytest.raises(ValueError, match="E2E: an MR of .* tokens leaves no room .* max_length 8"):
        data._prepare("train", "train")


def test_malformed_files_name_file_and_record(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('mr,ref\n"name[A]",A is good.\n"name[B]",B is,extra\n')
    with pytest.raises(ValueError, match=r"bad.csv: record 2 \(line 3\): 3 fields, expected 2"):
        read_e2e_csv(path)
    path.write_text('mr,ref\n"name[A]",\n')
    with pytest.raises(ValueError, match=r"bad.csv: record 1 \(line 2\): empty 'mr' or 'ref'"):
        read_e2e_csv(path)
    path.write_text("meaning,text\nx,y\n")
    with pytest.raises(ValueError, match="bad.csv: expected a header with columns 'mr' and 'ref'"):
        read_e2e_csv(path)
    with pytest.raises(FileNotFoundError, match="E2E: no file"):
        read_e2e_csv(tmp_path / "missing.csv")


@pytest.mark.integration
def test_tiny_fit_through_the_cli_with_a_strategy(tiny_gpt2, tmp_path):
    from sparseft.cli.command import SparseFTCLI, expand_strategy_names

    args = [
        "fit", f"--model.backbone={tiny_gpt2}", "--model.learning_rate=1e-3",
        "--data=sparseft.datamodules.E2EDataModule", f"--data.data_dir={shared_data('e2e')}",
        "--data.batch_size=8", "--data.max_train_samples=48", "--data.max_eval_samples=6", "--data.num_beams=2",
        "--data.max_new_tokens=8", "--data.with_meteor=false",
        "--sparsity=magnitude", "--sparsity.sparsity=0.5", "--trainer.max_steps=6",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
    ]
    cli = SparseFTCLI(args=expand_strategy_names(args))
    assert cli.model.hparams.task == "causal-lm"  # linked from the datamodule
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    assert {"val/bleu", "val/nist", "val/rouge_l", "val/cider"} <= set(metrics), metrics
    assert 0.0 <= metrics["val/bleu"] <= 100.0
    strategy = next(c for c in cli.trainer.callbacks if c.__class__.__name__ == "Magnitude")
    assert strategy.measured_sparsity() == pytest.approx(0.5)
    assert cli.trainer.global_step == 6
