"""Linking cells where homes are, and healing after a home's address changes, per topology.

In namespaces (tests/netns harness and tests/netns/homes.py), one topology at a time:
- `public` (baseline): two cells with public addresses on the internet bridge;
- `nat`: a cell behind a masquerading router with no forward links out to a public cell;
- `cgnat`: the same behind two layers of NAT (100.64/10 between the carrier and the home);
- `udp`: two homes forwarding UDP 51820 only, endpoints are names in a test DNS; both owners
  import each other's invite (the pairing ports are unreachable);
- `ipv6`: a dual-stack cell links with a cell whose only address is IPv6.
Each run:
- link: from `picell connect` (both, for `udp`) until both sides show `linked` and the first
  cell pings the other's VPN address through the tunnel;
- heal: from the address change (the NATed side's router, or the moving cell; for `udp` both
  routers at once, the names following) until the ping goes through again, with no owner
  action;
- then `disconnect`, until both sides forgot the link.
A figure that does not come within its deadline is reported as such and its topology stops.
Pings poll every 0.2 s with a 1 s deadline each: figures are good to about a second, which is
the scale here (a keepalive is 25 s, a stale link 135 s).

Run as root from the repo root:  .venv/bin/python bench/homes.py [--runs 3] [--only nat,udp]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from tests.netns.cells import Cell  # noqa: E402
from tests.netns.harness import Topology, wait_until  # noqa: E402
from tests.netns.homes import Zone, add_router, home_cell, plug, public_cell  # noqa: E402

DNS4, DNS6 = "198.51.100.53", "2001:db8::53"
LINK_DEADLINE_S = 120.0
HEAL_DEADLINE_S = 360.0  # a stale link (135 s) plus a few reconcile rounds
POLL_S = 0.2


def _linked(cell: Cell, other: str) -> bool:
    link = cell.links().get(other)
    return link is not None and link["state"] == "linked"


def _until(check: Callable[[], bool], deadline_s: float) -> float | None:
    """Seconds until `check` holds, None past the deadline."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if check():
            return time.monotonic() - start
        time.sleep(POLL_S)
    return None


@dataclass
class Setup:
    """A built topology: `first` links to (or with) `second`; `connect` makes the link, `move`
    changes an address (run index given, to alternate), `restore` moves a cell whose endpoint
    is a literal address back once the link is gone, so that the next run's invite holds."""

    topo: Topology
    first: Cell
    second: Cell
    connect: Callable[[], None]
    move: Callable[[int], None]
    restore: Callable[[], None] = lambda: None


def _internet(topo: Topology, ipv6: bool = False) -> Any:
    inet = topo.bridge("inet")
    dns = topo.add_ns("dns")
    plug(topo, dns, inet, f"{DNS4}/24", *([f"{DNS6}/64"] if ipv6 else []), internet=True)
    zone = Zone(dns, (DNS4, DNS6) if ipv6 else (DNS4,), topo.workdir)
    return inet, zone


def _uplink(cell: Cell, addr: str) -> str:
    out = json.loads(cell.ns.run(["ip", "-j", "addr", "show"]).stdout)
    return str(
        next(a["ifname"] for a in out if any(i.get("local") == addr for i in a["addr_info"]))
    )


