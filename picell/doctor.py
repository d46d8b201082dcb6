"""`picell doctor`: walk the real path from a device (ours, or any of a linked cell's) to a
service (ours, or a linked cell's) and name the first broken step, with its fix.

Runs in the daemon (`POST /api/doctor`), so it reads the reconciler's observations (children,
host firewalls) and can ask the other cell through the mesh client (`mesh.explain`). Each step
observes the system now (`wg show`, `ip -j link`, a DNS query to our own Unbound, a TCP
connect, `nft`), never the store's belief alone. The steps, in path order, only those the
question needs:

  daemon → device → endpoint → port mapping → host firewall → handshake → mtu → grant → dns
  → backend → drop counters

The handshake comes before the MTU probe (which travels through the tunnel), and the grant
before DNS: a linked cell's DNS view answers exactly what is granted, so a missing grant shows
as a missing name too, and the grant is its cause.

Must not: change anything (no grant, no reconcile, no route); send anything to another cell but
the one signed `explain` question.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import struct
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from picell import validate
from picell.addressing import vip_address
from picell.constants import DNS_PORT, LINK_STALE_S
from picell.control import Control
from picell.errors import CommandFailed, Conflict, NotFound
from picell.mesh.explain import Explain, ExplainFailed, answer_line, decide, when
from picell.mesh.links import Links
from picell.mesh.reach import endpoint_warnings
from picell.store import cell as cell_table
from picell.store import links as link_table
from picell.store import peers as peer_table
from picell.store import portmap as portmap_table
from picell.store import services as service_table
from picell.store.cell import Cell
from picell.store.links import Link, LinkState
from picell.store.peers import Peer
from picell.store.services import Service
from picell.wireguard.apply import interface_exists, observe_wg

Status = Literal["pass", "fail", "skip"]
TCP_PROBE_S = 3.0  # a backend that does not accept within this is not answering
DNS_PROBE_S = 3.0
PING_WAIT_S = 2  # per probe of the MTU step
IPV4_ICMP_HEADERS = 28  # IPv4 (20) + ICMP (8): ping's -s is the payload


_LABEL = r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?"
PATH_PATTERN = rf"^{_LABEL}(/{_LABEL})?$"  # NAME or CELL/NAME (picell names: DNS labels)


class DoctorAsk(BaseModel):
    """The question (`picell doctor --from … --to …`); both optional."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    from_: str | None = Field(default=None, alias="from", max_length=127, pattern=PATH_PATTERN)
    to: str | None = Field(default=None, max_length=127, pattern=PATH_PATTERN)


@dataclass(frozen=True)
class Step:
    name: str
    status: Status
    finding: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Route:
    """The question, resolved against our store."""

    device: Peer | None = None  # one of our devices asks
    asker: Link | None = None  # any device of this linked cell asks
    service: Service | None = None  # our service
    server: Link | None = None  # the linked cell that serves `remote`
    remote: str | None = None  # the service name at `server`
    asker_device: str | None = None  # the device of `asker` that asks (one it publishes)

    @property
    def links(self) -> tuple[Link, ...]:
        return tuple(ln for ln in (self.asker, self.server) if ln is not None)


def _parts(text: str, field: str) -> tuple[str, str | None]:
    head, sep, tail = text.partition("/")
    first = validate.name(head, field)
    return (first, validate.name(tail, field)) if sep else (first, None)


