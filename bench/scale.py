"""One cell linked with many: grant propagation, memory per link, reconcile time under load.

Never run by CI (fifty daemons and fifty wireguard-go on 2 cores). Every cell is a real picell
daemon (`picell serve`: wireguard-go, nftables, Unbound, the signed mesh protocol over the
tunnel) in its own namespace of the tests/netns harness, all on one test bridge:

      ┌──────────────────── switch ns: br-inet 198.51.100.0/24 ──────────────────┐
      │                │                │                          │
  hub .2           s0 .10           s1 .11            ...       sN-1 .(10+N-1)
  10.60.0.1/24     10.61.0.1/24     10.62.0.1/24                10.(61+N-1).0.1/24
  hub.test         s0.test          s1.test
  web :80 → 127.0.0.1:8000 in every cell; the hub also has `--services` more (bulk grants)

Measures:
- grant propagation, hub → spoke: `POST /api/cells/sK/shares/web` on the hub's admin socket
  until a prober in sK's namespace (connecting every 5 ms through the tunnel) first connects to
  the hub's web, by address, and by name (`web.hub.test`, a fresh lookup through sK's own
  Unbound each time, which forwards it to the hub's view for sK through the tunnel);
- the reverse, spoke → hub: sK shares its web; a prober in the hub's namespace;
- the tunnel's RTT (ping from a spoke to the hub's address) for the goal "RTT + 100 ms";
- memory: RSS of everything in the hub's namespace (picell, wireguard-go, Unbound) with no
  link and with N links, per link; a spoke's wireguard-go RSS;
- reconcile on the hub with N links, `--devices` devices and N x `--services` grants: no-op
  (`POST /api/reconcile`) and one change (one link's permission list loses one service), against
  `GET /api/status` in the same run as the admin socket's own cost;
- propagation again with all of that loaded.

A linked cell's network is at most a /24 (DESIGN, identity policy), so a live hub holds at most
~250 devices and services together: the live run loads `--devices` 50 and `--services` 200
(10,000 grants with 50 links). `--reconcile-only` measures the hub's reconcile at the full
figure instead: in a scratch namespace, one in-process cell (a /22) with real wireguard-go,
nftables and Unbound, `--links` 50 links written to its store (WireGuard peers, routes, views,
grant sets; no cell behind them), `--devices` 250 devices and `--services` 200 services shared
with every link (10,000 grants): a no-op reconcile and one change (one link's list loses one
service, and gets it back), with the processes each spawns.

Run as root from the repo root:  .venv/bin/python bench/scale.py [--spokes 50] [--json]
                                 .venv/bin/python bench/scale.py --reconcile-only --devices 250
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from tests.netns.cells import Cell  # noqa: E402
from tests.netns.harness import Netns, Topology, wait_until  # noqa: E402

# Connects every 5 ms; by name, asks `server` for an A record itself (one UDP query, no cache
# in between) and connects to the answer. Logs each change of outcome with its time.
PROBER = r"""
import os, socket, struct, sys, time
mode, host, port, server, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

