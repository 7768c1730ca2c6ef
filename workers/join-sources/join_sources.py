"""Join two lists of JSON rows on one or more key columns (inner or left join).

Besides the joined rows, the report says what did *not* join and where keys repeat, because
that is what a flow maker needs to spot a bad export: unmatched keys on either side, and
duplicate keys whose many-to-many matches multiply the output (fan-out).

Key matching follows SQL: a key containing null never matches anything. Key values match by
JSON value, so the number 1 matches 1.0 but not "1" and not true.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hybrid_worker import InvalidInput

Row = dict[str, Any]
# A key value tagged with its JSON kind, so that True and 1 (equal in Python) stay distinct.
KeyPart = tuple[str, Any]
Key = tuple[KeyPart, ...]

_FIELDS = ("left", "right", "on", "left_on", "right_on", "how")
_HOWS = ("inner", "left")
_RIGHT_SUFFIX = "_right"
# The artifacts written when the left side comes as a CSV file (the job's input_blob).
_OUTPUT_CSV = "joined.csv"
_OUTPUT_REPORT = "report.json"


@dataclass(frozen=True)
class _Request:
    left: list[Row]
    right: list[Row]
    left_on: list[str]
    right_on: list[str]
    how: str


def run(input: Any, ctx: Any) -> dict[str, Any]:
    """Entry point: see README.md for the input and output shapes."""
    input_path = getattr(ctx, "input_path", None)
    request = _parse_input(input, input_path)
    left_keys = [_row_key(row, request.left_on, "left", i) for i, row in enumerate(request.left)]
    right_keys = [
        _row_key(row, request.right_on, "right", i) for i, row in enumerate(request.right)
    ]

    left_columns = _columns(request.left)
    # With a shared key name ("on"), the right copy of the key would only repeat the left one.
    shared_keys = {
        right
        for left, right in zip(request.left_on, request.right_on, strict=True)
        if left == right
    }
    right_columns = [c for c in _columns(request.right) if c not in shared_keys]
    right_names = _output_names(right_columns, set(left_columns))

    right_index: dict[Key, list[int]] = {}
    for position, key in enumerate(right_keys):
        if _matchable(key):
            right_index.setdefault(key, []).append(position)

    rows: list[Row] = []
    matched_right: set[int] = set()
    unmatched_left: list[Key] = []
    for row, key in zip(request.left, left_keys, strict=True):
        matches = right_index.get(key, [])
        for position in matches:
            rows.append(_merge(row, left_columns, request.right[position], right_names))
        matched_right.update(matches)
        if not matches:
            unmatched_left.append(key)
            if request.how == "left":
                rows.append(_merge(row, left_columns, None, right_names))

    unmatched_right = [key for i, key in enumerate(right_keys) if i not in matched_right]
    ctx.logger.info(
        "join-sources: %s join of %d x %d rows gave %d",
        request.how,
        len(request.left),
        len(request.right),
        len(rows),
    )
    columns = left_columns + list(right_names.values())
    report = {
        "how": request.how,
        "on": {"left": request.left_on, "right": request.right_on},
        "left_rows": len(request.left),
        "right_rows": len(request.right),
        "output_rows": len(rows),
        "unmatched_left_rows": len(unmatched_left),
        "unmatched_right_rows": len(unmatched_right),
        "unmatched_left_keys": _distinct(unmatched_left),
        "unmatched_right_keys": _distinct(unmatched_right),
        "duplicate_keys": _duplicate_keys(left_keys, right_keys),
        "renamed_right_columns": [
            {"from": old, "to": new} for old, new in right_names.items() if old != new
        ],
    }
    if input_path is None:
        return {"columns": columns, "rows": rows, "report": report}
    _write_artifacts(ctx.output_dir, columns, rows, report)
    summary = {k: report[k] for k in ("how", "on", "left_rows", "right_rows", "output_rows",
                                     "unmatched_left_rows", "unmatched_right_rows")}
    return {
        "columns": columns,
        "summary": summary,
        "files": {"csv": _OUTPUT_CSV, "report": _OUTPUT_REPORT},
    }


def _write_artifacts(
    folder: str, columns: list[str], rows: list[Row], report: dict[str, Any]
) -> None:
    """The joined rows as CSV (null as an empty field) and the full report."""
    with open(os.path.join(folder, _OUTPUT_CSV), "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row[c]) for c in columns])
    with open(os.path.join(folder, _OUTPUT_REPORT), "w", encoding="utf-8") as out:
        json.dump(report, out, ensure_ascii=False, indent=1)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _csv_rows(path: str) -> list[Row]:
    """The left side from a CSV file: the header names the columns, every value is text (an
    empty field too), so its keys match string keys on the right."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            csv.field_size_limit(max(os.path.getsize(path), csv.field_size_limit()))
            reader = csv.reader(file, strict=True)
            header = next(reader, None)
            if header is None:
                raise InvalidInput("input_blob is empty: it has no header row")
            rows = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue
                if len(cells) != len(header):
                    raise InvalidInput(
                        f"input_blob line {reader.line_num} has {len(cells)} fields, expected "
                        f"{len(header)} as in the header"
                    )
                rows.append(dict(zip(header, cells, strict=True)))
            return rows
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"input_blob is not UTF-8 text (invalid byte at offset {exc.start})") from None
    except csv.Error as exc:
        raise InvalidInput(f"input_blob cannot be parsed as CSV: {exc}") from None


