"""The world of the fault and crash suites: two linked cells behind a router namespace, a model of
what their owners were told succeeded, random cycles of change and fault, and the invariants.

Topology:

                           ┌────────── wan ns (router; faults live here) ──────────┐
                           │ nft table inet picell_faults: loss / partition / tproxy│
                           │ delay relay (python, transparent UDP)                  │
                           └──┬──────────────┬───────────────┬───────────────┬──────┘
                 198.51.100.14│ .30          │ 203.0.113.14  │ 203.0.113.30  │
             198.51.100.1 ┌───┴───┐  .17 ┌───┴───┐    .2 ┌───┴───┐    .18 ┌──┴────┐
                          │ alpha │      │ beta  │       │ phone │        │laptop │
                          │picell │      │picell │       │alpha's│        │beta's │
                          └───────┘      └───────┘       │device │        │device │
            a1 a2 a3: HTTP on 127.0.0.1  b1 b2 likewise  └───────┘        └───────┘

Faults touch only datagrams between the two cells' addresses: a device and its own cell are never
hit. Changes go through the CLI (`share`, `unshare`, `peers add`) in the fault cycles, and through
the admin API calls the CLI makes in the crash suite (no CLI start-up: the kill can land anywhere
in a request), so the suites hold whatever the apply path does behind the admin API. The model
holds what was acknowledged.

Invariants (`check_converged`), each observed, never assumed:
- every acknowledged share is enforced: the other cell's device opens a TCP connection to the
  service's address, the other cell mirrors it (`cells`) and resolves its name;
- every acknowledged unshare is gone: that connection is refused or times out, and the name with it;
- every acknowledged device is in `peers list` and in `wg show` of its cell;
- sequence numbers (`links.local_seq`, `links.remote_seq` of both stores) never go backwards,
  and what a cell applied of the other's never exceeds what the other sent;
- nothing needs a restart: no `picell reconcile`, no restart but the fault's own; the
  wireguard-go and Unbound processes of each cell keep their pids throughout.
This module must not edit a store or call picell's code: it acts as an owner and a network would.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.netns.cells import Cell, pids_of
from tests.netns.faults import (
    Faults,
    api,
    cells_view,
    integrity_ok,
    reachable,
    start_daemon,
    store_rows,
)
from tests.netns.harness import Netns, Topology, wait_until

FAULT_KINDS = ("loss", "delay", "partition", "kill", "skew")
SERVICES = {"alpha": ("a1", "a2", "a3"), "beta": ("b1", "b2")}
SKEW_S = 600  # ±10 minutes
CONVERGE_S = 90  # generous: a push may wait out a backoff, WireGuard a rekey, on 2 busy cores


def other(name: str) -> str:
    return "beta" if name == "alpha" else "alpha"


@dataclass
class Model:
    """What the owners were told succeeded."""

    shares: dict[str, set[str]] = field(default_factory=lambda: {"alpha": set(), "beta": set()})
    devices: dict[str, set[str]] = field(default_factory=dict)
    next_device: int = 0


@dataclass
class World:
    topo: Topology
    faults: Faults
    cells: dict[str, Cell]
    device_ns: dict[str, Netns]  # cell -> the namespace of one of its devices (wg-quick)
    vips: dict[str, dict[str, str]]  # cell -> service -> address
    model: Model
    children: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    seqs: dict[tuple[str, str], tuple[int, int, str]] = field(default_factory=dict)
    restarts: int = 0  # by faults only
    change_s: float = 0.5  # how long the last change took through the API (kill points scale)
    waited_on: list[list[str]] = field(default_factory=list)  # mismatches the last wait saw

    # -- observation --
    def daemon_running(self, name: str) -> bool:
        proc = self.cells[name].proc
        return proc is not None and proc.running()

    def snapshot_children(self) -> dict[str, dict[str, list[int]]]:
        return {n: {p: pids_of(c.ns, p) for p in ("wireguard-go", "unbound")}
                for n, c in self.cells.items()}  # fmt: skip

    def link_row(self, name: str) -> dict[str, Any]:
        rows = store_rows(self.cells[name], "SELECT * FROM links WHERE name = ?", (other(name),))
        assert len(rows) == 1, f"{name} has no link row for {other(name)}"
        return dict(rows[0])

    def local_seq(self, name: str) -> int:
        return int(self.link_row(name)["local_seq"])


def build(topo: Topology) -> World:
    """Two cells linked over the router, services, one device each; returns once linked."""
    wan = topo.add_ns("wan")
    wan.sysctl("net.ipv4.ip_forward", 1)
    cells: dict[str, Cell] = {}
    for i, name in enumerate(("alpha", "beta")):
        ns = topo.add_ns(name)
        base = 16 * i
        topo.link(ns, f"198.51.100.{base + 1}/28", wan, f"198.51.100.{base + 14}/28")
        ns.run(["ip", "route", "replace", "default", "via", f"198.51.100.{base + 14}"])
        cell = Cell(topo, ns, name, f"{name}.test", f"10.{61 + i}.0.1/24",
                    f"198.51.100.{base + 1}:51820")  # fmt: skip
        cell.init()
        start_daemon(cell)
        cells[name] = cell
        for j, svc in enumerate(SERVICES[name]):
            port = 8000 + 100 * i + j
            ns.serve_http("127.0.0.1", port, f"{name} {svc}")
            cell.cli("services", "add", svc, "--backend", f"127.0.0.1:{port}", "--port", "80")
    faults = Faults(wan, ["198.51.100.1", "198.51.100.17"], topo.workdir)
    device_ns: dict[str, Netns] = {}
    for i, (role, owner) in enumerate((("phone", "alpha"), ("laptop", "beta"))):
        ns = topo.add_ns(role)
        base = 16 * i
        topo.link(ns, f"203.0.113.{base + 2}/28", wan, f"203.0.113.{base + 14}/28")
        ns.run(["ip", "route", "replace", "default", "via", f"203.0.113.{base + 14}"])
        ns.device(cells[owner].add_device(role), hint=role).up()
        device_ns[owner] = ns
    vips = {n: {s["name"]: s["vip"] for s in c.cli("services", "list")} for n, c in cells.items()}
    cells["alpha"].cli("connect", cells["beta"].invite()["string"])
    world = World(topo, faults, cells, device_ns, vips,
                  Model(devices={"alpha": {"phone"}, "beta": {"laptop"}}))  # fmt: skip
    wait_until(lambda: all(c.links()[other(n)]["state"] == "linked" for n, c in cells.items()),
               60, "the cells did not link")  # fmt: skip
    wait_until(lambda: device_ns["beta"].ping("10.61.0.1"), 30, "beta's device cannot reach alpha")
    world.children = world.snapshot_children()
    for name, kids in world.children.items():
        assert all(len(p) == 1 for p in kids.values()), f"{name}'s children: {kids}"
    return world


# -- invariants ---------------------------------------------------------------------------------


def enforcement_mismatches(world: World) -> list[str]:
    """What a device of each cell can reach of the other cell's services, against the model."""
    targets = {name: {f"{world.vips[name][s]}:80": s for s in svcs}
               for name, svcs in SERVICES.items()}  # fmt: skip
    got = reachable({world.device_ns[other(n)]: list(t) for n, t in targets.items()})
    wrong = []
    for name, by_target in targets.items():
        for target, svc in by_target.items():
            want = svc in world.model.shares[name]
            if got[target] != want:
                wrong.append(f"{other(name)}'s device {'cannot' if want else 'can'} reach "
                             f"{name}/{svc} ({target})")  # fmt: skip
    return wrong


