"""The ``sparseft`` command: parsing (a LightningCLI subclass), checks before a run, help, console,
one-line errors, strategy names in YAML and the ``report`` command."""

from sparseft.cli.command import main

__all__ = ["main"]
