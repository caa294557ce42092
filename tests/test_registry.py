from importlib.metadata import EntryPoint

import pytest

from sparseft.strategies import Magnitude, SparsityStrategy, get_strategy, register_strategy, registry


class ThirdParty(SparsityStrategy):
    """A strategy shipped by another package.

    Runs on: nothing beyond the base.

    Args:
        sparsity: final sparsity.
    """

    def compute_scores(self):
        return [layer.mask.float() for layer in self.layers]


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(ThirdParty, "strategy_name", ThirdParty.strategy_name)  # registering sets it


def test_entry_point_strategies_are_discovered(clean_registry, monkeypatch):
    entry = EntryPoint(name="third_party", value=f"{__name__}:ThirdParty", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [entry] if group == entry.group else [])
    assert get_strategy("third_party") is ThirdParty
    assert "third_party" in registry.available_strategies()


def test_entry_point_must_be_a_strategy(clean_registry, monkeypatch):
    entry = EntryPoint(name="bad", value="collections:OrderedDict", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [entry])
    with pytest.raises(TypeError, match="entry point 'bad' = 'collections:OrderedDict' is not a SparsityStrategy"):
        registry.available_strategies()


def test_lookup_by_name_or_class_name_and_unknown_names(clean_registry):
    assert get_strategy("MAGNITUDE") is Magnitude and get_strategy("Magnitude") is Magnitude
    with pytest.raises(ValueError, match="unknown sparsity strategy 'nope'; available: .*magnitude"):
        get_strategy("nope")


def test_a_name_cannot_be_taken_twice(clean_registry):
    taken = "strategy name 'magnitude' is taken by sparseft.strategies.magnitude.Magnitude"
    with pytest.raises(ValueError, match=taken):
        register_strategy("magnitude")(ThirdParty)


def test_describe_and_rebuild_round_trip():
    from sparseft.sparse.schedules import SparsitySchedule
    from sparseft.strategies import build_strategy

    original = Magnitude(sparsity=0.7, targets=["q", "v"], schedule=SparsitySchedule(kind="linear"), pattern="global")
    rebuilt = build_strategy(original.describe())
    assert rebuilt.describe() == original.describe()
    assert rebuilt.schedule == original.schedule and rebuilt.targets == ["q", "v"]


def test_export_and_resume_rebuild_a_strategy_that_was_never_registered(tmp_path, capsys):
    import json

    from sparseft.cli.command import run_command
    from sparseft.sparse.schedules import SparsitySchedule
    from sparseft.testing.conformance import check_resume, fit

    def make() -> ThirdParty:  # not registered: YAML and checkpoints know it by its class path only
        return ThirdParty(sparsity=0.5, schedule=SparsitySchedule(kind="one_shot", initial_warmup=0.5))

    check_resume(make, tmp_path / "resume")
    trainer, _ = fit(make(), tmp_path / "run", max_steps=6)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    run_command(["export", f"--ckpt_path={tmp_path / 'last.ckpt'}", f"--output_dir={tmp_path / 'exported'}"])
    assert "target sparsity 0.5000" in capsys.readouterr().out
    report = json.loads((tmp_path / "exported" / "report.json").read_text())
    assert report["strategy"]["class_path"] == f"{__name__}.ThirdParty" and report["strategy"]["name"] == ""


def test_a_strategy_that_cannot_be_imported_is_named_in_the_error():
    from sparseft.strategies import build_strategy

    with pytest.raises(ValueError, match="cannot import the strategy 'nowhere.Missing' this checkpoint was trained"):
        build_strategy({"name": "", "class_path": "nowhere.Missing", "init_args": {}})
    with pytest.raises(ValueError, match="'collections.OrderedDict' is not a SparsityStrategy subclass"):
        build_strategy({"name": "", "class_path": "collections.OrderedDict", "init_args": {}})
