"""File readers of the data layer: .jsonl/.ndjson, .json, .csv and .parquet -> ``[(row number, row dict)]``.

Data files are untrusted input; each reader refuses with one line naming the file, line (or index), field
and a fix, never with a traceback (rules in docs/data.md, "Encoding and limits"):

- bytes must be UTF-8 (``chatrlhf.limits.decode_utf8``: the line and column of the first bad byte); a
  leading byte-order mark is dropped and CRLF line ends are read like LF;
- JSON is parsed by ``chatrlhf.limits.parse_json``: no duplicate keys, no nesting deeper than 100, no
  integers beyond 64 bits, no lone UTF-16 surrogates, no NaN/Infinity;
- a JSON line or a CSV cell may hold at most ``MAX_ROW_BYTES``.

``skipped``: ``None`` raises on the first bad row (``data.bad_rows=error``); a list (``skip``) collects the
reasons of rows that cannot be read (a line that is not UTF-8 or not JSON, too long, over a limit) and goes
on. A problem of the whole file (a .json or .csv that is not UTF-8, a broken Parquet file) always raises.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from chatrlhf.data.errors import DataError, LimitError, describe_location
from chatrlhf.limits import InputError, decode_utf8, parse_json

MAX_ROW_BYTES = 16 * 2**20
"""Longest JSON line / CSV cell (16 MiB, millions of tokens, far past any context): a longer one is nearly
always a file without line breaks, or a CSV cell whose unbalanced quote ran on to the end of the file."""
CSV_JSON_COLUMNS = ("messages", "conversations")

Rows = list[tuple[int, dict]]
_LINE_FIX = "write one JSON object per line."
_UTF8_FIX = "save the file as UTF-8"


def _fail(err: DataError, skipped: list[str] | None) -> None:
    """Raises ``err``, or under ``data.bad_rows=skip`` records it as a skipped row."""
    if skipped is None:
        raise err
    skipped.append(str(err))


def _decode_file(data: bytes, source: str) -> str:
    """A whole file's bytes -> text without its byte-order mark (a file-level problem: always raises)."""
    try:
        return decode_utf8(data, source).removeprefix("\ufeff")
    except InputError as err:
        raise LimitError(err, source) from None


def _decode_line(raw: bytes, source: str, line: int) -> str:
    try:
        return decode_utf8(raw, source)
    except InputError as err:
        # decode_utf8 counts lines from the start of the bytes it is given, here this one line: its
        # "<source> line 1, column C" becomes the file's line (padding the bytes instead would cost O(line)).
        text, head = str(err), f"{source} line 1, "
        if text.startswith(head):
            text = f"{describe_location(source, line)}, {text[len(head):]}"
        raise LimitError(InputError(text), source, line) from None


def parse_value(text: str, source: str, row: int | None, fix: str, field: str | None = None) -> Any:
    """One JSON document through ``chatrlhf.limits.parse_json``; any failure is a DataError naming the place.
    ``field``: the CSV column the JSON text came from."""
    where = describe_location(source, row) + (f", cell '{field}'" if field else "")
    try:
        return parse_json(text, where)
    except InputError as err:
        raise LimitError(err, source, row) from None
    except json.JSONDecodeError as err:
        if "\x00" in text:  # ASCII saved as UTF-16 without a byte-order mark reads as NUL-separated bytes
            fix = ("remove the NUL bytes (write \\u0000 inside a string if one is meant); a file of NUL-separated "
                   f"characters is UTF-16: {_UTF8_FIX}.")
        at = f"column {err.colno}" if row is not None else f"line {err.lineno} column {err.colno}"
        msg = err.msg.removesuffix(" at")  # "Invalid control character at"
        raise DataError(f"is not valid JSON: {msg} at {at}.", fix, source=source, row=row, field=field) from None


def _rest_of_line(fh: BinaryIO) -> int:
    """Reads past the end of the current line; returns the bytes read."""
    size = 0
    while chunk := fh.readline(2**20):
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return size


def _split_cr(raw: bytes) -> list[bytes]:
    """One \\n-ended line -> its lines as text mode reads them (universal newlines): \\r\\n ends one line,
    a lone \\r (classic Mac files) ends one too."""
    body = raw.removesuffix(b"\n").removesuffix(b"\r")
    return body.split(b"\r") if b"\r" in body else [body]


