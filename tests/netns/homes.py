"""Home networks for the netns tests and benchmarks: routers that masquerade, carrier-grade NAT,
IPv6 on the public bridge, and an authoritative DNS whose records a test changes.

Built on `tests/netns/harness.py` (namespaces, bridges, teardown) and `tests/netns/cells.py`
(real cells). What it adds:

* `plug`: like `Topology.attach`, but it also admits a home's
  private ranges (192.168.0.0/16 for LANs, 100.64.0.0/10 between a carrier and its customers) and
  IPv6 from 2001:db8::/32 (added `nodad`: no seconds as a tentative address).
* `add_router`: a home router namespace: WAN and LAN veths, `ip_forward`, a `table ip nat` that
  masquerades out of the WAN (one statement per line: RECIPES "Homes behind NAT"), a forward
  filter as on a real router (LAN out, replies and forwarded ports in, nothing else), and
  optionally a UDP-only port forward. `Router.move_wan` gives it a new public address the way a
  provider does at night: old address gone, conntrack flushed.
* `Zone`: a small authoritative DNS (Unbound with `local-data`, TTL 1) answering A and AAAA
  records under a reserved TLD; `Zone.set` changes a name's records at run time.
* `home_cell`: a cell behind a router, on the router's LAN, default route via the router.

The "internet" is one flat bridge: every namespace on it has a default route out of its bridge
veth (no gateway), so public addresses of different documentation ranges reach each other.
Network safety: namespaces are joined only to each other; every address is checked against the
documentation ranges, or the private ranges above inside a home; never the host's uplink.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.netns.cells import Cell
from tests.netns.harness import (
    IFNAME_MAX,
    TEST_NETS,
    Bridge,
    Netns,
    Proc,
    Topology,
    run,
    wait_until,
)

HOME_NETS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    *TEST_NETS,
    ipaddress.IPv4Network("192.168.0.0/16"),  # home LANs
    ipaddress.IPv4Network("100.64.0.0/10"),  # carrier-grade NAT (RFC 6598)
    ipaddress.IPv6Network("2001:db8::/32"),
)
WG_PORT = 51820


def check_home_address(addr: str) -> None:
    """Raise ValueError unless `addr` (CIDR or plain) is a documentation or home-private one."""
    iface = ipaddress.ip_interface(addr)
    if not any(
        iface.version == net.version and iface.network.subnet_of(net)  # type: ignore[arg-type]
        for net in HOME_NETS
    ):
        raise ValueError(f"{addr} is outside the test and home ranges")


def _add_address(ns: Netns, ifname: str, addr_cidr: str) -> None:
    check_home_address(addr_cidr)
    extra = ["nodad"] if ":" in addr_cidr else []
    ns.run(["ip", "addr", "add", addr_cidr, "dev", ifname, *extra])


def plug(topo: Topology, ns: Netns, bridge: Bridge, *addrs: str, internet: bool = False) -> str:
    """Plug `ns` into `bridge` with a veth holding `addrs` (IPv4 and/or IPv6 CIDRs).

    `internet`: the bridge is the flat internet: default routes (IPv4 and IPv6, for the families
    given) out of this veth, without a gateway."""
    for addr in addrs:
        check_home_address(addr)
    n = topo._next()
    inner = f"e{topo.tag}{n}{bridge.role}"[:IFNAME_MAX]
    outer = f"s{topo.tag}{n}{ns.role}"[:IFNAME_MAX]
    run(["ip", "link", "add", inner, "netns", ns.name, "type", "veth",
         "peer", "name", outer, "netns", bridge.switch.name])  # fmt: skip
    bridge.switch.run(["ip", "link", "set", outer, "master", bridge.name, "up"])
    for addr in addrs:
        _add_address(ns, inner, addr)
    ns.run(["ip", "link", "set", inner, "up"])
    if internet:
        for family in {"-6" if ":" in a else "-4" for a in addrs}:
            ns.run(["ip", family, "route", "replace", "default", "dev", inner])
    return inner


# --------------------------------------------------------------------------------------------
# Routers


def _router_rules(wan: str, lan: str, forwards: list[tuple[int, str]]) -> str:
    """The router's nft text: NAT (masquerade out of the WAN, forwarded UDP ports in) and a
    forward filter (LAN out, replies back, forwarded ports in). One statement per line: nft
    1.0.6 does not parse a chain closed on its last rule's line (RECIPES)."""
    # only what is addressed to the router's own (current) address: after a move, packets for
    # the old address must find nobody, even from neighbours whose ARP cache still names us
    dnat = [
        f'    iifname "{wan}" fib daddr type local udp dport {port} dnat to {host}:{port}'
        for port, host in forwards
    ]
    lines = [
        "table ip nat {",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        *dnat,
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{wan}" masquerade',
        "  }",
        "}",
        "table inet home {",
        "  chain forward {",
        "    type filter hook forward priority 0; policy drop;",
        "    ct state established,related accept",
        f'    iifname "{lan}" accept',
        "    ct status dnat accept",
        "  }",
        "}",
        "",
    ]
    return "\n".join(lines)


