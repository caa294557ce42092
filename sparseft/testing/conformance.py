"""The conformance suite: the contract every sparsity strategy meets, sparseft's own and yours.

A package that ships a strategy runs the suite on it with a pytest class of a few lines::

    from sparseft.testing.conformance import StrategyConformance
    from my_package import RandomPruning

    class TestRandomPruning(StrategyConformance):
        strategy_class = RandomPruning
        init_args = {"sparsity": 0.5, "schedule": {"kind": "cubic", "initial_warmup": 0.1, "final_warmup": 0.3}}

pytest then runs one test per check (:data:`CHECKS`). ``init_args`` are written as in a YAML
config, plain data: the strategy is built from them by jsonargparse, as ``sparseft fit`` does.
Each check trains a tiny random BERT (2 layers, hidden size 32) on a synthetic task for
:data:`STEPS` optimizer steps on the CPU, in seconds. Choose a schedule that reaches the final
sparsity within them; a one-shot schedule works too (``{"kind": "one_shot", "initial_warmup":
0.5}`` prunes at step 5, so the resumed run of the ``resume`` check prunes after its checkpoint).

A check that cannot hold for a method is listed in ``not_applicable`` with the reason; it still
runs, as a strict ``xfail``: the day it passes, the entry must go.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save_model
from torch import nn

from sparseft.cli.strategy_names import register_parser_mode
from sparseft.export.pretrained import export_pretrained
from sparseft.sparse.inplace import stored_keep
from sparseft.sparse.masks import pruned_count, topk_mask
from sparseft.sparse.parametrize import sparse_layers
from sparseft.sparse.sharding import whole_parameters
from sparseft.strategies import SparsityStrategy, build_strategy
from sparseft.testing import SyntheticClassificationData, tiny_config
from sparseft.training.module import SparseFTModule

STEPS = 10  # optimizer steps of every run, 4 batches per epoch
RESUME_STEP = 4  # the interrupted run's checkpoint: on an epoch boundary (Lightning replays a
# plain DataLoader from its start when resuming mid-epoch)
CHECKS = ("docstring", "yaml", "zeros", "precision", "logging", "resume", "fresh_masks", "export", "in_place",
          "fsdp2")
#: the reduced precisions a strategy trains under on the CPU (``16-mixed`` needs a GPU's gradient scaler)
PRECISIONS = ("bf16-mixed", "bf16-true")
#: how far FSDP2's weights may be from DDP's after :data:`STEPS` steps: the same sums, some in another
#: order (magnitude measured 0 apart on the CPU with gloo; movement's soft penalty is summed per shard)
FSDP2_WEIGHT_TOLERANCE = 1e-5


def build_from_config(strategy_class: type[SparsityStrategy], init_args: dict[str, Any]) -> SparsityStrategy:
    """The strategy built from plain data by jsonargparse, as a ``sparsity:`` entry of a config."""
    parser = _sparsity_parser()
    config = parser.parse_object({"sparsity": {"class_path": _class_path(strategy_class), "init_args": init_args}})
    return parser.instantiate_classes(config).sparsity


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _sparsity_parser() -> ArgumentParser:
    parser = ArgumentParser(parser_mode=register_parser_mode(), exit_on_error=False)
    parser.add_subclass_arguments(SparsityStrategy, "sparsity")
    return parser


def tiny_module(model_type: str = "bert") -> SparseFTModule:
    """A 2-layer random ``model_type`` classifier (:func:`~sparseft.testing.tiny_config`) without dropout,
    the same for every seed-0 run."""
    torch.manual_seed(0)
    # no dropout; GPT-2 and LLaMA classify at the last token that is not padding, so they need a pad id
    overrides = {"bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                 "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=1),
                 "llama": dict(pad_token_id=1)}
    config = tiny_config(model_type, **overrides.get(model_type, {}))
    return SparseFTModule(config=config, num_labels=2, learning_rate=1e-3)


def fit(strategy: SparsityStrategy, root: Path, max_steps: int = STEPS, ckpt_path: str | None = None,
        trainer_strategy: str = "auto", model_type: str = "bert", sharded_loading: bool = False,
        **trainer_kwargs: Any) -> tuple[Trainer, SparseFTModule]:
    """Train :func:`tiny_module` with ``strategy`` on 32 synthetic examples (4 batches per epoch, over all
    processes), under Lightning's ``trainer_strategy``. ``sharded_loading``: the same weights, saved as a model
    directory and loaded by the module built inside ``trainer.init_module(empty_init=True)`` (under ``fsdp2``,
    each process reads its own shards)."""
    module = tiny_module(model_type)
    trainer = Trainer(
        max_steps=max_steps, accelerator=trainer_kwargs.pop("accelerator", "cpu"),
        devices=trainer_kwargs.pop("devices", 1),
        logger=trainer_kwargs.pop("logger", False),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
        limit_val_batches=trainer_kwargs.pop("limit_val_batches", 0), enable_checkpointing=False,
        callbacks=[strategy, *trainer_kwargs.pop("callbacks", [])], strategy=trainer_strategy, **trainer_kwargs,
    )
    if sharded_loading:
        # every process writes its own (save_pretrained writes on rank 0 only once a process group exists)
        saved = root / f"backbone-{os.getpid()}"
        module.model.config.save_pretrained(saved)
        save_model(module.model, str(saved / "model.safetensors"))
        with trainer.init_module(empty_init=True):
            module = SparseFTModule(backbone=str(saved), num_labels=2, learning_rate=1e-3)
    trainer.fit(module, SyntheticClassificationData(size=32), ckpt_path=ckpt_path)
    return trainer, module


# ---- the checks -----------------------------------------------------------------------------
def check_docstring(strategy_class: type[SparsityStrategy]) -> None:
    """The docstring says what the arguments mean (``Args:``) and when the strategy acts (``Runs on:``)."""
    doc = inspect.getdoc(strategy_class) or ""
    assert "Args:" in doc and "Runs on:" in doc, f"{strategy_class.__name__} docstring needs 'Args:' and 'Runs on:'"


def check_yaml(strategy_class: type[SparsityStrategy], init_args: dict[str, Any]) -> None:
    """Builds from a YAML config by class name (and registry name, if registered), and rebuilds
    from its checkpoint entry (:meth:`~SparsityStrategy.describe`) with the same arguments."""
    names = [strategy_class.__name__, _class_path(strategy_class), strategy_class.strategy_name]
    parser = _sparsity_parser()
    for name in filter(None, names):
        text = yaml.safe_dump({"sparsity": {"class_path": name, "init_args": init_args}})
        strategy = parser.instantiate_classes(parser.parse_string(text)).sparsity
        assert type(strategy) is strategy_class, name
    described = strategy.describe()
    yaml.safe_dump(described)  # plain data: a checkpoint and report.json hold it
    assert build_strategy(described).describe() == described, "describe() does not rebuild the same strategy"


class _PrunedStayZero(Callback):
    """After every optimizer step, every masked entry of every effective weight is exactly 0."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for sparse in sparse_layers(pl_module.model):
            assert (sparse.layer.weight()[~sparse.mask] == 0).all(), sparse.name
        self.checked += 1


