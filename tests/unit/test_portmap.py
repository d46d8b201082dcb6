"""Port mapping (picell/system/portmap.py): the PCP and NAT-PMP datagrams against the RFCs'
layouts, hostile answers, renewal on a fake clock, a restart renewing the kept mapping, release.

No packet leaves: the UDP transport is replaced by a fake gateway that decodes our requests with
its own `struct` formats (written from the RFC figures, not from the module) and answers them.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import time
from typing import Any

import pytest

from picell.constants import REPEAT_LOG_INTERVAL_S
from picell.control import Control
from picell.store import cell as cell_table
from picell.store import links as link_table
from picell.store import portmap as portmap_table
from picell.store.db import Store
from picell.store.links import Link, LinkIdentity, LinkState
from picell.system import portmap
from picell.system.limits import RepeatLog
from picell.system.portmap import (
    FAIL_BACKOFF_S,
    Malformed,
    NatPmpClient,
    NoAnswer,
    PcpClient,
    PortMapError,
    PortMapper,
    Unsupported,
    UpnpClient,
)

IP = ipaddress.IPv4Address
GW = IP("192.168.1.1")
LAN = IP("192.168.1.10")
EXT = IP("203.0.113.7")
NONCE = bytes(range(1, 13))


# -- the datagrams -----------------------------------------------------------------------------
def test_pcp_map_request_matches_rfc6887_layout() -> None:
    got = portmap.pcp_map_request(
        nonce=NONCE,
        protocol="udp",
        internal_port=51820,
        client=LAN,
        lifetime_s=7200,
        suggested_port=51820,
        suggested_address=EXT,
    )
    # RFC 6887 Figure 2 (request header) and Figure 9 (MAP opcode), byte by byte
    want = (
        b"\x02"  # version 2
        + b"\x01"  # R=0, opcode MAP
        + b"\x00\x00"  # reserved
        + b"\x00\x00\x1c\x20"  # requested lifetime 7200
        + b"\x00" * 10 + b"\xff\xff" + bytes([192, 168, 1, 10])  # client IP, IPv4-mapped
        + NONCE  # mapping nonce (96 bits)
        + b"\x11"  # protocol 17 (UDP)
        + b"\x00\x00\x00"  # reserved
        + b"\xca\x6c"  # internal port 51820
        + b"\xca\x6c"  # suggested external port
        + b"\x00" * 10 + b"\xff\xff" + bytes([203, 0, 113, 7])  # suggested external address
    )  # fmt: skip
    assert got == want and len(got) == 60


def test_pcp_without_preference_suggests_the_ipv4_all_zeros_address() -> None:
    got = portmap.pcp_map_request(
        nonce=NONCE, protocol="tcp", internal_port=51821, client=LAN, lifetime_s=0
    )
    assert got[36] == 6 and got[40:44] == b"\xca\x6d\x00\x00"
    assert got[44:] == b"\x00" * 10 + b"\xff\xff" + b"\x00" * 4  # RFC 6887 §11.1: ::ffff:0:0


def pcp_answer(
    *,
    nonce: bytes = NONCE,
    result: int = 0,
    opcode: int = 0x81,
    version: int = 2,
    proto: int = 17,
    iport: int = 51820,
    eport: int = 51820,
    eaddr: bytes = b"\x00" * 10 + b"\xff\xff" + EXT.packed,
    lifetime: int = 7200,
) -> bytes:
    """A PCP MAP response, RFC 6887 Figure 3 + Figure 10."""
    header = struct.pack("!BBBBII12x", version, opcode, 0, result, lifetime, 1234)
    return header + struct.pack("!12sB3xHH16s", nonce, proto, iport, eport, eaddr)


def parse(data: bytes) -> portmap.Granted:
    return portmap.pcp_parse_map(data, nonce=NONCE, protocol="udp", internal_port=51820)


def test_pcp_answer_is_parsed() -> None:
    assert parse(pcp_answer(eport=40000, lifetime=3600)) == portmap.Granted(EXT, 40000, 3600)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (pcp_answer()[:59], Malformed),  # short
        (pcp_answer()[:24], Malformed),  # a header alone
        (pcp_answer() + b"\x00" * 1044, Malformed),  # oversize: 1104 > 1100 bytes
        (pcp_answer() + b"\x00\x00", Malformed),  # not a multiple of 4
        (pcp_answer(opcode=0x82), Malformed),  # PEER, not MAP
        (pcp_answer(opcode=0x01), Malformed),  # a request, not an answer
        (pcp_answer(nonce=b"\x00" * 12), Malformed),  # the nonce of another request
        (pcp_answer(proto=6), Malformed),  # another protocol
        (pcp_answer(iport=22), Malformed),  # another internal port
        (pcp_answer(eport=0), Malformed),
        (pcp_answer(lifetime=0), Malformed),
        (pcp_answer(eaddr=b"\x00" * 10 + b"\xff\xff" + b"\x00" * 4), Malformed),  # 0.0.0.0
        (pcp_answer(eaddr=b"\x00" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])), Malformed),
        (pcp_answer(eaddr=b"\x00" * 10 + b"\xff\xff" + bytes([224, 0, 0, 1])), Malformed),
        (pcp_answer(eaddr=b"\x00" * 10 + b"\xff\xff" + bytes([255] * 4)), Malformed),
        (pcp_answer(eaddr=IP("203.0.113.7").packed * 4), Malformed),  # not IPv4-mapped
        (pcp_answer(version=3), Unsupported),
        (pcp_answer(result=1), Unsupported),  # UNSUPP_VERSION
        (bytes([0, 129, 0, 1]) + b"\x00" * 8, Unsupported),  # a NAT-PMP server's answer
        (pcp_answer(result=2), PortMapError),  # NOT_AUTHORIZED
        (pcp_answer(result=2, nonce=b"\x07" * 12), Malformed),  # a spoofed refusal
        (b"", Malformed),
    ],
)
def test_pcp_hostile_answers_are_refused(answer: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse(answer)


def test_pcp_refusal_names_the_result_code() -> None:
    with pytest.raises(PortMapError, match="NO_RESOURCES"):
        parse(pcp_answer(result=8))


def test_natpmp_requests_match_rfc6886_layout() -> None:
    assert portmap.natpmp_address_request() == b"\x00\x00"  # §3.2: version 0, opcode 0
    got = portmap.natpmp_map_request(
        protocol="tcp", internal_port=51821, lifetime_s=7200, suggested_port=51821
    )
    # §3.3: version, opcode (2 = TCP), reserved, internal port, suggested port, lifetime
    assert got == b"\x00\x02\x00\x00\xca\x6d\xca\x6d\x00\x00\x1c\x20"
    delete = portmap.natpmp_map_request(protocol="udp", internal_port=51820, lifetime_s=0)
    assert delete == b"\x00\x01\x00\x00\xca\x6c\x00\x00\x00\x00\x00\x00"  # §3.4


def natpmp_address(result: int = 0, addr: bytes = EXT.packed, op: int = 128) -> bytes:
    return struct.pack("!BBHI4s", 0, op, result, 99, addr)


def natpmp_map(
    result: int = 0, op: int = 129, iport: int = 51820, eport: int = 51820, lifetime: int = 7200
) -> bytes:
    return struct.pack("!BBHIHHI", 0, op, result, 99, iport, eport, lifetime)


def test_natpmp_answers_are_parsed() -> None:
    assert portmap.natpmp_parse_address(natpmp_address()) == EXT
    got = portmap.natpmp_parse_map(natpmp_map(eport=40001), protocol="udp", internal_port=51820)
    assert got == (40001, 7200)


@pytest.mark.parametrize(
    "answer",
    [
        natpmp_map()[:15],  # short
        natpmp_map() + b"\x00" * 1100,  # oversize
        natpmp_map(op=130),  # the TCP answer to a UDP request
        natpmp_map(op=1),  # a request
        b"\x02" + natpmp_map()[1:],  # version 2 in a NAT-PMP answer
        natpmp_map(iport=22),
        natpmp_map(eport=0),
        natpmp_map(lifetime=0),
        natpmp_map(result=2),  # refused
    ],
)
def test_natpmp_hostile_map_answers_are_refused(answer: bytes) -> None:
    with pytest.raises(PortMapError):
        portmap.natpmp_parse_map(answer, protocol="udp", internal_port=51820)


@pytest.mark.parametrize(
    "answer",
    [
        natpmp_address(addr=b"\x00\x00\x00\x00"),
        natpmp_address(addr=bytes([127, 0, 0, 1])),
        natpmp_address(addr=bytes([169, 254, 1, 1])),
        natpmp_address(op=129),
        natpmp_address(result=3),
        natpmp_address()[:11],
    ],
)
def test_natpmp_hostile_address_answers_are_refused(answer: bytes) -> None:
    with pytest.raises(PortMapError):
        portmap.natpmp_parse_address(answer)


def test_cgnat_and_private_external_addresses_are_warned_about_and_never_announced() -> None:
    assert portmap.cgnat_warning(IP("100.72.1.2")) is not None
    assert "carrier-grade" in (portmap.cgnat_warning(IP("100.72.1.2")) or "")
    assert portmap.cgnat_warning(IP("10.0.0.2")) is not None
    assert portmap.cgnat_warning(EXT) is None and portmap.cgnat_warning(IP("8.8.8.8")) is None
    assert not portmap.announceable(IP("100.64.0.1"))
    assert portmap.announceable(EXT)


def test_mode_from_the_environment() -> None:
    assert portmap.parse_mode(None) == ("pcp", "nat-pmp", "upnp")
    assert portmap.parse_mode("off") is None
    assert portmap.parse_mode("upnp, pcp") == ("upnp", "pcp")
    with pytest.raises(ValueError, match="PICELL_PORTMAP"):
        portmap.parse_mode("stun")


def test_gateway_is_the_best_default_routes_next_hop(control: Control) -> None:
    class Routes:
        def run(self, argv: list[str], **kw: Any) -> Any:
            assert argv[:2] == ["ip", "-j"]
            out = (
                '[{"dst":"default","gateway":"10.9.9.1","dev":"wg9","metric":600},'
                '{"dst":"default","gateway":"192.168.1.1","dev":"eth0","metric":100},'
                '{"dst":"default","dev":"ppp0","metric":50}]'
            )
            return type("R", (), {"stdout": out})()

    assert portmap.observe_gateway(Routes()) == GW  # type: ignore[arg-type]


# -- a fake gateway: PCP, NAT-PMP, or nobody ---------------------------------------------------
class FakeGateway:
    """Decodes our requests with its own formats (RFC figures) and answers like a router."""

    def __init__(self, speaks: str = "pcp", external: ipaddress.IPv4Address = EXT) -> None:
        self.speaks = speaks
        self.external = external
        self.requests: list[dict[str, Any]] = []
        self.table: dict[tuple[int, int], int] = {}  # (proto, internal port) -> external port
        self.next_port = 40000

    def local_address(self, gateway: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        return LAN

    def _grant(self, proto: int, iport: int, suggested: int, lifetime: int) -> int:
        if lifetime == 0:
            self.table.pop((proto, iport), None)
            return 0
        if (proto, iport) not in self.table:
            taken = set(self.table.values())
            port = suggested if suggested and suggested not in taken else self.next_port
            self.next_port += 1
            self.table[(proto, iport)] = port
        return self.table[(proto, iport)]

    def exchange(self, gateway: ipaddress.IPv4Address, payload: bytes) -> bytes:
        assert gateway == GW
        if self.speaks == "nobody":
            raise NoAnswer("no answer")
        if payload[0] == 2:
            ver, op, _, lifetime, client = struct.unpack_from("!BBHI16s", payload)
            nonce, proto, iport, sport, saddr = struct.unpack_from("!12sB3xHH16s", payload, 24)
            self.requests.append(
                {
                    "pcp": True,
                    "nonce": nonce,
                    "proto": proto,
                    "iport": iport,
                    "sport": sport,
                    "lifetime": lifetime,
                    "client": client[12:],
                }  # fmt: skip
            )
            if self.speaks != "pcp":  # RFC 6887 §9: a NAT-PMP server's answer
                return struct.pack("!BBHI", 0, 128 + op, 1, 5)
            eport = self._grant(proto, iport, sport, lifetime)
            return pcp_answer(
                nonce=nonce, proto=proto, iport=iport, eport=eport,
                eaddr=b"\x00" * 10 + b"\xff\xff" + self.external.packed,
                lifetime=min(lifetime, 3600),
            )  # fmt: skip
        if payload == b"\x00\x00":
            return natpmp_address(addr=self.external.packed)
        ver, op, _, iport, sport, lifetime = struct.unpack("!BBHHHI", payload)
        self.requests.append(
            {"pcp": False, "proto": op, "iport": iport, "sport": sport, "lifetime": lifetime}
        )
        eport = self._grant(op, iport, sport, lifetime)
        return natpmp_map(op=128 + op, iport=iport, eport=eport, lifetime=min(lifetime, 3600))


class Clock:
    """Wall time that moves only when a test moves it (status compares with the real clock)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def make_home(store: Store) -> None:
    """The cell's endpoint is the host's own LAN address, as `init` without --endpoint does."""
    with store.transaction() as conn:
        conn.execute(
            "UPDATE cell SET endpoint = '192.168.1.10:51820', endpoint_source = 'host', "
            "endpoints = '[\"192.168.1.10:51820\"]'"
        )
        link_table.save(
            conn,
            Link(
                "beta",
                "B" * 43 + "=",
                LinkIdentity(
                    "198.51.100.2:51820",
                    ipaddress.IPv4Network("10.62.0.0/24"),
                    IP("10.62.0.1"),
                    "beta.test",
                ),  # fmt: skip
                LinkState.LINKED,
            ),
        )