def build(topo: Topology, kind: str) -> Setup:
    if kind == "public":
        inet, _ = _internet(topo)
        a = public_cell(topo, inet, "alpha", ("198.51.100.1/24",), 1, DNS4)
        b = public_cell(topo, inet, "beta", ("198.51.100.2/24",), 2, DNS4)
        where = {"addr": "198.51.100.2"}
        uplink = _uplink(b, "198.51.100.2")
        b.ns.sysctl(f"net.ipv4.conf.{uplink}.promote_secondaries", 1)

        def move_public(run: int) -> None:
            new = f"198.51.100.{102 + run}" if run >= 0 else "198.51.100.2"
            b.ns.run(["ip", "addr", "add", f"{new}/24", "dev", uplink])
            b.ns.run(["ip", "addr", "del", f"{where['addr']}/24", "dev", uplink])
            b.ns.run(["ip", "route", "replace", "default", "dev", uplink])
            where["addr"] = new

        return Setup(topo, a, b, lambda: _connect(a, b), move_public, lambda: move_public(-1))
    if kind in ("nat", "cgnat"):
        inet, _ = _internet(topo)
        pub = public_cell(topo, inet, "pub", ("198.51.100.1/24",), 1, DNS4)
        if kind == "cgnat":
            outer = add_router(topo, "carrier", inet, "203.0.113.2/24", "100.64.1.1/24")
            home_router = add_router(topo, "router", outer, "100.64.1.2/24", "192.168.2.1/24")
        else:
            outer = home_router = add_router(topo, "router", inet, "203.0.113.2/24",
                                             "192.168.2.1/24")  # fmt: skip
        home = home_cell(topo, home_router, "home", 10, 2, DNS4)

        def move_nat(run: int) -> None:
            outer.move_wan(f"203.0.113.{102 + run}")

        return Setup(topo, pub, home, lambda: _connect(home, pub), move_nat)
    if kind == "udp":
        inet, zone = _internet(topo)
        routers, cells = [], []
        for name, n in (("alpha", 11), ("beta", 12)):
            router = add_router(topo, f"r{name}", inet, f"203.0.113.{n}/24", f"192.168.{n}.1/24")
            router.forward_udp(51820, f"192.168.{n}.10")
            zone.set(f"{name}.homes.test", router.wan_ip)
            routers.append(router)
            cells.append(home_cell(topo, router, name, 10, n, DNS4,
                                   endpoint=f"{name}.homes.test:51820"))  # fmt: skip
        a, b = cells

        def connect_both() -> None:
            a.cli("connect", b.invite()["string"])
            b.cli("connect", a.invite()["string"])

        def move_both(run: int) -> None:
            for router, name, n in ((routers[0], "alpha", 100), (routers[1], "beta", 150)):
                new = f"203.0.113.{n + run}"
                router.move_wan(new)
                zone.set(f"{name}.homes.test", new)

        return Setup(topo, a, b, connect_both, move_both)
    if kind == "ipv6":
        inet, _ = _internet(topo, ipv6=True)
        dual = public_cell(topo, inet, "dual", ("198.51.100.31/24", "2001:db8::31/64"), 1, DNS4)
        six = public_cell(topo, inet, "six", ("2001:db8::36/64",), 2, DNS6)
        where = {"addr": "2001:db8::36"}
        uplink = _uplink(six, "2001:db8::36")

        def move_six(run: int) -> None:
            new = f"2001:db8::{0x100 + run:x}" if run >= 0 else "2001:db8::36"
            six.ns.run(["ip", "addr", "add", f"{new}/64", "dev", uplink, "nodad"])
            six.ns.run(["ip", "addr", "del", f"{where['addr']}/64", "dev", uplink])
            where["addr"] = new

        return Setup(topo, dual, six, lambda: _connect(dual, six), move_six, lambda: move_six(-1))
    raise ValueError(kind)


def _connect(cell: Cell, other: Cell) -> None:
    cell.cli("connect", other.invite()["string"])


def measure(kind: str, runs: int) -> dict[str, Any]:
    link_s: list[float] = []
    heal_s: list[float] = []
    failures: list[str] = []
    with Topology() as topo:
        setup = build(topo, kind)
        a, b = setup.first, setup.second

        def through() -> bool:
            return a.ns.ping(b.ip, timeout_s=1)

        def both_linked() -> bool:
            return _linked(a, b.name) and _linked(b, a.name)

        for run in range(runs):
            start = time.monotonic()
            setup.connect()
            if _until(lambda: both_linked() and through(), LINK_DEADLINE_S) is None:
                failures.append(f"run {run}: not linked within {LINK_DEADLINE_S:g} s")
                break
            link_s.append(time.monotonic() - start)
            setup.move(run)
            healed = _until(through, HEAL_DEADLINE_S)
            if healed is None:
                failures.append(f"run {run}: not healed within {HEAL_DEADLINE_S:g} s")
                break
            heal_s.append(healed)
            a.cli("disconnect", b.name)
            wait_until(lambda: b.name not in a.links() and a.name not in b.links(), 90,
                       "the link did not go")  # fmt: skip
            setup.restore()
    return {
        "link_s": quantiles(link_s) if link_s else None,
        "heal_s": quantiles(heal_s) if heal_s else None,
        "failures": failures,
    }


def _figure(q: dict[str, float] | None) -> str:
    return f"{q['median']:>14.1f} {q['p95']:>7.1f}" if q else f"{'-':>14} {'-':>7}"


KINDS = ("public", "nat", "cgnat", "udp", "ipv6")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(KINDS), help="comma-separated topologies")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    for kind in args.only.split(","):
        results[kind] = measure(kind, args.runs)
        print(f"{kind}: {json.dumps(results[kind])}", file=sys.stderr, flush=True)
    base = results.get("public", {}).get("link_s")
    for result in results.values():
        if base and result["link_s"]:
            result["link_over_baseline"] = result["link_s"]["median"] / base["median"]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'topology':<10} {'link median s':>14} {'p95':>7} {'heal median s':>14} {'p95':>7}"
          f" {'link/base':>9}  (n)")  # fmt: skip
    for kind, r in results.items():
        link, heal = r["link_s"], r["heal_s"]
        cells = [_figure(link), _figure(heal)]
        ratio = f"{r['link_over_baseline']:>9.2f}" if "link_over_baseline" in r else f"{'-':>9}"
        n = f"({link['n'] if link else 0}/{heal['n'] if heal else 0})"
        print(f"{kind:<10} {cells[0]} {cells[1]} {ratio}  {n}")
        for failure in r["failures"]:
            print(f"           {failure}")


if __name__ == "__main__":
    main()