def check_zeros(strategy: SparsityStrategy, root: Path) -> None:
    """The final sparsity is reached exactly (the pruned count of the strategy's rounding rule in every
    layer), and pruned weights are exactly zero after every optimizer step."""
    _fit_to_target(strategy, root)
    for sparse in strategy.layers:
        assert int((sparse.layer.weight() == 0).sum()) >= int((~sparse.mask).sum()), sparse.name


def _fit_to_target(strategy: SparsityStrategy, root: Path, **trainer_kwargs: Any) -> SparseFTModule:
    """:func:`fit` with pruned weights checked to be exactly zero after every optimizer step, then every
    layer's mask checked to prune exactly the count of the strategy's rounding rule at its final sparsity."""
    guard = _PrunedStayZero()
    _, module = fit(strategy, root, callbacks=[guard], **trainer_kwargs)
    assert guard.checked == STEPS
    for sparse in strategy.layers:
        expected = pruned_count(sparse.mask.numel(), strategy.final_sparsity, strategy.pruned_count_rule)
        assert int((~sparse.mask).sum()) == expected, sparse.name
    assert strategy.measured_sparsity() == pytest.approx(strategy.final_sparsity, abs=1e-3)
    return module


def check_precision(make_strategy: Callable[[], SparsityStrategy], root: Path,
                    precisions: tuple[str, ...] = PRECISIONS, **trainer_kwargs: Any) -> None:
    """Under each of ``precisions`` (by default :data:`PRECISIONS`: Lightning's autocast over float32
    weights, and bfloat16 weights; ``16-mixed`` with its gradient scaler on a GPU) a fit finishes, every
    mask reaches the target exactly and pruned weights are exactly zero after every optimizer step: what
    GPU users run, the bfloat16 ones checked on the CPU. A strategy whose scores need float32 (PST's
    ``addmm_`` of ``|W|`` with its factors) computes them in float32 itself."""
    for precision in precisions:
        module = _fit_to_target(make_strategy(), root / precision, precision=precision, **trainer_kwargs)
        dtypes = {param.dtype for param in module.parameters() if param.is_floating_point()}
        expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
        assert dtypes == {expected}, f"{precision}: parameters in {dtypes}, expected {expected}"