def mapper(
    store: Store,
    gw: FakeGateway,
    clock: Clock,
    changes: list[int] | None = None,
    protocols: tuple[str, ...] | None = portmap.PROTOCOLS,
    upnp: Any = None,
) -> PortMapper:
    clients: dict[str, portmap.Client] = {
        "pcp": PcpClient(gw, clock),
        "nat-pmp": NatPmpClient(gw, clock),
        "upnp": upnp or UpnpClient(clock, factory=lambda: FakeIgd(speaks=False)),
    }
    return PortMapper(
        store,
        None,  # type: ignore[arg-type]  # the gateway seam replaces the runner
        on_change=lambda: changes.append(1) if changes is not None else None,
        protocols=protocols,
        clock=clock,
        clients=clients,
        gateway=lambda: GW,
        repeats=RepeatLog(logging.getLogger("test.portmap"), clock=clock),
    )


def cell_of(store: Store) -> cell_table.Cell:
    with store.read() as conn:
        return cell_table.load(conn)


def pending(store: Store) -> int:
    with store.read() as conn:
        return link_table.pending_generation(conn, "beta")


# -- the mapper --------------------------------------------------------------------------------
def test_mapping_is_announced_and_every_link_told(control: Control) -> None:
    store, gw, clock, changes = control.store, FakeGateway(), Clock(), []
    make_home(store)
    m = mapper(store, gw, clock, changes)
    delay = m.step()
    assert [r["proto"] for r in gw.requests] == [17, 6]
    assert all(r["client"] == LAN.packed and r["lifetime"] == 7200 for r in gw.requests)
    cell = cell_of(store)
    assert cell.mapped_endpoint == "203.0.113.7:51820"
    assert cell.announced[0] == "203.0.113.7:51820"  # before the host's own LAN address
    assert changes == [1] and pending(store) == 1
    assert delay == 1800  # half of the granted hour
    status = control.status()["port_mapping"]
    assert status["protocol"] == "pcp" and status["external_port"] == 51820
    assert status["pair_external_port"] == 51821 and status["warning"] is None
    assert status["expires_at"] == clock.now + 3600