def _lines(fh: BinaryIO, source: str, skipped: list[str] | None) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of the non-blank lines, the first without a byte-order mark; a line over
    MAX_ROW_BYTES is refused (or skipped) without being held in memory whole."""
    line = 0
    while raw := fh.readline(MAX_ROW_BYTES + 1):
        if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
            line += 1
            size = len(raw) + _rest_of_line(fh)
            _fail(DataError(f"is {size / 2**20:.1f} MiB long, over the {MAX_ROW_BYTES >> 20} MiB a row may hold.",
                            "split the text; if the file should have many lines, check that its lines end "
                            "with \\n (one JSON object per line).", source=source, row=line), skipped)
            continue
        for piece in _split_cr(raw.removeprefix(codecs.BOM_UTF8) if line == 0 else raw):
            line += 1
            if piece.strip():
                yield line, piece


def _json_object(text: str, source: str, row: int, fix: str) -> dict:
    value = parse_value(text, source, row, fix)
    if not isinstance(value, dict):
        raise DataError(f"is a JSON {type(value).__name__}, not an object.", fix, source=source, row=row)
    return value


def read_json_lines(path: Path, source: str, skipped: list[str] | None = None, fix: str = _LINE_FIX) -> Rows:
    """A JSON Lines file: one object per non-blank line, numbered by file line (1-based)."""
    rows = []
    with path.open("rb") as fh:
        for line, raw in _lines(fh, source, skipped):
            try:
                rows.append((line, _json_object(_decode_line(raw, source, line), source, line, fix)))
            except DataError as err:
                _fail(err, skipped)
    return rows


def read_json(path: Path, source: str, skipped: list[str] | None = None) -> tuple[str, Rows]:
    """A .json file: a list of objects, ``{"data": [...]}``, or JSON Lines (what ``Dataset.to_json``
    writes); returns (display name, rows indexed from 0). The file is one document, so a limit broken
    anywhere in it stops the run even under ``skip``."""
    text = _decode_file(path.read_bytes(), source)
    fix = "store a list of row objects, or {\"data\": [...]}, or JSON Lines."
    try:
        data = parse_value(text, source, None, fix)
    except DataError as err:
        # `Dataset.to_json` writes JSON Lines under a .json name; accept that rather than fail.
        if "Extra data" in err.problem and text.lstrip().startswith("{"):
            jsonl_source = f"{source} (JSON Lines)"
            return jsonl_source, read_json_lines(path, jsonl_source, skipped)
        raise
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"holds a JSON {type(data).__name__} at the top level.", fix, source=source)
    rows = []
    for i, row in enumerate(data):
        if isinstance(row, dict):
            rows.append((i, row))
        else:
            _fail(DataError(f"is a JSON {type(row).__name__}, not an object.", "store each row as an object.",
                            source=source, row=i), skipped)
    return source, rows


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    # csv.field_size_limit is process-wide (default 128 KiB, less than a long document): raised while
    # reading, then put back
    before = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _csv_header(reader: csv.DictReader, source: str) -> list[str]:
    header = reader.fieldnames or []
    seen = set()
    for name in header:
        if name in seen:
            raise DataError(f"the header names column {name!r} twice.", "rename or drop one of them.",
                            source=source, row=1)
        seen.add(name)
    return header


def _csv_row(row: dict, source: str, line: int, width: int) -> dict:
    if None in row:
        raise DataError(f"has more cells than the header's {width} columns.", "quote cells that contain commas.",
                        source=source, row=line)
    if any(value is None for value in row.values()):
        raise DataError(f"has fewer cells than the header's {width} columns.",
                        "fill in every column (a cell with an unbalanced quote \" runs on to the end of the file).",
                        source=source, row=line)
    # CSV has no lists: a messages/conversations cell holds the message list as JSON text.
    for column in CSV_JSON_COLUMNS:
        cell = row.get(column)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            row[column] = parse_value(cell, source, line, "write the message list as JSON text in the cell.",
                                      field=column)
    return row


def read_csv(path: Path, source: str, skipped: list[str] | None = None) -> Rows:
    """A CSV file with a header; rows numbered by the file line they start on (a quoted cell may span
    lines). Decoded whole, since a quoted cell may hold line breaks."""
    text = _decode_file(path.read_bytes(), source)
    rows, line = [], 2  # line 1 is the header
    with _csv_field_limit(MAX_ROW_BYTES):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            width = len(_csv_header(reader, source))
            for row in reader:
                try:
                    rows.append((line, _csv_row(row, source, line, width)))
                except DataError as err:
                    _fail(err, skipped)
                line = reader.line_num + 1
        except csv.Error as err:  # the reader cannot go on after this: the file's problem, not one row's
            raise DataError(f"is not valid CSV ({err}).",
                            f"keep each cell under {MAX_ROW_BYTES >> 20} MiB and close every quote \".",
                            source=source, row=line) from None
    return rows


def read_parquet(path: Path, source: str) -> Rows:
    """A Parquet file; rows indexed from 0 (``to_pylist``: plain lists/dicts, not numpy arrays)."""
    import pyarrow.parquet as pq

    try:
        return list(enumerate(pq.read_table(path).to_pylist()))
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for corrupt or truncated files
        raise DataError(f"is not a readable Parquet file ({type(err).__name__}: {err}).",
                        "re-export the file (it may be truncated, or not Parquet).", source=source) from None
