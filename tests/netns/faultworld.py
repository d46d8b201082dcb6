"""The world of the fault and crash suites: two linked cells behind a router namespace, a model of
what their owners were told succeeded, random cycles of change and fault, and the invariants.

Both cells use the same network, 10.61.0.0/24, so their link is translated (`picell.mesh.mapping`):
each presents the other at a free /24 of 10/8 (`mapped_subnet`) and learns where the other
presents it (`seen_as`); every packet between them, and every name one cell's devices resolve in
the other's domain, goes through that translation, so every fault cycle and every kill -9 does.

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
            10.61.0.1/24 alpha.test      10.61.0.1/24    └───────┘        └───────┘
            a1 a2 a3: HTTP on 127.0.0.1  beta.test, b1 b2 likewise
            alpha presents beta at its mapped_subnet M_a (beta's seen_as), beta presents alpha
            at M_b (alpha's seen_as): beta's laptop reaches alpha's a1 (VIP 10.61.0.254) at
            M_b.254, never at 10.61.0.254, which is beta's own b1
            each cell publishes its devices to the other: a3 is shared with beta's laptop
            only and b2 with alpha's phone only (`--device`: a /32 grant, as presented)

Faults touch only datagrams between the two cells' addresses: a device and its own cell are never
hit. Changes go through the CLI (`share`, `unshare`, `peers add`) in the fault cycles, and through
the admin API calls the CLI makes in the crash suite (no CLI start-up: the kill can land anywhere
in a request), so the suites hold whatever the apply path does behind the admin API. The model
holds what was acknowledged.

Invariants (`check_converged`), each observed, never assumed:
- every acknowledged share is enforced: the other cell's device opens a TCP connection to the
  service where its own cell presents it (the host part of the service's VIP, as the serving
  cell lists it, in the viewer cell's `mapped_subnet` of the server, both read from the cells),
  the other cell mirrors it (`cells`) and its device resolves the name to that address;
- every acknowledged unshare is gone: that connection is refused or times out, and the name with it;
- every acknowledged device is in `peers list` and in `wg show` of its cell, and its name
  resolves to its address for its cell's device; a device never acknowledged (and not kept by
  the store after a kill) has no name;
- the translation is stable: each cell's `mapped_subnet` and `seen_as` of the other are those
  observed once linked (a fault or a restart never moves them), and they agree: alpha's
  `seen_as` is beta's `mapped_subnet`, and beta's is alpha's;
- sequence numbers (`links.local_seq`, `links.remote_seq` of both stores) never go backwards,
  and what a cell applied of the other's never exceeds what the other sent;
- nothing needs a restart: no `picell reconcile`, no restart but the fault's own; the
  wireguard-go and Unbound processes of each cell keep their pids throughout.
This module must not edit a store or call picell's code: it acts as an owner and a network would.
"""

from __future__ import annotations

import contextlib
import ipaddress
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
    resolve,
    start_daemon,
    store_rows,
)
from tests.netns.harness import Netns, Topology, wait_until

FAULT_KINDS = ("loss", "delay", "partition", "kill", "skew")
SERVICES = {"alpha": ("a1", "a2", "a3"), "beta": ("b1", "b2")}
DEVICES = {"alpha": "phone", "beta": "laptop"}  # the device of each cell the invariants use
# services shared with one device of the other cell, which it publishes (a /32 grant through
# the translation): the invariants' device is that one, so "reaches iff shared" holds as is
DEVICE_SHARES = {"a3": "laptop", "b2": "phone"}
NETWORK = ipaddress.IPv4Network("10.61.0.0/24")  # both cells': their link is translated
MESH_RANGE = ipaddress.IPv4Network("10.0.0.0/8")  # where a mapped subnet must lie
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
    vips: dict[str, dict[str, str]]  # cell -> service -> its VIP, as the cell lists it
    model: Model
    # viewer -> (mapped_subnet, seen_as) of the other cell, as the viewer's `cells` showed
    # them once linked: where it presents the other, where the other presents it
    mapping: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    # viewer -> the other cell's service -> "address:80" where the viewer presents it
    targets: dict[str, dict[str, str]] = field(default_factory=dict)
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