def view_mismatches(world: World) -> list[str]:
    """The owners' views (`cells`, one call per cell), the devices in each store and kernel, and
    names (DNS on the other cell's device), against the model."""
    wrong = []
    views = {name: cells_view(cell)[other(name)] for name, cell in world.cells.items()}
    for name, cell in world.cells.items():
        want = world.model.shares[name]
        inbound = {s["name"] for s in views[name]["inbound"]}
        if inbound != want:
            wrong.append(f"{name} shares {sorted(inbound)}, acknowledged {sorted(want)}")
        mirrored = {s["name"] for s in views[other(name)]["outbound"]}
        if mirrored != want:
            wrong.append(f"{other(name)} mirrors {sorted(mirrored)} of {name}, "
                         f"acknowledged {sorted(want)}")  # fmt: skip
        peers = store_rows(cell, "SELECT name, public_key FROM peers")
        devices = {p["name"] for p in peers}
        if devices != world.model.devices[name]:
            wrong.append(f"{name} stores devices {sorted(devices)}, "
                         f"acknowledged {sorted(world.model.devices[name])}")  # fmt: skip
        missing = {p["public_key"] for p in peers} - {row[0] for row in cell.wg_dump()}
        if missing:
            wrong.append(f"{name}'s wg show lacks {len(missing)} stored device(s)")
        device = world.device_ns[other(name)]
        for svc in SERVICES[name]:
            addrs = device.dig(f"{svc}.{name}.test")
            expected = [world.vips[name][svc]] if svc in want else []
            if addrs != expected:
                wrong.append(f"{svc}.{name}.test resolves to {addrs} for {other(name)}'s device")
    return wrong


