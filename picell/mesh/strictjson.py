"""Strict JSON for bytes from another cell: RFC 8259 JSON and nothing more.

Python's `json.loads` accepts `NaN` and `Infinity`, keeps the last of duplicate keys (another
parser might keep the first: two readers of one signed body would disagree), and raises
`RecursionError` on deep nesting, which kills whatever thread parses it. `loads` refuses all
three with `BadInput` naming the field, checks the nesting depth before parsing, and turns every
decoding error into `BadInput` too. The caller bounds the size before it calls.
"""

from __future__ import annotations

import json
from typing import Any

from picell.errors import BadInput

MAX_DEPTH = 32  # our deepest message (envelope → body → services → ports) needs 5


def _depth_ok(text: str, limit: int) -> bool:
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def loads(raw: bytes | str, field: str = "body", max_depth: int = MAX_DEPTH) -> Any:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise BadInput(f"{field}: not UTF-8", field=field) from None
    if not _depth_ok(text, max_depth):
        raise BadInput(f"{field}: nested deeper than {max_depth} levels", field=field)
    try:
        return json.loads(text, parse_constant=_constant, object_pairs_hook=_pairs)
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"{field}: not JSON ({exc})", field=field) from None