def test_renewal_at_half_life_repeats_nonce_and_ports_and_tells_no_one(control: Control) -> None:
    store, gw, clock, changes = control.store, FakeGateway(), Clock(), []
    make_home(store)
    gw.table[(17, 9999)] = 51820  # another host holds 51820 at first: we get another port
    m = mapper(store, gw, clock, changes)
    m.step()
    first = gw.requests[0]["nonce"]
    gw.table.pop((17, 9999))
    assert cell_of(store).mapped_endpoint == "203.0.113.7:40000"
    clock.now += 1799
    assert m.step() == pytest.approx(1.0)  # not yet: no request
    assert len(gw.requests) == 2
    clock.now += 1
    assert m.step() == 1800
    renew = gw.requests[2:]
    assert [r["nonce"] for r in renew] == [first, first]
    assert renew[0]["sport"] == 40000  # the same external port asked for again
    assert cell_of(store).mapped_endpoint == "203.0.113.7:40000"
    assert changes == [1] and pending(store) == 1  # nothing new to tell


def test_gateway_gone_backs_off_capped_without_flooding_the_log(
    control: Control, caplog: pytest.LogCaptureFixture
) -> None:
    store, gw, clock, changes = control.store, FakeGateway(), Clock(), []
    make_home(store)
    m = mapper(store, gw, clock, changes)
    m.step()
    gw.speaks = "nobody"
    clock.now += 1800
    delays = []
    with caplog.at_level(logging.WARNING):
        for _ in range(12):
            delays.append(m.step())
            clock.now += delays[-1]
    assert delays[:5] == list(FAIL_BACKOFF_S) and delays[5:] == [FAIL_BACKOFF_S[-1]] * 7
    assert sum(delays[:1]) < 1800  # retried well before the hour ran out
    failed = [r for r in caplog.records if "port mapping failed" in r.getMessage()]
    # twelve failures over ~45 minutes: at most one line per RepeatLog interval, all counted
    assert 1 <= len(failed) <= 1 + sum(delays) / REPEAT_LOG_INTERVAL_S
    assert m.repeats.totals["portmap failed"] == 12
    # the mapping lapsed (1800 s after renew_at): it is no longer announced, links are told
    assert cell_of(store).mapped_endpoint is None and changes == [1, 1] and pending(store) == 2
    assert portmap.status_of(m.held(), clock.now) is None  # what `status` shows
    gw.speaks = "pcp"
    m.step()
    assert cell_of(store).mapped_endpoint == "203.0.113.7:51820" and m.failures == 0