def lookup(name):
    qid = os.getpid() & 0xFFFF
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.sendto(q, (server, 53))
        data = s.recv(2048)
    flags, an = struct.unpack(">H", data[2:4])[0], struct.unpack(">H", data[6:8])[0]
    if flags & 0xF or not an:
        return None
    i = len(q)
    for _ in range(an):
        while data[i] and data[i] < 0xC0:
            i += data[i] + 1
        i += 2 if data[i] >= 0xC0 else 1
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[i:i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            return socket.inet_ntoa(data[i:i + 4])
        i += rdlen
    return None

state = None
with open(out, "a", buffering=1) as f:
    while True:
        try:
            addr = host if mode == "addr" else lookup(host)
            ok = False
            if addr:
                with socket.create_connection((addr, port), timeout=0.2):
                    ok = True
        except OSError:
            ok = False
        if ok != state:
            f.write("%f %d\n" % (time.monotonic(), ok))
            state = ok
        time.sleep(0.005)
"""


class Prober:
    def __init__(self, ns: Netns, mode: str, host: str, server: str, out: Path) -> None:
        self.out = out
        self.proc = ns.popen([sys.executable, "-I", "-c", PROBER, mode, host, "80", server,
                              str(out)], name=f"prober-{ns.role}-{mode}")  # fmt: skip

    def _lines(self) -> list[tuple[float, bool]]:
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        return [(float(a), b == "1") for a, b in (ln.split() for ln in text.splitlines() if ln)]

    def first_up_after(self, t0: float) -> float | None:
        return next((at for at, ok in self._lines() if at >= t0 and ok), None)

    def is_down(self) -> bool:
        lines = self._lines()
        return bool(lines) and not lines[-1][1]

    def stop(self) -> None:
        self.proc.stop()


def api(cell: Cell) -> httpx.Client:
    transport = httpx.HTTPTransport(uds=str(cell.data_dir / "admin.sock"))
    return httpx.Client(transport=transport, base_url="http://picell", timeout=120)


def ns_rss_kib(ns: Netns) -> dict[str, int]:
    """VmRSS of every process in `ns`, summed by command name (KiB)."""
    total: dict[str, int] = {}
    out = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout
    for pid in out.split():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
        rss = int(fields.get("VmRSS", "0 kB").split()[0])
        name = fields["Name"].strip()
        if name.startswith("python"):  # the daemon, or a test backend / prober (not counted)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            name = "picell" if b"picell" in cmdline and b"serve" in cmdline else "harness"
        if name != "harness":
            total[name] = total.get(name, 0) + rss
    return total


def new_cell(topo: Topology, inet: Any, name: str, number: int, address: str) -> Cell:
    ns = topo.add_ns(name)
    topo.attach(ns, inet, f"198.51.100.{number}/24")
    return Cell(topo, ns, name, f"{name}.test", address, f"198.51.100.{number}:51820")


def boot(cell: Cell) -> Cell:
    """Init, serve, and offer `web` (not yet shared)."""
    cell.init()
    cell.start(timeout_s=300)
    cell.ns.serve_http("127.0.0.1", 8000, f"{cell.name} web", timeout_s=60)
    with api(cell) as c:
        body = {"name": "web", "backend": "127.0.0.1:8000", "port": 80}
        c.post("/api/services", json=body).raise_for_status()
    return cell


def propagate(
    topo: Topology, server: Cell, client: Cell, vip: str, tag: str
) -> tuple[float, float]:
    """`server` shares web with `client`; seconds until `client`'s namespace connects to it by
    address and by name (through `client`'s own resolver); then unshared again."""
    work = topo.workdir
    by_addr = Prober(client.ns, "addr", vip, client.ip, work / f"{tag}-addr")
    by_name = Prober(client.ns, "name", f"web.{server.domain}", client.ip, work / f"{tag}-name")
    try:
        wait_until(lambda: by_addr.is_down() and by_name.is_down(), 30, "web open before")
        with api(server) as c:
            t0 = time.monotonic()
            c.post(f"/api/cells/{client.name}/shares/web").raise_for_status()
            up_addr = wait_until(partial(by_addr.first_up_after, t0), 30, "no grant by address")
            up_name = wait_until(partial(by_name.first_up_after, t0), 30, "no grant by name")
            c.delete(f"/api/cells/{client.name}/shares/web").raise_for_status()
    finally:
        by_addr.stop()
        by_name.stop()
    return up_addr - t0, up_name - t0


def rtt_ms(spoke: Cell, hub: Cell) -> float:
    out = spoke.ns.run(["ping", "-c", "5", "-i", "0.2", "-q", hub.ip]).stdout
    # rtt min/avg/max/mdev = a/b/c/d ms
    return float(out.rsplit("=", 1)[1].split("/")[1])


def timed(call: Any, reps: int) -> list[float]:
    samples = []
    for _ in range(reps):
        t0 = time.monotonic()
        call().raise_for_status()
        samples.append(time.monotonic() - t0)
    return samples


def propagation_round(topo: Topology, hub: Cell, spokes: list[Cell], samples: int, tag: str,
                      hub_vip: str) -> dict[str, Any]:  # fmt: skip
    out: dict[str, list[float]] = {k: [] for k in ("out_addr", "out_name", "in_addr", "in_name")}
    for k in range(samples):
        spoke = spokes[k % len(spokes)]
        a, n = propagate(topo, hub, spoke, hub_vip, f"{tag}-out{k}")
        out["out_addr"].append(a)
        out["out_name"].append(n)
        with api(spoke) as c:
            spoke_vip = c.get("/api/services").json()[0]["vip"]
        a, n = propagate(topo, spoke, hub, spoke_vip, f"{tag}-in{k}")
        out["in_addr"].append(a)
        out["in_name"].append(n)
    return {k: quantiles(v) for k, v in out.items()}


def run(n_spokes: int, samples: int, devices: int, services: int) -> dict[str, Any]:
    result: dict[str, Any] = {"spokes": n_spokes, "devices": devices,
                              "grants": n_spokes * services}  # fmt: skip
    with Topology() as topo:
        inet = topo.bridge("inet")
        hub = boot(new_cell(topo, inet, "hub", 2, "10.60.0.1/24"))
        hub_api = api(hub)
        hub_vip = hub_api.get("/api/services").json()[0]["vip"]
        time.sleep(2)  # settle: the first reconciles and Unbound's start are not a link's cost
        rss0 = ns_rss_kib(hub.ns)

        # the spokes start a few at a time (their start-up is not what we measure); the links
        # are made one after another
        spokes = [new_cell(topo, inet, f"s{i}", 10 + i, f"10.{61 + i}.0.1/24")
                  for i in range(n_spokes)]  # fmt: skip
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(boot, spokes))
        link_s = []
        for i, spoke in enumerate(spokes):
            with api(spoke) as c:
                invite = c.post("/api/cells/invites", json={}).json()["string"]
            t0 = time.monotonic()
            answer = hub_api.post("/api/cells", json={"invite": invite})
            if answer.status_code != 201:
                raise RuntimeError(f"connect {spoke.name}: {answer.status_code} {answer.text}")
            wait_until(lambda s=spoke: s.ns.ping(hub.ip, timeout_s=1), 60, "no tunnel")
            link_s.append(time.monotonic() - t0)
            print(f"linked {i + 1}/{n_spokes}", file=sys.stderr, flush=True)
        result["link_connect_to_ping_s"] = quantiles(link_s)
        time.sleep(5)  # settle: the last links' first documents and reconciles
        rss_n = ns_rss_kib(hub.ns)
        spoke_wg = [ns_rss_kib(s.ns).get("wireguard-go", 0) for s in spokes]
        result["memory_kib"] = {
            "hub_no_link": rss0,
            "hub_with_links": rss_n,
            "hub_per_link": {k: (rss_n.get(k, 0) - rss0.get(k, 0)) / n_spokes for k in rss_n},
            "spoke_wireguard_go_median": statistics.median(spoke_wg),
        }
        result["tunnel_rtt_ms_median"] = statistics.median(rtt_ms(s, hub) for s in spokes[:10])
        result["light"] = propagation_round(topo, hub, spokes, samples, "light", hub_vip)

        # load: devices and bulk grants on the hub
        t0 = time.monotonic()
        for d in range(devices):
            hub_api.post("/api/peers", json={"name": f"d{d}"}).raise_for_status()
        bulk = [f"x{j}" for j in range(services)]
        for j, name in enumerate(bulk):
            body = {"name": name, "backend": f"127.0.0.1:{9000 + j}", "port": 80}
            hub_api.post("/api/services", json=body).raise_for_status()
        for spoke in spokes:
            hub_api.put(f"/api/cells/{spoke.name}/permissions",
                        json={"services": bulk}).raise_for_status()  # fmt: skip
        result["load_seconds"] = time.monotonic() - t0
        time.sleep(5)  # settle: the pushes of the bulk grants
        result["memory_kib"]["hub_loaded"] = ns_rss_kib(hub.ns)

        reps = 10
        status = timed(lambda: hub_api.get("/api/status"), reps)
        noop = timed(lambda: hub_api.post("/api/reconcile"), reps)
        report = hub_api.post("/api/reconcile").json()
        change: list[float] = []
        target = spokes[0].name
        for k in range(reps):
            lists = (bulk[1:], bulk) if k % 2 == 0 else (bulk, bulk)
            t0 = time.monotonic()
            hub_api.put(f"/api/cells/{target}/permissions",
                        json={"services": lists[0]}).raise_for_status()  # fmt: skip
            change.append(time.monotonic() - t0)
            hub_api.put(f"/api/cells/{target}/permissions",
                        json={"services": lists[1]}).raise_for_status()  # fmt: skip
        result["reconcile_loaded"] = {
            "status_call_s": quantiles(status),
            "noop_reconcile_call_s": quantiles(noop),
            "noop_processes": report.get("processes"),
            "one_permission_change_call_s": quantiles(change),
        }
        result["loaded"] = propagation_round(topo, hub, spokes, min(samples, 20), "loaded",
                                             hub_vip)  # fmt: skip
        result["hub_applied"] = hub_api.get("/api/status").json().get("applied", {})
    return result


def reconcile_inner(links: int, devices: int, services: int, reps: int) -> dict[str, Any]:
    """Runs inside its scratch namespace (see `--reconcile-only`)."""
    import secrets
    import tempfile

    from picell.cellinit import InitRequest
    from picell.control import Control
    from picell.paths import Paths
    from picell.reconcile import Reconciler
    from picell.store import links as link_table
    from picell.store import peers as peer_table
    from picell.store import services as service_table
    from picell.store.db import Store
    from picell.store.links import Link, LinkIdentity, LinkState, OwnerChoices, Share
    from picell.store.peers import Peer
    from picell.store.services import Service
    from picell.system.children import Child
    from picell.system.run import Runner
    from picell.wireguard import keys

    out: dict[str, Any] = {"links": links, "devices": devices, "grants": links * services}
    with tempfile.TemporaryDirectory(prefix="picell-bench-") as tmp:
        paths = Paths(Path(tmp))
        paths.run_dir.mkdir()
        paths.unbound_dir.mkdir()

        def make_child(name: str, argv: list[str]) -> Child:
            return Child(name, argv, paths.run_dir / f"{name}.log")

        store, runner = Store(paths.db), Runner()
        reconciler = Reconciler(runner, paths, make_child)
        control = Control(store, runner, reconciler)
        control.init_cell(InitRequest(
            name="hub", domain="hub.test", address="10.60.0.1/22", endpoint="127.0.0.1:51999",
            interface=f"pcsc{secrets.token_hex(2)}", listen_port=51999,
        ))  # fmt: skip
        names = [f"x{j}" for j in range(services)]
        try:
            t0 = time.monotonic()
            with store.transaction() as conn:
                for d in range(devices):
                    key = keys.public_from_private(keys.generate_private())
                    peer_table.add(conn, Peer(f"d{d}", key, None, d + 2, None, time.time()))
                local = ipaddress.IPv4Address("127.0.0.1")
                for j, name in enumerate(names):
                    service_table.add(conn, Service(name, j + 1, local, 9000 + j, "tcp", 80))
                for i in range(links):
                    ident = LinkIdentity(
                        f"198.51.100.{10 + i}:51820", ipaddress.IPv4Network(f"10.{61 + i}.0.0/24"),
                        ipaddress.IPv4Address(f"10.{61 + i}.0.1"), f"s{i}.test",
                    )  # fmt: skip
                    key = keys.public_from_private(keys.generate_private())
                    shared = OwnerChoices(tuple(Share(n) for n in names))
                    link_table.save(conn, Link(f"s{i}", key, ident, LinkState.LINKED, shared))
            first = control.converge()
            out["first_apply_s"] = time.monotonic() - t0
            assert first is not None and len(reconciler._grants) == links * services

            def timed_converge() -> tuple[float, int]:
                t = time.monotonic()
                report = control.converge()
                assert report is not None
                return time.monotonic() - t, len(report.commands)

            noop = [timed_converge() for _ in range(reps)]
            change = []
            for k in range(reps):
                kept = tuple(Share(n) for n in (names[1:] if k % 2 == 0 else names))
                with store.transaction() as conn:
                    link = link_table.get(conn, "s0")
                    link_table.save(conn, replace(link, choices=replace(link.choices,
                                                                        shares=kept)))  # fmt: skip
                change.append(timed_converge())
            out["noop_s"] = quantiles([t for t, _ in noop])
            out["noop_processes"] = sorted({n for _, n in noop})
            out["one_change_s"] = quantiles([t for t, _ in change])
            out["one_change_processes"] = sorted({n for _, n in change})
            out["applied"] = dict(reconciler.applied)
        finally:
            reconciler.stop()
            reconciler.unbound.stop()
            if reconciler.wg_child is not None:
                reconciler.wg_child.stop()
            store.close()
    return out


def reconcile_only(links: int, devices: int, services: int, reps: int) -> dict[str, Any]:
    from bench._netns import run_in_netns, scratch_netns

    with scratch_netns("pcsc") as ns, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        argv = [sys.executable, __file__, "--inner", str(out), "--links", str(links)]
        argv += ["--devices", str(devices), "--services", str(services), "--reps", str(reps)]
        if run_in_netns(ns, argv) != 0:
            sys.exit("the benchmark failed inside its namespace")
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spokes", type=int, default=50)
    parser.add_argument("--samples", type=int, default=50, help="propagation samples per way")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--services", type=int, default=200, help="bulk-granted to every spoke")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--reconcile-only", action="store_true")
    parser.add_argument("--links", type=int, default=50, help="with --reconcile-only")
    parser.add_argument("--reps", type=int, default=10, help="with --reconcile-only")
    parser.add_argument("--inner", help=argparse.SUPPRESS)  # file for the results
    args = parser.parse_args()
    if args.inner:
        inner = reconcile_inner(args.links, args.devices, args.services, args.reps)
        Path(args.inner).write_text(json.dumps(inner))
        return
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    if args.reconcile_only:
        result = reconcile_only(args.links, args.devices, args.services, args.reps)
    else:
        result = run(args.spokes, args.samples, args.devices, args.services)
    with open("/proc/loadavg") as f:
        result["loadavg_before_after"] = [load_before, f.read().split()[:3]]
    result["machine"] = {"cpus": os.cpu_count(), "mem_total": Path("/proc/meminfo").read_text()
                         .splitlines()[0].split(":")[1].strip()}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