def resolve(conn: Any, ask: DoctorAsk) -> Route:
    """The question's parts, or a 4xx naming `from` or `to`."""
    cell = cell_table.load(conn)
    links = {ln.name: ln for ln in link_table.all_links(conn) if ln.state != LinkState.UNLINKING}
    devices = {p.name: p for p in peer_table.all_peers(conn)}
    services = {s.name: s for s in service_table.all_services(conn)}
    device = asker = asker_device = None
    if ask.from_:
        first, second = _parts(ask.from_, "from")
        if second is not None and first == cell.name:
            first, second = second, None  # OURCELL/DEVICE is our DEVICE
        if second is not None:
            if first not in links:
                raise NotFound(f"from: no linked cell named {first!r}", field="from")
            published = links[first].mirror.devices
            if not published:
                raise Conflict(
                    f"from: {ask.from_}: {first} publishes no devices (its owner runs "
                    f"`picell cells publish-devices {cell.name} on`); ask with --from {first}",
                    field="from",
                )
            if second not in dict(published):
                raise NotFound(f"from: {first} publishes no device named {second!r}",
                               field="from")  # fmt: skip
            asker_device = second
        if asker_device is not None:
            asker = links[first]
        elif first in devices and first in links:
            raise Conflict(
                f"from: {first!r} is both a device and a linked cell; rename one", field="from"
            )
        elif first in devices:
            device = devices[first]
        elif first in links:
            asker = links[first]
        else:
            raise NotFound(f"from: no device or linked cell named {first!r}", field="from")
    service = server = remote = None
    if ask.to:
        first, second = _parts(ask.to, "to")
        if second is None or first == cell.name:
            name = second or first
            if name not in services:
                raise NotFound(f"to: this cell has no service named {name!r}", field="to")
            service = services[name]
        elif first in links:
            server, remote = links[first], second
        else:
            raise NotFound(f"to: no linked cell named {first!r}", field="to")
    if asker is not None and server is not None:
        raise Conflict(
            f"to: {asker.name}'s devices reach only our services through this cell, not "
            f"{server.name}'s; ask {server.name}'s owner to run the doctor",
            field="to",
        )
    return Route(device, asker, service, server, remote, asker_device)


