"""``sparseft predict`` for every datamodule: the task's submission format in the run directory,
and predictions on the dev split that score, with our metrics, exactly what ``validate`` reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparseft.cli.command import SparseFTCLI, expand_strategy_names, main
from sparseft.datamodules.e2e import group_references, read_e2e_csv
from sparseft.datamodules.e2e_metrics import e2e_scores
from sparseft.datamodules.squad_metrics import squad_scores
from sparseft.testing import make_tiny_model_dir
from tests.conftest import shared_data

TRAINER = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
           "--trainer.num_sanity_val_steps=0", "--seed_everything=0"]


def fit_then(args: list[str], root: Path) -> tuple[list[str], dict[str, float]]:
    """Fit 2 steps, then validate the last checkpoint; the arguments to predict it and validate's metrics."""
    run = [*args, *TRAINER, f"--trainer.default_root_dir={root}"]
    main(["fit", *run, "--trainer.max_steps=2"])
    run.append(f"--ckpt_path={next(root.parent.rglob('last.ckpt'))}")  # under the logger's folder if any
    validate = SparseFTCLI(args=expand_strategy_names(["validate", *run]))
    metrics = {key: float(value) for key, value in validate.trainer.callback_metrics.items()}
    assert validate.datamodule.monitor in metrics, "the shipped configs' checkpoint monitor is logged"
    return run, metrics


def predict(run: list[str], capsys: pytest.CaptureFixture, *extra: str) -> Path:
    """Run predict and return the file whose path it printed (checking it is in the run directory)."""
    capsys.readouterr()
    cli = SparseFTCLI(args=expand_strategy_names(["predict", *run, *extra]))
    written = Path(capsys.readouterr().out.split("predictions written to ")[1].splitlines()[0])
    assert written.parent == Path(cli.trainer.log_dir) and written.is_file()
    return written


def test_glue_dev_predictions_score_as_validate_and_fill_their_run_directory(tiny_bert_dir, tmp_path, capsys):
    data = tmp_path / "sst2"
    data.mkdir()
    rows = [("a good film", 1), ("a bad film", 0), ("great fun", 1), ("dull and bad", 0), ("fine", 1)] * 3
    for split in ("train", "dev"):
        (data / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (data / "test.tsv").write_text("index\tsentence\n0\tgood\n1\tbad\n")
    logger = ["--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
              f"--trainer.logger.save_dir={tmp_path / 'runs'}", "--trainer.logger.name=sst2"]
    args = [f"--model.backbone={tiny_bert_dir}", "--model.learning_rate=1e-2", "--data=GLUEDataModule",
            "--data.task=sst2", f"--data.data_dir={data}", "--data.batch_size=4", *logger]
    run, metrics = fit_then(args, tmp_path / "run")

    dev = predict(run, capsys, "--data.predict_split=dev")
    lines = [line.split("\t") for line in dev.read_text().splitlines()]
    assert lines[0] == ["index", "prediction"] and [int(i) for i, _ in lines[1:]] == list(range(len(rows)))
    correct = sum(int(value) == label for (_, value), (_, label) in zip(lines[1:], rows))
    assert correct / len(rows) == pytest.approx(metrics["val/accuracy"])
    # evaluations add no run to the training logger's folder: they write beside the checkpoints, one folder each
    run_dir = tmp_path / "runs" / "sst2" / "version_0"
    assert [path.name for path in (tmp_path / "runs" / "sst2").iterdir()] == ["version_0"]
    assert dev == run_dir / "predict" / "SST-2.tsv" and (run_dir / "validate" / "metrics.json").is_file()

    test = predict(run, capsys)  # the default: GLUE's unlabelled test file
    assert test == run_dir / "predict-2" / "SST-2.tsv" and len(test.read_text().splitlines()) == 1 + 2


@pytest.mark.integration
def test_squad_writes_the_official_scripts_json_and_scores_as_validate(tmp_path, capsys):
    source = json.loads(shared_data("squad", "dev-v1.1.json").read_text())
    (tmp_path / "train.json").write_text(json.dumps({"data": source["data"][:1]}))
    (tmp_path / "eval.json").write_text(json.dumps({"data": source["data"][1:2]}))
    model_dir = make_tiny_model_dir(tmp_path / "tiny-qa", "bert", task="question-answering")
    args = [f"--model.backbone={model_dir}", "--data=SquadDataModule", f"--data.train_file={tmp_path / 'train.json'}",
            f"--data.eval_file={tmp_path / 'eval.json'}", "--data.max_length=128", "--data.doc_stride=32",
            "--data.batch_size=8", "--data.max_train_samples=32", "--data.max_eval_samples=30",
            "--trainer.logger=false"]
    run, metrics = fit_then(args, tmp_path / "run")

    answers = json.loads(predict(run, capsys).read_text())  # SQuAD has no test set: dev by default
    questions = [qa for paragraph in source["data"][1]["paragraphs"] for qa in paragraph["qas"]][:30]
    assert list(answers) == [qa["id"] for qa in questions] and all(isinstance(a, str) for a in answers.values())
    golds = {qa["id"]: [answer["text"] for answer in qa["answers"]] for qa in questions}
    scores = squad_scores(answers, golds)
    assert scores["f1"] == pytest.approx(metrics["val/f1"], abs=1e-4)
    assert scores["exact_match"] == pytest.approx(metrics["val/exact_match"], abs=1e-4)


@pytest.mark.integration
def test_e2e_writes_one_output_per_mr_in_file_order_and_scores_as_validate(tiny_gpt2_dir, tmp_path, capsys):
    args = [f"--model.backbone={tiny_gpt2_dir}", "--data=E2EDataModule", f"--data.data_dir={shared_data('e2e')}",
            "--data.batch_size=4", "--data.max_train_samples=16", "--data.max_eval_samples=6", "--data.num_beams=2",
            "--data.max_new_tokens=8", "--data.with_meteor=false", "--trainer.logger=false"]
    run, metrics = fit_then(args, tmp_path / "run")

    dev_file = predict(run, capsys, "--data.predict_split=dev")
    outputs = dev_file.read_text().splitlines()
    references = group_references(read_e2e_csv(shared_data("e2e", "devset.csv")))["references"][:6]
    assert len(outputs) == 6
    assert e2e_scores(outputs, references, with_meteor=False)["bleu"] == pytest.approx(metrics["val/bleu"], abs=1e-4)
    test = predict(run, capsys).read_text()  # the default: the challenge's test set
    assert test.count("\n") == 6  # one line per MR, empty where the tiny model ends at once


def test_a_predictions_file_from_an_earlier_run_is_never_overwritten(tmp_path):
    from types import SimpleNamespace

    from sparseft.training.callbacks import PredictionWriter

    trainer = SimpleNamespace(log_dir=None, default_root_dir=str(tmp_path), world_size=1, global_rank=0,
                              datamodule=SimpleNamespace(prediction_files=["predictions.json"]))
    writer = PredictionWriter()
    writer.on_predict_start(trainer, None)  # nothing there yet: allowed
    (tmp_path / "predictions.json").write_text("{}")
    with pytest.raises(ValueError, match="predictions.json exists: move it"):
        writer.on_predict_start(trainer, None)
    assert (tmp_path / "predictions.json").read_text() == "{}"