def check_seqs(world: World) -> None:
    """Sequence numbers never go backwards; nobody applied more than the other sent."""
    rows = {n: world.link_row(n) for n in world.cells}
    for name, row in rows.items():
        now = (int(row["local_seq"]), int(row["remote_seq"]), str(row["remote_epoch"]))
        before = world.seqs.get((name, other(name)))
        if before is not None:
            assert now[0] >= before[0], f"{name}'s local_seq went back: {before} -> {now}"
            assert now[2] == before[2], f"{name} saw {other(name)}'s epoch change: {before}->{now}"
            assert now[1] >= before[1], f"{name}'s remote_seq went back: {before} -> {now}"
        world.seqs[(name, other(name))] = now
    for name in world.cells:
        applied = rows[name]["remote_seq"]
        sent = rows[other(name)]["local_seq"]
        assert applied <= sent, f"{name} applied seq {applied} of {other(name)}, sent {sent}"


def check_no_restart(world: World) -> None:
    for name in world.cells:
        assert world.daemon_running(name), (
            f"{name}'s daemon is not running:\n{world.cells[name].log()}"
        )
    now = world.snapshot_children()
    assert now == world.children, f"children restarted: {world.children} -> {now}"


def check_converged(world: World, timeout_s: float = CONVERGE_S) -> float:
    """Wait until every invariant holds; return how long it took (seconds)."""
    started = time.monotonic()
    world.waited_on = []

    def converged() -> bool:
        wrong = enforcement_mismatches(world) or view_mismatches(world)
        if wrong:
            if not world.waited_on or world.waited_on[-1] != wrong:
                world.waited_on.append(wrong)  # what the wait was for (the bench prints it)
            raise AssertionError("; ".join(wrong))
        return True

    wait_until(converged, timeout_s, "the cells did not converge on the acknowledged state")
    took = time.monotonic() - started
    check_seqs(world)
    check_no_restart(world)
    return took


# -- changes ------------------------------------------------------------------------------------


@dataclass
class Change:
    cell: str
    kind: str  # share, unshare, device
    target: str  # a service or a device name

    def request(self) -> tuple[str, str, dict[str, Any] | None]:
        """The admin API call the CLI makes for this change: (method, path, JSON body)."""
        if self.kind == "device":
            return "POST", "/api/peers", {"name": self.target, "public_key": None}
        method = "POST" if self.kind == "share" else "DELETE"
        return method, f"/api/cells/{other(self.cell)}/shares/{self.target}", None

    def argv(self) -> list[str]:
        if self.kind == "device":
            return ["peers", "add", self.target]
        return [self.kind, other(self.cell), self.target]

    def acknowledged(self, model: Model) -> None:
        if self.kind == "share":
            model.shares[self.cell].add(self.target)
        elif self.kind == "unshare":
            model.shares[self.cell].discard(self.target)
        else:
            model.devices[self.cell].add(self.target)

    def __str__(self) -> str:
        return f"{self.cell}: {' '.join(self.argv())}"


def pick_change(rng: random.Random, model: Model, cells: tuple[str, ...] = ("alpha", "beta"),
                device_share: float = 0.2) -> Change:  # fmt: skip
    cell = rng.choice(cells)
    if rng.random() < device_share:
        model.next_device += 1
        return Change(cell, "device", f"d{model.next_device}")
    svc = rng.choice(SERVICES[cell])
    return Change(cell, "unshare" if svc in model.shares[cell] else "share", svc)


# -- fault cycles -------------------------------------------------------------------------------


@dataclass
class CycleResult:
    n: int
    change: str
    fault: str
    converge_s: float


def restart(world: World, name: str, offset_s: int = 0, kill: bool = False) -> None:
    cell = world.cells[name]
    if kill:
        cell.kill()
    else:
        cell.stop()
    start_daemon(cell, offset_s)
    world.restarts += 1


def _pushed(world: World, cell: str, seq_before: int) -> Callable[[], bool]:
    """True once `cell` has put a new signed document on the path (its local_seq grew)."""
    return lambda: world.local_seq(cell) > seq_before


def _accepted(world: World, cell: str, seq_before: int) -> bool:
    row = world.link_row(cell)
    return bool(row["local_seq"] > seq_before and row["pending_push"] == 0
                and row["last_push_status"] == "ok")  # fmt: skip