def check_logging(strategy: SparsityStrategy, root: Path) -> None:
    """``sparsity/actual``, ``sparsity/target`` and every layer's sparsity reach the logger, the
    per-layer values every ``log_every_n_steps`` only, equal to the masks' measured sparsity."""
    fit(strategy, root, 4, logger=CSVLogger(root, name="logs"), log_every_n_steps=2)
    with open(root / "logs" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    columns = {f"sparsity/layer/{sparse.name}" for sparse in strategy.layers}
    assert columns <= set(rows[0]) and {"sparsity/actual", "sparsity/target"} <= set(rows[0])
    logged = [row for row in rows if row[next(iter(columns))]]
    assert [int(row["step"]) for row in logged] == [1, 3]  # every log_every_n_steps, not every step
    for sparse in strategy.layers:
        measured = 1 - sparse.mask.float().mean().item()
        assert float(logged[-1][f"sparsity/layer/{sparse.name}"]) == pytest.approx(measured), sparse.name


class SaveAt(Callback):
    """Write a checkpoint after optimizer step ``step``, as an interrupted run would have."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path, self.sparsity = step, path, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            strategy = next(c for c in trainer.callbacks if isinstance(c, SparsityStrategy))
            self.sparsity = strategy.applied_sparsity


def check_resume(make_strategy: Callable[[], SparsityStrategy], root: Path) -> None:
    """A run resumed from a checkpoint after step :data:`RESUME_STEP` ends with the masks and weights of
    the run that was never interrupted. With a ramping schedule the checkpoint must be mid-ramp."""
    ckpt = root / "interrupted.ckpt"
    saver = SaveAt(RESUME_STEP, ckpt)
    straight = make_strategy()
    fit(straight, root / "straight", callbacks=[saver])
    if straight.schedule.ramps:
        assert 0 < saver.sparsity < straight.final_sparsity, "the checkpoint should be mid-schedule"
    resumed = make_strategy()
    fit(resumed, root / "resumed", ckpt_path=str(ckpt))
    for a, b in zip(straight.layers, resumed.layers, strict=True):
        assert torch.equal(a.mask, b.mask), a.name
        assert torch.allclose(a.weight(), b.weight(), atol=1e-6), a.name  # effective: M ⊙ (W0 + ΔW)


class _FreshMaskCheck(Callback):
    """Validation and a mid-run checkpoint see the masks of the current scores, not the ones the last
    training step used before its optimizer step moved the scores."""

    def __init__(self, strategy: SparsityStrategy, ckpt: Path) -> None:
        self.strategy, self.ckpt = strategy, ckpt
        self.validated, self.stale_differed = 0, False

    def expected(self) -> list[torch.Tensor]:
        strategy = self.strategy
        return [topk_mask(score, strategy.applied_sparsity, layer.row_blocks, strategy.pruned_count_rule)
                for score, layer in zip(strategy.compute_scores(), strategy.layers, strict=True)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        used = [layer.mask.clone() for layer in self.strategy.layers]
        self.stale_differed |= any(not torch.equal(a, b) for a, b in zip(used, self.expected()))
        if trainer.global_step == 6:
            trainer.save_checkpoint(self.ckpt)
            saved = torch.load(self.ckpt, weights_only=False)["state_dict"]
            names = {id(buffer): key for key, buffer in pl_module.named_buffers()}
            for layer, keep in zip(self.strategy.layers, self.expected(), strict=True):
                assert torch.equal(saved[names[id(layer.mask)]], keep), layer.name

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        for layer, keep in zip(self.strategy.layers, self.expected(), strict=True):
            assert torch.equal(layer.mask, keep), layer.name
        self.validated += 1


def check_fresh_masks(strategy: SparsityStrategy, root: Path) -> None:
    """For ``masks_follow_scores`` strategies: validation, checkpoints and the end of training use the
    masks that the scores after the last optimizer step define."""
    if not strategy.masks_follow_scores:
        pytest.skip("masks_follow_scores is off: the masks do not move with the scores between updates")
    check = _FreshMaskCheck(strategy, root / "mid.ckpt")
    trainer, module = fit(strategy, root, callbacks=[check], limit_val_batches=1)  # validates after steps 4 and 8
    trainer.validate(module, SyntheticClassificationData(size=32), verbose=False)
    assert check.validated == 3 and check.stale_differed, "the run should have had stale masks to refresh"
    for layer, keep in zip(strategy.layers, check.expected(), strict=True):
        assert torch.equal(layer.mask, keep), layer.name


def check_export(strategy: SparsityStrategy, root: Path) -> None:
    """The final checkpoint rebuilds (as ``sparseft export`` does it, from the checkpoint alone) and
    merges into a plain Hugging Face model with the trained model's logits and sparsity."""
    from transformers import AutoModelForSequenceClassification

    trainer, module = fit(strategy, root / "run")
    trainer.save_checkpoint(root / "last.ckpt")
    rebuilt, rebuilt_strategy = SparseFTModule.from_sparseft_checkpoint(root / "last.ckpt")
    assert type(rebuilt_strategy) is type(strategy)
    batch = next(iter(SyntheticClassificationData(size=8).train_dataloader()))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        expected = module.eval().model(**inputs).logits
        assert torch.allclose(rebuilt.model(**inputs).logits, expected, atol=1e-5)
    report = export_pretrained(rebuilt.model, root / "exported", shrink=rebuilt_strategy.structured)
    plain = AutoModelForSequenceClassification.from_pretrained(root / "exported").eval()
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, expected, atol=1e-5)
    assert report["target_sparsity"] == pytest.approx(strategy.measured_sparsity(), abs=1e-6)
    assert not any("parametrizations" in key for key in plain.state_dict())