class Doctor:
    def __init__(self, control: Control, links: Links) -> None:
        self.control = control
        self.runner = control.runner
        self.store = control.store
        self.links = links
        self.explain = Explain(links)

    def run(self, ask: DoctorAsk) -> dict[str, Any]:
        with self.store.read() as conn:
            route = resolve(conn, ask)
            cell = cell_table.load(conn)
            all_links = link_table.all_links(conn)
            mapping = portmap_table.load(conn)
        steps = [self.daemon(cell)]
        if route.device is not None:
            steps.append(self.device_handshake(cell, route.device))
        if ask.from_ is None and ask.to is None:  # the cell's general health: every link
            path_links = tuple(ln for ln in all_links if ln.state == LinkState.LINKED)
        else:
            path_links = route.links
        if path_links:
            steps += [self.endpoint(cell, all_links, ln) for ln in path_links]
            steps += [t for ln in path_links if (t := translation(cell, ln)) is not None]
            steps.append(self.port_mapping(mapping))
            steps.append(self.host_firewall())
            shakes = [self.handshake(cell, ln) for ln in path_links]
            steps += shakes
            steps += [
                self.mtu(cell, ln) if hs.status == "pass" else _skip_mtu(ln)
                for ln, hs in zip(path_links, shakes, strict=True)
            ]
        if route.server is not None and route.remote is not None:
            grant = self.remote_grant(cell, route.device, route.server, route.remote)
            steps += [grant, self.remote_dns(cell, route.server, route.remote)]
            steps.append(self.counters(cell, None, None))
        elif route.service is not None:
            steps.append(self.local_grant(cell, route, route.service))
            steps.append(self.local_dns(cell, route.asker, route.service))
            steps.append(self.backend(route.service))
            steps.append(self.counters(cell, route.asker, route.service))
        failed = next((s for s in steps if s.status == "fail"), None)
        return {
            "ok": failed is None,
            "from": ask.from_,
            "to": ask.to,
            "steps": [s.as_dict() for s in steps],
            "first_failure": failed.as_dict() if failed else None,
        }

    # -- the steps -----------------------------------------------------------------------------
    def daemon(self, cell: Cell) -> Step:
        rec = self.control.reconciler
        if rec is None:
            return Step(
                "daemon",
                "fail",
                "no reconciler runs in this process",
                "start the daemon: picell serve",
            )
        seen = []
        if not interface_exists(cell.interface):
            return Step(
                "daemon",
                "fail",
                f"the WireGuard interface {cell.interface} is missing",
                "run `picell reconcile` (it recreates it); if it stays missing, read "
                "the daemon's log",
            )
        if rec.wg_child is not None:
            if not rec.wg_child.running():
                return Step(
                    "daemon",
                    "fail",
                    f"wireguard-go for {cell.interface} has exited",
                    "run `picell reconcile` (it restarts it); read "
                    f"{rec.paths.run_dir}/{rec.wg_child.name}.log",
                )
            seen.append(f"wireguard-go pid {rec.wg_child.pid} alive")
        else:
            seen.append(f"{cell.interface} present")
        if not rec.unbound.running():
            return Step(
                "daemon",
                "fail",
                "Unbound (the cell's DNS) is not running",
                f"run `picell reconcile` (it restarts it); read {rec.paths.run_dir}/unbound.log",
            )
        seen.append(f"unbound pid {rec.unbound.child.pid} alive")
        if self.control.last_error:
            return Step(
                "daemon",
                "fail",
                f"the last reconcile failed: {self.control.last_error}",
                "fix what the message names, then `picell reconcile`",
            )
        return Step("daemon", "pass", ", ".join(seen) + ", last reconcile ok")

    def device_handshake(self, cell: Cell, device: Peer) -> Step:
        observed = observe_wg(self.runner, cell.interface)
        peer = observed.peers.get(device.public_key) if observed else None
        if peer is None:
            return Step(
                "device",
                "fail",
                f"{device.name} is not a peer of {cell.interface}",
                "run `picell reconcile`",
            )
        if not peer.latest_handshake:
            return Step(
                "device",
                "fail",
                f"{device.name} has never completed a handshake",
                f"import its config (`picell peers config {device.name}`) and turn its "
                f"tunnel on; it must reach {cell.primary_endpoint} over UDP",
            )
        age = round(time.time() - peer.latest_handshake)
        return Step(
            "device",
            "pass",
            f"{device.name} last handshook {age} s ago from "
            f"{peer.endpoint} (a device handshakes only while it sends)",
        )

    def endpoint(self, cell: Cell, links: list[Link], link: Link) -> Step:
        name = f"endpoint {link.name}"
        warnings = endpoint_warnings(cell, links)
        note = f" (note: {'; '.join(warnings)})" if warnings else ""
        if link.mirror.seen_at:
            return Step(
                name,
                "pass",
                f"{link.name} sees us at {link.mirror.seen_at}; we "
                f"announce {', '.join(cell.announced)}{note}",
            )
        fix = (
            warnings[0]
            if warnings
            else (
                f"wait for {link.name}'s next state document (at most 45 s), and check its "
                "handshake below"
            )
        )
        return Step(name, "fail", f"{link.name} has not told us where it sees us", fix)

    def port_mapping(self, mapping: portmap_table.Mapping | None) -> Step:
        error = self.control.port_mapping_error()
        if error:
            return Step(
                "port mapping",
                "fail",
                f"the router's port mapping failed: {error}",
                "forward the UDP port on the router by hand, or enable UPnP/NAT-PMP on it",
            )
        if mapping is None:
            return Step("port mapping", "skip", "no router port mapping in use")
        if time.time() >= mapping.expires_at:
            return Step(
                "port mapping",
                "fail",
                f"the router's mapping {mapping.endpoint} expired at {when(mapping.expires_at)}",
                "check the router (UPnP/NAT-PMP on) and the daemon's log",
            )
        return Step(
            "port mapping",
            "pass",
            f"the router maps {mapping.endpoint} to us until {when(mapping.expires_at)}",
        )

    def host_firewall(self) -> Step:
        rec = self.control.reconciler
        blockers = rec.host_firewall.last.blockers if rec is not None else ()
        open_ = [b for b in blockers if b.action.startswith("run: ")]
        if open_:
            first = open_[0]
            return Step(
                "host firewall",
                "fail",
                str(first).split(": run: ")[0],
                first.action.removeprefix("run: "),
            )
        if blockers:
            handled = "; ".join(str(b) for b in blockers)
            return Step("host firewall", "pass", f"handled: {handled}")
        return Step("host firewall", "pass", "no other firewall drops our traffic")

    def handshake(self, cell: Cell, link: Link) -> Step:
        name = f"handshake {link.name}"
        observed = observe_wg(self.runner, cell.interface)
        peer = observed.peers.get(link.public_key) if observed else None
        reach = (
            f"check that UDP reaches {link.name} at {link.identity.endpoint} (its "
            "firewall, its router's port forward) and that its daemon runs"
        )
        if peer is None:
            return Step(
                name,
                "fail",
                f"{link.name} is not a peer of {cell.interface}",
                "run `picell reconcile`",
            )
        if not peer.latest_handshake:
            return Step(
                name,
                "fail",
                f"no handshake with {link.name} since its peer was set up "
                f"(endpoint {peer.endpoint or link.identity.endpoint})",
                reach,
            )
        age = round(time.time() - peer.latest_handshake)
        if age >= LINK_STALE_S:
            return Step(
                name,
                "fail",
                f"the last handshake with {link.name} was {age} s ago "
                f"(stale after {LINK_STALE_S} s)",
                reach,
            )
        return Step(name, "pass", f"handshake with {link.name} {age} s ago at {peer.endpoint}")

    def mtu(self, cell: Cell, link: Link) -> Step:
        """A full-size packet (the interface's MTU, don't fragment) through the tunnel to the
        other cell's own address, which answers ping. Only if that fails, a small one: a small
        echo that passes where a full one does not is a path that cannot carry WireGuard's
        packets at our MTU (PPPoE, a mobile network), the silent cause of hanging transfers."""
        name = f"mtu {link.name}"
        mtu = _link_mtu(self.runner, cell.interface)
        if mtu is None:
            return Step(name, "skip", f"could not read the MTU of {cell.interface}")
        if self._ping(cell, link, mtu - IPV4_ICMP_HEADERS):
            return Step(
                name, "pass", f"{mtu}-byte packets cross the tunnel to {link.name} unfragmented"
            )
        if self._ping(cell, link, 56):
            return Step(
                name,
                "fail",
                f"small packets cross the tunnel to {link.name}, {mtu}-byte ones do not",
                f"the path to {link.identity.endpoint} carries less than {mtu + 60} "
                f"bytes: lower the MTU of {cell.interface} on both cells "
                f"(`ip link set {cell.interface} mtu {mtu - 80}`), or fix that path",
            )
        return Step(
            name,
            "fail",
            f"no echo crosses the tunnel to {link.name} "
            f"({link.identity.address}) although the handshake is fresh",
            f"check the routes to {link.identity.network} (`picell reconcile`) and "
            f"{link.name}'s firewall",
        )

    def _ping(self, cell: Cell, link: Link, size: int) -> bool:
        argv = [
            "ping",
            "-n",
            "-q",
            "-M",
            "do",
            "-s",
            str(size),
            "-c",
            "1",
            "-W",
            str(PING_WAIT_S),
            "-I",
            str(cell.ip),
            str(link.identity.address),
        ]
        try:
            res = self.runner.run(argv, ok_codes=(0, 1, 2), timeout_s=PING_WAIT_S + 3)
        except CommandFailed:
            return False
        return res.returncode == 0

    def local_grant(self, cell: Cell, route: Route, service: Service) -> Step:
        asker, device, theirs = route.asker, route.device, route.asker_device
        if asker is None:
            who = device.name if device else "our devices"
            return Step(
                "grant",
                "pass",
                f"{who} → {cell.name}/{service.name}:{service.port} "
                "allowed (our own devices reach every service of ours)",
            )
        with self.store.read() as conn:
            answer = decide(conn, asker, service.name, theirs)
        line = answer_line(asker.name, theirs, cell.name, answer)
        if answer.allowed:
            return Step("grant", "pass", line)
        fix = f"picell share {asker.name} {service.name}" + (
            f" --device {theirs}" if theirs else ""
        )
        return Step("grant", "fail", line, fix)

    def remote_grant(self, cell: Cell, device: Peer | None, server: Link, service: str) -> Step:
        who = device.name if device else None
        try:
            answer = self.explain.ask(server.name, service, who)
        except (ExplainFailed, Conflict) as exc:
            message = exc.message if isinstance(exc, Conflict) else str(exc)
            return Step(
                "grant",
                "fail",
                f"could not ask {server.name}: {message}",
                f"see the handshake step; {server.name}'s daemon must run",
            )
        line = answer_line(cell.name, who, server.name, answer)
        if answer.allowed:
            return Step("grant", "pass", line)
        return Step(
            "grant",
            "fail",
            line,
            f"ask {server.name}'s owner to run `picell share {cell.name} {service}`",
        )

    def remote_dns(self, cell: Cell, server: Link, service: str) -> Step:
        fqdn = f"{service}.{server.identity.domain}"
        told = next((s for s in server.mirror.outbound if s.get("name") == service), None)
        if told is None:
            return Step(
                "dns",
                "fail",
                f"{server.name} has not told us it shares {service}",
                f"wait for {server.name}'s next state document (at most 45 s)",
            )
        # where we present it (`mesh.mapping`): its own address, moved when its network is mapped
        return self._dns_step(cell, fqdn, server.identity.view(ipaddress.IPv4Address(told["vip"])))

    def local_dns(self, cell: Cell, asker: Link | None, service: Service) -> Step:
        fqdn = f"{service.name}.{cell.domain}"
        vip = vip_address(cell.network, service.vip_index)
        if asker is None:
            return self._dns_step(cell, fqdn, vip)
        rec = self.control.reconciler
        if rec is None:
            return Step("dns", "skip", "no Unbound to ask")
        # what Unbound answers to that cell's queries: its view's records, as Unbound holds them
        view = f"link-{asker.name}"
        vip = asker.seen(vip, cell.network)  # where that cell presents our network
        argv = ["unbound-control", "-c", str(rec.unbound.conf_path), "view_list_local_data", view]
        try:
            out = self.runner.run(argv, timeout_s=DNS_PROBE_S + 2).stdout
        except CommandFailed as exc:
            return Step(
                "dns",
                "fail",
                f"Unbound's view for {asker.name}: {exc.message}",
                "run `picell reconcile`",
            )
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0].rstrip(".") == fqdn and fields[-1] == str(vip):
                return Step(
                    "dns", "pass", f"{fqdn} → {vip} in the view {asker.name} is answered from"
                )
        return Step(
            "dns",
            "fail",
            f"{fqdn} is not {vip} in the view {asker.name} is answered from",
            "run `picell reconcile`",
        )

    def _dns_step(self, cell: Cell, fqdn: str, want: ipaddress.IPv4Address) -> Step:
        try:
            rcode, addrs = query_a(cell.ip, fqdn)
        except OSError as exc:
            return Step(
                "dns",
                "fail",
                f"our DNS at {cell.ip} did not answer for {fqdn}: {exc}",
                "run `picell reconcile` (it restarts Unbound)",
            )
        if want in addrs:
            return Step("dns", "pass", f"{fqdn} → {want} (asked of {cell.ip}, as a device would)")
        got = ", ".join(map(str, addrs)) or RCODES.get(rcode, f"rcode {rcode}")
        return Step(
            "dns",
            "fail",
            f"{fqdn} resolves to {got} at {cell.ip}, not {want}",
            "run `picell reconcile`; a cached answer clears within 60 s",
        )

    def backend(self, service: Service) -> Step:
        where = f"{service.backend_host}:{service.backend_port}"
        if service.protocol != "tcp":
            return Step("backend", "skip", f"{service.name} is UDP ({where}): no connect to try")
        try:
            with socket.create_connection(
                (str(service.backend_host), service.backend_port), timeout=TCP_PROBE_S
            ):
                pass
        except OSError as exc:
            return Step(
                "backend",
                "fail",
                f"{service.name}'s backend {where} does not accept a "
                f"TCP connection from the cell: {exc.strerror or exc}",
                f"start the program behind {service.name} on {where}, or point the "
                "service at where it listens",
            )
        return Step("backend", "pass", f"{service.name}'s backend {where} accepts connections")

    def counters(self, cell: Cell, asker: Link | None, service: Service | None) -> Step:
        """The drop counters of the chains on this path, and, for a linked cell's traffic to
        our service, whether the kernel's grant set holds the element its packets must match
        (the reconciler keeps it; a missing one is drift)."""
        if asker is not None:
            chains = ("link_pre", "link_input")
        elif service is not None:
            chains = ("own_input", "vpn_forward")
        else:
            chains = ("vpn_forward", "vpn_deliver")
        try:
            dropped = {c: _drops(self.runner, c) for c in chains}
        except (CommandFailed, ValueError) as exc:
            return Step(
                "drop counters",
                "fail",
                f"could not read picell's nft table: {exc}",
                "run `picell reconcile`",
            )
        seen = ", ".join(f"{c} dropped {n} packets" for c, n in dropped.items())
        if asker is not None and service is not None:
            with self.store.read() as conn:
                allowed = decide(conn, asker, service.name).allowed
            # the grant as the kernel holds it: their network and our VIP as they present them
            vip = asker.seen(vip_address(cell.network, service.vip_index), cell.network)
            element = f"{asker.identity.network} . {vip} . {service.port}"
            argv = [
                "nft",
                "get",
                "element",
                "inet",
                "picell",
                f"grants_{service.protocol}",
                f"{{ {element} }}",
            ]
            found = self.runner.run(argv, ok_codes=(0, 1)).returncode == 0
            if allowed and not found:
                return Step(
                    "drop counters",
                    "fail",
                    f"the grant {element} is missing from the kernel ({seen})",
                    "run `picell reconcile`",
                )
            if found and not allowed:
                return Step(
                    "drop counters",
                    "fail",
                    f"the kernel still holds the revoked grant {element} ({seen})",
                    "run `picell reconcile`",
                )
        return Step("drop counters", "pass", seen)


