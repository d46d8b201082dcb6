"""The listeners other cells reach serve only their own routes, with limits."""

from __future__ import annotations

from fastapi.testclient import TestClient

from picell.api.peer import build_mesh_api, build_pairing_api
from picell.control import Control
from picell.mesh.links import Links
from picell.mesh.sync import Sync

PAIR = "/api/cells/peer-sync/accept-invite"


def routes(app: object) -> set[str]:
    return {getattr(r, "path", "") for r in getattr(app, "routes", [])}


def test_each_listener_serves_only_its_routes(control: Control) -> None:
    links = Links(control)
    assert routes(build_pairing_api(links)) == {PAIR}
    assert routes(build_mesh_api(links, Sync(links))) == {
        "/api/cells/peer-sync/permissions",
        "/api/cells/peer-sync/unlink",
        "/api/cells/peer-sync/rekey",
        "/api/cells/peer-sync/explain",
    }
    client = TestClient(build_pairing_api(links))
    for path in ("/api/status", "/api/peers", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 404


def test_pairing_limits_body_size_and_rate(control: Control) -> None:
    client = TestClient(build_pairing_api(Links(control)))
    big = client.post(PAIR, content=b"{" + b" " * 9000 + b"}")
    assert big.status_code == 422 and big.json()["field"] == "body"
    statuses = [client.post(PAIR, json={"nonce": "x"}).status_code for _ in range(12)]
    assert statuses[:9] == [422] * 9  # refused on their merits: a missing field is named
    assert statuses[-1] == 429


def test_the_pairing_rate_counts_an_ipv6_host_by_its_64(control: Control) -> None:
    """One host holds a whole /64: a new address per request does not buy new attempts."""
    app = build_pairing_api(Links(control))
    statuses = []
    for i in range(12):
        client = TestClient(app, client=(f"2001:db8:1:2::{i + 1:x}", 40000))
        statuses.append(client.post(PAIR, json={"nonce": "x"}).status_code)
    assert statuses[-1] == 429, statuses
    other = TestClient(app, client=("2001:db8:1:3::1", 40000))  # another /64: its own count
    assert other.post(PAIR, json={"nonce": "x"}).status_code == 422