def check_in_place(make_strategy: Callable[[], SparsityStrategy], root: Path) -> None:
    """For ``holds_masks_in_place`` strategies: the run with the masks held in ``W0`` (the dense forward)
    ends with the masks, effective weights, every other tensor of the model and the optimizer state of
    the same run masking in the forward, bit for bit; only ``W0`` and its optimizer state where pruned
    differ (0 there, stale values in the masking run that no computation reads). A method whose pruned
    weights can return (their stale value read again) fails here."""
    held = make_strategy()
    if not held.holds_masks_in_place:
        pytest.skip("holds_masks_in_place is off: the masks are applied in the forward")
    masking = make_strategy()
    masking.holds_masks_in_place = False  # this instance only
    runs = [_end_state(*fit(held, root / "held"), held), _end_state(*fit(masking, root / "masking"), masking)]
    for layer in held.layers:
        assert (layer.stored_weight[~stored_keep(layer)] == 0).all(), f"{layer.name}: W0 should be 0 where pruned"
    assert runs[0].keys() == runs[1].keys()
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), f"{key} differs between the held and the masking run"


def _end_state(trainer: Trainer, module: SparseFTModule, strategy: SparsityStrategy) -> dict[str, torch.Tensor]:
    """Masks, effective weights, the model's other tensors (not ``W0``) and the optimizer state (``W0``'s
    only where kept)."""
    state = {key: value for key, value in module.state_dict().items() if not key.endswith(".original")}
    state.update({f"{layer.name}.effective_weight": layer.layer.weight().detach() for layer in strategy.layers})
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    kept = {id(layer.stored_weight): stored_keep(layer) for layer in strategy.layers}
    for optimizer in trainer.optimizers:
        for parameter, values in optimizer.state.items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    keep = kept.get(id(parameter)) if value.shape == parameter.shape else None
                    state[f"optimizer: {names[id(parameter)]}/{key}"] = value if keep is None else value * keep
    return state