def test_restart_renews_the_kept_mapping_instead_of_a_new_one(control: Control) -> None:
    store, gw, clock = control.store, FakeGateway(), Clock()
    make_home(store)
    gw.table[(17, 9999)] = 51820
    mapper(store, gw, clock).step()
    gw.table.pop((17, 9999))
    nonce = gw.requests[0]["nonce"]
    # the daemon restarts 10 minutes later: its new mapper renews at once, the same mapping
    clock.now += 600
    again = mapper(store, gw, clock)
    assert again.step() == 1800
    assert [r["nonce"] for r in gw.requests[2:]] == [nonce, nonce]
    assert gw.requests[2]["sport"] == 40000
    assert gw.table == {(17, 51820): 40000, (6, 51821): 51821}  # renewed, not duplicated
    assert cell_of(store).mapped_endpoint == "203.0.113.7:40000"


def test_natpmp_when_the_gateway_does_not_speak_pcp(control: Control) -> None:
    store, gw, clock = control.store, FakeGateway(speaks="nat-pmp"), Clock()
    make_home(store)
    m = mapper(store, gw, clock)
    m.step()
    assert [r["pcp"] for r in gw.requests] == [True, False, False]
    assert m.held() is not None and m.held().protocol == "nat-pmp"  # type: ignore[union-attr]
    # renewal goes straight to NAT-PMP
    clock.now += 1800
    m.step()
    assert [r["pcp"] for r in gw.requests[3:]] == [False, False]