@dataclass
class Router:
    """A home (or carrier) router: `ns`, its WAN side (`wan_if`, `wan_ip`) and LAN side."""

    ns: Netns
    wan_if: str
    wan_ip: str
    lan_if: str
    lan_ip: str
    lan_prefix: int
    lan_bridge: Bridge
    forwards: list[tuple[int, str]] = field(default_factory=list)

    def apply(self) -> None:
        self.ns.run(["nft", "delete", "table", "ip", "nat"], check=False)
        self.ns.run(["nft", "delete", "table", "inet", "home"], check=False)
        rules = _router_rules(self.wan_if, self.lan_if, self.forwards)
        self.ns.run(["nft", "-f", "-"], input=rules)

    def forward_udp(self, port: int, lan_host: str) -> None:
        """A UDP-only port forward, as every WireGuard guide tells owners to set up."""
        check_home_address(lan_host)
        self.forwards.append((port, lan_host))
        self.apply()

    def move_wan(self, new_ip: str, prefix: int = 24) -> None:
        """A new public address, as a provider hands out at night: the old one is gone and
        every NAT mapping with it (conntrack flushed)."""
        check_home_address(new_ip)
        # the new address is a secondary one of the same subnet: Linux deletes secondaries with
        # their primary unless promote_secondaries is set
        self.ns.sysctl(f"net.ipv4.conf.{self.wan_if}.promote_secondaries", 1)
        self.ns.run(["ip", "addr", "add", f"{new_ip}/{prefix}", "dev", self.wan_if])
        self.ns.run(["ip", "addr", "del", f"{self.wan_ip}/{prefix}", "dev", self.wan_if])
        self.ns.run(["ip", "route", "replace", "default", "dev", self.wan_if], check=False)
        self.wan_ip = new_ip
        self.ns.run(["conntrack", "-F"], check=False)  # exit 1 when the table was empty

    def lan_net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(f"{self.lan_ip}/{self.lan_prefix}").network


def add_router(
    topo: Topology,
    role: str,
    wan: Bridge | Router,
    wan_cidr: str,
    lan_cidr: str,
) -> Router:
    """A router namespace `role`: WAN `wan_cidr` on the bridge `wan` (the flat internet), or on
    the LAN of an upstream `Router` (a carrier's CGNAT: the home router's WAN address is then
    in 100.64/10); LAN side `lan_cidr` on a new bridge `l<role>` (`Router.lan_bridge`)."""
    ns = topo.add_ns(role)
    ns.sysctl("net.ipv4.ip_forward", 1)
    if isinstance(wan, Router):
        wan_if = plug(topo, ns, wan.lan_bridge, wan_cidr)
        ns.run(["ip", "route", "replace", "default", "via", wan.lan_ip])
    else:
        wan_if = plug(topo, ns, wan, wan_cidr, internet=True)
    lan = topo.bridge(f"l{role}"[: IFNAME_MAX - 3])
    lan_if = plug(topo, ns, lan, lan_cidr)
    lan_iface = ipaddress.IPv4Interface(lan_cidr)
    router = Router(ns, wan_if, wan_cidr.split("/")[0], lan_if, str(lan_iface.ip),
                    lan_iface.network.prefixlen, lan)  # fmt: skip
    router.apply()
    return router


