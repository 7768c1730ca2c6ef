"""Normalise a CSV document into typed, de-duplicated JSON rows.

The flow maker gets the cleaned rows *and* a report of every change, so that nothing is altered
silently: renamed columns, trimmed and coerced values, dropped blank rows and removed duplicates
are all listed, with the line numbers of the CSV text they came from.

Types are inferred per column, never per cell: a column becomes int, float, bool, date or
datetime only when every non-empty value in it has that form. That keeps identifiers such as
"007" or a column of mostly-numeric codes from being half converted.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from dateutil.parser import isoparse
from hybrid_worker import InvalidInput

JsonScalar = str | int | float | bool | None

_FIELDS = ("csv", "delimiter", "dedupe", "key")
# The artifacts written when the CSV comes as a file (the job's input_blob).
_OUTPUT_CSV = "normalized.csv"
_OUTPUT_REPORT = "report.json"
# Shown in error messages; beyond this many names the list is cut so that a wide file does not
# produce an unreadable (or oversized) dead-letter description.
_MAX_NAMES_SHOWN = 20

# ASCII digits only (Python's \d and int() also accept other scripts' digits). A leading zero
# ("007", "0123.5") marks an identifier or code, not a number.
_INT = re.compile(r"[+-]?(?:0|[1-9]\d*)", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:(?:0|[1-9]\d*)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_BOOLS = {"true": True, "false": False}
# ISO-8601 calendar dates only (YYYY-MM-DD, optionally a time after "T" or a space). dateutil's
# isoparse alone would also read "2024" or "2024-03" as a full date and invent the missing parts.
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}.*", re.ASCII)


@dataclass
class _Record:
    """One data row of the CSV, with the line its text starts on (1-based)."""

    line: int
    cells: list[str]


@dataclass
class _ColumnReport:
    type: str = "string"
    coerced: int = 0
    trimmed: int = 0
    nulls: int = 0


@dataclass
class _Options:
    text: str
    delimiter: str
    dedupe: bool
    key: list[str] | None


def run(input: Any, ctx: Any) -> dict[str, Any]:
    """Entry point: see README.md for the input and output shapes."""
    input_path = getattr(ctx, "input_path", None)
    options = _parse_input(input, input_path)
    header, records, blank_lines = _read_csv(options.text, options.delimiter)

    columns, renamed = _normalise_headers(header.cells)
    key_indexes = _resolve_key(options.key, header.cells, columns)

    column_reports = [_ColumnReport() for _ in columns]
    typed_rows = _type_columns(records, column_reports)

    if options.dedupe:
        kept, duplicates = _dedupe(records, typed_rows, key_indexes)
    else:
        kept, duplicates = list(zip(records, typed_rows, strict=True)), []

    ctx.logger.info(
        "csv-normalize: %d rows in, %d out (%d duplicates, %d blank)",
        len(records) + len(blank_lines),
        len(kept),
        len(duplicates),
        len(blank_lines),
    )
    report = {
        "rows_in": len(records) + len(blank_lines),
        "rows_out": len(kept),
        "renamed_columns": renamed,
        "blank_rows_dropped": blank_lines,
        "dedupe": _describe_dedupe(options.dedupe, key_indexes, columns),
        "duplicates_removed": duplicates,
        "columns": {
            name: asdict(report) for name, report in zip(columns, column_reports, strict=True)
        },
    }
    if input_path is None:
        return {
            "columns": columns,
            "rows": [dict(zip(columns, values, strict=True)) for _, values in kept],
            "report": report,
        }
    _write_artifacts(ctx.output_dir, columns, [values for _, values in kept], report)
    return {
        "columns": columns,
        "summary": {
            "rows_in": report["rows_in"],
            "rows_out": report["rows_out"],
            "renamed_columns": len(renamed),
            "blank_rows_dropped": len(blank_lines),
            "duplicates_removed": len(duplicates),
        },
        "files": {"csv": _OUTPUT_CSV, "report": _OUTPUT_REPORT},
    }


def _write_artifacts(
    folder: str, columns: list[str], rows: list[list[JsonScalar]], report: dict[str, Any]
) -> None:
    """The normalised CSV (typed values written back as text) and the full report."""
    with open(os.path.join(folder, _OUTPUT_CSV), "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([_cell(value) for value in row] for row in rows)
    with open(os.path.join(folder, _OUTPUT_REPORT), "w", encoding="utf-8") as out:
        json.dump(report, out, ensure_ascii=False, indent=1)


def _cell(value: JsonScalar) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _read_file(path: str) -> str:
    with open(path, "rb") as file:
        data = file.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"input_blob is not UTF-8 text (invalid byte at offset {exc.start})"
        ) from None


def _parse_input(value: Any, input_path: str | None) -> _Options:
    if input_path is not None and value is None:
        value = {}
    if not isinstance(value, dict):
        raise InvalidInput(f"input must be a JSON object, got {_json_type(value)}")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise InvalidInput(
            f"unknown input field(s) {', '.join(map(repr, unknown))}; expected {', '.join(_FIELDS)}"
        )
    if input_path is not None:
        if "csv" in value:
            raise InvalidInput("give the CSV either as input.csv or as the job's input_blob, not both")
        text = _read_file(input_path)
    elif "csv" not in value:
        raise InvalidInput(
            "input.csv is required: the CSV text as a string (or name a CSV blob as input_blob)"
        )
    else:
        text = value["csv"]
    if not isinstance(text, str):
        raise InvalidInput(f"input.csv must be a string of CSV text, got {_json_type(text)}")

    delimiter = value.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '"\r\n':
        raise InvalidInput(
            "input.delimiter must be a single character other than a quote or a line break"
        )

    dedupe = value.get("dedupe", True)
    if not isinstance(dedupe, bool):
        raise InvalidInput(f"input.dedupe must be true or false, got {_json_type(dedupe)}")

    key = value.get("key")
    if key is not None:
        if not isinstance(key, list) or not key or not all(isinstance(k, str) for k in key):
            raise InvalidInput("input.key must be a non-empty list of column names (strings)")
        if not dedupe:
            raise InvalidInput("input.key only applies when input.dedupe is true")
    return _Options(text=text, delimiter=delimiter, dedupe=dedupe, key=key)


def _read_csv(text: str, delimiter: str) -> tuple[_Record, list[_Record], list[int]]:
    """Split the text into header, data records and the lines of blank records.

    Blank lines before the header are skipped without being counted: they are not rows.
    """
    header: _Record | None = None
    records: list[_Record] = []
    blank_lines: list[int] = []
    for record in _records(text.removeprefix("\ufeff"), delimiter):
        if not any(cell.strip() for cell in record.cells):
            if header is not None:
                blank_lines.append(record.line)
            continue
        if header is None:
            header = record
        elif len(record.cells) != len(header.cells):
            raise InvalidInput(
                f"CSV line {record.line} has {len(record.cells)} fields, expected "
                f"{len(header.cells)} as in the header on line {header.line}"
            )
        else:
            records.append(record)
    if header is None:
        raise InvalidInput("input.csv is empty: it has no header row")
    return header, records, blank_lines


def _records(text: str, delimiter: str) -> Iterator[_Record]:
    # The whole text is already in memory, so the csv module's 128 KiB cap on one field would
    # only reject valid input. (The limit is per process, and each job has its own process.)
    csv.field_size_limit(max(len(text), csv.field_size_limit()))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InvalidInput(f"CSV line {line} cannot be parsed: {exc}") from None
        yield _Record(line=line, cells=cells)


def _snake_case(name: str) -> str:
    """ "Amount (EUR)" -> "amount_eur", "firstName" -> "first_name", "Café" -> "cafe".

    Accents are dropped but other letters are kept, so a header in another script stays
    readable instead of collapsing to a generated name.
    """
    split_camel = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    decomposed = unicodedata.normalize("NFKD", split_camel.casefold())
    unaccented = "".join(char for char in decomposed if not unicodedata.combining(char))
    return re.sub(r"[\W_]+", "_", unaccented).strip("_")


def _normalise_headers(raw: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Make snake_case, unique column names; report each one that differs from its header.

    A name that is unique on its own keeps it; only the later repeats of a name get a numeric
    suffix, chosen so that it never takes a name another column has by right
    ("a", "a", "a_2" becomes a, a_3, a_2).
    """
    bases = [_snake_case(name) or f"column_{index}" for index, name in enumerate(raw, start=1)]
    names: list[str | None] = [None] * len(bases)
    taken: set[str] = set()
    for index, base in enumerate(bases):
        if base not in taken:
            names[index] = base
            taken.add(base)
    for index, base in enumerate(bases):
        if names[index] is None:
            suffix = 2
            while f"{base}_{suffix}" in taken:
                suffix += 1
            names[index] = f"{base}_{suffix}"
            taken.add(f"{base}_{suffix}")

    columns = [name for name in names if name is not None]
    renamed = [
        {"column": index, "from": old, "to": new}
        for index, (old, new) in enumerate(zip(raw, columns, strict=True), start=1)
        if old != new
    ]
    return columns, renamed