_FSDP2_SCRIPT = """
import json, sys
from sparseft.testing.conformance import fsdp2_and_ddp_runs
fsdp2_and_ddp_runs(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4])
"""


def whole_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state with sharded (FSDP2) tensors gathered whole, on every rank."""
    with whole_parameters([module]):
        return {key: value.detach().clone() for key, value in module.state_dict().items()}


def fit_and_save_state(strategy: SparsityStrategy, root: Path, run: str, trainer_strategy: str,
                       **kwargs: Any) -> None:
    """:func:`fit` on 2 processes under ``trainer_strategy``; each rank saves the model's whole state to
    ``root/<run>-rank<r>.pt`` (``kwargs`` go to :func:`fit`: callbacks, ``ckpt_path``)."""
    trainer, module = fit(strategy, root / run, devices=2, trainer_strategy=trainer_strategy, **kwargs)
    torch.save(whole_state(module.model), root / f"{run}-rank{trainer.global_rank}.pt")


def fsdp2_and_ddp_runs(class_path: str, init_args: dict[str, Any], root: str, model_type: str = "bert",
                       callbacks: Callable[[SparsityStrategy, str], list[Callback]] | None = None) -> None:
    """In each of 2 processes: :func:`fit` under DDP, then under FSDP2, the strategy built afresh from
    ``init_args`` each time; each rank saves both models' whole state to ``root`` (runs ``ddp`` and
    ``fsdp2``). ``callbacks(strategy, trainer_strategy)`` adds callbacks to a run (checks, checkpoints).
    Run it as a script (Lightning starts the second process by running the script again). A strategy that
    attaches to a backbone without weights also runs under FSDP2 with sharded loading (run ``fsdp2-loaded``)."""
    module_name, _, class_name = class_path.rpartition(".")
    strategy_class = getattr(importlib.import_module(module_name), class_name)
    for run in fsdp2_runs(strategy_class, init_args):
        trainer_strategy = run.split("-")[0]
        strategy = build_from_config(strategy_class, init_args)
        extra = callbacks(strategy, trainer_strategy) if callbacks else []
        fit_and_save_state(strategy, Path(root), run, trainer_strategy, callbacks=extra, model_type=model_type,
                           sharded_loading=run.endswith("loaded"))


def fsdp2_runs(strategy_class: type[SparsityStrategy], init_args: dict[str, Any]) -> tuple[str, ...]:
    """The runs :func:`fsdp2_and_ddp_runs` makes: DDP, FSDP2, and FSDP2 with sharded loading where it applies."""
    loaded = strategy_class.attaches_to_empty(init_args)
    return ("ddp", "fsdp2", "fsdp2-loaded") if loaded else ("ddp", "fsdp2")


def assert_states_match(reference: dict[str, torch.Tensor], states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every state in ``states`` (run name -> whole state) has ``reference``'s keys, its masks (bool
    tensors) bit for bit and its other tensors within :data:`FSDP2_WEIGHT_TOLERANCE`."""
    for run, state in states.items():
        assert state.keys() == reference.keys(), f"{run}: {sorted(set(state) ^ set(reference))}"
        for key, value in reference.items():
            if value.dtype == torch.bool:
                assert torch.equal(state[key], value), f"{run}: mask {key} differs from the reference's"
            else:
                torch.testing.assert_close(state[key], value, rtol=0, atol=FSDP2_WEIGHT_TOLERANCE,
                                           msg=lambda text, key=key, run=run: f"{run}: {key}: {text}")