def test_cgnat_mapping_is_kept_and_warned_about_but_not_announced(control: Control) -> None:
    store, clock = control.store, Clock()
    gw = FakeGateway(speaks="nat-pmp", external=IP("100.80.3.4"))
    make_home(store)
    mapper(store, gw, clock).step()
    assert cell_of(store).mapped_endpoint is None
    status = control.status()["port_mapping"]
    assert status["external_address"] == "100.80.3.4"
    assert "carrier-grade NAT" in status["warning"]


def test_no_mapping_when_the_owner_set_the_endpoint(control: Control) -> None:
    gw, clock = FakeGateway(), Clock()
    m = mapper(control.store, gw, clock)
    assert m.step() == portmap.IDLE_S and gw.requests == []
    assert control.status()["port_mapping"] is None


def test_turned_off_releases_the_kept_mapping(control: Control) -> None:
    store, gw, clock, changes = control.store, FakeGateway(), Clock(), []
    make_home(store)
    mapper(store, gw, clock, changes).step()
    assert gw.table
    off = mapper(store, gw, clock, changes, protocols=None)
    off.step()
    assert gw.table == {} and [r["lifetime"] for r in gw.requests[2:]] == [0, 0]
    assert off.held() is None and cell_of(store).mapped_endpoint is None
    assert changes == [1, 1]


def test_a_new_listen_port_releases_the_old_mapping(control: Control) -> None:
    store, gw, clock = control.store, FakeGateway(), Clock()
    make_home(store)
    m = mapper(store, gw, clock)
    m.step()
    with store.transaction() as conn:
        conn.execute("UPDATE cell SET listen_port = 51999")
    clock.now += 10
    m.step()
    assert (17, 51820) not in gw.table and gw.table[(17, 51999)] == 51999


