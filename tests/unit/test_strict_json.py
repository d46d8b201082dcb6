"""The strict JSON reader, and every listener answering a malformed body with a 4xx naming `body`:
pairing and mesh (`read_json`), the admin socket and the web listener (`StrictJsonBodies`)."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from picell.api.auth import Auth
from picell.api.peer import build_mesh_api, build_pairing_api
from picell.api.strict_json import loads_strict, nesting_depth
from picell.app import build_api, build_web_api
from picell.control import Control
from picell.errors import BadInput
from picell.mesh.links import Links
from picell.mesh.sync import Sync
from tests.unit.test_web_auth import BASE, PASSWORD, csrf_of, log_in

DEEP = b"[" * 100_000 + b"]" * 100_000
MALFORMED = {
    "nan": b'{"a": NaN}',
    "infinity": b'{"a": Infinity}',
    "minus_infinity": b'{"a": -Infinity}',
    "overflow": b'{"a": 1e999}',
    "deep": DEEP,
    "deep_objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "not_utf8": b'{"a": "\xff\xfe"}',
    "utf16": '{"a": 1}'.encode("utf-16"),
    "duplicate_key": b'{"a": 1, "a": 2}',
    "lone_surrogate": b'{"a": "\\ud800"}',
    "truncated": b'{"a": [1, 2',
    "huge_integer": b"1" * 5000,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_json_is_refused_naming_body(name: str) -> None:
    with pytest.raises(BadInput) as refused:
        loads_strict(MALFORMED[name], max_bytes=1 << 20)
    assert refused.value.field == "body"
    assert refused.value.message.startswith("body: ")


def test_good_json_parses_as_json_does() -> None:
    text = b'{"name": "beta", "n": [1, 2.5, -3e2, true, null], "s": "a[{\\"]}", "u": "\\u00e9"}'
    assert loads_strict(text, max_bytes=1000) == json.loads(text)


def test_size_and_depth_limits_are_exact() -> None:
    assert loads_strict(b"[" * 32 + b"]" * 32, max_bytes=100, max_depth=32)
    with pytest.raises(BadInput, match="deeper than 32"):
        loads_strict(b"[" * 33 + b"]" * 33, max_bytes=100, max_depth=32)
    assert loads_strict(b"[" + b"1" * 98 + b"]", max_bytes=100) == [int("1" * 98)]
    with pytest.raises(BadInput, match="larger than 100 bytes"):
        loads_strict(b"[" + b"1" * 99 + b"]", max_bytes=100)


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"1", 0),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'["[[[[", "]]"]', 1),  # brackets inside strings do not nest
        (b'["\\"[[[", [2]]', 2),  # an escaped quote does not end the string
        (b'["\\\\", [[3]]]', 3),  # an escaped backslash does not escape the quote after it
    ],
)
def test_nesting_depth_ignores_strings(text: bytes, depth: int) -> None:
    assert nesting_depth(text) == depth


# -- every listener ------------------------------------------------------------------------------


def _refused_by(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text}"
    assert response.json()["field"] == "body"


@pytest.mark.parametrize("name", ["nan", "infinity", "deep", "not_utf8", "duplicate_key"])
def test_pairing_and_mesh_listeners_answer_4xx(control: Control, name: str) -> None:
    links = Links(control)
    pairing = TestClient(build_pairing_api(links))
    mesh = TestClient(build_mesh_api(links, Sync(links)))
    body = MALFORMED[name]
    _refused_by(pairing.post("/api/cells/peer-sync/accept-invite", content=body))
    for route in ("permissions", "unlink"):
        _refused_by(mesh.post(f"/api/cells/peer-sync/{route}", content=body))


@pytest.mark.parametrize("name", ["nan", "infinity", "deep", "not_utf8", "lone_surrogate"])
def test_admin_socket_answers_4xx_and_adds_nothing(control: Control, name: str) -> None:
    client = TestClient(build_api(control))
    body = MALFORMED[name] if name == "deep" else MALFORMED[name].replace(b'"a"', b'"name"')
    for content_type in ("application/json", None):  # FastAPI parses JSON without a type too
        headers = {"content-type": content_type} if content_type else {}
        _refused_by(client.post("/api/peers", content=body, headers=headers))
    assert client.get("/api/peers").json() == []


def test_admin_socket_still_takes_good_json_and_forms(control: Control) -> None:
    client = TestClient(build_api(control))
    assert client.post("/api/peers", json={"name": "phone"}).status_code == 201
    assert [p["name"] for p in client.get("/api/peers").json()] == ["phone"]


def test_web_listener_answers_4xx_after_login(control: Control) -> None:
    auth = Auth(control.store)
    auth.set_password(PASSWORD)
    client = TestClient(build_web_api(control, auth=auth), base_url=BASE)
    log_in(client)
    headers = {"content-type": "application/json", "x-csrf-token": csrf_of(client)}
    for name in ("nan", "deep", "not_utf8"):
        _refused_by(client.post("/api/peers", content=MALFORMED[name], headers=headers))
    created = client.post("/api/peers", content=b'{"name": "laptop"}', headers=headers)
    assert created.status_code == 201, created.text
