"""How the ``sparseft`` command reports a user's mistake: one line on stderr, not a traceback.

A *user error* is input that cannot work: an option value, a file, a checkpoint. It is printed
as ``sparseft: error: <what is wrong, which option, how to fix it>`` and the command exits with
status 2, the usual status of a usage error. Anything else is a bug (in sparseft or a library)
and keeps its full traceback. With ``SPARSEFT_DEBUG=1`` in the environment user errors show
their traceback too.

The exception that reaches the command is often not the one that says what is wrong:
jsonargparse wraps an error raised in a constructor (a strategy's ``sparsity must be in
[0, 1)``) in "Does not validate against any of the Union subtypes", and libraries wrap theirs
with ``raise ... from``. So the chain of explicit causes is searched from the outside in, and
the first link that is a user error is reported:

* a ``ValueError`` raised by sparseft's own code: its checks name the option and the fix;
* a missing, unreadable or already existing path (``FileNotFoundError``, ``FileExistsError``,
  ``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``), from any code: the message
  names the path;
* a command-line or configuration parse error (``argparse.ArgumentError`` from jsonargparse),
  condensed from its nested report to the option and the problem;
* Lightning's ``MisconfigurationException``: Trainer options that cannot work together.

An exception raised while another was being handled (implicit context, no ``from``) is a new
problem, not a wrapper: it is never looked through, so a bug in error handling stays visible.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from lightning.fabric.utilities.exceptions import MisconfigurationException

DEBUG_ENV = "SPARSEFT_DEBUG"
USAGE_ERROR_STATUS = 2
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
PACKAGE_DIR = Path(__file__).resolve().parents[1]

# jsonargparse's wrapper of an error raised while instantiating a class given as "class_path"
_UNION_WRAPPER = "Does not validate against any of the Union subtypes"
_UNION_BASE = re.compile(r"Subtypes: \[<class '([\w.]+)'>")
_GIVEN_CLASS = re.compile(r"class_path='([\w.]+)'")
# the command-line option group of each base class the CLI takes as a class_path
_OPTION_GROUPS = {"SparsityStrategy": "sparsity", "TextDataModule": "data", "SparsitySchedule": "schedule"}


def debug_requested() -> bool:
    """Whether ``SPARSEFT_DEBUG`` asks for full tracebacks (any value but empty, ``0`` or ``false``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _raised_by_sparseft(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is in the sparseft package."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def _is_user_error(error: BaseException) -> bool:
    if isinstance(error, (argparse.ArgumentError, MisconfigurationException, *PATH_ERRORS)):
        return True
    return isinstance(error, ValueError) and _raised_by_sparseft(error)


def explicit_causes(error: BaseException) -> list[BaseException]:
    """``error`` and the chain of exceptions it was raised ``from``, outermost first."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__
    return chain


def _option_group(wrappers: list[BaseException]) -> str:
    """``--sparsity (Magnitude): `` for an error jsonargparse wrapped while building a class, else ``''``."""
    names, given = [], None
    for wrapper in wrappers:
        text = str(wrapper)
        if not (isinstance(wrapper, ValueError) and text.startswith(_UNION_WRAPPER)):
            continue
        base = _UNION_BASE.search(text)
        if base and base.group(1).rsplit(".", 1)[-1] in _OPTION_GROUPS:
            names.append(_OPTION_GROUPS[base.group(1).rsplit(".", 1)[-1]])
        if given is None and (match := _GIVEN_CLASS.search(text)):
            given = match.group(1).rsplit(".", 1)[-1]
    if not names:
        return ""
    return f"--{'.'.join(names)}" + (f" ({given})" if given else "") + ": "


def one_line(text: str) -> str:
    """The lines of a message joined into one."""
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def user_error_message(error: BaseException, command: str = "") -> str | None:
    """The one-line report of ``error`` if it is a user error (see the module docstring), else None."""
    chain = explicit_causes(error)
    for depth, link in enumerate(chain):
        if isinstance(link, argparse.ArgumentError):
            return condense_parse_error(link.message, command)
        if _is_user_error(link):
            return _option_group(chain[:depth]) + one_line(str(link) or type(link).__name__)
    return None


@contextmanager
def one_line_user_errors(command: str = "") -> Iterator[None]:
    """Report a user error raised inside as one line on stderr and exit with status 2; re-raise
    anything else (and, with ``SPARSEFT_DEBUG=1``, user errors too) with its traceback."""
    try:
        yield
    except Exception as error:
        message = None if debug_requested() else user_error_message(error, command)
        if message is None:
            raise
        print(f"sparseft: error: {message}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR_STATUS) from None


# ---- jsonargparse's parse errors ------------------------------------------------------------
_PARSER_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":\s*(.*)$')
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)'")
_NOISE = (_UNION_WRAPPER, "Subtypes:", "Errors:", "Given value type:", "Expected a <class 'NoneType'>")


def _readable_types(text: str) -> str:
    text = re.sub(r"Expected an? typing\.Literal\[(.*?)\]", r"expected one of \1", text)
    text = re.sub(r"Expected an? <class '(?:[\w.]+\.)?(\w+)'>", r"expected \1", text)
    return re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)


class _Problem(NamedTuple):
    """One innermost line of a jsonargparse report: its indent, line index, full option and class."""

    indent: int
    index: int
    text: str
    option: str
    class_path: str | None


def _problems(lines: list[str]) -> list[_Problem]:
    """Every line of the report that states a problem (not a key, a union's bookkeeping or a value)."""
    keys: list[tuple[int, str]] = []
    classes: list[tuple[int, str]] = []
    found = []
    for index, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        text = line.strip().removeprefix("- ").strip()
        keys = [(level, key) for level, key in keys if level < indent]
        classes = [(level, name) for level, name in classes if level < indent]
        if match := _PARSER_KEY.match(line.strip()):
            keys.append((indent, match.group(1)))
            text = match.group(2)
        if match := _CLASS_PATH.match(text):
            classes.append((indent, match.group(1)))
        elif text and not text.startswith(_NOISE) and not text.startswith("Given value:"):
            option = ".".join(key for _, key in keys)
            found.append(_Problem(indent, index, text, option, classes[-1][1] if classes else None))
    return found


def condense_parse_error(message: str, command: str = "") -> str:
    """One line from jsonargparse's nested report: the full option name and the innermost problem.

    ``Parser key "sparsity": ... Parser key "schedule": ... Parser key "kind": Expected a
    typing.Literal['cubic', ...]. Got value: foo`` becomes ``--sparsity.schedule.kind: expected
    one of 'cubic', .... Got value: foo``, followed by where to read the accepted options. The
    alternatives of a union (``--trainer.precision``) are all listed.
    """
    hint = f" (sparseft {command} --help lists the options)" if command else ""
    lines = message.splitlines()
    problems = _problems(lines)
    if not problems:
        return one_line(message) + hint
    deepest = max(problems, key=lambda problem: problem.indent)  # the first of the deepest
    if match := _NOT_ACCEPTED.match(deepest.text):
        owner = f" of {deepest.class_path}" if deepest.class_path else ""
        return f"--{deepest.option}.{match.group(1)}: no such option{owner}{hint}"
    end = next((i for i in range(deepest.index + 1, len(lines))
                if len(lines[i]) - len(lines[i].lstrip()) < deepest.indent), len(lines))
    alternatives = [_readable_types(problem.text) for problem in problems
                    if problem.indent == deepest.indent and deepest.index <= problem.index < end]
    text = alternatives[0] + "".join(f" or {other.removeprefix('expected ')}" for other in alternatives[1:])
    given = next((line.strip() for line in lines[end:] if line.strip().startswith("Given value:")), None)
    if given and "Got value" not in text:
        text = f"{text.rstrip('.')}. {given}"
    prefix = f"--{deepest.option}: " if deepest.option else ""
    return prefix + one_line(text) + hint