def home_cell(
    topo: Topology,
    router: Router,
    role: str,
    host: int,
    vpn_number: int,
    resolver: str,
    endpoint: str | None = None,
) -> Cell:
    """A running cell `role` on `router`'s LAN at `.host`, default route via the router, the
    upstream `resolver`; VPN 10.<60 + vpn_number>.0.1/24, domain `<role>.test`. Without
    `endpoint` it inits with no `--endpoint` (its default: the host's LAN address)."""
    ns = topo.add_ns(role)
    lan_ip = str(router.lan_net()[host])
    plug(topo, ns, router.lan_bridge, f"{lan_ip}/{router.lan_prefix}")
    ns.run(["ip", "route", "replace", "default", "via", router.lan_ip])
    ns.set_resolver(resolver)
    cell = Cell(topo, ns, role, f"{role}.test", f"10.{60 + vpn_number}.0.1/24",
                endpoint or "", source=None)  # fmt: skip
    init_cell(cell)
    start_cell(cell)
    return cell


def public_cell(
    topo: Topology,
    bridge: Bridge,
    role: str,
    addrs: tuple[str, ...],
    vpn_number: int,
    resolver: str,
    endpoint: str | None = None,
) -> Cell:
    """A running cell `role` on the internet bridge with `addrs` (IPv4 and/or IPv6 CIDRs);
    without `endpoint` it inits with the host's default."""
    ns = topo.add_ns(role)
    plug(topo, ns, bridge, *addrs, internet=True)
    ns.set_resolver(resolver)
    cell = Cell(topo, ns, role, f"{role}.test", f"10.{60 + vpn_number}.0.1/24",
                endpoint or "", source=None)  # fmt: skip
    init_cell(cell)
    start_cell(cell)
    return cell


def init_cell(cell: Cell) -> None:
    """`picell init`, with `--endpoint` only when the cell has one set (else the default)."""
    args = ["init", "--name", cell.name, "--domain", cell.domain, "--address", cell.address,
            "--interface", cell.interface]  # fmt: skip
    if cell.endpoint:
        args += ["--endpoint", cell.endpoint]
    cell.run(*args)


def start_cell(cell: Cell) -> None:
    """Start the daemon; `cell.endpoint` becomes the endpoint the cell chose (its default)."""
    cell.start()
    cell.endpoint = cell.cli("status")["endpoint"]


# --------------------------------------------------------------------------------------------
# An authoritative DNS whose records change


class Zone:
    """Unbound in `ns` answering A/AAAA `local-data` (TTL 1) at `addrs`; `set` changes a name's
    records at run time through `unbound-control` on a unix socket. Other names: REFUSED."""

    def __init__(self, ns: Netns, addrs: tuple[str, ...], workdir: Path) -> None:
        self.ns = ns
        self.addrs = addrs
        self.conf = workdir / f"zone-{ns.name}.conf"
        sock = workdir / f"zone-{ns.name}.ctl"
        lines = ["server:", '\tusername: ""', '\tchroot: ""', f'\tdirectory: "{workdir}"',
                 '\tpidfile: ""', "\tuse-syslog: no", "\tdo-ip6: yes",
                 *(f"\tinterface: {a}" for a in addrs),
                 "\taccess-control: 0.0.0.0/0 allow", "\taccess-control: ::/0 allow",
                 '\tlocal-zone: "." refuse', '\tlocal-zone: "test." static',
                 "remote-control:", "\tcontrol-enable: yes", f'\tcontrol-interface: "{sock}"',
                 "\tcontrol-use-cert: no"]  # fmt: skip
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: Proc = ns.popen(["unbound", "-d", "-p", "-c", str(self.conf)], name="zone")

        def up() -> bool:
            if not self.proc.running():
                raise RuntimeError(f"zone DNS exited: {self.proc.log_text()}")
            return self._control("status").returncode == 0

        wait_until(up, 15, "zone DNS not up")

    def _control(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.ns.run(["unbound-control", "-c", str(self.conf), *args], check=check)

    def set(self, name: str, *addrs: str) -> None:
        """`name` answers exactly `addrs` (A for IPv4, AAAA for IPv6) from the next query."""
        for addr in addrs:
            check_home_address(addr)
        self._control("local_data_remove", name, check=True)
        for addr in addrs:
            rtype = "AAAA" if ":" in addr else "A"
            self._control("local_data", f"{name}. 1 IN {rtype} {addr}", check=True)
        server = self.addrs[0]
        want = sorted(a for a in addrs if ":" not in a)
        wait_until(lambda: sorted(self.ns.dig(name, server=server)) == want, 10,
                   f"{name} does not answer {addrs}")  # fmt: skip


__all__ = [
    "HOME_NETS",
    "Router",
    "Zone",
    "add_router",
    "check_home_address",
    "home_cell",
    "init_cell",
    "plug",
    "public_cell",
    "start_cell",
]
