"""The metrics: what a scrape shows after real reconciles and pushes (fake kernel, fake linked
cell), drift counted only when the same state needed repairing, the scrape token (hash only,
rotation), and the WireGuard listener's refusals (no or a wrong token: 401; a linked cell's
address even with the token: 403)."""

from __future__ import annotations

import ipaddress
import socket
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from picell.api.metrics import build_metrics_api
from picell.app import build_api
from picell.control import Control
from picell.mesh.sync import Sync
from picell.metrics import Metrics, MetricsToken, check_backends, scrape_refusal
from picell.reconcile import Reconciler
from tests.unit.fakes import FakeKernel
from tests.unit.test_reconcile import link_peer, state_with, state_with_link
from tests.unit.test_sender import World, unreachable

OWN = ipaddress.IPv4Network("10.61.0.0/24")  # the control fixture's network


def value(text: bytes, name: str, **labels: str) -> float | None:
    """The sample `name{labels}` of an exposition, None when absent."""
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


class Gate:
    def __init__(self, **shed: int) -> None:
        self.shed = Counter(shed)


@pytest.fixture
def world(control: Control) -> Iterator[World]:
    w = World(control)
    yield w
    w.sender.stop()


@pytest.fixture
def backend() -> Iterator[int]:
    """A TCP backend that accepts (the kernel completes the handshake from the backlog)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_scrape_shows_reconciles_pushes_refusals_and_each_link(
    world: World, control: Control, kernel: FakeKernel, backend: int
) -> None:
    metrics = Metrics()
    assert control.reconciler is not None
    control.reconciler.metrics = world.sender.metrics = metrics
    metrics.observe(world.links, clock=world.clock.time)
    metrics.gates = {"pairing": Gate(total=3), "mesh": Gate(source=2)}

    control.add_service("web", f"127.0.0.1:{backend}", port=80)
    control.add_service("gone", f"127.0.0.1:{closed_port()}", port=81)
    control.add_service("dns", "127.0.0.1:5353", port=53, protocol="udp")
    Sync(world.links).share("beta", ["web"])
    beta = world.link()
    peer = kernel.wg["pctest0"]["peers"][beta.public_key]  # type: ignore[index]
    peer.update(handshake=int(world.clock.time()) - 30, rx=1234, tx=5678)
    control.converge()  # the reconciler's `wg show` now holds the session

    world.round()  # beta accepts our state
    world.clock.advance(7)
    world.cells.policy["10.62.0.1"] = unreachable
    world.mark()
    world.round()  # this one fails
    world.links.rejected["permissions 403"] += 2
    world.links.rejected["other 404"] += 1

    text = metrics.exposition()
    assert value(text, "picell_reconcile_total")  # every change above reconciled
    assert value(text, "picell_reconcile_total") == value(
        text, "picell_reconcile_duration_seconds_count"
    )
    assert value(text, "picell_pushes_total") == 2
    assert value(text, "picell_push_failures_total") == 1
    assert value(text, "picell_push_duration_seconds_count") == 2
    age = value(text, "picell_link_handshake_age_seconds", cell="beta")
    assert age is not None and 37 <= age < 38  # 30 s old at the reconcile, then 7 s later
    assert value(text, "picell_link_receive_bytes_total", cell="beta") == 1234
    assert value(text, "picell_link_transmit_bytes_total", cell="beta") == 5678
    assert value(text, "picell_link_push_lag_seconds", cell="beta") == pytest.approx(7, abs=1)
    assert value(text, "picell_link_grants", cell="beta") == 1
    assert value(text, "picell_messages_refused_total", route="permissions", status="403") == 2
    assert value(text, "picell_messages_refused_total", route="other", status="404") == 1
    assert value(text, "picell_listener_shed_connections_total", listener="pairing",
                 reason="total") == 3  # fmt: skip
    assert value(text, "picell_listener_shed_connections_total", listener="mesh",
                 reason="source") == 2  # fmt: skip
    assert value(text, "picell_backend_up", service="web") == 1
    assert value(text, "picell_backend_up", service="gone") == 0
    assert value(text, "picell_backend_up", service="dns") is None  # no TCP check for UDP

    Sync(world.links).unshare("beta", "web")
    assert value(metrics.exposition(), "picell_link_grants", cell="beta") == 0


def test_drift_is_counted_only_when_the_same_state_needed_repairing(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    metrics = reconciler.metrics
    state = state_with(2, 1)
    reconciler.set(state)  # the first apply: not drift
    reconciler.set(state)  # nothing to do
    assert value(metrics.exposition(), "picell_drift_repaired_total") == 0
    kernel.delete_interface("pctest0")  # someone removed it
    reconciler.set(state)
    assert value(metrics.exposition(), "picell_drift_repaired_total") == 1
    reconciler.set(state_with(3, 1))  # a change of ours is not drift
    assert value(metrics.exposition(), "picell_drift_repaired_total") == 1
    kernel.fail_on = "nft"
    kernel.nft_text = None
    with pytest.raises(Exception, match="nft"):
        reconciler.set(state_with(3, 1))
    text = metrics.exposition()
    assert value(text, "picell_reconcile_failures_total") == 1
    assert value(text, "picell_reconcile_total") == 4
    assert value(text, "picell_drift_repaired_total") == 1


def test_a_stale_link_trying_its_endpoints_is_not_drift(
    reconciler: Reconciler, kernel: FakeKernel
) -> None:
    from picell.constants import ENDPOINT_RETRY_S, LINK_STALE_S

    now = [1_800_000_000.0]
    reconciler.clock = lambda: now[0]
    state = state_with_link(1, "home.beta.test:51820", "[2001:db8::2]:51820")
    reconciler.set(state)
    link_peer(kernel).update(endpoint="203.0.113.50:40001", handshake=int(now[0]))
    for _ in range(3):  # each a `wg syncconf` (two candidates) or a `wg set` (the same one)
        now[0] += LINK_STALE_S + ENDPOINT_RETRY_S
        assert reconciler.set(state).changed
    assert value(reconciler.metrics.exposition(), "picell_drift_repaired_total") == 0
    link_peer(kernel)["allowed"] = ""  # someone narrowed the peer by hand
    now[0] += 1  # no try due: the repair is drift
    assert reconciler.set(state).changed
    assert value(reconciler.metrics.exposition(), "picell_drift_repaired_total") == 1


def test_backends_are_checked_together_within_the_timeout(backend: int) -> None:
    loopback = ipaddress.IPv4Address("127.0.0.1")
    up = check_backends([("a", loopback, backend), ("b", loopback, closed_port())], 1.0)
    assert up == {"a": True, "b": False}


def test_the_token_is_kept_as_a_hash_and_a_rotation_ends_the_old_one(tmp_path: Path) -> None:
    token = MetricsToken(tmp_path / "metrics-token.sha256")
    assert token.issued_at() is None and not token.check("anything")
    first = token.issue()
    kept = token.path.read_text()
    assert first not in kept and stat.S_IMODE(token.path.stat().st_mode) == 0o600
    assert token.check(first) and not token.check(first + "x") and not token.check("")
    second = token.issue()
    assert token.check(second) and not token.check(first)


@pytest.mark.parametrize(
    ("source", "header", "refused"),
    [
        ("10.61.0.5", "Bearer {token}", None),
        ("10.61.0.5", "bearer  {token}", None),
        ("10.61.0.5", None, 401),
        ("10.61.0.5", "Bearer wrong", 401),
        ("10.61.0.5", "Basic {token}", 401),
        ("10.61.0.5", "Bearer ", 401),
        ("10.62.0.1", "Bearer {token}", 403),  # a linked cell, with the owner's token
        ("198.51.100.7", "Bearer {token}", 403),
        ("2001:db8::1", "Bearer {token}", 403),
        (None, "Bearer {token}", 403),
        ("testclient", "Bearer {token}", 403),
    ],
)
def test_scrape_refusal(tmp_path: Path, source: str | None, header: str | None,
                        refused: int | None) -> None:  # fmt: skip
    token = MetricsToken(tmp_path / "t")
    secret = token.issue()
    authorization = header.format(token=secret) if header else None
    assert scrape_refusal(source, authorization, OWN, token) == refused


def test_the_wireguard_listener_serves_only_our_devices_with_the_token(
    control: Control, tmp_path: Path
) -> None:
    metrics, token = Metrics(), MetricsToken(tmp_path / "t")
    secret = token.issue()
    app = build_metrics_api(metrics, token, OWN)
    auth = {"Authorization": f"Bearer {secret}"}
    device = TestClient(app, client=("10.61.0.5", 40000))
    resp = device.get("/metrics", headers=auth)
    assert resp.status_code == 200 and b"picell_reconcile_total" in resp.content
    assert resp.headers["content-type"].startswith("text/plain")
    resp = device.get("/metrics")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["field"] == "authorization"
    assert device.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    linked = TestClient(app, client=("10.62.0.1", 40000))
    resp = linked.get("/metrics", headers=auth)
    assert resp.status_code == 403 and resp.json()["field"] == "source"
    assert device.get("/api/status", headers=auth).status_code == 404  # nothing else here


def test_the_admin_api_serves_metrics_and_issues_the_token_once(
    control: Control, tmp_path: Path
) -> None:
    metrics, token = Metrics(), MetricsToken(tmp_path / "t")
    assert control.reconciler is not None
    control.reconciler.metrics = metrics
    control.converge()
    admin = TestClient(build_api(control, metrics=(metrics, token)))
    resp = admin.get("/metrics")
    assert resp.status_code == 200 and value(resp.content, "picell_reconcile_total") == 1
    issued = admin.post("/api/metrics/token", json={}).json()
    assert issued["url"] == "http://10.61.0.1:9469/metrics" and token.check(issued["token"])
    again = admin.post("/api/metrics/token", json={})
    assert again.status_code == 409 and again.json()["field"] == "rotate"
    assert token.check(issued["token"])  # a refused ask leaves the token as it was
    rotated = admin.post("/api/metrics/token", json={"rotate": True}).json()
    assert token.check(rotated["token"]) and not token.check(issued["token"])
    bad = admin.post("/api/metrics/token", json={"rotate": "yes"})
    assert bad.status_code == 422 and "rotate" in bad.json()["message"]
    assert "/metrics" not in {getattr(r, "path", "") for r in build_api(control).routes}