def observe_mapping(views: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, Any]]:
    """Each cell's (mapped_subnet, seen_as) of the other, from its `cells` view of it."""
    return {n: (v["mapped_subnet"], v["seen_as"]) for n, v in views.items()}


def mapping_mismatches(mapping: dict[str, tuple[Any, Any]]) -> list[str]:
    """What is wrong with the translation both cells show: each must present the other at a
    /24 of the mesh range apart from the shared network, and say where the other presents it
    as the other says it does."""
    wrong = []
    for name, (mapped, seen_as) in mapping.items():
        if mapped is None or seen_as is None:
            wrong.append(f"{name} shows mapped_subnet {mapped}, seen_as {seen_as}")
            continue
        net = ipaddress.IPv4Network(mapped)
        if not net.subnet_of(MESH_RANGE) or net.overlaps(NETWORK) or net.prefixlen != 24:
            wrong.append(f"{name} presents {other(name)} at {net}")
        if seen_as != mapping[other(name)][0]:
            wrong.append(f"{name} is seen as {seen_as}, {other(name)} presents it at "
                         f"{mapping[other(name)][0]}")  # fmt: skip
    return wrong


def presented_targets(
    views: dict[str, dict[str, Any]], vips: dict[str, dict[str, str]]
) -> dict[str, dict[str, str]]:
    """viewer -> the other cell's service -> "address:80", where the viewer (and its devices)
    reach it: the host part of the service's VIP (as its cell lists it), in the viewer's
    mapped subnet of the other cell's network (as the viewer's `cells` shows both)."""
    targets: dict[str, dict[str, str]] = {}
    for viewer, view in views.items():
        real = ipaddress.IPv4Network(view["vpn_subnet"])
        mapped = ipaddress.IPv4Network(view["mapped_subnet"])
        targets[viewer] = {}
        for svc, vip in vips[other(viewer)].items():
            offset = int(ipaddress.IPv4Address(vip)) - int(real.network_address)
            assert 0 < offset < real.num_addresses, f"{svc}'s VIP {vip} is outside {real}"
            targets[viewer][svc] = f"{mapped.network_address + offset}:80"
    return targets


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
        cell = Cell(topo, ns, name, f"{name}.test", f"{NETWORK[1]}/{NETWORK.prefixlen}",
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
    for i, (owner, role) in enumerate(DEVICES.items()):
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

    def mapped() -> bool:  # each has heard where the other presents it (its signed document)
        wrong = mapping_mismatches(observe_mapping(views_of(world)))
        assert not wrong, "; ".join(wrong)
        return True

    wait_until(mapped, 30, "the cells do not agree on where each presents the other")
    for name, cell in cells.items():  # device shares (`DEVICE_SHARES`) need published devices
        cell.cli("cells", "publish-devices", other(name), "on")
    wait_until(lambda: all(DEVICES[other(n)] in {d["name"] for d in c.links()[other(n)]["devices"]}
                           for n, c in cells.items()), 30,
               "the cells do not see each other's devices")  # fmt: skip
    views = views_of(world)
    world.mapping = observe_mapping(views)
    world.targets = presented_targets(views, vips)
    alpha_at_beta = ipaddress.IPv4Network(world.mapping["beta"][0]).network_address + 1
    wait_until(lambda: device_ns["beta"].ping(str(alpha_at_beta)), 30,
               f"beta's device cannot reach alpha at {alpha_at_beta}")  # fmt: skip
    world.children = world.snapshot_children()
    for name, kids in world.children.items():
        assert all(len(p) == 1 for p in kids.values()), f"{name}'s children: {kids}"
    return world


# -- invariants ---------------------------------------------------------------------------------


def views_of(world: World) -> dict[str, dict[str, Any]]:
    """Each cell's `cells` view of the other (one API call per cell)."""
    return {name: cells_view(cell)[other(name)] for name, cell in world.cells.items()}


def enforcement_mismatches(world: World) -> list[str]:
    """What a device of each cell can reach of the other cell's services, where its own cell
    presents them, against the model."""
    targets = {name: {world.targets[other(name)][s]: s for s in svcs}
               for name, svcs in SERVICES.items()}  # fmt: skip
    got = reachable({world.device_ns[other(n)]: list(t) for n, t in targets.items()})
    wrong = []
    for name, by_target in targets.items():
        for target, svc in by_target.items():
            want = svc in world.model.shares[name]
            if got[world.device_ns[other(name)]][target] != want:
                wrong.append(f"{other(name)}'s device {'cannot' if want else 'can'} reach "
                             f"{name}/{svc} ({target})")  # fmt: skip
    return wrong


def device_names(model: Model) -> list[str]:
    """Every device name a change ever tried, on either cell (acknowledged or not)."""
    return sorted({*DEVICES.values(), *(f"d{i}" for i in range(1, model.next_device + 1))})


def view_mismatches(world: World) -> list[str]:
    """The owners' views (`cells` and `peers list`, one call each per cell), the devices in each
    kernel, and names (one `dig` on each cell's device: the other cell's services, and its own
    cell's devices), against the model."""
    wrong = []
    views = views_of(world)
    # name -> (the device cell asking, the expected answer), filled in below
    names: dict[str, tuple[str, list[str]]] = {}
    for name, cell in world.cells.items():
        want = world.model.shares[name]
        inbound = {s["name"] for s in views[name]["inbound"]}
        if inbound != want:
            wrong.append(f"{name} shares {sorted(inbound)}, acknowledged {sorted(want)}")
        mirrored = {s["name"]: s["vip"] for s in views[other(name)]["outbound"]}
        if set(mirrored) != want:
            wrong.append(f"{other(name)} mirrors {sorted(mirrored)} of {name}, "
                         f"acknowledged {sorted(want)}")  # fmt: skip
        elif any(world.vips[name][s] != vip for s, vip in mirrored.items()):
            # the document carries the serving cell's own VIPs: only the viewer translates
            wrong.append(f"{other(name)} mirrors {name}'s VIPs as {mirrored}")
        code, peers = api(cell, "GET", "/api/peers")
        assert code == 200, peers
        devices = {p["name"]: p["address"] for p in peers}
        if set(devices) != world.model.devices[name]:
            wrong.append(f"{name} lists devices {sorted(devices)}, "
                         f"acknowledged {sorted(world.model.devices[name])}")  # fmt: skip
        missing = {p["public_key"] for p in peers} - {row[0] for row in cell.wg_dump()}
        if missing:
            wrong.append(f"{name}'s wg show lacks {len(missing)} listed device(s)")
        # its services, for the other cell's device: where that cell presents them
        for svc in SERVICES[name]:
            target = world.targets[other(name)][svc].rsplit(":", 1)[0]
            names[f"{svc}.{name}.test"] = (other(name), [target] if svc in want else [])
        # its devices, for its own device: at their addresses
        for device in device_names(world.model):
            expected = [devices[device]] if device in world.model.devices[name] else []
            names[f"{device}.{name}.test"] = (name, expected)
    for asker in world.cells:
        asked = [n for n, (a, _) in names.items() if a == asker]
        for fqdn, addrs in resolve(world.device_ns[asker], asked).items():
            if addrs != names[fqdn][1]:
                wrong.append(f"{fqdn} resolves to {addrs} for {asker}'s device, "
                             f"expected {names[fqdn][1]}")  # fmt: skip
    return wrong


def check_mapping(world: World) -> None:
    """The translation never moved: each side still shows what it showed once linked, and the
    two sides agree."""
    now = observe_mapping(views_of(world))
    assert now == world.mapping, f"the translation moved: {world.mapping} -> {now}"
    wrong = mapping_mismatches(now)
    assert not wrong, "; ".join(wrong)


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
    check_mapping(world)
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
        path = f"/api/cells/{other(self.cell)}/shares"
        device = DEVICE_SHARES.get(self.target)
        if device is None:
            return ("POST" if self.kind == "share" else "DELETE"), f"{path}/{self.target}", None
        if self.kind == "share":
            return "POST", path, {"services": [self.target], "device": device}
        return "DELETE", f"{path}/{self.target}?device={device}", None

    def argv(self) -> list[str]:
        if self.kind == "device":
            return ["peers", "add", self.target]
        device = DEVICE_SHARES.get(self.target)
        return [self.kind, other(self.cell), self.target, *(["--device", device] if device else [])]

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
    inbound = {s if isinstance(s, str) else s["service"] for s in json.loads(row["inbound"])}
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
