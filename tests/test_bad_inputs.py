"""The bad-input catalogue: every mistake a user can make on the ``sparseft`` command line is
answered with one line on stderr (what is wrong, which option, how to fix it), exit status 2,
no traceback, and nothing written or lost (:mod:`sparseft.cli.errors`, :mod:`sparseft.cli.preflight`).

Each case runs the real entry point in-process on a tiny random BERT and tiny TSV files.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sparseft.backbones.loading import load_backbone, position_limit
from sparseft.cli.command import main
from sparseft.cli.errors import DEBUG_ENV, USAGE_ERROR_STATUS, condense_parse_error, user_error_message
from sparseft.datamodules.e2e import read_e2e_csv
from sparseft.datamodules.text import read_documents
from sparseft.sparse.masks import check_sparsity
from sparseft.sparse.parametrize import sparse_layers
from sparseft.sparse.schedules import SparsitySchedule
from sparseft.strategies import DSEE, Magnitude
from sparseft.testing import tiny_config

ROWS = [("the movie was a delight from start to finish", 1), ("a dull , lifeless film with no story", 0)] * 4


@dataclass
class Paths:
    model: Path
    data: Path
    checkpoint: Path
    stsb: Path
    tmp: Path

    @property
    def run(self) -> Path:
        return self.tmp / "run"


def write_sst2(folder: Path, train: str | bytes | None = None) -> Path:
    """An SST-2 folder in the original GLUE layout; ``train`` replaces the train file's content."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in ROWS)
    (folder / "dev.tsv").write_text(rows)
    (folder / "test.tsv").write_text("index\tsentence\n0\tgood\n")
    train = rows if train is None else train
    (folder / "train.tsv").write_bytes(train if isinstance(train, bytes) else train.encode())
    return folder


def fit_args(paths: Paths, *extra: str, data: Path | None = None) -> list[str]:
    return [
        "fit", f"--model.backbone={paths.model}", "--data=sparseft.datamodules.GLUEDataModule", "--data.task=sst2",
        f"--data.data_dir={data or paths.data}", "--data.batch_size=4", "--data.max_length=16",
        "--trainer.max_steps=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={paths.run}", *extra,
    ]


def magnitude(paths: Paths, *extra: str, **kwargs: Path) -> list[str]:
    return fit_args(paths, "--sparsity=magnitude", *extra, **kwargs)


def dsee(paths: Paths, *extra: str) -> list[str]:
    return fit_args(paths, "--sparsity=dsee", "--sparsity.rank=2", "--sparsity.num_sparse=4", *extra)


def s2ft(paths: Paths, *extra: str) -> list[str]:
    return fit_args(paths, "--sparsity=s2ft", *extra)


def bad_train_file(content: str | bytes) -> Callable[[Paths], list[str]]:
    return lambda paths: fit_args(paths, data=write_sst2(paths.tmp / "bad", train=content))


def export(paths: Paths, checkpoint: Path | str) -> list[str]:
    return ["export", f"--ckpt_path={checkpoint}", f"--output_dir={paths.tmp / 'exported'}"]


def file_with(paths: Paths, name: str, content: bytes | dict) -> Path:
    path = paths.tmp / name
    if isinstance(content, dict):
        torch.save(content, path)
    else:
        path.write_bytes(content)
    return path


