"""The ``sparseft`` command.

* ``sparseft fit|validate|test|predict``: LightningCLI with the strategy under ``sparsity:``;
  ``data.tokenizer`` is linked from ``model.backbone`` (or ``model.tokenizer``), and
  ``model.num_labels`` / ``model.task`` from the datamodule, so none is written twice.
* ``sparseft predict``: writes the task's submission format (GLUE TSVs, SQuAD JSON, E2E text) (the
  datamodule's ``write_predictions``; ``--data.predict_split dev|test``); ``validate`` / ``test`` write
  ``metrics.json``. Evaluations use no logger and write into their own directory, printed
  (:mod:`sparseft.cli.evaluation`; ``--output_dir``).
* ``sparseft``, ``sparseft --help``: every command, one line each (:mod:`sparseft.cli.help`).
* ``validate`` / ``test`` / ``predict`` need ``--ckpt_path``, or ``--backbone_weights true`` for a
  backbone that is itself fine-tuned (:mod:`sparseft.cli.checks`); ``--ckpt_path`` fills in only the
  model options the user left unset (:mod:`sparseft.training.resume`).
* ``sparseft export --ckpt_path CKPT --output_dir DIR``: a plain Hugging Face model directory,
  written whole or not at all (``--overwrite true`` replaces a non-empty one);
  ``--adapter_path PATH`` also writes the update alone: S²FT's as a file (:mod:`sparseft.export.adapters`),
  LoRA's as a PEFT adapter directory (:mod:`sparseft.export.peft`);
  ``--format compressed`` stores sparse weights as bitmask + values (:mod:`sparseft.export.compressed`).
* ``sparseft strategies``: every registered strategy with its one-line description.
* ``sparseft targets --config CFG``: a dry run listing the layers the strategy would sparsify.
* ``sparseft report CKPT_OR_EXPORT``: the per-layer sparsity table and PNG figures
  (:mod:`sparseft.cli.report`).
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from sparseft import __version__
from sparseft.backbones.loading import load_report_hidden, load_tokenizer
from sparseft.cli.checks import (
    BACKBONE_WEIGHTS_HELP,
    EVALUATION_COMMANDS,
    check_evaluated_weights,
    check_trainer_strategy,
    whole_backbone_reason,
)
from sparseft.cli.console import console_callbacks
from sparseft.cli.errors import one_line_user_errors
from sparseft.cli.evaluation import OUTPUT_DIR_HELP, evaluation_trainer
from sparseft.cli.help import HELP_FLAGS, VERSION_FLAGS, usage
from sparseft.cli.options import add_optimizer_arguments, start_switched_strategies_fresh
from sparseft.cli.preflight import check_before_run
from sparseft.cli.report import report_command
from sparseft.cli.strategy_names import names_a_strategy, register_parser_mode, strategy_class_path
from sparseft.datamodules.base import TextDataModule
from sparseft.export.adapters import check_adapter_target, prepare_adapter
from sparseft.export.compressed import WEIGHT_FORMATS
from sparseft.export.pretrained import check_export_target, export_pretrained
from sparseft.sparse.targets import describe_targets
from sparseft.strategies import SparsityStrategy, available_strategies
from sparseft.training.checkpointing import fit_checkpoint_callbacks, with_checkpoint_io
from sparseft.training.module import SparseFTModule
from sparseft.training.resume import model_options_from_checkpoint, strategy_options_from_checkpoint
from sparseft.training.run_summary import read_training_summary
from sparseft.training.sharding import sharded_loading

EXTRA_COMMANDS = ("export", "strategies", "targets", "report")
STRATEGY_OPTIONS = ("--sparsity", "--sparsity.class_path", "--sparsity.help")


def _tokenizer_name(backbone: str | None, tokenizer: str | None) -> str | None:
    return tokenizer or backbone


class SaveConfigWhenRunning(SaveConfigCallback):
    """Writes the run's ``config.yaml`` when the loop starts, after the checkpoint is restored and checked.

    Lightning's callback writes it at ``setup``, before ``--ckpt_path`` is loaded: a resume refused then
    (another strategy, other settings) had already replaced the resumed run's ``config.yaml`` by the
    refused configuration. Nothing may be written before the checks pass.

    Runs on: ``on_train_start`` / ``on_validation_start`` / ``on_test_start`` / ``on_predict_start``,
    whichever comes first.
    """

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self._stage = stage  # written later, by the first loop that starts

    def _save_once(self, trainer: Trainer, pl_module: Any) -> None:
        super().setup(trainer, pl_module, self._stage)  # does nothing once saved

    on_train_start = on_validation_start = on_test_start = on_predict_start = _save_once


class SparseFTCLI(LightningCLI):
    """LightningCLI for a ``SparseFTModule``, any ``TextDataModule`` and one sparsity strategy."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", SaveConfigWhenRunning)
        # strategy names in configuration files (class_path: magnitude), see sparseft.cli.strategy_names
        kwargs["parser_kwargs"] = {"parser_mode": register_parser_mode(), **kwargs.get("parser_kwargs", {})}
        # --optimizer / --lr_scheduler go to the module, which builds them from the strategies' groups
        super().__init__(SparseFTModule, TextDataModule, subclass_mode_data=True, auto_configure_optimizers=False,
                         **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parse errors are raised, for :mod:`sparseft.cli.errors` to report in one line."""
        return super().init_parser(**{"exit_on_error": False, **kwargs})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        available_strategies()  # imports entry-point strategies, so that --help lists them too
        parser.add_lightning_class_args(SparsityStrategy, "sparsity", subclass_mode=True, required=False)
        parser.link_arguments(
            ("model.backbone", "model.tokenizer"), "data.init_args.tokenizer", compute_fn=_tokenizer_name
        )
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")
        parser.link_arguments("data.task_type", "model.task", apply_on="instantiate")
        add_optimizer_arguments(parser)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in EVALUATION_COMMANDS:
            parser.add_argument("--backbone_weights", type=bool, default=False, help=BACKBONE_WEIGHTS_HELP)
            parser.add_argument("--output_dir", type=str | None, default=None, help=OUTPUT_DIR_HELP)
        return parser

    def _parse_ckpt_path(self) -> None:
        """Check the run before anything loads (:mod:`sparseft.cli.checks`); take from ``--ckpt_path`` only
        the model options the user left unset, refusing another model, and for an evaluation the strategy
        settings the user left unset, refusing other ones (:mod:`sparseft.training.resume`), where Lightning
        would parse all of the checkpoint's model options over the user's."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        check_evaluated_weights(subcommand, config)
        check_trainer_strategy(config.get("trainer.strategy"), config.get("sparsity"))
        taken = {"model": model_options_from_checkpoint(config.get("ckpt_path"), config.model.as_dict(),
                                                        SparseFTModule)}
        if subcommand in EVALUATION_COMMANDS:
            user = config.sparsity.as_dict() if config.get("sparsity") else None
            sparsity = strategy_options_from_checkpoint(config.get("ckpt_path"), user)
            if sparsity != user:
                taken["sparsity"] = sparsity
        if taken["model"] or "sparsity" in taken:
            self.config = self.parser.parse_object({subcommand: taken}, self.config)

    def instantiate_classes(self) -> None:
        """As LightningCLI's; with ``--ckpt_path`` the backbone's weights are replaced by the checkpoint's, so
        transformers' report of the head it initialised ("classifier MISSING ... Consider training") is hidden.
        ``fit`` under ``fsdp2`` builds the backbone without weights, each process reading its own shards in
        ``configure_model`` (sharded loading), unless the sparsity strategy reads weights when it attaches."""
        subcommand = self.config.get("subcommand")
        resumed = subcommand and self.config[subcommand].get("ckpt_path") is not None
        with load_report_hidden() if resumed else nullcontext(), self._backbone_loading(subcommand):
            super().instantiate_classes()

    def _backbone_loading(self, subcommand: str | None) -> AbstractContextManager[None]:
        config = self.config[subcommand] if subcommand else None
        if subcommand != "fit" or config.get("model.backbone") is None:
            return nullcontext()
        reason = whole_backbone_reason(config.get("trainer.strategy"), config.get("sparsity"))
        if reason is None:
            rank_zero_info(f"sparseft: FSDP2 sharded loading: each process reads only its own shards of "
                           f"{config.model.backbone}")
            return sharded_loading()
        if reason != "not sharded":
            rank_zero_info(f"sparseft: every process loads the whole backbone before FSDP2 shards it: {reason}")
        return nullcontext()

    def after_instantiate_classes(self) -> None:
        """Check strategies, checkpoint and data before the run writes anything (:mod:`sparseft.cli.preflight`)."""
        if self.subcommand is not None:
            check_before_run(self.model.model, self.datamodule, self.trainer, self.subcommand,
                             self._get(self.config_init, "ckpt_path"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """As LightningCLI's, but a run without ``sparsity`` (dense fine-tuning) adds no callback, an
        evaluation writes its outputs into its own directory (:mod:`sparseft.cli.evaluation`), and the
        console is quieter (:mod:`sparseft.cli.console`)."""
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        callbacks = [c for c in callbacks if isinstance(c, Callback)]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        configured = config.get("callbacks") or []
        if self.subcommand in EVALUATION_COMMANDS:
            callbacks += evaluation_trainer(self.subcommand, config, configured,
                                            self._get(self.config_init, "ckpt_path"),
                                            self._get(self.config_init, "output_dir"))
        if self.subcommand == "fit":
            callbacks += resumable_fit(config, configured)
        callbacks += console_callbacks(self.subcommand, config, configured)
        return self._instantiate_trainer(config, callbacks)


def resumable_fit(config: dict[str, Any], configured: list[Any]) -> list[Callback]:
    """A fit always leaves a checkpoint of its last state, also on Ctrl-C or an exception, and writes
    checkpoints next to their target (:mod:`sparseft.training.checkpointing`); edits ``config["plugins"]``."""
    config["plugins"] = with_checkpoint_io(config.get("plugins"))
    return fit_checkpoint_callbacks(configured, config.get("enable_checkpointing") is not False)


def expand_strategy_names(argv: list[str]) -> list[str]:
    """Let ``--sparsity magnitude`` and ``--sparsity.help magnitude`` (a registry name or class name, any
    case) stand for the strategy's class path; a strategy that replaces another starts from its own
    defaults (:func:`start_switched_strategies_fresh`)."""
    expanded = list(argv)
    for index, arg in enumerate(expanded):
        option, equals, value = arg.partition("=")
        if option in STRATEGY_OPTIONS and equals and names_a_strategy(value):
            expanded[index] = f"{option}={strategy_class_path(value)}"
        elif arg in STRATEGY_OPTIONS and index + 1 < len(expanded) and names_a_strategy(expanded[index + 1]):
            expanded[index + 1] = strategy_class_path(expanded[index + 1])
    return start_switched_strategies_fresh(expanded)


def list_strategies() -> str:
    """One line per registered strategy: name, class, first line of its docstring."""
    rows = []
    for name, cls in available_strategies().items():
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append(f"{name:<12} {cls.__module__}.{cls.__qualname__}\n{'':<12} {summary}")
    return "\n".join(rows)


def export_command(argv: list[str]) -> dict[str, Any]:
    """``sparseft export``: merge a checkpoint into a plain HF model directory with report.json."""
    parser = ArgumentParser(prog="sparseft export", description=export_command.__doc__, exit_on_error=False)
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by sparseft fit")
    parser.add_argument("--output_dir", type=str, required=True, help="directory to write the model to")
    parser.add_argument("--tokenizer", type=str, default=None, help="tokenizer to save beside it (default: the run's)")
    parser.add_argument("--adapter_path", type=str, default=None,
                        help="also write the update alone: S²FT's as a structured adapter file (indices, update, "
                             "base); LoRA's (lora, DSEE unpruned) as a PEFT adapter directory")
    parser.add_argument("--format", choices=WEIGHT_FORMATS, default="dense",
                        help="weights as a plain model.safetensors (dense) or as bitmask + non-zero values per sparse "
                             "tensor (compressed: load with trust_remote_code=True or sparseft.load_compressed)")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace a non-empty --output_dir (and an existing --adapter_path)")
    args = parser.parse_args(argv)
    check_export_target(args.output_dir, args.overwrite, keep=[args.ckpt_path])  # before loading anything
    if args.adapter_path:
        check_adapter_target(args.adapter_path, args.output_dir, args.overwrite)
    module, strategy = SparseFTModule.from_sparseft_checkpoint(args.ckpt_path)
    write_adapter = (prepare_adapter(module.model, args.adapter_path, args.output_dir, args.overwrite,
                                     keep=[args.ckpt_path]) if args.adapter_path else None)  # before the merge
    tokenizer_name = args.tokenizer or module.hparams.tokenizer
    tokenizer = load_tokenizer(tokenizer_name, "--tokenizer, else the run's") if tokenizer_name else None
    extra = {"strategy": strategy.describe() if strategy else None, "checkpoint": str(args.ckpt_path),
             **read_training_summary(args.ckpt_path)}
    shrink = strategy is not None and strategy.structured
    report = export_pretrained(module.model, args.output_dir, tokenizer, extra, shrink=shrink,
                               weight_format=args.format, overwrite=args.overwrite)
    if write_adapter is not None:
        write_adapter()
    print(
        f"exported to {args.output_dir}: target sparsity {report['target_sparsity']:.4f} over "
        f"{report['target_weights']:,} weights; linear FLOPs/token {report['linear_flops_per_token']}"
    )
    return report


def targets_command(argv: list[str]) -> str:
    """``sparseft targets``: parse a fit config and list the layers its strategy would sparsify."""
    cli = SparseFTCLI(run=False, args=expand_strategy_names(argv))
    strategy = cli.config_init.get("sparsity")
    if strategy is None:
        raise SystemExit("no sparsity strategy in this configuration: nothing would be sparsified")
    table = describe_targets([sparse.layer for sparse in strategy.attach(cli.model.model)])
    print(table)
    return table


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sparseft`` console script; a user error is one line (:mod:`sparseft.cli.errors`)."""
    command = next(iter(sys.argv[1:] if argv is None else argv), "")
    with one_line_user_errors(command if command in ("fit", "validate", "test", "predict", *EXTRA_COMMANDS) else ""):
        run_command(argv)


def run_command(argv: list[str] | None = None) -> None:
    """Run one ``sparseft`` command line (``argv`` None: the process's own)."""
    argv_given = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    if command in VERSION_FLAGS:
        print(f"sparseft {__version__}")
    elif command in ("", *HELP_FLAGS):
        print(usage())
    elif command == "strategies":
        print(list_strategies())
    elif command == "export":
        export_command(argv[1:])
    elif command == "targets":
        targets_command(argv[1:])
    elif command == "report":
        report_command(argv[1:])
    elif argv_given:
        SparseFTCLI(args=expand_strategy_names(argv))
    else:  # from the shell: LightningCLI reads sys.argv (and DDP relaunches the same command line)
        sys.argv[1:] = expand_strategy_names(argv)
        SparseFTCLI()