def _resolve_key(key: list[str] | None, header: list[str], columns: list[str]) -> list[int] | None:
    """Map key names to column indexes; a key may use the normalised name or the header text."""
    if key is None:
        return None
    headers = [cell.strip() for cell in header]
    indexes: list[int] = []
    for name in key:
        if name in columns:
            index = columns.index(name)
        elif name.strip() in headers:
            index = headers.index(name.strip())
        else:
            shown = ", ".join(columns[:_MAX_NAMES_SHOWN])
            if len(columns) > _MAX_NAMES_SHOWN:
                shown += f" and {len(columns) - _MAX_NAMES_SHOWN} more"
            raise InvalidInput(f"input.key column {name!r} is not in the CSV; columns are: {shown}")
        if index not in indexes:
            indexes.append(index)
    return indexes


def _parse_int(value: str) -> int | None:
    if not _INT.fullmatch(value):
        return None
    try:
        return int(value)
    except ValueError:  # more digits than Python's int/str conversion limit
        return None


def _parse_float(value: str) -> float | None:
    if not _FLOAT.fullmatch(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _parse_bool(value: str) -> bool | None:
    return _BOOLS.get(value.lower())


def _parse_date(value: str) -> str | None:
    if not _ISO_DATE.fullmatch(value):
        return None
    return _isoparse(value, lambda parsed: parsed.date().isoformat())


def _parse_datetime(value: str) -> str | None:
    if _ISO_DATE.fullmatch(value):
        return _parse_date(value)
    if not _ISO_DATETIME.fullmatch(value):
        return None
    return _isoparse(value, datetime.isoformat)


def _isoparse(value: str, render: Callable[[datetime], str]) -> str | None:
    try:
        return render(isoparse(value))
    except (ValueError, OverflowError):
        return None


# Tried in order; the first type that accepts every non-empty value of a column wins. "datetime"
# also accepts plain dates (kept as dates), so a column mixing the two is still normalised.
_PARSERS: tuple[tuple[str, Callable[[str], JsonScalar]], ...] = (
    ("int", _parse_int),
    ("float", _parse_float),
    ("bool", _parse_bool),
    ("date", _parse_date),
    ("datetime", _parse_datetime),
)


def _type_columns(records: list[_Record], reports: list[_ColumnReport]) -> list[list[JsonScalar]]:
    """Trim every cell, then convert each column to the narrowest type all its values fit."""
    rows: list[list[JsonScalar]] = [[cell.strip() for cell in record.cells] for record in records]
    for index, report in enumerate(reports):
        raw = [record.cells[index] for record in records]
        present = [value.strip() for value in raw if value.strip()]
        report.trimmed = sum(value != value.strip() for value in raw)
        report.nulls = len(raw) - len(present)
        report.type, converted = _infer_type(present)
        if converted is not None:
            report.coerced = len(converted)
        values = iter(converted if converted is not None else present)
        for row in rows:
            row[index] = next(values) if row[index] else None
    return rows


def _infer_type(values: list[str]) -> tuple[str, list[JsonScalar] | None]:
    """Return the first type that accepts every value, and the converted values (None: string)."""
    if not values:
        return "null", None
    for type_name, parse in _PARSERS:
        converted: list[JsonScalar] = []
        for value in values:
            result = parse(value)
            if result is None:
                break
            converted.append(result)
        else:
            return type_name, converted
    return "string", None


def _dedupe(
    records: list[_Record],
    rows: list[list[JsonScalar]],
    key_indexes: list[int] | None,
) -> tuple[list[tuple[_Record, list[JsonScalar]]], list[dict[str, int]]]:
    """Keep the first row of each identity; empty key values (null) compare equal to each other.

    Values within a column share one type, so comparing Python values is exact (no 1 == True).
    """
    first_line: dict[tuple[JsonScalar, ...], int] = {}
    kept: list[tuple[_Record, list[JsonScalar]]] = []
    duplicates: list[dict[str, int]] = []
    for record, row in zip(records, rows, strict=True):
        identity = tuple(row[i] for i in key_indexes) if key_indexes is not None else tuple(row)
        if identity in first_line:
            duplicates.append({"line": record.line, "duplicate_of": first_line[identity]})
        else:
            first_line[identity] = record.line
            kept.append((record, row))
    return kept, duplicates


def _describe_dedupe(dedupe: bool, key_indexes: list[int] | None, columns: list[str]) -> Any:
    if not dedupe:
        return None
    if key_indexes is None:
        return "all columns"
    return [columns[i] for i in key_indexes]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
