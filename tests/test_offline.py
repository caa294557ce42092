"""Without a network: what ships with sparseft (the tiny BPE the tiny configs name), and one-line errors that
name the offline alternative when a model, tokenizer or data set would come from the hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparseft.backbones import load_backbone, load_tokenizer
from sparseft.backbones.loading import OFFLINE_BACKBONES
from sparseft.cli.command import main
from sparseft.datamodules import GLUEDataModule, SquadDataModule
from sparseft.testing import TINY_BPE, make_tiny_tokenizer
from tests.conftest import shared_data

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_shipped_tiny_bpe_is_what_make_tiny_tokenizer_builds():
    shipped, built = load_tokenizer(TINY_BPE), make_tiny_tokenizer("bpe")
    assert shipped.get_vocab() == built.get_vocab() and len(shipped) == 400
    text = "name [ the eagle ] eattype [ coffee shop ] near the riverside"
    assert shipped(text).input_ids == built(text).input_ids
    assert (shipped.eos_token, shipped.pad_token) == ("<|endoftext|>", "<|endoftext|>")


def test_a_hub_backbone_offline_names_the_models_installed_from_pypi():
    with pytest.raises(FileNotFoundError) as refused:
        load_backbone("sequence-classification", "bert-base-uncased", num_labels=2)
    message = str(refused.value)
    assert "'bert-base-uncased' (--model.backbone / --model.teacher)" in message
    assert "hub cannot be reached" in message and all(name in message for name in OFFLINE_BACKBONES)
    assert "local_files_only" not in message and "\n" not in message


def test_a_missing_model_directory_names_the_offline_models_too(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory") as refused:
        load_backbone("sequence-classification", str(tmp_path / "bert"), num_labels=2)
    assert all(name in str(refused.value) for name in OFFLINE_BACKBONES)


def test_a_hub_tokenizer_offline_is_one_line_naming_the_option_and_the_shipped_one(tmp_path, capsys):
    config = tmp_path / "gpt2.yaml"
    config.write_text("model:\n  config: {model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2}\n  tokenizer: gpt2\n"
                      "data:\n  class_path: sparseft.datamodules.RawTextDataModule\n"
                      "  init_args: {train_files: [x.txt], block_size: 16}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sparseft: error: tokenizer 'gpt2' (--model.tokenizer, else --model.backbone)")
    assert TINY_BPE in line and "local_files_only" not in line and "offline mode" not in line


def test_hub_data_offline_names_the_local_files_option():
    data = GLUEDataModule(task="sst2", tokenizer=TINY_BPE)
    with pytest.raises(FileNotFoundError, match="'nyu-mll/glue' is not in the local datasets cache .* --data.data_dir"):
        data.load_split("train")


@pytest.mark.integration
def test_squad_trains_on_the_first_dev_articles_and_evaluates_on_the_others():
    folder = shared_data("squad")
    split = SquadDataModule(data_dir=str(folder), train_on_dev_articles=40)
    train, dev = split.load_split("train"), split.load_split("validation")
    whole = SquadDataModule(eval_file=str(folder / "dev-v1.1.json")).load_split("validation")
    assert len(train) + len(dev) == len(whole) and not set(train["title"]) & set(dev["title"])
    assert list(train["id"]) + list(dev["id"]) == list(whole["id"])  # in the file's order
    with pytest.raises(FileNotFoundError, match="--data.train_on_dev_articles"):
        SquadDataModule(data_dir=str(folder)).load_split("train")  # only the dev file is there
    with pytest.raises(ValueError, match="leaves no article"):
        SquadDataModule(data_dir=str(folder), train_on_dev_articles=48).load_split("validation")


@pytest.mark.integration
def test_the_tiny_e2e_configs_cut_no_training_example():
    """At their max_length every E2E training example (MR, reference and both EOS) fits whole in the shipped
    tiny BPE: none loses its EOS, and E2E's warning about cut references stays silent."""
    import yaml

    from sparseft.datamodules.e2e import read_e2e_csv

    rows = read_e2e_csv(shared_data("e2e", "trainset.csv"))
    tokenizer = load_tokenizer(TINY_BPE)
    mrs = tokenizer(rows["mr"])["input_ids"]
    references = tokenizer([" " + reference for reference in rows["ref"]], add_special_tokens=False)["input_ids"]
    longest = max(len(mr) + len(reference) + 2 for mr, reference in zip(mrs, references))
    configs = sorted(CONFIGS.glob("tiny_*_e2e.yaml"))
    assert len(configs) == 4
    for path in configs:
        config = yaml.safe_load(path.read_text())
        assert config["model"]["tokenizer"] == TINY_BPE
        assert longest <= config["data"]["init_args"]["max_length"], path.name
