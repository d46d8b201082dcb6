"""Port mapping on the home router: PCP (RFC 6887), then NAT-PMP (RFC 6886), then UPnP-IGD.

Owns: asking the gateway (the default route's next hop) to forward the cell's WireGuard UDP
port and its TCP pairing port, renewing the mapping at half its lifetime, keeping it through a
daemon restart (the `port_mapping` table: the same external ports are asked for again), and
releasing it when it is no longer wanted. It records the mapped public endpoint with
`cell.set_mapped_endpoint` and, when that changes, marks every link pending and calls
`on_change` (the daemon wakes the sender and converges).

PCP and NAT-PMP are a few UDP datagrams, encoded and parsed here with `struct`; the gateway's
answer is hostile input: bounded in size, its version, opcode, result code, nonce, protocol and
ports checked, its external address refused when unusable (0.0.0.0, loopback, multicast, ...).
UPnP-IGD goes through the maintained `miniupnpc` client (PyPI wheel, see docs/ARCHITECTURE.md).

When: `PICELL_PORTMAP` unset or `auto` maps when the cell's endpoint is the host's own private
address (`endpoint_source == "host"`); `off` never maps (and releases a kept mapping); a comma
list (`pcp,nat-pmp,upnp`, any subset, in order) maps like `auto` with only those protocols.

Must not: touch the cell's own settings (only `mapped_endpoint`), sleep (its thread waits on an
event, and `step()` takes its time from `clock`, so tests drive renewal without waiting), or
log a line per failed attempt (`RepeatLog`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from picell.errors import CommandFailed
from picell.store import cell as cell_table
from picell.store import links as link_table
from picell.store import portmap as portmap_table
from picell.store.db import Store
from picell.store.portmap import Mapping
from picell.system.limits import RepeatLog
from picell.system.run import Runner
from picell.worker import Worker

log = logging.getLogger(__name__)

ENV = "PICELL_PORTMAP"
PROTOCOLS = ("pcp", "nat-pmp", "upnp")
SERVER_PORT = 5351  # PCP and NAT-PMP servers listen here (RFC 6887 §19.1, RFC 6886 §3)
PCP_VERSION = 2
PCP_OP_MAP = 1
PCP_RESPONSE = 0x80  # the R bit
PCP_MAX = 1100  # RFC 6887 §7: a PCP message is at most 1100 octets
PCP_MAP_SIZE = 24 + 36  # common header + MAP opcode data
NATPMP_OP_ADDRESS, NATPMP_OP_UDP, NATPMP_OP_TCP = 0, 1, 2
IPPROTO = {"udp": 17, "tcp": 6}
NATPMP_OP = {"udp": NATPMP_OP_UDP, "tcp": NATPMP_OP_TCP}
# retransmissions (RFC 6886 §3.1 starts at 250 ms and doubles); four tries keep a start-up
# without a server to about 4 s per protocol
UDP_TIMEOUTS_S = (0.25, 0.5, 1.0, 2.0)
LIFETIME_S = 7200  # asked for: RFC 6886 §3.3 recommends two hours
LIFETIME_MAX_S = 86400  # a longer grant is believed only this far
UPNP_DISCOVER_MS = 2000
UPNP_PERMANENT_RENEW_S = 3600  # an IGD granting only permanent leases is re-asked hourly anyway
IDLE_S = 300.0  # while nothing is wanted: look again whether the cell's endpoint changed
FAIL_BACKOFF_S = (10.0, 30.0, 60.0, 120.0, 300.0)  # capped: the gateway may be gone for days
DESCRIPTION = "picell"

PCP_RESULTS = {
    1: "UNSUPP_VERSION",
    2: "NOT_AUTHORIZED",
    3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION",
    6: "MALFORMED_OPTION",
    7: "NETWORK_FAILURE",
    8: "NO_RESOURCES",
    9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL",
    12: "ADDRESS_MISMATCH",
    13: "EXCESSIVE_REMOTE_PEERS",
}
NATPMP_RESULTS = {
    1: "unsupported version",
    2: "not authorized",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}
SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598: carrier-grade NAT


class PortMapError(Exception):
    """One protocol did not give us a mapping (the message says why)."""


class NoAnswer(PortMapError):
    """Nobody answered on the server port."""


class Unsupported(PortMapError):
    """The server speaks another protocol (a NAT-PMP server answering PCP)."""


class Malformed(PortMapError):
    """An answer we refuse: truncated, oversized, or not an answer to our request."""


@dataclass(frozen=True)
class Granted:
    external_address: ipaddress.IPv4Address
    external_port: int
    lifetime_s: int


# -- the datagrams (pure) ----------------------------------------------------------------------
def _v6(addr: ipaddress.IPv4Address) -> bytes:
    """An IPv4 address as PCP carries it: IPv4-mapped IPv6 (RFC 6887 §5)."""
    return b"\x00" * 10 + b"\xff\xff" + addr.packed


def _v4(raw: bytes) -> ipaddress.IPv4Address:
    mapped = ipaddress.IPv6Address(raw).ipv4_mapped
    if mapped is None:
        raise Malformed("external address: not an IPv4 address")
    return mapped


def check_external(addr: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    """Refuse an external address nobody could ever reach us at. A private or shared one is
    kept (it tells of a double NAT or CGNAT) but never announced: see `announceable`."""
    if (
        addr.is_unspecified
        or addr.is_loopback
        or addr.is_multicast
        or addr.is_link_local
        or addr == ipaddress.IPv4Address("255.255.255.255")
        or addr in ipaddress.IPv4Network("240.0.0.0/4")
        or addr in ipaddress.IPv4Network("0.0.0.0/8")
    ):
        raise Malformed(f"external address: {addr} is not usable")
    return addr


def announceable(addr: ipaddress.IPv4Address) -> bool:
    """Whether another cell could reach us at `addr`: not private, not behind CGNAT. The
    documentation ranges count as public: the netns tests use them as the Internet."""
    doc = any(
        addr in ipaddress.IPv4Network(n)
        for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
    )
    return doc or (addr.is_global and addr not in SHARED)


def cgnat_warning(addr: ipaddress.IPv4Address) -> str | None:
    if addr in SHARED:
        return (
            f"the router's external address {addr} lies in 100.64.0.0/10: this home is behind "
            "carrier-grade NAT, and the mapping does not make the cell reachable from outside"
        )
    if not announceable(addr):
        return (
            f"the router's external address {addr} is private or reserved: another NAT lies "
            "beyond it (double NAT or CGNAT), and the mapping does not make the cell reachable"
        )
    return None


def _port(value: int, field: str) -> int:
    if not 1 <= value <= 65535:
        raise Malformed(f"{field}: {value} is not a port")
    return value


def _lifetime(value: int) -> int:
    if value <= 0:
        raise Malformed("lifetime: a granted mapping must have a lifetime")
    return min(value, LIFETIME_MAX_S)


def pcp_map_request(
    *,
    nonce: bytes,
    protocol: str,
    internal_port: int,
    client: ipaddress.IPv4Address,
    lifetime_s: int,
    suggested_port: int = 0,
    suggested_address: ipaddress.IPv4Address | None = None,
) -> bytes:
    """A PCP MAP request (RFC 6887 §7.1 header, §11.1 MAP opcode). Lifetime 0 deletes."""
    if len(nonce) != 12:
        raise ValueError("a PCP nonce is 12 bytes")
    header = struct.pack("!BBHI16s", PCP_VERSION, PCP_OP_MAP, 0, lifetime_s, _v6(client))
    body = struct.pack(
        "!12sB3xHH16s",
        nonce,
        IPPROTO[protocol],
        internal_port,
        suggested_port,
        _v6(suggested_address or ipaddress.IPv4Address(0)),
    )
    return header + body


def pcp_parse_map(data: bytes, *, nonce: bytes, protocol: str, internal_port: int) -> Granted:
    """The answer to `pcp_map_request`, strictly (RFC 6887 §7.2, §11.1)."""
    if len(data) > PCP_MAX:
        raise Malformed(f"PCP answer of {len(data)} bytes (at most {PCP_MAX})")
    if len(data) >= 4 and data[0] == 0:
        # RFC 6887 §9: a NAT-PMP server answers a PCP request with its own version 0
        raise Unsupported("the gateway speaks NAT-PMP, not PCP")
    if len(data) < PCP_MAP_SIZE or len(data) % 4:
        raise Malformed(f"PCP answer of {len(data)} bytes")
    version, r_op, _, result, lifetime, _epoch = struct.unpack_from("!BBBBII", data)
    if version != PCP_VERSION:
        raise Unsupported(f"PCP version {version}")
    if r_op != PCP_RESPONSE | PCP_OP_MAP:
        raise Malformed(f"PCP answer with opcode {r_op:#x}, not MAP")
    r_nonce, r_proto, r_iport, e_port, e_addr = struct.unpack_from("!12sB3xHH16s", data, 24)
    if r_nonce != nonce:
        raise Malformed("PCP answer to another request (nonce)")
    if result == 1:
        raise Unsupported("PCP: UNSUPP_VERSION")
    if result != 0:
        raise PortMapError(f"PCP refused: {PCP_RESULTS.get(result, f'result {result}')}")
    if r_proto != IPPROTO[protocol] or r_iport != internal_port:
        raise Malformed("PCP answer for another protocol or port")
    return Granted(check_external(_v4(e_addr)), _port(e_port, "external port"), _lifetime(lifetime))


def pcp_parse_delete(data: bytes, *, nonce: bytes) -> None:
    if len(data) > PCP_MAX or len(data) < PCP_MAP_SIZE:
        raise Malformed(f"PCP answer of {len(data)} bytes")
    version, r_op, _, result = struct.unpack_from("!BBBB", data)
    if version != PCP_VERSION or r_op != PCP_RESPONSE | PCP_OP_MAP or data[24:36] != nonce:
        raise Malformed("not an answer to our PCP delete")
    if result != 0:
        raise PortMapError(f"PCP refused the delete: {PCP_RESULTS.get(result, result)}")


def natpmp_address_request() -> bytes:
    return struct.pack("!BB", 0, NATPMP_OP_ADDRESS)  # RFC 6886 §3.2


def _natpmp_header(data: bytes, op: int, size: int) -> None:
    if len(data) > PCP_MAX:
        raise Malformed(f"NAT-PMP answer of {len(data)} bytes")
    if len(data) < size:
        raise Malformed(f"NAT-PMP answer of {len(data)} bytes (expected {size})")
    version, r_op, result = struct.unpack_from("!BBH", data)
    if version != 0:
        raise Malformed(f"NAT-PMP answer of version {version}")
    if r_op != 128 + op:
        raise Malformed(f"NAT-PMP answer with opcode {r_op}, not {128 + op}")
    if result != 0:
        raise PortMapError(f"NAT-PMP refused: {NATPMP_RESULTS.get(result, f'result {result}')}")


def natpmp_parse_address(data: bytes) -> ipaddress.IPv4Address:
    _natpmp_header(data, NATPMP_OP_ADDRESS, 12)
    return check_external(ipaddress.IPv4Address(data[8:12]))


def natpmp_map_request(
    *, protocol: str, internal_port: int, lifetime_s: int, suggested_port: int = 0
) -> bytes:
    """RFC 6886 §3.3. Lifetime 0 with suggested port 0 deletes the mapping (§3.4)."""
    return struct.pack(
        "!BBHHHI", 0, NATPMP_OP[protocol], 0, internal_port, suggested_port, lifetime_s
    )


def natpmp_parse_map(data: bytes, *, protocol: str, internal_port: int) -> tuple[int, int]:
    """(external port, lifetime) from the answer to `natpmp_map_request`."""
    _natpmp_header(data, NATPMP_OP[protocol], 16)
    r_iport, e_port, lifetime = struct.unpack_from("!HHI", data, 8)
    if r_iport != internal_port:
        raise Malformed("NAT-PMP answer for another port")
    return _port(e_port, "external port"), _lifetime(lifetime)


# -- the transports (seams) --------------------------------------------------------------------
class Transport(Protocol):
    def local_address(self, gateway: ipaddress.IPv4Address) -> ipaddress.IPv4Address: ...

    def exchange(self, gateway: ipaddress.IPv4Address, payload: bytes) -> bytes: ...


class UdpTransport:
    """One request to the gateway's port 5351, retransmitted (`UDP_TIMEOUTS_S`). The socket is
    connected, so the kernel drops datagrams from anyone but the gateway's server port."""

    def __init__(self, timeouts_s: Sequence[float] = UDP_TIMEOUTS_S) -> None:
        self.timeouts_s = tuple(timeouts_s)

    def local_address(self, gateway: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((str(gateway), SERVER_PORT))  # no packet: it only picks the route
            return ipaddress.IPv4Address(s.getsockname()[0])

    def exchange(self, gateway: ipaddress.IPv4Address, payload: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((str(gateway), SERVER_PORT))
            for timeout in self.timeouts_s:
                s.settimeout(timeout)
                try:
                    s.send(payload)
                    return s.recv(PCP_MAX + 1)  # one byte more: an oversize answer shows
                except TimeoutError:
                    continue
                except ConnectionRefusedError as exc:  # ICMP port unreachable: no server
                    raise NoAnswer(f"{gateway}:{SERVER_PORT} refused") from exc
                except OSError as exc:  # no route, network down
                    raise NoAnswer(f"{gateway}:{SERVER_PORT}: {exc.strerror}") from exc
        raise NoAnswer(f"no answer from {gateway}:{SERVER_PORT}")


# -- the protocols -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Want:
    """What the cell needs mapped."""

    listen_port: int  # UDP
    pair_port: int  # TCP


class Client(Protocol):
    name: str

    def map(self, gateway: ipaddress.IPv4Address, want: Want, held: Mapping | None) -> Mapping: ...

    def release(self, m: Mapping) -> None: ...


class PcpClient:
    name = "pcp"

    def __init__(self, transport: Transport, clock: Callable[[], float]) -> None:
        self.transport = transport
        self.clock = clock

    def _one(
        self,
        gateway: ipaddress.IPv4Address,
        client: ipaddress.IPv4Address,
        nonce: bytes,
        protocol: str,
        port: int,
        suggested: int,
        address: ipaddress.IPv4Address | None,
    ) -> Granted:
        request = pcp_map_request(
            nonce=nonce,
            protocol=protocol,
            internal_port=port,
            client=client,
            lifetime_s=LIFETIME_S,
            suggested_port=suggested,
            suggested_address=address,
        )
        answer = self.transport.exchange(gateway, request)
        return pcp_parse_map(answer, nonce=nonce, protocol=protocol, internal_port=port)

    def map(self, gateway: ipaddress.IPv4Address, want: Want, held: Mapping | None) -> Mapping:
        client = self.transport.local_address(gateway)
        # a renewal repeats the nonce and asks for the same external address and ports
        same = held is not None and held.protocol == self.name and len(held.nonce) == 12
        nonce = held.nonce if same and held is not None else secrets.token_bytes(12)
        address = held.external_address if held is not None else None
        udp = self._one(
            gateway,
            client,
            nonce,
            "udp",
            want.listen_port,
            held.external_port if held else want.listen_port,
            address,
        )
        tcp = _optional(
            lambda: self._one(
                gateway,
                client,
                nonce,
                "tcp",
                want.pair_port,
                (held.pair_external_port or want.pair_port) if held else want.pair_port,
                udp.external_address,
            )
        )
        return _mapping(self.name, gateway, client, want, udp, tcp, self.clock(), nonce)

    def release(self, m: Mapping) -> None:
        for protocol, port in (("udp", m.listen_port), ("tcp", m.pair_port)):
            request = pcp_map_request(
                nonce=m.nonce,
                protocol=protocol,
                internal_port=port,
                client=m.internal_address,
                lifetime_s=0,
            )
            pcp_parse_delete(self.transport.exchange(m.gateway, request), nonce=m.nonce)


class NatPmpClient:
    name = "nat-pmp"

    def __init__(self, transport: Transport, clock: Callable[[], float]) -> None:
        self.transport = transport
        self.clock = clock

    def _one(
        self, gateway: ipaddress.IPv4Address, protocol: str, port: int, suggested: int
    ) -> tuple[int, int]:
        request = natpmp_map_request(
            protocol=protocol, internal_port=port, lifetime_s=LIFETIME_S, suggested_port=suggested
        )
        answer = self.transport.exchange(gateway, request)
        return natpmp_parse_map(answer, protocol=protocol, internal_port=port)

    def map(self, gateway: ipaddress.IPv4Address, want: Want, held: Mapping | None) -> Mapping:
        client = self.transport.local_address(gateway)
        external = natpmp_parse_address(self.transport.exchange(gateway, natpmp_address_request()))
        port, lifetime = self._one(
            gateway, "udp", want.listen_port, held.external_port if held else want.listen_port
        )
        udp = Granted(external, port, lifetime)

        def tcp() -> Granted:
            suggested = (held.pair_external_port or want.pair_port) if held else want.pair_port
            p, lt = self._one(gateway, "tcp", want.pair_port, suggested)
            return Granted(external, p, lt)

        return _mapping(self.name, gateway, client, want, udp, _optional(tcp), self.clock())

    def release(self, m: Mapping) -> None:
        for protocol, port in (("udp", m.listen_port), ("tcp", m.pair_port)):
            request = natpmp_map_request(protocol=protocol, internal_port=port, lifetime_s=0)
            answer = self.transport.exchange(m.gateway, request)
            _natpmp_header(answer, NATPMP_OP[protocol], 16)


def _upnp_factory() -> Any:
    import miniupnpc  # type: ignore[import-not-found]  # a C extension without type hints

    return miniupnpc.UPnP()


class UpnpClient:
    """UPnP-IGD through miniupnpc: SSDP discovery, then AddPortMapping with a lease. An IGD
    that takes only permanent leases (error 725) gets one, renewed hourly all the same."""

    name = "upnp"

    def __init__(
        self, clock: Callable[[], float], factory: Callable[[], Any] = _upnp_factory
    ) -> None:
        self.clock = clock
        self.factory = factory

    def _open(self, gateway: ipaddress.IPv4Address) -> Any:
        igd = self.factory()
        igd.discoverdelay = UPNP_DISCOVER_MS
        try:
            igd.discover()
            url = str(igd.selectigd())  # the IGD's control URL
        except Exception as exc:  # noqa: BLE001 - miniupnpc raises the bare Exception
            raise NoAnswer(f"UPnP: {exc}") from exc
        # any host of the LAN may answer SSDP: only the gateway itself is believed about the
        # address the Internet sees us at
        host = urllib.parse.urlsplit(url).hostname
        if host != str(gateway):
            raise Malformed(f"UPnP: the IGD at {host} is not the gateway {gateway}")
        return igd

    @staticmethod
    def _add(igd: Any, protocol: str, external: int, client: str, internal: int) -> tuple[int, int]:
        proto = protocol.upper()
        for lease in (LIFETIME_S, 0):
            try:
                igd.addportmapping(external, proto, client, internal, DESCRIPTION, "", lease)
            except Exception as exc:  # noqa: BLE001 - miniupnpc raises the bare Exception
                text = str(exc)
                if lease and ("725" in text or "OnlyPermanentLeases" in text):
                    continue
                if "718" in text or "Conflict" in text:
                    # the port is taken by another host: let an IGDv2 pick one
                    try:
                        port = int(
                            igd.addanyportmapping(
                                external, proto, client, internal, DESCRIPTION, "", lease
                            )
                        )
                    except Exception as exc2:  # noqa: BLE001
                        raise PortMapError(f"UPnP refused {proto} {external}: {exc2}") from exc2
                    return _port(port, "external port"), lease or UPNP_PERMANENT_RENEW_S
                raise PortMapError(f"UPnP refused {proto} {external}: {text}") from exc
            return external, lease or UPNP_PERMANENT_RENEW_S
        raise PortMapError(f"UPnP refused {proto} {external}")

    def map(self, gateway: ipaddress.IPv4Address, want: Want, held: Mapping | None) -> Mapping:
        igd = self._open(gateway)
        try:
            client = ipaddress.IPv4Address(igd.lanaddr)
            external = check_external(ipaddress.IPv4Address(igd.externalipaddress()))
        except (ValueError, TypeError) as exc:
            raise Malformed(f"UPnP: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            raise PortMapError(f"UPnP: {exc}") from exc
        eport, lifetime = self._add(
            igd,
            "udp",
            held.external_port if held else want.listen_port,
            str(client),
            want.listen_port,
        )
        udp = Granted(external, eport, lifetime)

        def tcp() -> Granted:
            suggested = (held.pair_external_port or want.pair_port) if held else want.pair_port
            p, lt = self._add(igd, "tcp", suggested, str(client), want.pair_port)
            return Granted(external, p, lt)

        return _mapping(self.name, gateway, client, want, udp, _optional(tcp), self.clock())

    def release(self, m: Mapping) -> None:
        igd = self._open(m.gateway)
        ports = [("UDP", m.external_port)]
        if m.pair_external_port:
            ports.append(("TCP", m.pair_external_port))
        for proto, port in ports:
            try:
                igd.deleteportmapping(port, proto)
            except Exception as exc:  # noqa: BLE001
                raise PortMapError(f"UPnP: deleting {proto} {port}: {exc}") from exc


def _optional(ask: Callable[[], Granted]) -> Granted | None:
    """The pairing port is a convenience (a link completes over UDP alone): a refusal of the
    TCP mapping leaves the UDP one standing."""
    try:
        return ask()
    except PortMapError as exc:
        log.info("port mapping: the pairing port was not mapped: %s", exc)
        return None


def _mapping(
    protocol: str,
    gateway: ipaddress.IPv4Address,
    client: ipaddress.IPv4Address,
    want: Want,
    udp: Granted,
    tcp: Granted | None,
    now: float,
    nonce: bytes = b"",
) -> Mapping:
    lifetime = min(udp.lifetime_s, tcp.lifetime_s) if tcp else udp.lifetime_s
    return Mapping(
        protocol=protocol,
        gateway=gateway,
        internal_address=client,
        external_address=udp.external_address,
        listen_port=want.listen_port,
        external_port=udp.external_port,
        pair_port=want.pair_port,
        pair_external_port=tcp.external_port if tcp else None,
        lifetime_s=lifetime,
        obtained_at=now,
        nonce=nonce,
    )


# -- the gateway -------------------------------------------------------------------------------
def observe_gateway(runner: Runner) -> ipaddress.IPv4Address | None:
    """The next hop of the main table's best IPv4 default route (`ip -j`), or None."""
    try:
        out = runner.run(["ip", "-j", "-4", "route", "show", "default"]).stdout
        routes = json.loads(out or "[]")
    except (CommandFailed, ValueError):
        return None
    best: tuple[int, ipaddress.IPv4Address] | None = None
    for r in routes if isinstance(routes, list) else []:
        if not isinstance(r, dict) or not isinstance(r.get("gateway"), str):
            continue
        try:
            gw = ipaddress.IPv4Address(r["gateway"])
        except ValueError:
            continue
        metric = r.get("metric", 0)
        metric = metric if isinstance(metric, int) else 0
        if best is None or metric < best[0]:
            best = (metric, gw)
    return best[1] if best else None


# -- the mapper --------------------------------------------------------------------------------
def parse_mode(value: str | None) -> tuple[str, ...] | None:
    """`PICELL_PORTMAP`: None when off, else the protocols to try in order."""
    text = (value or "auto").strip().lower()
    if text == "off":
        return None
    if text in ("auto", "on", ""):
        return PROTOCOLS
    chosen = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in chosen if p not in PROTOCOLS]
    if unknown or not chosen:
        raise ValueError(f"{ENV}: {value!r}: use auto, off, or a list of {', '.join(PROTOCOLS)}")
    return chosen


def record_endpoint(store: Store, endpoint: str | None) -> bool:
    """Set the cell's mapped endpoint; True when it changed, and then every link is marked
    pending in the same transaction, so linked cells learn the new address."""
    with store.transaction() as conn:
        if not cell_table.exists(conn) or cell_table.load(conn).mapped_endpoint == endpoint:
            return False
        cell_table.set_mapped_endpoint(conn, endpoint)
        for link in link_table.all_links(conn):
            link_table.mark_pending(conn, link.name)
    return True


class PortMapper(Worker):
    thread_name = "portmap"
    """Keeps the mapping: `step()` does one round and says how long to wait until the next;
    `start()` runs it on a thread that waits on an event (`stop()` and `wake()` cut it short)."""

    def __init__(
        self,
        store: Store,
        runner: Runner,
        *,
        on_change: Callable[[], None] = lambda: None,
        protocols: tuple[str, ...] | None = PROTOCOLS,
        clock: Callable[[], float] = time.time,
        clients: dict[str, Client] | None = None,
        gateway: Callable[[], ipaddress.IPv4Address | None] | None = None,
        repeats: RepeatLog | None = None,
    ) -> None:
        self.store = store
        self.on_change = on_change
        self.protocols = protocols
        self.clock = clock
        transport = UdpTransport()
        self.clients: dict[str, Client] = clients or {
            "pcp": PcpClient(transport, clock),
            "nat-pmp": NatPmpClient(transport, clock),
            "upnp": UpnpClient(clock),
        }
        self.gateway = gateway or (lambda: observe_gateway(runner))
        self.repeats = repeats or RepeatLog(log)
        self.failures = 0
        self.last_error: str | None = None
        # the first round renews a kept mapping at once: the router may have rebooted while the
        # daemon was down, and the same ports are best asked for again before anyone else does
        self._started = False
        super().__init__()

    @classmethod
    def from_env(cls, store: Store, runner: Runner, **kw: Any) -> PortMapper:
        try:
            protocols = parse_mode(os.environ.get(ENV))
        except ValueError as exc:
            log.error("port mapping: %s; trying every protocol", exc)
            protocols = PROTOCOLS
        return cls(store, runner, protocols=protocols, **kw)

    # -- what is wanted ------------------------------------------------------------------------
    def wanted(self) -> Want | None:
        if self.protocols is None:
            return None
        with self.store.read() as conn:
            if not cell_table.exists(conn):
                return None
            cell = cell_table.load(conn)
        if cell.endpoint_source != "host":
            return None  # the owner chose the endpoint (and, presumably, forwarded the port)
        host = cell.endpoint.rsplit(":", 1)[0].strip("[]")
        try:
            if announceable(ipaddress.IPv4Address(host)):
                return None  # a public address of the host's own needs no router
        except ValueError:
            pass
        return Want(cell.listen_port, cell.pair_port)

    def held(self) -> Mapping | None:
        with self.store.read() as conn:
            return portmap_table.load(conn)

    # -- one round -----------------------------------------------------------------------------
    def step(self) -> float:
        """Map, renew or release as needed; the seconds until the next round."""
        now = self.clock()
        want = self.wanted()
        held = self.held()
        if held is not None and (
            want is None or (held.listen_port, held.pair_port) != (want.listen_port, want.pair_port)
        ):
            self.release(held)
            held = None
        if want is None:
            self._publish(None)
            return IDLE_S
        if held is not None and now < held.renew_at and self._started:
            self._publish(held)
            return held.renew_at - now
        self._started = True
        gateway = self.gateway()
        if gateway is None:
            return self._failed(held, now, "no IPv4 default route: no gateway to ask")
        try:
            mapping = self._obtain(gateway, want, held)
        except PortMapError as exc:
            return self._failed(held, now, str(exc))
        if self.failures or held is None or held.endpoint != mapping.endpoint:
            log.info(
                "port mapping: %s at %s maps %s (UDP %d) and TCP %s for %d s",
                mapping.protocol,
                gateway,
                mapping.endpoint,
                mapping.listen_port,
                mapping.pair_external_port,
                mapping.lifetime_s,
            )
        self.failures, self.last_error = 0, None
        with self.store.transaction() as conn:
            portmap_table.save(conn, mapping)
        warning = cgnat_warning(mapping.external_address)
        if warning:
            self.repeats.note("portmap cgnat", logging.WARNING, f"port mapping: {warning}")
        self._publish(mapping)
        return max(mapping.renew_at - self.clock(), 1.0)

    def _obtain(self, gateway: ipaddress.IPv4Address, want: Want, held: Mapping | None) -> Mapping:
        assert self.protocols is not None
        order = list(self.protocols)
        same = held is not None and held.gateway == gateway
        if same and held is not None and held.protocol in order:
            order.remove(held.protocol)  # renew with what worked, the same ports first
            order.insert(0, held.protocol)
        reasons = []
        silent_5351 = False
        for name in order:
            if name == "nat-pmp" and silent_5351:
                continue  # nobody answered PCP on 5351: NAT-PMP shares the port
            try:
                return self.clients[name].map(gateway, want, held if same else None)
            except NoAnswer as exc:
                silent_5351 = silent_5351 or name == "pcp"
                reasons.append(f"{name}: {exc}")
            except PortMapError as exc:
                reasons.append(f"{name}: {exc}")
        raise PortMapError("; ".join(reasons) or "no protocol to try")

    def _failed(self, held: Mapping | None, now: float, reason: str) -> float:
        self.failures += 1
        self.last_error = reason
        self.repeats.note(
            "portmap failed",
            logging.WARNING,
            f"port mapping failed (retrying with backoff): {reason}",
        )
        if held is not None and now >= held.expires_at:
            self._publish(None)  # it has lapsed: do not send other cells to it
        elif held is not None:
            self._publish(held)
        return FAIL_BACKOFF_S[min(self.failures - 1, len(FAIL_BACKOFF_S) - 1)]

    def _publish(self, mapping: Mapping | None) -> None:
        endpoint = None
        if mapping is not None and announceable(mapping.external_address):
            endpoint = mapping.endpoint
        if record_endpoint(self.store, endpoint):
            log.info("port mapping: announcing %s", endpoint or "no mapped endpoint")
            self.on_change()

    def release(self, held: Mapping | None = None) -> None:
        """Give the mapping back to the router (best effort) and forget it."""
        held = held or self.held()
        if held is None:
            return
        client = self.clients.get(held.protocol)
        try:
            if client is not None:
                client.release(held)
            log.info("port mapping: released %s (%s)", held.endpoint, held.protocol)
        except PortMapError as exc:
            log.warning("port mapping: releasing %s failed: %s", held.endpoint, exc)
        with self.store.transaction() as conn:
            portmap_table.clear(conn)
        self._publish(None)

    # -- the thread ----------------------------------------------------------------------------
    # `stop` (Worker's) stops renewing; the mapping stays (the tunnels outlive the daemon)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.step()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive a bad round
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.repeats.note(
                    "portmap crash", logging.ERROR, f"port mapping: {self.last_error}",
                    exc_info=True,
                )  # fmt: skip
                delay = FAIL_BACKOFF_S[min(self.failures - 1, len(FAIL_BACKOFF_S) - 1)]
            self._wake.wait(delay)
            self._wake.clear()


def status_of(m: Mapping | None, now: float) -> dict[str, Any] | None:
    """`status`'s `port_mapping`: the mapping while it holds, or None."""
    if m is None or now >= m.expires_at:
        return None
    return {
        "protocol": m.protocol,
        "external_address": str(m.external_address),
        "external_port": m.external_port,
        "pair_external_port": m.pair_external_port,
        "expires_at": m.expires_at,
        "warning": cgnat_warning(m.external_address),
    }