def damaged(paths: Paths, how: str) -> Path:
    """A copy of the shared checkpoint: ``empty``, ``truncated`` (its first half) or ``corrupted`` (4096 bytes
    XOR'd a third of the way in, inside the weights: the zip structure is intact, a member's CRC is not)."""
    data = bytearray(paths.checkpoint.read_bytes())
    if how == "empty":
        data = bytearray()
    elif how == "truncated":
        data = data[: len(data) // 2]
    else:
        start = len(data) // 3
        data[start:start + 4096] = bytes(byte ^ 0x5A for byte in data[start:start + 4096])
    return file_with(paths, f"{how}.ckpt", bytes(data))


def from_damaged(paths: Paths, how: str, command: str = "fit") -> list[str]:
    """``command`` with the shared run's options and a :func:`damaged` copy of its checkpoint."""
    args = magnitude(paths, "--sparsity.targets=[q]", "--sparsity.sparsity=0.5", f"--ckpt_path={damaged(paths, how)}")
    return [command, *args[1:]]


@dataclass
class Case:
    args: Callable[[Paths], list[str]]
    words: tuple[str, ...]  # must all be in the one-line message (option name and fix)


CASES: dict[str, Case] = {
    # ---- the command line itself: parse errors ----
    "unknown command": Case(lambda p: ["fitt"], ("fitt", "invalid choice")),
    "unknown option": Case(lambda p: fit_args(p, "--trainer.nope=1"), ("--trainer.nope",)),
    "not an int": Case(lambda p: fit_args(p, "--trainer.max_steps=abc"),
                       ("--trainer.max_steps", "int", "abc", "--help")),
    "missing config file": Case(lambda p: fit_args(p, "--config=nope.yaml"), ("--config", "nope.yaml")),
    "unknown strategy": Case(lambda p: fit_args(p, "--sparsity=prunemagic"), ("prunemagic", "magnitude")),
    "unknown strategy option": Case(lambda p: magnitude(p, "--sparsity.rank=4"), ("--sparsity.rank", "no such option")),
    "sparsity not a number": Case(lambda p: magnitude(p, "--sparsity.sparsity=most"), ("--sparsity.sparsity", "float")),
    "unknown schedule kind": Case(lambda p: magnitude(p, "--sparsity.schedule.kind=cosine"),
                                  ("--sparsity.schedule.kind", "one_shot", "cosine")),
    "unknown lr schedule": Case(lambda p: fit_args(p, "--model.lr_schedule=exp"), ("--model.lr_schedule", "cosine")),
    "not a precision": Case(lambda p: fit_args(p, "--trainer.precision=7"),
                            ("--trainer.precision", "bf16-mixed", "Given value: 7")),
    "unknown data option": Case(lambda p: fit_args(p, "--data.shuffle=true"), ("--data.shuffle", "GLUEDataModule")),
    "unknown DSEE criterion": Case(lambda p: dsee(p, "--sparsity.criterion=taylor"),
                                   ("--sparsity.criterion", "update")),
    # ---- options that the constructors refuse ----
    "sparsity above 1": Case(lambda p: magnitude(p, "--sparsity.sparsity=1.5"), ("--sparsity", "[0, 1)", "1.5")),
    "sparsity 1": Case(lambda p: magnitude(p, "--sparsity.sparsity=1.0"), ("--sparsity", "[0, 1)")),
    "negative sparsity": Case(lambda p: magnitude(p, "--sparsity.sparsity=-0.1"), ("[0, 1)", "-0.1")),
    "N:M with soft movement": Case(lambda p: fit_args(p, "--sparsity=movement", "--sparsity.variant=soft",
                                                      "--sparsity.pattern=2:4", "--sparsity.sparsity=0.5"),
                                   ("soft movement", "2:4", "variant hard")),
    "N:M with N >= M": Case(lambda p: magnitude(p, "--sparsity.pattern=4:4", "--sparsity.schedule.kind=one_shot"),
                            ("4:4", "0 < n < m")),
    "N:M against sparsity": Case(lambda p: magnitude(p, "--sparsity.pattern=2:4", "--sparsity.schedule.kind=one_shot"),
                                 ("2:4", "set sparsity to it")),
    "unknown pattern": Case(lambda p: magnitude(p, "--sparsity.pattern=rows"), ("'rows'", "'global'")),
    "warm-ups sum over 1": Case(lambda p: magnitude(p, "--sparsity.schedule.initial_warmup=0.8",
                                                    "--sparsity.schedule.final_warmup=0.5"),
                                ("--sparsity.schedule", "initial_warmup + final_warmup", "below 1")),
    "warm-up over 1": Case(lambda p: magnitude(p, "--sparsity.schedule.initial_warmup=1.5"), ("initial_warmup", "< 1")),
    "update_every 0": Case(lambda p: magnitude(p, "--sparsity.schedule.update_every=0"), ("update_every", ">= 1")),
    "initial above final sparsity": Case(lambda p: magnitude(p, "--sparsity.schedule.initial_sparsity=0.95"),
                                         ("initial_sparsity", "sparsity")),
    "batch size 0": Case(lambda p: fit_args(p, "--data.batch_size=0"), ("data.batch_size", "at least 1")),
    "GPU on a machine without one": Case(lambda p: fit_args(p, "--trainer.accelerator=gpu"), ("gpu",)),
    "unknown GLUE task": Case(lambda p: fit_args(p, "--data.task=sst3"), ("--data", "sst3", "sst2")),
    "empty targets": Case(lambda p: magnitude(p, "--sparsity.targets=[]"), ("targets", "empty")),
    "invalid target regex": Case(lambda p: magnitude(p, "--sparsity.targets=[query(]"),
                                 ("query(", "regular expression")),
    "DSEE ffn_sparsity without heads": Case(lambda p: dsee(p, "--sparsity.ffn_sparsity=0.5"),
                                            ("ffn_sparsity", "heads")),
    "warm-up ratio above 1": Case(lambda p: fit_args(p, "--model.warmup_ratio=1.5"),
                                  ("--model.warmup_ratio", "1.5", "[0, 1)")),
    "negative warm-up ratio": Case(lambda p: fit_args(p, "--model.warmup_ratio=-0.1"),
                                   ("--model.warmup_ratio", "-0.1", "[0, 1)")),
    "negative learning rate": Case(lambda p: fit_args(p, "--model.learning_rate=-1"),
                                   ("--model.learning_rate", "-1", ">= 0")),
    "negative strategy learning rate": Case(lambda p: fit_args(p, "--sparsity=pst", "--sparsity.learning_rate=-0.01"),
                                            ("--sparsity.learning_rate", "-0.01", ">= 0")),
    "negative score learning rate": Case(lambda p: fit_args(p, "--sparsity=movement", "--sparsity.score_lr=-1"),
                                         ("--sparsity.score_lr", ">= 0")),
    "S2FT sparsity with ratios": Case(lambda p: s2ft(p, "--sparsity.sparsity=0.5", "--sparsity.head_ratio=0.25"),
                                      ("--sparsity.sparsity", "--sparsity.head_ratio", "not both")),
    "S2FT gradient without calibration": Case(lambda p: s2ft(p, "--sparsity.criterion=gradient",
                                                             "--sparsity.calibration_batches=0"),
                                              ("--sparsity.calibration_batches", "gradient", "at least 1")),
    "S2FT trains nothing": Case(lambda p: s2ft(p, "--sparsity.head_ratio=0", "--sparsity.channel_ratio=0"),
                                ("head_ratio", "channel_ratio", "train nothing")),
    "S2FT more heads than the model": Case(lambda p: s2ft(p, "--sparsity.heads=1000"),
                                           ("--sparsity.heads", "1000", "query heads", "all layers", "0 to")),
    "accumulate_grad_batches 0": Case(lambda p: fit_args(p, "--trainer.accumulate_grad_batches=0"),
                                      ("--trainer.accumulate_grad_batches", "0", "at least 1")),
    "DSEE heads on a ramp": Case(lambda p: dsee(p, "--sparsity.pattern=heads", "--sparsity.schedule.kind=cubic"),
                                 ("heads", "one_shot")),
    # ---- options that do not fit the model: refused before the data is read ----
    "target matches nothing": Case(lambda p: magnitude(p, "--sparsity.targets=[.*attn\\.c_attn]"),
                                   ("c_attn", "matched no", "query")),
    "role absent from the model": Case(lambda p: magnitude(p, "--sparsity.targets=qkv"), ("'qkv'", "roles")),
    "N:M does not divide a layer": Case(lambda p: magnitude(p, "--sparsity.pattern=2:5", "--sparsity.sparsity=0.6",
                                                            "--sparsity.schedule.kind=one_shot"),
                                        ("sparsity.pattern", "2:5", "layer", "32", "sparsity.targets")),
    "DSEE num_sparse above a matrix": Case(lambda p: dsee(p, "--sparsity.num_sparse=5000"),
                                           ("sparsity.num_sparse", "5000", "query", "at most 1024")),
    "DSEE prune targets match nothing": Case(lambda p: dsee(p, "--sparsity.prune_targets=[nothing]"),
                                             ("nothing", "matched no")),
    "max_length beyond the positions": Case(lambda p: fit_args(p, "--data.max_length=192"),
                                            ("--data.max_length", "192", "128 positions", "at most 128")),
    "backbone directory missing": Case(lambda p: fit_args(p, f"--model.backbone={p.tmp / 'no-model'}"),
                                       ("no-model", "no such directory", "--model.backbone")),
    "backbone package missing": Case(lambda p: fit_args(p, "--model.backbone=pkg:no_such_package/model"),
                                     ("no_such_package", "pip install")),
    "backbone directory without a model": Case(lambda p: fit_args(p, f"--model.backbone={p.tmp}"),
                                               ("could not be loaded", "--model.backbone")),
    "ckpt_path missing": Case(lambda p: magnitude(p, f"--ckpt_path={p.tmp / 'nope.ckpt'}"),
                              ("--ckpt_path", "nope.ckpt", "no such file")),
    # ---- data files ----
    "data_dir missing": Case(lambda p: fit_args(p, data=p.tmp / "no-data"), ("train.tsv", "data.data_dir")),
    "TSV with only a header": Case(bad_train_file("sentence\tlabel\n"), ("train.tsv", "no data rows")),
    "empty TSV": Case(bad_train_file(""), ("train.tsv", "empty file")),
    "binary garbage": Case(bad_train_file(bytes(range(256)) * 4), ("train.tsv:1", "binary")),
    "binary after text": Case(bad_train_file(b"sentence\tlabel\ngood\t1\n\xff\xfe\x00\x81\n"),
                              ("train.tsv:3", "not UTF-8")),
    "malformed line": Case(bad_train_file("sentence\tlabel\ngood\t1\nno label here\n"),
                           ("train.tsv:3", "tab-separated fields")),
    "unreadable label": Case(bad_train_file("sentence\tlabel\ngood\tmaybe\n"), ("train.tsv:2", "'maybe'")),
    "header without the column": Case(bad_train_file("text\tlabel\ngood\t1\n"), ("train.tsv:1", "'sentence'")),
    # ---- checkpoints that do not fit the run ----
    "checkpoint with other targets": Case(lambda p: magnitude(p, f"--ckpt_path={p.checkpoint}"),
                                          ("settings differ from the checkpoint", "--sparsity.targets")),
    "checkpoint of another task": Case(lambda p: magnitude(p, "--sparsity.targets=[q]", "--sparsity.sparsity=0.5",
                                                           "--data.task=stsb", f"--ckpt_path={p.checkpoint}",
                                                           data=p.stsb),
                                       ("--ckpt_path", "classifier", "another task")),
    "checkpoint of another strategy": Case(lambda p: fit_args(p, "--sparsity=pst", f"--ckpt_path={p.checkpoint}"),
                                           ("magnitude", "--sparsity magnitude")),
    "resuming an empty checkpoint": Case(lambda p: from_damaged(p, "empty"),
                                         ("--ckpt_path", "empty.ckpt", "0 bytes", "another checkpoint")),
    "resuming a truncated checkpoint": Case(lambda p: from_damaged(p, "truncated"),
                                            ("--ckpt_path", "truncated.ckpt", "no zip directory", "truncated,")),
    "resuming a corrupted checkpoint": Case(lambda p: from_damaged(p, "corrupted"),
                                            ("--ckpt_path", "corrupted.ckpt", "CRC")),
    "validating a corrupted checkpoint": Case(lambda p: from_damaged(p, "corrupted", "validate"),
                                              ("--ckpt_path", "corrupted.ckpt", "CRC")),
    "predicting from a truncated checkpoint": Case(lambda p: from_damaged(p, "truncated", "predict"),
                                                   ("--ckpt_path", "truncated.ckpt", "no zip directory", "truncated,")),
    # ---- export ----
    "export: no such checkpoint": Case(lambda p: export(p, p.tmp / "nope.ckpt"), ("--ckpt_path", "no such file")),
    "export: not a sparseft checkpoint": Case(lambda p: export(p, file_with(p, "other.ckpt", {"state_dict": {}})),
                                              ("--ckpt_path", "not a checkpoint written by sparseft",
                                               "hyper_parameters")),
    "export: not a checkpoint": Case(lambda p: export(p, file_with(p, "junk.ckpt", b"\x00junk" * 64)),
                                     ("--ckpt_path", "not a readable PyTorch checkpoint")),
    "export: empty checkpoint": Case(lambda p: export(p, damaged(p, "empty")), ("--ckpt_path", "0 bytes")),
    "export: truncated checkpoint": Case(lambda p: export(p, damaged(p, "truncated")),
                                         ("--ckpt_path", "no zip directory")),
    "export: corrupted checkpoint": Case(lambda p: export(p, damaged(p, "corrupted")),
                                         ("--ckpt_path", "corrupted.ckpt", "CRC")),
    "report: corrupted checkpoint": Case(lambda p: ["report", str(damaged(p, "corrupted"))], ("corrupted.ckpt", "CRC")),
    "export: no output_dir": Case(lambda p: ["export", f"--ckpt_path={p.checkpoint}"], ("output_dir", "export")),
    "export: existing adapter file": Case(lambda p: [*export(p, p.checkpoint),
                                                     f"--adapter_path={p.model / 'config.json'}"],
                                          ("adapter_path", "exists", "--overwrite")),
    "export: adapter folder missing": Case(lambda p: [*export(p, p.checkpoint),
                                                      f"--adapter_path={p.tmp / 'no-folder' / 'a.safetensors'}"],
                                           ("--adapter_path", "no-folder", "does not exist", "create it")),
    "export: non-empty output_dir": Case(lambda p: ["export", f"--ckpt_path={p.checkpoint}", f"--output_dir={p.model}"],
                                         ("output_dir", "not empty", "--overwrite")),
}


@pytest.fixture(scope="module")
def shared(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The SST-2 and STS-B folders, and a checkpoint of a one-step magnitude run on the query layers."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_sst2(root / "sst2")
    stsb = root / "stsb"
    stsb.mkdir()
    for split in ("train", "dev"):
        (stsb / f"{split}.tsv").write_text("sentence1\tsentence2\tscore\n" + "a good film\ta fine film\t4.0\n" * 8)
    paths = Paths(tiny_bert_dir, data, Path(), stsb, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["sparseft"])
        main(magnitude(paths, "--sparsity.targets=[q]", "--sparsity.sparsity=0.5"))
    checkpoint = next((root / "run").rglob("last.ckpt"))
    return {"data": data, "stsb": stsb, "checkpoint": checkpoint}


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["sparseft"])  # as from the shell: pytest's own arguments are not sparseft's
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def digest(folder: Path) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line(name: str, shared: dict[str, Path], tiny_bert_dir: Path, tmp_path: Path, capsys):
    case = CASES[name]
    paths = Paths(tiny_bert_dir, shared["data"], shared["checkpoint"], shared["stsb"], tmp_path)
    args = case.args(paths)
    before = digest(shared["checkpoint"].parents[3]) | digest(tiny_bert_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == USAGE_ERROR_STATUS
    err = capsys.readouterr().err
    assert "Traceback" not in err
    reports = [line for line in err.splitlines() if line.startswith("sparseft: error: ")]
    assert len(reports) == 1, err
    report = reports[0]
    assert err.rstrip().endswith(report), "the report is the last thing printed, and one line"
    for word in case.words:
        assert word in report, f"{word!r} not in {report!r}"
    assert "Does not validate against any of the Union subtypes" not in report
    assert not paths.run.exists(), f"a run directory was written: {sorted(paths.run.rglob('*'))}"
    assert not (tmp_path / "exported").exists()
    assert digest(shared["checkpoint"].parents[3]) | digest(tiny_bert_dir) == before, "an existing file changed"


@pytest.mark.parametrize("logger", [(), ("--trainer.logger=false",)], ids=["tensorboard", "no-logger"])
@pytest.mark.parametrize("name", [name for name in CASES if name.startswith("checkpoint ")])
def test_a_refused_resume_into_the_checkpoints_own_run_writes_no_file(name: str, logger: tuple[str, ...],
                                                                      shared: dict[str, Path], tiny_bert_dir: Path,
                                                                      capsys):
    """A refused resume run in the directory of the run it resumes: no file of that run changes and none
    is added (LightningCLI wrote the refused configuration at setup, over the run's own ``config.yaml``
    where the log directory is the same; a refusal found when Lightning loaded the checkpoint left an
    empty TensorBoard event file in a new version folder)."""
    original = shared["checkpoint"].parents[3]
    paths = Paths(tiny_bert_dir, shared["data"], shared["checkpoint"], shared["stsb"], original.parent)
    before = digest(original)
    with pytest.raises(SystemExit) as exit_info:
        main([*CASES[name].args(paths), *logger])
    assert exit_info.value.code == USAGE_ERROR_STATUS, capsys.readouterr().err
    assert digest(original) == before, "the refused run changed or added a file"


def test_debug_env_shows_the_traceback(shared, tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    paths = Paths(tiny_bert_dir, shared["data"], shared["checkpoint"], shared["stsb"], tmp_path)
    with pytest.raises(ValueError) as error:  # jsonargparse's wrapper, ours as its cause
        main(magnitude(paths, "--sparsity.sparsity=1.5"))
    assert "sparsity must be in [0, 1)" in str(error.value.__cause__)


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as caught:
        return caught


def test_only_user_errors_become_one_line():
    ours = _raised_from(lambda: check_sparsity(2.0))
    assert user_error_message(ours) == "sparsity must be in [0, 1), got 2.0: it is the fraction of weights removed"
    assert user_error_message(_raised(ValueError("raised outside sparseft"))) is None  # a bug: keeps its traceback
    assert user_error_message(_raised(KeyError("hyper_parameters"))) is None
    assert user_error_message(_raised(FileNotFoundError("no file x.tsv"))) == "no file x.tsv"
    try:  # a new error while handling a user error is a bug, not a wrapper
        try:
            check_sparsity(2.0)
        except ValueError:
            raise KeyError("while handling")  # noqa: B904 - the implicit context is the point
    except KeyError as bug:
        assert user_error_message(bug) is None
    wrapped = _raised_from(lambda: _wrap(ours))
    assert user_error_message(wrapped) == user_error_message(ours)


def _raised_from(call: Callable[[], object]) -> Exception:
    try:
        call()
    except Exception as error:
        return error
    raise AssertionError("nothing was raised")


def _wrap(error: Exception) -> None:
    raise RuntimeError("a library's wrapper") from error


def test_nested_parse_error_becomes_the_full_option_name():
    report = """Parser key "sparsity":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'sparseft.strategies.base.SparsityStrategy'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'sparseft.strategies.magnitude.Magnitude':
        Parser key "schedule":
          Does not validate against any of the Union subtypes
          Subtypes: [<class 'sparseft.sparse.schedules.SparsitySchedule'>, <class 'NoneType'>]
          Errors:
            - Problem with given class_path 'sparseft.sparse.SparsitySchedule':
                Parser key "kind":
                  Expected a typing.Literal['cubic', 'one_shot']. Got value: foo
            - Expected a <class 'NoneType'>
          Given value type: <class 'jsonargparse._util.NestedArg'>
          Given value: NestedArg(key='kind', val='foo')
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='schedule.kind', val='foo')"""
    assert condense_parse_error(report, "fit") == (
        "--sparsity.schedule.kind: expected one of 'cubic', 'one_shot'. Got value: foo "
        "(sparseft fit --help lists the options)"
    )


def test_the_console_command_prints_nothing_but_the_line(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "sparseft", "fit", "--trainer.max_steps=abc",
         f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, cwd=root, env={**os.environ, DEBUG_ENV: "", "PYTHONPATH": str(root)},
    )
    assert result.returncode == USAGE_ERROR_STATUS
    assert result.stderr.splitlines() == [
        "sparseft: error: --trainer.max_steps: expected int. Got value: abc (sparseft fit --help lists the options)"
    ]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["fit", "export"])
def test_help_still_exits_cleanly(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--ckpt_path" in capsys.readouterr().out


def test_attach_checks_the_model_outside_the_cli_too():
    model = load_backbone("sequence-classification", config=tiny_config("bert"), num_labels=2)
    nm = Magnitude(sparsity=0.6, pattern="2:5", schedule=SparsitySchedule(kind="one_shot"))
    with pytest.raises(ValueError, match=r"layer bert\.encoder\.layer\.0\.attention\.self\.query has 32"):
        nm.attach(model)
    with pytest.raises(ValueError, match="num_sparse 2000 is more than the 32x32 = 1024 weights"):
        DSEE(num_sparse=2000).attach(model)
    assert not sparse_layers(model), "nothing was attached"


def test_export_checks_the_adapter_folder_before_writing_the_model(shared, tiny_bert_dir, tmp_path, capsys):
    # an S²FT checkpoint has an adapter to write: the model directory was fully written before this failed
    paths = Paths(tiny_bert_dir, shared["data"], shared["checkpoint"], shared["stsb"], tmp_path)
    main(s2ft(paths, "--sparsity.heads=2"))
    checkpoint = next(paths.run.rglob("last.ckpt"))
    adapter = tmp_path / "no-folder" / "a.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        main([*export(paths, checkpoint), f"--adapter_path={adapter}"])
    assert exit_info.value.code == USAGE_ERROR_STATUS
    assert "does not exist; create it" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "exported").exists() and not adapter.parent.exists()
    main([*export(paths, checkpoint), f"--adapter_path={tmp_path / 'exported' / 'a.safetensors'}"])  # its own folder
    assert (tmp_path / "exported" / "a.safetensors").is_file() and (tmp_path / "exported" / "config.json").is_file()


def test_e2e_longer_than_gpt2_positions_is_refused_before_the_run(tiny_gpt2_dir, tmp_path, capsys):
    # the run: E2E on a GPT-2 with n_positions 128 and max_length 192 failed with an IndexError mid-training
    long_ref = " ".join(["The Eagle is a French restaurant near the river."] * 30)
    for name in ("trainset.csv", "devset.csv"):
        (tmp_path / name).write_text(f'mr,ref\n"name[The Eagle]",{long_ref}\n' * 4)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--model.backbone={tiny_gpt2_dir}", "--data=sparseft.datamodules.E2EDataModule",
              f"--data.data_dir={tmp_path}", "--data.max_length=192", "--data.batch_size=2", "--trainer.max_steps=1",
              "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={run}"])
    assert exit_info.value.code == USAGE_ERROR_STATUS
    assert capsys.readouterr().err.splitlines()[-1] == (
        "sparseft: error: --data.max_length 192 is longer than the backbone's 128 positions (its position embedding "
        "has 128 rows): set --data.max_length to at most 128")
    assert not run.exists()


@pytest.mark.parametrize("kind, limit", [("bert", 128), ("gpt2", 128), ("roberta", 128), ("llama", None)])
def test_position_limit_counts_the_rows_inputs_can_use(kind, limit):
    # RoBERTa's table has 130 rows, but its positions start after the padding index 1; LLaMA's are rotary
    model = load_backbone("sequence-classification", config=tiny_config(kind), num_labels=2)
    assert position_limit(model) == limit


def test_e2e_and_text_files_name_file_and_line(tmp_path):
    (tmp_path / "binary.csv").write_bytes(b"mr,ref\nname[x],fine\n\xff\xfe,x\n")
    with pytest.raises(ValueError, match=r"binary\.csv:3: not UTF-8"):
        read_e2e_csv(tmp_path / "binary.csv")
    (tmp_path / "header.csv").write_text("mr,ref\n")
    with pytest.raises(ValueError, match=r"header\.csv: no records after the header"):
        read_e2e_csv(tmp_path / "header.csv")
    (tmp_path / "corpus.tsv").write_bytes(b"text\nfine\n\x00\x01\n")
    with pytest.raises(ValueError, match=r"corpus\.tsv:3: a NUL byte"):
        read_documents(tmp_path / "corpus.tsv")