def _parse_input(value: Any, input_path: str | None) -> _Request:
    if not isinstance(value, dict):
        raise InvalidInput(f"input must be a JSON object, got {_json_type(value)}")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise InvalidInput(
            f"unknown input field(s) {', '.join(map(repr, unknown))}; expected {', '.join(_FIELDS)}"
        )
    if input_path is not None:
        if "left" in value:
            raise InvalidInput(
                "give the left rows either as input.left or as the job's input_blob (CSV), not both"
            )
        left = _csv_rows(input_path)
    else:
        left = _rows(value, "left")
    right = _rows(value, "right")

    how = value.get("how", "inner")
    if how not in _HOWS:
        shown = repr(how) if isinstance(how, str) and len(how) <= 40 else _json_type(how)
        raise InvalidInput(f"input.how must be one of {', '.join(_HOWS)}, got {shown}")

    if "on" in value:
        if "left_on" in value or "right_on" in value:
            raise InvalidInput("give either input.on or input.left_on and input.right_on, not both")
        left_on = right_on = _column_list(value["on"], "on")
    elif "left_on" in value and "right_on" in value:
        left_on = _column_list(value["left_on"], "left_on")
        right_on = _column_list(value["right_on"], "right_on")
        if len(left_on) != len(right_on):
            raise InvalidInput(
                f"input.left_on has {len(left_on)} column(s) but input.right_on has "
                f"{len(right_on)}; they pair up one to one"
            )
    else:
        raise InvalidInput(
            "input.on (a column name or a list of them) is required, "
            "or both input.left_on and input.right_on"
        )
    return _Request(left=left, right=right, left_on=left_on, right_on=right_on, how=how)


def _rows(value: dict[str, Any], side: str) -> list[Row]:
    if side not in value:
        raise InvalidInput(f"input.{side} is required: a list of row objects")
    rows = value[side]
    if not isinstance(rows, list):
        raise InvalidInput(f"input.{side} must be a list of row objects, got {_json_type(rows)}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidInput(f"input.{side}[{index}] must be an object, got {_json_type(row)}")
    return rows


def _column_list(value: Any, name: str) -> list[str]:
    columns = [value] if isinstance(value, str) else value
    if (
        not isinstance(columns, list)
        or not columns
        or not all(isinstance(c, str) and c for c in columns)
    ):
        raise InvalidInput(
            f"input.{name} must be a column name or a non-empty list of column names"
        )
    if len(set(columns)) != len(columns):
        raise InvalidInput(f"input.{name} names a column more than once")
    return columns


def _row_key(row: Row, columns: list[str], side: str, index: int) -> Key:
    """The row's join key; see _matchable for keys with a null part."""
    parts: list[KeyPart] = []
    for column in columns:
        if column not in row:
            raise InvalidInput(f"input.{side}[{index}] has no key column {column!r}")
        value = row[column]
        if value is None:
            parts.append(("null", None))
        elif isinstance(value, bool):
            parts.append(("bool", value))
        elif isinstance(value, (int, float)):
            parts.append(("number", value))
        elif isinstance(value, str):
            parts.append(("string", value))
        else:
            raise InvalidInput(
                f"input.{side}[{index}].{column} is {_json_type(value)}; "
                "join keys must be strings, numbers, booleans or null"
            )
    return tuple(parts)


def _columns(rows: list[Row]) -> list[str]:
    """Union of the rows' column names, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _output_names(right_columns: list[str], taken: set[str]) -> dict[str, str]:
    """Name each right column in the output, suffixing those that clash with a left column."""
    names: dict[str, str] = {}
    used = taken | set(right_columns)
    for column in right_columns:
        if column not in taken:
            names[column] = column
            continue
        candidate = f"{column}{_RIGHT_SUFFIX}"
        counter = 2
        while candidate in used:
            candidate = f"{column}{_RIGHT_SUFFIX}_{counter}"
            counter += 1
        names[column] = candidate
        used.add(candidate)
    return names


def _merge(
    left: Row, left_columns: list[str], right: Row | None, right_names: dict[str, str]
) -> Row:
    """One output row with every output column present (null where a side has no value)."""
    merged = {column: left.get(column) for column in left_columns}
    for column, name in right_names.items():
        merged[name] = right.get(column) if right is not None else None
    return merged


def _matchable(key: Key) -> bool:
    """SQL semantics: a key with a null part matches nothing, not even another null."""
    return all(kind != "null" for kind, _ in key)


def _display(key: Key) -> Any:
    """The key as shown in the report: a scalar for one column, a list for several."""
    values = [value for _, value in key]
    return values[0] if len(values) == 1 else values


def _distinct(keys: list[Key]) -> list[Any]:
    """Distinct keys in input order, as JSON values."""
    return [_display(key) for key in dict.fromkeys(keys)]


def _duplicate_keys(left_keys: list[Key], right_keys: list[Key]) -> list[dict[str, Any]]:
    """Keys that occur more than once on either side, with the rows they produce.

    A key repeated on both sides is a many-to-many match: its output is the product of the
    counts, which is usually the sign of a missing key column.
    """
    left_counts = Counter(key for key in left_keys if _matchable(key))
    right_counts = Counter(key for key in right_keys if _matchable(key))
    report: list[dict[str, Any]] = []
    for key in dict.fromkeys([*left_counts, *right_counts]):
        left, right = left_counts[key], right_counts[key]
        if left > 1 or right > 1:
            report.append(
                {
                    "key": _display(key),
                    "left": left,
                    "right": right,
                    "output_rows": left * right,
                    "many_to_many": left > 1 and right > 1,
                }
            )
    return report


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
