"""The data layer's one exception, :class:`DataError`, and the way it names a place (``rows.jsonl line 3``).

Torch-free and free of the other data modules, so every reader, the formats and the encoder share it
without import circles. ``chatrlhf.data.formats`` re-exports both names (most code imports them there).
"""

from __future__ import annotations

from chatrlhf.limits import InputError


class DataError(ValueError):
    """A data problem a user can act on: where (source, row, field), what is wrong, and the fix."""

    def __init__(self, problem: str, fix: str = "", *, source: str | None = None,
                 row: int | None = None, field: str | None = None):
        super().__init__(problem)
        self.problem, self.fix, self.source, self.row, self.field = problem, fix, source, row, field

    def located(self, source: str | None, row: int | None) -> DataError:
        """Fills in the location where the raising code did not know it; returns self for ``raise``."""
        self.source = self.source if self.source is not None else source
        self.row = self.row if self.row is not None else row
        return self

    def __str__(self) -> str:
        where = describe_location(self.source, self.row)
        if self.field:
            where = f"{where}, field '{self.field}'" if where else f"field '{self.field}'"
        msg = f"{where}: {self.problem}" if where else self.problem
        return one_line(f"{msg} Fix: {self.fix}" if self.fix else msg)


class LimitError(DataError):
    """A row or file broke a limit of :mod:`chatrlhf.limits` (surrogate, 64-bit integer, depth, duplicate
    key, invalid UTF-8). The :class:`InputError` was given ``describe_location(source, row)`` as its
    ``where``, so its one line already reads ``<source> line <n>, field '<path>': <problem>. Fix: ...``
    and is kept verbatim; ``source``/``row`` are still set for code that reads them."""

    def __init__(self, err: InputError, source: str | None = None, row: int | None = None):
        super().__init__(str(err), source=source, row=row)

    def __str__(self) -> str:
        return one_line(self.problem)


def one_line(text: str) -> str:
    """Line breaks escaped: a message quotes keys, cells and library errors, which may hold them, and must
    still read as the one line the CLI prints (a column named "a\\nb" shows as ``a\\nb``)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def describe_location(source: str | None, row: int | None) -> str:
    """``"a.jsonl line 3"`` for line-based files (1-based line), ``"x.parquet index 2"`` otherwise (0-based)."""
    if source is None:
        return ""
    if row is None:
        return source
    line_based = source.endswith((".jsonl", ".ndjson", ".csv", "(JSON Lines)")) or source.startswith("demo:")
    return f"{source} line {row}" if line_based else f"{source} index {row}"