# -- UPnP through a fake miniupnpc -------------------------------------------------------------
class FakeIgd:
    """The part of miniupnpc.UPnP we use, with an IGD's error strings."""

    def __init__(
        self, speaks: bool = True, permanent_only: bool = False, at: str = "192.168.1.1"
    ) -> None:
        self.speaks = speaks
        self.at = at
        self.permanent_only = permanent_only
        self.discoverdelay = 0
        self.lanaddr = str(LAN)
        self.rules: dict[tuple[int, str], tuple[str, int, int]] = {}

    def discover(self) -> int:
        return 1 if self.speaks else 0

    def selectigd(self) -> str:
        if not self.speaks:
            raise Exception("No UPnP device discovered")  # noqa: TRY002 - as miniupnpc does
        return f"http://{self.at}:5000/ctl/IPConn"

    def externalipaddress(self) -> str:
        return str(EXT)

    def addportmapping(self, e: int, p: str, c: str, i: int, d: str, r: str, lease: int) -> bool:
        if self.permanent_only and lease:
            raise Exception("OnlyPermanentLeasesSupported")  # noqa: TRY002
        if (e, p) in self.rules and self.rules[(e, p)][:2] != (c, i):
            raise Exception("ConflictInMappingEntry")  # noqa: TRY002
        self.rules[(e, p)] = (c, i, lease)
        return True

    def addanyportmapping(self, e: int, p: str, c: str, i: int, d: str, r: str, ls: int) -> int:
        port = e + 1
        self.rules[(port, p)] = (c, i, ls)
        return port

    def deleteportmapping(self, e: int, p: str) -> bool:
        del self.rules[(e, p)]
        return True


def test_upnp_when_nothing_answers_on_5351(control: Control) -> None:
    store, clock = control.store, Clock()
    gw, igd = FakeGateway(speaks="nobody"), FakeIgd()
    make_home(store)
    upnp = UpnpClient(clock, factory=lambda: igd)
    m = mapper(store, gw, clock, upnp=upnp)
    assert m.step() == 3600
    assert igd.rules == {
        (51820, "UDP"): (str(LAN), 51820, 7200),
        (51821, "TCP"): (str(LAN), 51821, 7200),
    }
    assert cell_of(store).mapped_endpoint == "203.0.113.7:51820"
    clock.now += 3600
    m.step()  # renewed in place: the same two rules
    assert len(igd.rules) == 2
    m.release()
    assert igd.rules == {} and cell_of(store).mapped_endpoint is None


def test_upnp_conflict_and_permanent_leases(control: Control) -> None:
    store, clock = control.store, Clock()
    igd = FakeIgd(permanent_only=True)
    igd.rules[(51820, "UDP")] = ("192.168.1.77", 51820, 0)  # another host holds the port
    make_home(store)
    m = mapper(store, FakeGateway(speaks="nobody"), clock, protocols=("upnp",),
               upnp=UpnpClient(clock, factory=lambda: igd))  # fmt: skip
    assert m.step() == portmap.UPNP_PERMANENT_RENEW_S / 2
    assert igd.rules[(51821, "UDP")] == (str(LAN), 51820, 0)
    assert cell_of(store).mapped_endpoint == "203.0.113.7:51821"


def test_everything_silent_reports_why(control: Control) -> None:
    store, clock = control.store, Clock()
    make_home(store)
    m = mapper(store, FakeGateway(speaks="nobody"), clock)
    assert m.step() == FAIL_BACKOFF_S[0]
    assert m.last_error is not None and "pcp" in m.last_error and "upnp" in m.last_error
    assert "nat-pmp" not in m.last_error  # PCP's silence on 5351 spoke for NAT-PMP too
    with control.store.read() as conn:
        assert portmap_table.load(conn) is None


def test_an_igd_that_is_not_the_gateway_is_not_believed(control: Control) -> None:
    store, clock = control.store, Clock()
    igd = FakeIgd(at="192.168.1.66")  # another host of the LAN answering SSDP
    make_home(store)
    m = mapper(store, FakeGateway(speaks="nobody"), clock, protocols=("upnp",),
               upnp=UpnpClient(clock, factory=lambda: igd))  # fmt: skip
    assert m.step() == FAIL_BACKOFF_S[0]
    assert igd.rules == {} and cell_of(store).mapped_endpoint is None
    assert "not the gateway" in (m.last_error or "")
