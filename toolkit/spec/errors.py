"""Problems found in a spec, and the exception that carries all of them at once."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from toolkit.errors import InputError

Loc = tuple[str | int, ...]


def format_path(loc: Loc) -> str:
    """Render a location tuple as a field path: ``('nodes', 3, 'factorize', 'rank')`` -> ``nodes[3].factorize.rank``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def suggest(name: str, known: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix naming the closest known name, or "" when none is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec.

    Attributes:
        file: the spec file (or "<memory>").
        path: field path inside the spec, e.g. ``nodes[3].factorize.rank`` ("" for the whole file).
        line: 1-based line in the file, or None when unknown (JSON without positions, dict input).
        message: what is wrong: expected X, got Y.
    """

    file: str
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return one_line(text)


# what str.splitlines() splits on: a key or value holding one must not break "one line per problem"
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: str) -> str:
    """``text`` with every line break escaped (``\\n``, ``\\x85``...), so it prints as one line."""
    return text.translate(_LINE_BREAKS)


class SpecError(InputError):
    """A spec is invalid; ``problems`` lists every problem found, ``str()`` gives one line each.

    An :class:`~toolkit.errors.InputError` (hence a ValueError): the CLI prints it with exit code 2.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
