"""Port mapping on the home router: a cell behind a NAT with no static port forward asks
miniupnpd (UPnP-IGD, then PCP) to open its ports, announces the mapped address, and a public
cell links to it; a restarted daemon renews the same mapping; a CGNAT answer is warned about.

Topology of `test_a_cell_behind_miniupnpd_maps_its_ports_and_is_linked_to` (one per protocol):

      ┌──────────────── switch ns: br-wan ────────────────┐
      │                    │                              │
  pub ns 198.51.100.2   phone ns 198.51.100.3          home ns (the router)
  picell pub            pub's device (wg-quick)        WAN 11.64.0.1/32, on-link to .100/24
  10.62.0.1/24          resolves web.nat.test          masquerade out of WAN; forward: LAN,
  route 11.64.0.1 on-link                              established, and miniupnpd's chain only
                                                       miniupnpd on the LAN (no static forward)
                                                          │ veth 192.168.77.1/24
                                                       nat ns 192.168.77.2, default via .1
                                                       picell nat (init without --endpoint)
                                                       10.61.0.1/24, web: 127.0.0.1:8000

The router's WAN address lies outside the reserved ranges because miniupnpd refuses those as
its external address (RECIPES "Homes behind NAT"). It exists only on veths between namespaces
this test creates, with no route to the host or beyond; the home LAN is RFC 1918, likewise.

`test_cgnat_is_warned_about` (a NAT-PMP responder of the test answering 100.64/10):

  cgn ns (the router) 192.168.78.1 ── veth ── cell ns 192.168.78.2, default via .1, picell
  natpmp responder: PCP answered "version 0 only", NAT-PMP: external address 100.70.0.5
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.cells import Cell
from tests.netns.harness import Netns, Topology, run, wait_until

WAN_ADDR = "11.64.0.1"  # not reserved: miniupnpd's external address (see the docstring)

NFT_ROUTER = """\
table inet miniupnpd {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "{lan}" accept
        jump miniupnpd
    }
    chain miniupnpd {
    }
    chain prerouting {
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
}
table ip home {
    chain postrouting {
        type nat hook postrouting priority 110; policy accept;
        oifname "{wan}" masquerade
    }
}
"""

MINIUPNPD_CONF = """\
ext_ifname={wan}
listening_ip={lan}
port=0
enable_natpmp={natpmp}
enable_upnp=yes
secure_mode=yes
system_uptime=yes
uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
allow 1024-65535 192.168.77.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""

# A NAT-PMP-only gateway behind carrier-grade NAT: PCP requests get NAT-PMP's "unsupported
# version" (RFC 6887 §9), NAT-PMP gets 100.70.0.5 and whatever port was suggested.
NATPMP_RESPONDER = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5351))
print("ready", flush=True)
start = time.monotonic()
while True:
    data, peer = s.recvfrom(2048)
    epoch = int(time.monotonic() - start)
    if data[:1] == b"\x02":
        s.sendto(struct.pack("!BBHI", 0, 128 + (data[1] & 0x7F), 1, epoch), peer)
    elif data == b"\x00\x00":
        s.sendto(struct.pack("!BBHI4s", 0, 128, 0, epoch, socket.inet_aton("100.70.0.5")), peer)
    elif len(data) == 12 and data[0] == 0 and data[1] in (1, 2):
        _, op, _, iport, sport, life = struct.unpack("!BBHHHI", data)
        eport = sport or iport
        print("map", op, iport, eport, life, flush=True)
        s.sendto(struct.pack("!BBHIHHI", 0, 128 + op, 0, epoch, iport, eport, life), peer)