def run_cycle(world: World, rng: random.Random, n: int, log: Callable[[str], None]) -> CycleResult:
    """One change made while one fault is on, the fault healed, then every invariant checked."""
    change = pick_change(rng, world.model)
    fault = rng.choice(FAULT_KINDS)
    detail = fault
    seq_before = world.local_seq(change.cell)
    skewed: str | None = None
    if fault == "loss":
        percent = rng.randint(1, 30)
        world.faults.loss(percent)
        detail = f"loss {percent} %"
    elif fault == "delay":
        delay_ms = rng.randint(50, 500)
        world.faults.delay(delay_ms)
        detail = f"delay {delay_ms} ms"
    elif fault == "partition":
        world.faults.partition()
        # the partition is real: the cells no longer reach each other at all
        assert not world.cells["alpha"].ns.ping("198.51.100.17", timeout_s=1)
    elif fault == "skew":
        skewed = rng.choice(tuple(world.cells))
        offset = rng.choice((-SKEW_S, SKEW_S))
        restart(world, skewed, offset)
        detail = f"skew {offset:+d} s on {skewed}"
    log(f"cycle {n}: {change} under {detail}")
    world.cells[change.cell].cli(*change.argv())
    change.acknowledged(world.model)
    if fault in ("loss", "delay", "partition") and change.kind != "device":
        # hold the fault until the push of this change has been put on the faulty path
        wait_until(_pushed(world, change.cell, seq_before), 30, f"{change.cell} did not push")
    if fault == "loss":
        # the cells' datagrams do cross the loss rule (keepalives and handshakes at least)
        wait_until(lambda: world.faults.counted() > 0, 30, "nothing met the loss rule")
    if fault == "delay" and change.kind != "device":
        # the slow path carries traffic: the change's push is accepted through the relay
        wait_until(lambda: _accepted(world, change.cell, seq_before), CONVERGE_S,
                   f"{change.cell}'s push never went through the delay relay")  # fmt: skip
        assert world.faults.counted() > 0, world.faults.counters()
    if fault == "kill":
        victim = rng.choice(tuple(world.cells))
        detail = f"kill -9 of {victim}"
        restart(world, victim, kill=True)
    if skewed is not None:
        check_skewed(world, skewed, change)
        # the skewed cell converges while skewed; heal: its clock is set right (a restart)
        check_converged(world)
        restart(world, skewed)
    else:
        world.faults.heal()
    converge_s = check_converged(world)
    log(f"cycle {n}: converged {converge_s:.2f} s after healing {detail}"
        + "".join(f"\n    waited on: {'; '.join(w)}" for w in world.waited_on))  # fmt: skip
    return CycleResult(n, str(change), fault, converge_s)


def check_skewed(world: World, name: str, change: Change) -> None:
    """The skew is real: the skewed daemon stamps its log lines, and the journal entry of a change
    it made, minutes away from our clock."""
    first = re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", world.cells[name].log(), re.M)
    assert first is not None, world.cells[name].log()
    stamped = time.mktime(time.strptime(first.group(0), "%Y-%m-%d %H:%M:%S"))
    assert abs(stamped - time.time()) > SKEW_S / 2, f"{name}'s clock is not skewed: {first}"
    if change.cell != name or change.kind == "device":
        return
    entries = world.cells[name].journal(other(name))
    latest = max(entries, key=lambda e: int(e["id"]))  # this change's entry: the newest one
    assert abs(float(latest["at"]) - time.time()) > SKEW_S / 2, f"{name}'s journal: {latest}"


# -- crashes ------------------------------------------------------------------------------------


@dataclass
class CrashResult:
    n: int
    change: str
    killed: bool
    acknowledged: bool
    recover_s: float


def store_state(cell: Cell) -> tuple[set[str], set[str], set[str]]:
    """(shared service names, device names, device public keys) as the store holds them."""
    row = store_rows(cell, "SELECT inbound FROM links")[0]
    inbound = {s if isinstance(s, str) else s["name"] for s in json.loads(row["inbound"])}
    peers = store_rows(cell, "SELECT name, public_key FROM peers")
    return inbound, {p["name"] for p in peers}, {p["public_key"] for p in peers}


def sqlite_opens(cell: Cell) -> bool:
    """Open the store as the daemon would (read-write, WAL recovery) and check it whole."""
    with contextlib.closing(sqlite3.connect(cell.data_dir / "picell.db", timeout=10)) as conn:
        return [tuple(r) for r in conn.execute("PRAGMA integrity_check")] == [("ok",)]