def _skip_mtu(link: Link) -> Step:
    return Step(f"mtu {link.name}", "skip", "no fresh handshake: nothing crosses the tunnel")


def _link_mtu(runner: Any, ifname: str) -> int | None:
    try:
        data = json.loads(runner.run(["ip", "-j", "link", "show", ifname]).stdout)
        return int(data[0]["mtu"])
    except (CommandFailed, ValueError, KeyError, IndexError, TypeError):
        return None


def _drops(runner: Any, chain: str) -> int:
    """Packets counted by the `counter drop` rules of one chain of our table."""
    data = json.loads(runner.run(["nft", "-j", "list", "chain", "inet", "picell", chain]).stdout)
    total = 0
    for item in data.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        exprs = rule.get("expr", [])
        if any(isinstance(e, dict) and "drop" in e for e in exprs):
            for e in exprs:
                if isinstance(e, dict) and isinstance(e.get("counter"), dict):
                    total += int(e["counter"].get("packets", 0))
    return total


# -- a DNS question to our own Unbound (RFC 1035, the A records of one name) ---------------------
RCODES = {0: "no address (NOERROR)", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}


def build_query(qid: int, fqdn: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in fqdn.rstrip(".").split("."))
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)
    )


def _skip_name(data: bytes, pos: int) -> int:
    while True:
        n = data[pos]
        if n & 0xC0 == 0xC0:
            return pos + 2
        if n == 0:
            return pos + 1
        pos += 1 + n