"""


def veth(topo: Topology, a: Netns, addr_a: str, b: Netns, addr_b: str) -> tuple[str, str]:
    """A veth between two of this test's namespaces holding RFC 1918 or the router's WAN
    addresses, which `Topology.link` refuses (it checks for documentation ranges)."""
    n = topo._next()
    if_a, if_b = f"v{topo.tag}{n}{b.role}"[:15], f"w{topo.tag}{n}{a.role}"[:15]
    run(["ip", "link", "add", if_a, "netns", a.name, "type", "veth",
         "peer", "name", if_b, "netns", b.name])  # fmt: skip
    for ns, ifname, addr in ((a, if_a, addr_a), (b, if_b, addr_b)):
        ns.run(["ip", "addr", "add", addr, "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])
    return if_a, if_b


def home_cell(topo: Topology, ns: Netns, name: str, number: int) -> Cell:
    """A cell initialised WITHOUT --endpoint: its default endpoint is the host's LAN address."""
    cell = Cell(topo, ns, name, f"{name}.test", f"10.{60 + number}.0.1/24", "")
    cell.run("init", "--name", name, "--domain", cell.domain, "--address", cell.address,
             "--interface", cell.interface)  # fmt: skip
    return cell


def mapping(cell: Cell) -> dict[str, Any] | None:
    pm: dict[str, Any] | None = cell.cli("status")["port_mapping"]
    return pm


def miniupnpd_rules(router: Netns) -> list[str]:
    """The DNAT rules miniupnpd holds, one line each (`nft -j`)."""
    out = router.run(["nft", "-j", "list", "chain", "inet", "miniupnpd", "prerouting_miniupnpd"])
    rules = [i["rule"] for i in json.loads(out.stdout)["nftables"] if "rule" in i]
    return sorted(json.dumps(r["expr"], sort_keys=True) for r in rules)


@pytest.fixture
def env_portmap() -> Iterator[None]:
    old = os.environ.get("PICELL_PORTMAP")
    yield
    if old is None:
        os.environ.pop("PICELL_PORTMAP", None)
    else:
        os.environ["PICELL_PORTMAP"] = old