def check_fsdp2(strategy_class: type[SparsityStrategy], init_args: dict[str, Any], root: Path,
                model_type: str = "bert") -> None:
    """Under FSDP2 (2 CPU processes, gloo) the strategy gives the masks of the same run under DDP, bit for
    bit on both ranks, and weights within :data:`FSDP2_WEIGHT_TOLERANCE`, on a tiny ``model_type``
    backbone; settings that :meth:`~SparsityStrategy.fsdp2_refusal` refuses are skipped (refused at start). A
    strategy that sets ``attaches_to_empty_weights`` gives them too with sharded loading (each process reading
    its own rows of the backbone's weights)."""
    if build_from_config(strategy_class, init_args).fsdp2_refusal():
        pytest.skip("these settings are refused under FSDP2 (fsdp2_refusal)")
    script = root / "fsdp2_and_ddp.py"
    script.write_text(_FSDP2_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    result = subprocess.run([sys.executable, str(script), _class_path(strategy_class), json.dumps(init_args),
                             str(root), model_type], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = [f"{run}-rank{rank}" for run in fsdp2_runs(strategy_class, init_args) for rank in (0, 1)][1:]
    assert_states_match(torch.load(root / "ddp-rank0.pt"), {run: torch.load(root / f"{run}.pt") for run in runs})


# ---- the pytest class ---------------------------------------------------------------------
class StrategyConformance:
    """Subclass as ``Test<Name>`` with ``strategy_class`` and ``init_args``: pytest runs every check.

    Attributes:
        strategy_class: the :class:`SparsityStrategy` subclass under test.
        init_args: its constructor arguments as plain data (as under ``init_args:`` in YAML).
        not_applicable: check name (one of :data:`CHECKS`) -> why it cannot hold for this method;
            the check runs as a strict xfail.
    """

    strategy_class: ClassVar[type[SparsityStrategy]]
    init_args: ClassVar[dict[str, Any]] = {}
    not_applicable: ClassVar[dict[str, str]] = {}

    def make_strategy(self) -> SparsityStrategy:
        return build_from_config(self.strategy_class, self.init_args)

    def expect(self, request: pytest.FixtureRequest, check: str) -> None:
        """Mark this test as a strict xfail when ``check`` is listed in ``not_applicable``."""
        unknown = set(self.not_applicable) - set(CHECKS)
        assert not unknown, f"not_applicable names unknown checks {sorted(unknown)}; the checks are {CHECKS}"
        if check in self.not_applicable:
            request.applymarker(pytest.mark.xfail(reason=self.not_applicable[check], strict=True))

    def test_has_docstring_with_args_and_hooks(self, request):
        self.expect(request, "docstring")
        check_docstring(self.strategy_class)

    def test_builds_from_yaml_and_from_its_checkpoint_entry(self, request):
        self.expect(request, "yaml")
        check_yaml(self.strategy_class, self.init_args)

    def test_reaches_target_exactly_and_pruned_stay_zero(self, request, tmp_path):
        self.expect(request, "zeros")
        check_zeros(self.make_strategy(), tmp_path)

    def test_reaches_target_under_bf16_mixed_and_bf16_true(self, request, tmp_path):
        self.expect(request, "precision")
        check_precision(self.make_strategy, tmp_path)

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_reaches_target_under_16_mixed_on_a_gpu(self, request, tmp_path):
        """float16 autocast with Lightning's gradient scaler, which skips steps whose gradients overflow:
        the masks still reach the target and pruned weights stay zero."""
        self.expect(request, "precision")
        check_precision(self.make_strategy, tmp_path, ("16-mixed",), accelerator="gpu")

    def test_logs_every_layers_sparsity_when_the_logger_writes(self, request, tmp_path):
        self.expect(request, "logging")
        check_logging(self.make_strategy(), tmp_path)

    def test_resume_gives_identical_masks_and_weights(self, request, tmp_path):
        self.expect(request, "resume")
        check_resume(self.make_strategy, tmp_path)

    def test_masks_that_follow_scores_are_fresh_in_validation_checkpoints_and_at_the_end(self, request, tmp_path):
        self.expect(request, "fresh_masks")
        check_fresh_masks(self.make_strategy(), tmp_path)

    def test_export_from_the_checkpoint_gives_identical_logits(self, request, tmp_path):
        self.expect(request, "export")
        check_export(self.make_strategy(), tmp_path)

    def test_masks_held_in_the_weights_give_the_masking_forwards_results(self, request, tmp_path):
        self.expect(request, "in_place")
        check_in_place(self.make_strategy, tmp_path)

    @pytest.mark.slow
    def test_fsdp2_gives_the_masks_and_weights_of_ddp(self, request, tmp_path):
        self.expect(request, "fsdp2")
        check_fsdp2(self.strategy_class, self.init_args, tmp_path)
