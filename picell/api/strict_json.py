"""The one strict JSON reader for bodies that reach us over HTTP (pairing, mesh, admin, web).

`loads_strict(data, max_bytes=…, max_depth=…)` returns the value or raises `BadInput` naming
`body`. It refuses what Python's `json.loads` lets through and what makes it fail badly:
- more than `max_bytes` bytes, or bytes that are not UTF-8 (no UTF-16/32 guessing);
- nesting deeper than `max_depth`, measured before parsing (100,000 `[` raise RecursionError in
  `json.loads`, which used to answer 500);
- `NaN`, `Infinity`, `-Infinity`, and numbers that overflow to infinity (`1e999`);
- duplicate keys in an object (which one wins differs between parsers: a signature checked over
  one reading must not be applied to another);
- lone surrogates (`"\\ud800"`): they cannot be stored or rendered as UTF-8.

It must not know what the body means: models and validators do that afterwards.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from picell.api.errors import error_response
from picell.constants import JSON_MAX_DEPTH
from picell.errors import BadInput

_SPECIAL = re.compile(rb'[\[\]{}"\\]')  # the only bytes that matter to nesting


class _Refused(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text[:20]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Refused(f"duplicate key {key[:40]!r}")
        obj[key] = value
    return obj


def nesting_depth(data: bytes, stop_above: int | None = None) -> int:
    """The deepest nesting of arrays and objects in `data`, brackets inside strings ignored.

    Linear in the length (a regex with backtracking over strings is not: `"\\"\\"\\"…` made
    one quadratic); stops early once the depth exceeds `stop_above`.
    """
    depth = deepest = 0
    in_string = False
    escaped_at = -1
    for match in _SPECIAL.finditer(data):
        pos = match.start()
        if pos == escaped_at:
            continue
        char = data[pos]
        if in_string:
            if char == 0x5C:  # backslash: the next byte is escaped
                escaped_at = pos + 1
            elif char == 0x22:
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    return deepest
        elif char in b"]}":
            depth -= 1
    return deepest


def loads_strict(
    data: bytes, *, max_bytes: int, max_depth: int = JSON_MAX_DEPTH, field: str = "body"
) -> Any:
    """The JSON value of `data`, or BadInput naming `field` (an invite says `invite`)."""
    if len(data) > max_bytes:
        raise BadInput(f"{field}: larger than {max_bytes} bytes", field=field)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{field}: not UTF-8", field=field) from None
    if nesting_depth(data, stop_above=max_depth) > max_depth:
        raise BadInput(f"{field}: nested deeper than {max_depth} levels", field=field)
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_no_duplicates,
        )
        # a lone surrogate escape parses, then fails wherever the text is stored or written
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except _Refused as exc:
        raise BadInput(f"{field}: {exc}", field=field) from None
    except UnicodeEncodeError:
        raise BadInput(f"{field}: a string holds a lone surrogate", field=field) from None
    except (ValueError, RecursionError):  # RecursionError: belt and braces behind the depth check
        raise BadInput(f"{field}: not JSON", field=field) from None
    return value


def _is_json(content_type: bytes | None) -> bool:
    """FastAPI's own rule for when it parses a body as JSON: no content type, or application/json
    or application/*+json."""
    if not content_type:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


class StrictJsonBodies:
    """ASGI middleware for the admin and web apps, whose routes FastAPI parses with `json.loads`:
    every JSON body is first read (at most `max_bytes`) and checked with `loads_strict`, and a
    refused one answers 422 naming `body` before any route sees it; an accepted one is replayed
    to the app unchanged."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if not _is_json(headers.get(b"content-type")):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(receive, headers.get(b"content-length"))
            if body:
                loads_strict(body, max_bytes=self.max_bytes)
        except BadInput as exc:
            await error_response(exc)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: a disconnect, as the server reports it

        await self.app(scope, replay, send)

    async def _read(self, receive: Any, declared: bytes | None) -> bytes:
        too_big = BadInput(f"body: larger than {self.max_bytes} bytes", field="body")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            raise too_big
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return body  # the client went away; the app sees an empty body and its own end
            chunk: bytes = message.get("body", b"")
            body += chunk
            if len(body) > self.max_bytes:
                raise too_big
            if not message.get("more_body", False):
                return body
