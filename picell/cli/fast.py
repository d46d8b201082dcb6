"""The fast path of `picell`: the common read-only and simple commands without Typer, httpx or
pydantic, whose imports cost more than the command itself (issue 14: 260 ms for `picell status`).

It owns an argv reader for exactly these forms (DESIGN §9):

    picell [--data-dir DIR] status | cells [list] [--journal CELL] | peers list | services list
           | invite [--expires T] | invites | share CELL SERVICE | unshare CELL SERVICE   [--json]

and a small HTTP/1.1 client over the admin unix socket. Anything else (`--help`, another
command or option, more than one service to share, a name that would need quoting in a URL)
returns None, and `picell.cli.main` runs the Typer CLI, which prints usage errors. The words
printed come from `picell.cli.show`, the same functions the Typer commands print with, so the
two paths cannot drift; tests/unit/test_cli_fast.py compares them on the same answers.

Not `http.client`: it imports `ssl` and `email` (about 30 ms, a third of the budget). Must import
only the standard library and `picell.cli.show`/`picell.constants`, and must not retry a request
that changes something: only a GET whose answer it cannot read is handed to the Typer CLI (which
asks again and names what is wrong with the answer).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from picell.cli import show
from picell.constants import DEFAULT_DATA_DIR

TYPE_CHECKING = False  # `typing` costs milliseconds of start-up; mypy reads the block anyway
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Text = Callable[[Any], str]

TIMEOUT_S = 60  # the Typer CLI's httpx timeout: a change may wait for a reconcile
# names that go into a URL path as they are (the Typer CLI's httpx would quote anything else)
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class Unanswered(Exception):
    """No readable HTTP answer on the socket: the daemon is not there (or died mid-answer)."""


def _parse(raw: bytes, eof: bool) -> tuple[int, bytes] | None:
    """(status, body) once `raw` holds a whole answer; None while more bytes are due."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        if eof:
            raise Unanswered("truncated answer")
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise Unanswered("not an HTTP answer")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        if not eof:
            return None  # sent with Connection: close, so the end of the stream ends it
        return int(parts[1]), _dechunk(rest)
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(rest) < length:
            if eof:
                raise Unanswered("truncated answer")
            return None
        return int(parts[1]), rest[:length]
    return (int(parts[1]), rest) if eof else None


def _dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            raise Unanswered("truncated chunked answer")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        if len(data) < size + 2:
            raise Unanswered("truncated chunked answer")
        out.append(data[:size])
        data = data[size + 2 :]


def request(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    """One request on the admin socket: (status, body). Unanswered or OSError when nobody
    answers."""
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: picell\r\nConnection: close\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    if method != "GET":
        head += f"Content-Length: {len(data)}\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT_S)
        conn.connect(str(sock))
        conn.sendall(head.encode() + b"\r\n" + data)
        raw = b""
        while True:
            chunk = conn.recv(65536)
            answer = _parse(raw + chunk, eof=not chunk)
            if answer is not None:
                return answer
            raw += chunk


def _run(
    sock: Path, method: str, path: str, as_json: bool, text: Text, body: Any = None
) -> int | None:
    try:
        status, content = request(sock, method, path, body)
    except (OSError, Unanswered, ValueError):
        show.error(show.not_running(sock), as_json)
        return 1
    if status >= 400:
        message, refused = show.refusal(content)
        show.error(message, as_json, refused)
        return 1
    try:
        data = json.loads(content)
        human = text(data)
    except (ValueError, LookupError, TypeError, AttributeError):
        if method == "GET":
            return None
        show.error("unexpected answer from the daemon", as_json)
        return 1
    show.emit(data, as_json, human)
    return 0


def _plain(name: str) -> bool:
    return bool(name) and all(c in _PLAIN for c in name)


def main(argv: list[str]) -> int | None:
    """Run `argv` (without the program name) when it is a fast-path command: its exit code.
    None: not one of ours, run the Typer CLI."""
    data_dir = os.environ.get("PICELL_DATA_DIR") or DEFAULT_DATA_DIR
    args = list(argv)
    while args and args[0].startswith("--data-dir"):
        if args[0] == "--data-dir" and len(args) > 1 and not args[1].startswith("-"):
            data_dir, args = args[1], args[2:]
        elif args[0].startswith("--data-dir="):
            data_dir, args = args[0].split("=", 1)[1], args[1:]
        else:
            return None
    if not args:
        return None
    command = args[0]
    if command in ("peers", "services"):
        if len(args) < 2 or args[1] != "list":
            return None
        command, args = f"{command} list", args[1:]
    options = {"invite": ("--expires",), "cells": ("--journal",)}.get(command, ())
    as_json, values, words = False, dict[str, str](), list[str]()
    rest = args[1:]
    while rest:
        token, rest = rest[0], rest[1:]
        name, eq, value = token.partition("=")
        if token == "--json":
            as_json = True
        elif name in options and eq:
            values[name] = value
        elif token in options and rest and not rest[0].startswith("-"):
            values[token], rest = rest[0], rest[1:]
        elif token.startswith("-"):
            return None  # --help, --qr, --device, ...: the Typer CLI's
        else:
            words.append(token)
    sock = Path(data_dir) / "admin.sock"
    if command == "status" and not words:
        return _run(sock, "GET", "/api/status", as_json, show.status_text)
    if command == "cells" and words in ([], ["list"]):
        if "--journal" not in values:
            return _run(sock, "GET", "/api/cells", as_json, show.cells_text)
        journal = values["--journal"]
        if not _plain(journal):
            return None
        return _run(sock, "GET", f"/api/cells/journal?cell={journal}", as_json,
                    lambda d: show.journal_text(d, journal))  # fmt: skip
    if command == "peers list" and not words:
        return _run(sock, "GET", "/api/peers", as_json, show.peers_text)
    if command == "services list" and not words:
        return _run(sock, "GET", "/api/services", as_json, show.services_text)
    if command == "invites" and not words:
        return _run(sock, "GET", "/api/cells/invites", as_json, show.invites_text)
    if command == "invite" and not words:
        try:
            expires_s = show.duration(values.get("--expires", "24h"))
        except ValueError:
            return None  # the Typer CLI says what is wrong with it
        return _run(sock, "POST", "/api/cells/invites", as_json, show.invite_text,
                    {"expires_s": expires_s})  # fmt: skip
    # one service only: several in one change are the Typer CLI's (`share CELL S1 S2 …`)
    if command in ("share", "unshare") and len(words) == 2 and all(map(_plain, words)):
        method = "POST" if command == "share" else "DELETE"
        cell, service = words
        return _run(sock, method, f"/api/cells/{cell}/shares/{service}", as_json, show.link_text)
    return None