def kill_schedule(rng: random.Random, changes: int, kills: int) -> set[int]:
    """Which changes get a kill: never the first, which measures how long a change takes (the
    kill points are drawn over that span)."""
    return set(rng.sample(range(1, changes), min(kills, changes - 1)))


def admin_call(cell: Cell, change: Change, answer: dict[str, Any]) -> None:
    """Make `change` through the admin API; `answer["status"]`: the HTTP status, or 0 when the
    daemon died before answering (never acknowledged)."""
    try:
        answer["status"], answer["body"] = api(cell, *change.request())
    except OSError as exc:  # refused, reset, closed without an answer: not acknowledged
        answer["status"], answer["body"] = 0, repr(exc)


def run_crash(world: World, rng: random.Random, n: int, kill: bool,
              log: Callable[[str], None]) -> CrashResult:  # fmt: skip
    """A change on alpha through its admin API, with alpha's daemon killed (SIGKILL) at a random
    point of it when `kill`; after the restart, the store, the kernel and the other cell are
    checked."""
    alpha = world.cells["alpha"]
    change = pick_change(rng, world.model, cells=("alpha",), device_share=0.3)
    answer: dict[str, Any] = {}
    call = threading.Thread(target=admin_call, args=(alpha, change, answer), daemon=True)
    sent = time.monotonic()
    call.start()
    recover_s = 0.0
    if kill:
        # the random point of the crash: from before the request arrives to a little after a
        # change's usual answer (measured: the machine's load varies); a fault's timing, not a
        # wait for a condition
        time.sleep(rng.uniform(0.0, 1.3 * world.change_s))
        assert alpha.proc is not None
        os.kill(alpha.proc.pid, signal.SIGKILL)
    call.join(timeout=120)
    assert not call.is_alive(), f"{change}: no answer from alpha's admin API"
    acknowledged = 200 <= answer["status"] < 300
    if not kill:
        assert acknowledged, f"{change}: {answer}"
        world.change_s = time.monotonic() - sent
    if acknowledged:
        change.acknowledged(world.model)
    log(f"crash {n}: {change}, {'killed' if kill else 'no kill'}, "
        f"{'acknowledged' if acknowledged else 'not acknowledged'}")  # fmt: skip
    if kill:
        proc = alpha.proc
        assert proc is not None
        wait_until(lambda: not proc.running(), 10, "alpha's daemon did not die")
        alpha.proc = None
        assert sqlite_opens(alpha), "alpha's store does not pass integrity_check after kill -9"
        started = time.monotonic()
        start_daemon(alpha)
        world.restarts += 1
        check_after_crash(world, change, acknowledged)
        recover_s = time.monotonic() - started
        log(f"crash {n}: all checks passed {recover_s:.2f} s after the restart"
            + "".join(f"\n    waited on: {'; '.join(w)}" for w in world.waited_on))  # fmt: skip
    return CrashResult(n, str(change), kill, acknowledged, recover_s)


def check_after_crash(world: World, change: Change, acknowledged: bool) -> None:
    alpha = world.cells["alpha"]
    assert integrity_ok(alpha)
    shared, devices, keys = store_state(alpha)
    # no acknowledged change lost: the model is what was acknowledged (and, for the change the
    # kill interrupted unacknowledged, whatever the store kept of it: either is correct)
    if not acknowledged:
        if change.kind == "device" and change.target in devices:
            world.model.devices["alpha"].add(change.target)
        elif change.kind != "device":  # only the interrupted change's service may go either way
            world.model.shares["alpha"].discard(change.target)
            world.model.shares["alpha"] |= shared & {change.target}
    assert shared == world.model.shares["alpha"], (shared, world.model.shares["alpha"])
    assert devices == world.model.devices["alpha"], (devices, world.model.devices["alpha"])
    # one reconcile converges: the start-up reconcile left nothing for the next one to do
    code, status = api(alpha, "GET", "/api/status")
    assert code == 200 and status["last_reconcile"] is not None, status
    assert not status["last_reconcile"]["anomalies"], status["last_reconcile"]
    code, again = api(alpha, "POST", "/api/reconcile")
    assert code == 200 and again["changed"] is False, again
    # the kernel matches the store: wg peers are the devices and the link, the grants hold
    link_key = store_rows(alpha, "SELECT public_key FROM links")[0]["public_key"]
    assert {row[0] for row in alpha.wg_dump()} == keys | {link_key}
    check_converged(world)
