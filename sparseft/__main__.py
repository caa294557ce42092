"""``python -m sparseft``: the ``sparseft`` command."""

from sparseft.cli import main

if __name__ == "__main__":
    main()
