"""Reading the datamodules' local text files: a file that is not text is an error naming it and its line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def utf8_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file, line ends kept (for ``csv.reader``), a leading byte-order mark dropped.

    Raises:
        ValueError: a line is not UTF-8 or holds a NUL byte: a binary file given as data (names file and line).
    """
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start}): is it the right file?"
                ) from None
            if "\x00" in line:
                raise ValueError(f"{path}:{number}: a NUL byte, so not UTF-8 text but binary: is it the right file?")
            yield line