def translation(cell: Cell, link: Link) -> Step | None:
    """Where each side presents the other (`mesh.mapping`); None for a link with nothing to
    translate. Fails where the other cell's network overlaps ours but it has not told us where
    it presents ours: our packets to it would carry our own addresses, which its WireGuard
    drops (it cannot take a linked cell's word for its own devices' addresses)."""
    ident, seen = link.identity, link.mirror.seen_as
    if ident.mapped is None and seen is None and not ident.vpn_subnet.overlaps(cell.network):
        return None
    name = f"translation {link.name}"
    if seen is None and ident.vpn_subnet.overlaps(cell.network):
        return Step(
            name,
            "fail",
            f"{link.name}'s network {ident.vpn_subnet} overlaps ours ({cell.network}), and "
            f"{link.name} has not told us where it presents ours",
            "it tells us in its pairing answer or its state document: import a fresh invite of "
            f"{link.name}'s (`picell connect`) while one of the two pairing ports is reachable",
        )
    ours = f"at {ident.mapped}" if ident.mapped else "as it is"
    theirs = f"at {seen}" if seen else "as it is"
    return Step(
        name,
        "pass",
        f"we present {link.name}'s network {ident.vpn_subnet} {ours}; it presents ours {theirs}",
    )


def parse_answer(data: bytes, qid: int) -> tuple[int, list[ipaddress.IPv4Address]]:
    """(rcode, A addresses) of an answer to `build_query(qid, …)`; ValueError if malformed."""
    try:
        rid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", data[:12])
        if rid != qid or not flags & 0x8000:
            raise ValueError("not the answer to our question")
        pos = 12
        for _ in range(qd):
            pos = _skip_name(data, pos) + 4
        addrs = []
        for _ in range(an):
            pos = _skip_name(data, pos)
            rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", data[pos : pos + 10])
            pos += 10
            if rtype == 1 and rdlen == 4:
                addrs.append(ipaddress.IPv4Address(data[pos : pos + 4]))
            pos += rdlen
        return flags & 0xF, addrs
    except (struct.error, IndexError) as exc:
        raise ValueError(f"malformed DNS answer: {exc}") from None


def query_a(server: ipaddress.IPv4Address, fqdn: str) -> tuple[int, list[ipaddress.IPv4Address]]:
    """Ask `server` (UDP 53) for the A records of `fqdn`, as a device would."""
    qid = secrets.randbelow(65536)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(DNS_PROBE_S)
        sock.sendto(build_query(qid, fqdn), (str(server), DNS_PORT))
        deadline = time.monotonic() + DNS_PROBE_S
        while True:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            data, _ = sock.recvfrom(4096)
            try:
                return parse_answer(data, qid)
            except ValueError:
                if time.monotonic() > deadline:
                    raise OSError("no usable answer") from None
