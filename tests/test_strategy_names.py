"""Strategy names in configuration files and ``--sparsity.help`` (issue 15): a registry name or a
class name in any case works wherever a class path does, and an unknown one is refused in one line."""

from __future__ import annotations

import pydoc

import pytest
import yaml

from sparseft.cli.command import SparseFTCLI, expand_strategy_names, run_command
from sparseft.cli.strategy_names import resolve_strategy_names
from sparseft.strategies import PST, SPDF, Magnitude, available_strategies
from tests import test_cli
from tests.test_cli_optimizers import cli_args

sst2_dir = test_cli.sst2_dir  # the fixture: a small SST-2 folder


@pytest.mark.parametrize("name", ["magnitude", "MAGNITUDE", "Magnitude", "sparseft.strategies.Magnitude"])
def test_yaml_class_path_takes_registry_and_class_names(name, tiny_bert_dir, sst2_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"sparsity": {"class_path": name, "init_args": {"sparsity": 0.6}}}))
    cli = SparseFTCLI(args=expand_strategy_names([*cli_args(tiny_bert_dir, sst2_dir, tmp_path), f"--config={config}"]),
                      run=False)
    strategy = cli.config_init.sparsity
    assert type(strategy) is Magnitude and strategy.final_sparsity == 0.6
    assert pydoc.locate(cli.config.sparsity.class_path) is Magnitude  # config.yaml saves a class path


def test_yaml_sparsity_given_as_a_bare_name(tiny_bert_dir, sst2_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("sparsity: spdf\n")
    cli = SparseFTCLI(args=[*cli_args(tiny_bert_dir, sst2_dir, tmp_path), f"--config={config}"], run=False)
    assert type(cli.config_init.sparsity) is SPDF


def test_every_registered_name_and_class_name_resolves():
    for name, cls in available_strategies().items():
        for given in (name, name.upper(), cls.__name__, cls.__name__.lower()):
            resolved = resolve_strategy_names({"sparsity": {"class_path": given}, "fit": {"sparsity": given}})
            path = f"{cls.__module__}.{cls.__qualname__}"
            assert resolved == {"sparsity": {"class_path": path}, "fit": {"sparsity": path}}, given


def test_names_elsewhere_in_a_config_are_left_alone():
    config = {"trainer": {"callbacks": [{"class_path": "EarlyStopping"}]}, "model": {"backbone": "magnitude"}}
    assert resolve_strategy_names(config) == config


def test_unknown_name_in_yaml_is_one_line_listing_the_available(tiny_bert_dir, sst2_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("sparsity:\n  class_path: snipp\n")
    listed = r"^unknown sparsity strategy 'snipp'; available: dsee, lora, magnitude, .*spdf"
    with pytest.raises(ValueError, match=listed) as e:
        SparseFTCLI(args=[*cli_args(tiny_bert_dir, sst2_dir, tmp_path), f"--config={config}"], run=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("given, option", [("magnitude", "--sparsity.schedule"), ("PST", "--sparsity.weight_rank"),
                                           ("pst", "--sparsity.mask_rank"), ("Spdf", "--sparsity.dense_from_step")])
def test_sparsity_help_takes_a_registry_or_class_name(given, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_command(["fit", "--sparsity.help", given])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert f"{option} " in out and "--sparsity.sparsity" in out
    summary = {"magnitude": Magnitude, "pst": PST, "spdf": SPDF}[given.lower()].__doc__.splitlines()[0]
    assert summary.rstrip(".") in out


def test_sparsity_help_with_equals_and_unknown_names():
    expanded = expand_strategy_names(["fit", "--sparsity.help=pst"])
    assert expanded == ["fit", "--sparsity.help=sparseft.strategies.pst.PST"]
    with pytest.raises(ValueError, match="unknown sparsity strategy 'nope'; available: "):
        expand_strategy_names(["fit", "--sparsity.help", "nope"])
