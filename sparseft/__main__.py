"""``python -m sparseft``: the ``sparseft`` command."""

from sparseft.cli.command import main

if __name__ == "__main__":
    main()