@pytest.mark.parametrize("protocol", ["upnp", "pcp"])
def test_a_cell_behind_miniupnpd_maps_its_ports_and_is_linked_to(
    protocol: str, env_portmap: None
) -> None:
    with Topology() as topo:
        wan = topo.bridge("wan")
        home, nat_ns, pub_ns, phone = (topo.add_ns(r) for r in ("home", "nat", "pub", "phone"))
        pub_if = topo.attach(pub_ns, wan, "198.51.100.2/24")
        topo.attach(phone, wan, "198.51.100.3/24", gw="198.51.100.2")
        # the router: its WAN veth gets a documentation address from attach (checked), which is
        # then swapped for the non-reserved one miniupnpd accepts
        wan_if = topo.attach(home, wan, "198.51.100.1/24")
        home.run(["ip", "addr", "add", f"{WAN_ADDR}/32", "dev", wan_if])
        home.run(["ip", "addr", "del", "198.51.100.1/24", "dev", wan_if])
        home.run(["ip", "route", "add", "198.51.100.0/24", "dev", wan_if])
        pub_ns.run(["ip", "route", "add", f"{WAN_ADDR}/32", "dev", pub_if])
        lan_if, cell_if = veth(topo, home, "192.168.77.1/24", nat_ns, "192.168.77.2/24")
        nat_ns.run(["ip", "route", "add", "default", "via", "192.168.77.1"])
        home.sysctl("net.ipv4.ip_forward", 1)
        home.run(["nft", "-f", "-"], input=NFT_ROUTER.replace("{lan}", lan_if)
                 .replace("{wan}", wan_if))  # fmt: skip
        conf = topo.workdir / "miniupnpd.conf"
        conf.write_text(
            MINIUPNPD_CONF.format(
                wan=wan_if, lan=lan_if, natpmp="yes" if protocol == "pcp" else "no"
            )
        )
        pidfile = topo.workdir / "miniupnpd.pid"
        upnpd = home.popen(["miniupnpd", "-f", str(conf), "-d", "-P", str(pidfile)],
                           name="miniupnpd")  # fmt: skip
        wait_until(lambda: "HTTP listening on port" in upnpd.log_text(), 20,
                   "miniupnpd did not start")  # fmt: skip
        assert miniupnpd_rules(home) == []  # no static forward, nothing mapped yet

        os.environ["PICELL_PORTMAP"] = protocol  # the other one must not be what answers
        nat = home_cell(topo, nat_ns, "nat", 1)
        nat.start()
        # before the mapping the endpoint is the host's own LAN address; after, the router's
        assert nat.cli("status")["endpoint"] in ("192.168.77.2:51820", f"{WAN_ADDR}:51820")
        pub = Cell(topo, pub_ns, "pub", "pub.test", "10.62.0.1/24", "198.51.100.2:51820")
        pub.init()
        pub.start()

        wait_until(lambda: mapping(nat) is not None, 60,
                   f"no port mapping:\n{topo.logs()}")  # fmt: skip
        first = mapping(nat)
        assert first is not None
        assert first["protocol"] == protocol and first["external_address"] == WAN_ADDR
        assert first["external_port"] == 51820 and first["pair_external_port"] == 51821
        assert first["warning"] is None
        assert len(miniupnpd_rules(home)) == 2  # UDP 51820 and TCP 51821
        wait_until(lambda: nat.cli("status")["endpoint"] == f"{WAN_ADDR}:51820", 10,
                   "the mapped address is not our endpoint")  # fmt: skip
        human = nat.run("status").stdout
        assert f"port mapping: {protocol} {WAN_ADDR}:51820, pairing TCP 51821" in human

        # the invite carries the mapped address: the public cell pairs and links through it
        invite = nat.invite()
        assert invite["invite"]["endpoint"] == f"{WAN_ADDR}:51820"
        pub.cli("connect", invite["string"])
        wait_until(lambda: nat.links().get("pub", {}).get("state") == "linked", 30,
                   "nat did not link")  # fmt: skip
        nat_ns.serve_http("127.0.0.1", 8000, "nat web")
        nat.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        nat.cli("share", "pub", "web")
        phone.device(pub.add_device("phone"), hint="phone").up()
        wait_until(lambda: phone.http_get("http://web.nat.test/") == "nat web", 60,
                   "pub's phone cannot use nat's web by name")  # fmt: skip

        # a restart renews the same mapping: later expiry, the same two rules
        rules = miniupnpd_rules(home)
        nat.stop()
        nat.start()

        def renewed() -> bool:
            now = mapping(nat)
            return now is not None and now["expires_at"] > first["expires_at"]

        wait_until(renewed, 60, f"the mapping was not renewed:\n{topo.logs()}")
        again = mapping(nat)
        assert again is not None and again["external_port"] == 51820
        assert miniupnpd_rules(home) == rules
        if protocol == "upnp":
            listed = home.run(["upnpc", "-m", lan_if, "-l"], check=False).stdout
            assert listed.count("51820") + listed.count("51821") >= 2, listed
        wait_until(lambda: phone.http_get("http://web.nat.test/") == "nat web", 30,
                   "the link did not survive the restart")  # fmt: skip


def test_cgnat_is_warned_about(tmp_path: Path) -> None:
    with Topology() as topo:
        router, cell_ns = topo.add_ns("cgn"), topo.add_ns("cell")
        veth(topo, router, "192.168.78.1/24", cell_ns, "192.168.78.2/24")
        cell_ns.run(["ip", "route", "add", "default", "via", "192.168.78.1"])
        script = topo.workdir / "natpmp.py"
        script.write_text(NATPMP_RESPONDER)
        responder = router.popen(["python3", "-I", str(script), "192.168.78.1"], name="natpmp")
        wait_until(lambda: "ready" in responder.log_text(), 10, "the responder did not start")
        cell = home_cell(topo, cell_ns, "home", 3)
        cell.start()
        wait_until(lambda: mapping(cell) is not None, 60, f"no mapping:\n{topo.logs()}")
        pm = mapping(cell)
        assert pm is not None and pm["protocol"] == "nat-pmp"
        assert pm["external_address"] == "100.70.0.5"
        assert "carrier-grade NAT" in pm["warning"]
        assert "warning: " in cell.run("status").stdout
        # what it found is no endpoint to announce: the invite keeps the host's own address
        assert cell.invite()["invite"]["endpoint"] == "192.168.78.2:51820"
        assert "map 1 51820 51820 7200" in responder.log_text()
