"""The sender without a network or a wall clock: pushes, coalescing, backoff, heartbeat, the
outbox's unlink, hostile answers and link isolation, driven by a fake clock and linked cells
behind an httpx.MockTransport."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from typing import Any

import httpx
import pytest

from picell.constants import COALESCE_S, HEARTBEAT_S, OUTBOX_MAX_BACKOFF_S, UNLINK_GIVE_UP_S
from picell.control import Control
from picell.mesh import sender as sender_module
from picell.mesh.client import ANSWER_MAX_BYTES, MeshClient
from picell.mesh.links import Links
from picell.mesh.sender import Sender
from picell.store import links as link_table
from picell.store import outbox
from tests.unit.fakes import FakeClock
from tests.unit.test_client import Stream
from tests.unit.test_mesh import identity, keypair, redeem

BETA, GAMMA = "10.62.0.1", "10.63.0.1"
Policy = Callable[[httpx.Request, int], Any]


def accept(request: httpx.Request, seq: int) -> httpx.Response:
    if request.url.path.endswith("/unlink"):
        return httpx.Response(200, json={"ok": True, "cell": "beta"})
    return httpx.Response(200, json={"ok": True, "seq": seq, "newer": "ignored"})


def unreachable(request: httpx.Request, seq: int) -> httpx.Response:
    raise httpx.ConnectError("connection refused")


class Cells:
    """The linked cells behind the transport: each address answers by its policy (default:
    accept) and every request is recorded as (address, kind, seq)."""

    def __init__(self) -> None:
        self.policy: dict[str, Policy] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        seq = json.loads(request.content)["body"]["seq"]
        host = request.url.host
        with self._lock:
            self.requests.append((host, request.url.path.rsplit("/", 1)[-1], seq))
        result = self.policy.get(host, accept)(request, seq)
        return await result if inspect.isawaitable(result) else result

    def pushes(self, host: str = BETA) -> list[int]:
        with self._lock:
            return [seq for h, kind, seq in self.requests if h == host and kind == "permissions"]


class World:
    def __init__(self, control: Control, deadline_s: float = 8.0) -> None:
        self.control = control
        self.links = Links(control)
        self.pair("beta", "10.62.0.0/24")
        # rows the store stamps with the wall clock (an outbox message) lie in its past
        self.clock = FakeClock(time.time() + 3600)
        self.cells = Cells()
        transport = httpx.MockTransport(self.cells.handle)
        mesh = MeshClient(transport, clock=self.clock.monotonic, deadline_s=deadline_s)
        self.sender = Sender(self.links, clock=self.clock, mesh_client=mesh)

    def pair(self, name: str, subnet: str) -> None:
        inv = self.links.invite(3600)
        assert inv.pairing is not None
        other = identity(name, subnet, f"{name}.test", keypair()[1])
        self.links.accept(redeem(inv.pairing.token, other))

    def add_gamma(self) -> None:
        self.pair("gamma", "10.63.0.0/24")

    def round(self) -> list[Future[None]]:
        """One round, its jobs run to their end."""
        jobs = self.sender.round()
        done, pending = wait(jobs, timeout=30)
        assert not pending
        for job in done:
            job.result()  # a job never raises: `_guarded` keeps the worker alive
        return jobs

    def link(self, name: str = "beta") -> link_table.Link:
        with self.control.store.read() as conn:
            return link_table.get(conn, name)

    def mark(self, name: str = "beta", times: int = 1) -> None:
        for _ in range(times):
            with self.control.store.transaction() as conn:
                link_table.mark_pending(conn, name)
            self.sender.wake()

    def journal(self) -> list[tuple[str, str]]:
        return [(e["event"], e["detail"]) for e in self.links.journal_entries("beta")]


@pytest.fixture
def world(control: Control) -> Iterator[World]:
    w = World(control)
    yield w
    w.sender.stop()


# -- pushes ------------------------------------------------------------------------------------
def test_a_pending_link_is_pushed_once_and_a_burst_of_marks_is_one_push(world: World) -> None:
    world.mark()
    assert len(world.round()) == 1
    beta = world.link()
    assert world.cells.pushes() == [1] and beta.sync.seq == 1
    assert beta.sync.pending_push == 0 and beta.sync.last_push_status == "ok"
    assert beta.sync.last_push_at == world.clock.now and beta.sync.last_push_error is None
    assert world.round() == []  # in sync, and the heartbeat is far
    world.mark(times=5)
    assert len(world.round()) == 1
    assert world.cells.pushes() == [1, 2] and world.link().sync.pending_push == 0
    assert world.sender.pushes == 2


def test_a_burst_within_the_coalescing_window_is_one_push(world: World) -> None:
    clock, sender = world.clock, world.sender
    sender.start()
    # the first round tells beta at once; the job's end wakes the loop, which settles first
    assert clock.sleeper(1) == COALESCE_S
    clock.advance(COALESCE_S)
    assert clock.sleeper(2) == pytest.approx(HEARTBEAT_S - COALESCE_S)  # idle until the heartbeat
    assert world.cells.pushes() == [1]
    world.mark()  # the first change of a burst wakes it ...
    assert clock.sleeper(3) == COALESCE_S  # ... and it waits for the rest of the burst
    world.mark(times=4)
    clock.advance(COALESCE_S)
    assert clock.sleeper(5) == COALESCE_S  # the push's end woke it
    clock.advance(COALESCE_S)
    assert clock.sleeper(6) == pytest.approx(HEARTBEAT_S - COALESCE_S)
    assert world.cells.pushes() == [1, 2] and world.link().sync.pending_push == 0
    assert sender.alive()


def test_failures_retry_at_1_2_4_up_to_the_cap(world: World) -> None:
    world.cells.policy[BETA] = unreachable
    start = world.clock.now
    attempts = []
    while world.clock.now - start < 130:
        if world.round():
            attempts.append(world.clock.now - start)
        world.clock.advance(0.5)
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps == [1, 2, 4, 8, 16, 30, 30, 30]
    assert OUTBOX_MAX_BACKOFF_S == 30
    beta = world.link()
    assert beta.sync.last_push_status == "error" and "ConnectError" in (
        beta.sync.last_push_error or ""
    )
    assert beta.sync.pending_push >= 1
    del world.cells.policy[BETA]  # beta is back: the next retry succeeds, backoff forgotten
    world.clock.advance(30)
    assert len(world.round()) == 1 and world.link().sync.pending_push == 0
    world.clock.advance(HEARTBEAT_S - 1)
    assert world.round() == []


def test_hearing_from_a_backed_off_cell_makes_its_push_due_at_once(world: World) -> None:
    world.cells.policy[BETA] = unreachable
    for _ in range(6):  # 1, 2, 4, 8, 16 s: the next retry is 30 s away
        world.round()
        world.clock.advance(16)
    world.round()
    assert world.link().sync.pending_push >= 1
    del world.cells.policy[BETA]
    world.clock.advance(1)
    assert world.round() == []  # still backed off
    world.sender.heard_from(world.link().public_key)  # beta's document just reached us
    assert len(world.round()) == 1 and world.link().sync.pending_push == 0
    world.sender.heard_from(world.link().public_key)  # nothing backed off: nothing due
    assert world.round() == []


def test_an_idle_link_is_sent_again_after_the_heartbeat(world: World) -> None:
    world.round()
    world.clock.advance(HEARTBEAT_S - 1)
    assert world.round() == []
    world.clock.advance(1)
    assert len(world.round()) == 1
    assert world.cells.pushes() == [1, 2]


def test_an_answer_for_another_seq_or_of_another_shape_is_a_failed_push(world: World) -> None:
    answers: list[Any] = [
        {"ok": True, "seq": 99},
        {"ok": True},
        {"ok": "yes", "seq": 1},
        {"ok": True, "seq": "1"},
        {"ok": True, "seq": True},
        [1, 2],
        "ok",
    ]
    errors = []
    for body in answers:
        world.cells.policy[BETA] = lambda r, s, body=body: httpx.Response(200, json=body)
        world.clock.advance(OUTBOX_MAX_BACKOFF_S)
        assert len(world.round()) == 1
        beta = world.link()
        assert beta.sync.last_push_status == "error" and beta.sync.pending_push >= 1
        errors.append(beta.sync.last_push_error or "")
    assert errors[0].endswith("answer.seq: 99, expected 1")
    assert "answer.seq: Field required" in errors[1]
    assert "answer.ok:" in errors[2] and "answer.seq:" in errors[3] and "answer.seq:" in errors[4]
    assert all(e.startswith("HTTP 200: answer") for e in errors[1:])


def test_a_refusal_reaches_last_push_error_without_control_characters(world: World) -> None:
    message = "refused\n\x1b[31mred\x00" + "x" * 2000
    world.cells.policy[BETA] = lambda r, s: httpx.Response(403, json={"message": message})
    world.round()
    error = world.link().sync.last_push_error or ""
    assert error.startswith("HTTP 403: refused??[31mred?x")
    assert error.isprintable() and len(error) < 400


# -- hostile answers ---------------------------------------------------------------------------
def huge(world: World) -> tuple[Policy, Stream]:
    body = Stream(b" " * 65536, 100 * 1024 * 1024)
    return (lambda r, s: httpx.Response(200, content=body)), body


def trickled(world: World) -> tuple[Policy, Stream]:
    body = Stream(b" ", 10**9, world.clock, step_s=1.0)
    return (lambda r, s: httpx.Response(200, content=body)), body


def nested(world: World) -> tuple[Policy, Stream]:
    body = Stream(b"[" * 30_000 + b"]" * 30_000, 1)
    return (lambda r, s: httpx.Response(200, content=body)), body


def nan(world: World) -> tuple[Policy, Stream]:
    body = Stream(b'{"ok": true, "seq": NaN}', 1)
    return (lambda r, s: httpx.Response(200, content=body)), body


def not_an_object(world: World) -> tuple[Policy, Stream]:
    body = Stream(b'"ok"', 1)
    return (lambda r, s: httpx.Response(200, content=body)), body


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (huge, "over the 65536-byte limit"),
        (trickled, "not complete within 8 s"),
        (nested, "nested deeper than 32 levels"),
        (nan, "NaN is not a JSON number"),
        (not_an_object, "answer: Input should be"),
    ],
)
def test_a_hostile_answer_is_a_failed_push_and_the_next_round_goes_on(
    world: World, make: Callable[[World], tuple[Policy, Stream]], why: str
) -> None:
    world.add_gamma()
    policy, body = make(world)
    world.cells.policy[BETA] = policy
    assert len(world.round()) == 2
    beta, gamma = world.link("beta"), world.link("gamma")
    assert beta.sync.last_push_status == "error" and why in (beta.sync.last_push_error or "")
    assert body.pulled <= ANSWER_MAX_BYTES + 65536  # streamed, cut off early
    assert gamma.sync.last_push_status == "ok" and world.cells.pushes(GAMMA) == [1]
    world.cells.policy[BETA] = accept  # it backs off, then recovers like any failure
    world.clock.advance(1)
    assert len(world.round()) == 1 and world.link("beta").sync.last_push_status == "ok"


def test_a_slow_link_does_not_delay_another(control: Control) -> None:
    w = World(control, deadline_s=600)  # only the release below ends beta's answer
    w.add_gamma()
    release = threading.Event()

    async def slow(request: httpx.Request, seq: int) -> httpx.Response:
        async def trickle() -> Any:
            while not release.is_set():
                await asyncio.sleep(0.005)
                yield b" "
            yield json.dumps({"ok": True, "seq": seq}).encode()

        return httpx.Response(200, content=trickle())

    w.cells.policy[BETA] = slow
    try:
        beta_job, gamma_job = w.sender.round()  # links in name order
        done, _ = wait([gamma_job], timeout=30)
        assert gamma_job in done, "gamma waited behind beta"
        assert not beta_job.done() and w.link("gamma").sync.last_push_status == "ok"
        w.mark("beta")
        w.mark("gamma")
        [again] = w.sender.round()  # beta has a job in flight: never a second one
        wait([again], timeout=30)
        assert w.cells.pushes(GAMMA) == [1, 2] and w.cells.pushes(BETA) == [1]
    finally:
        release.set()
    wait([beta_job], timeout=30)
    assert w.link("beta").sync.last_push_status == "ok"
    w.sender.stop()


# -- the outbox: unlink ------------------------------------------------------------------------
def test_a_delivered_unlink_removes_our_side(world: World) -> None:
    world.links.disconnect("beta")
    assert len(world.round()) == 1
    assert world.links.overview() == []
    assert world.journal()[-1] == ("unlink delivered", "delivered")
    with world.control.store.read() as conn:
        assert outbox.all_messages(conn) == []


def test_an_unlink_answered_404_removes_our_side(world: World) -> None:
    world.cells.policy[BETA] = lambda r, s: httpx.Response(404, json={"message": "no link"})
    world.links.disconnect("beta")
    world.round()
    assert world.links.overview() == []
    assert world.journal()[-1] == ("unlink delivered", "they had no link with us")


def test_an_unlink_answered_200_with_a_hostile_body_is_delivered(world: World) -> None:
    body = Stream(b" " * 65536, 100 * 1024 * 1024)
    world.cells.policy[BETA] = lambda r, s: httpx.Response(200, content=body)
    world.links.disconnect("beta")
    world.round()
    assert world.links.overview() == [] and body.pulled <= ANSWER_MAX_BYTES + 65536


def test_an_undelivered_unlink_is_retried_then_given_up(world: World) -> None:
    world.cells.policy[BETA] = unreachable
    world.links.disconnect("beta")
    world.round()
    [message] = world.links.overview()
    assert message["state"] == "unlinking" and "ConnectError" in message["pending_error"]
    assert world.round() == []  # backing off
    world.clock.advance(1)
    assert len(world.round()) == 1  # retried after 1 s
    world.clock.advance(UNLINK_GIVE_UP_S)
    world.round()
    assert world.links.overview() == []
    event, detail = world.journal()[-1]
    assert event == "unlink delivered" and detail.startswith("given up: ")
    assert [k for _, k, _ in world.cells.requests] == ["unlink"] * 3


# -- the thread --------------------------------------------------------------------------------
def test_the_loop_survives_any_exception_and_logs_it_once_per_interval(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = outbox.all_messages
    calls = {"n": 0}

    def flaky(conn: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise RecursionError("maximum recursion depth exceeded")
        return real(conn)

    monkeypatch.setattr(outbox, "all_messages", flaky)
    clock, sender = world.clock, world.sender
    with caplog.at_level(logging.ERROR, logger="picell.mesh.sender"):
        sender.start()
        for index, backoff in enumerate([1.0, 2.0, 4.0]):
            assert clock.sleeper(index) == backoff
            clock.advance(backoff)
        assert clock.sleeper(4) == COALESCE_S  # the fourth round pushed; the push's end woke it
    assert world.cells.pushes() == [1] and sender.alive()
    assert sum(sender.errors.totals.values()) == 3
    [record] = [r for r in caplog.records if r.name == "picell.mesh.sender"]
    assert "RecursionError" in record.getMessage()


def test_a_failing_job_backs_its_link_off_and_keeps_the_worker(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in the document")

    monkeypatch.setattr(sender_module, "document", broken)
    assert len(world.round()) == 1
    assert sum(world.sender.errors.totals.values()) == 1
    assert world.round() == []  # no spinning: backed off
    monkeypatch.undo()
    world.clock.advance(1)
    assert len(world.round()) == 1 and world.link().sync.last_push_status == "ok"


# -- a link completes over UDP alone (NAT issue) -------------------------------------------------
def test_a_waiting_link_is_pushed_once_wireguard_has_a_handshake_and_then_is_linked(
    world: World, kernel: Any
) -> None:
    with world.control.store.transaction() as conn:  # our pairing call never got an answer
        conn.execute("UPDATE links SET state = 'waiting', linked_at = NULL WHERE name = 'beta'")
    bodies: list[dict[str, Any]] = []

    def record(request: httpx.Request, seq: int) -> httpx.Response:
        bodies.append(json.loads(request.content)["body"])
        return accept(request, seq)

    world.cells.policy[BETA] = record
    world.mark()
    assert world.round() == []  # no handshake: the other owner has not imported our invite
    assert world.link().state == "waiting" and bodies == []
    peer = kernel.wg["pctest0"]["peers"][world.link().public_key]
    peer.update(handshake=int(world.clock.now) - 5, endpoint="203.0.113.50:40001")
    assert len(world.round()) == 1
    assert world.link().state == "linked" and world.link().linked_at == world.clock.now
    assert bodies[0]["seen_at"] == "203.0.113.50:40001"  # where we see them
    assert bodies[0]["identity"]["endpoints"] == ["198.51.100.1:51820"]
    assert ("linked", "it accepted our signed state through the tunnel") in world.journal()


def test_a_waiting_link_with_a_stale_handshake_is_not_pushed(world: World, kernel: Any) -> None:
    from picell.constants import LINK_STALE_S

    with world.control.store.transaction() as conn:
        conn.execute("UPDATE links SET state = 'waiting' WHERE name = 'beta'")
    peer = kernel.wg["pctest0"]["peers"][world.link().public_key]
    peer.update(handshake=int(world.clock.now - LINK_STALE_S - 1))
    world.mark()
    assert world.round() == [] and world.cells.pushes() == []
