"""Grant propagation between two real cells, and a burst of sharing changes.

In namespaces (tests/netns harness): cells alpha and beta linked on a test bridge, beta's laptop
imported its config with wg-quick. alpha offers `web` (HTTP) and `echo` (a TCP echo).
- grant: `share beta web` on alpha (admin API over its socket) until a prober in the laptop,
  connecting every 5 ms, first connects to web by address, and by name (`web.alpha.test`, a fresh
  lookup through beta's DNS each time);
- revoke: `unshare beta echo` on alpha while the laptop holds an echo session answering every
  10 ms, until the last reply (the established flow stops);
- burst: 100 share/unshare changes over 5 services as fast as the API takes them: how many nft
  transactions and pushes alpha made, how many state documents beta applied, and whether beta's
  view ends exactly equal to alpha's choice.
Anchors (their published figures, not measured here): Headscale batches changes for 800 ms,
NetBird about 1 s, Tailscale about 3 s typical.

Run as root from the repo root:  .venv/bin/python bench/share.py [--grants 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from tests.netns.cells import Cell, cell_on_bridge  # noqa: E402
from tests.netns.harness import Netns, Topology, wait_until  # noqa: E402

PROBER = r"""
import socket, sys, time
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
state = None
with open(out, "a", buffering=1) as f:
    while True:
        try:
            addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
            # a dropped SYN holds the attempt for the whole timeout: keep it short, so a grant
            # that lands during an attempt is seen within ~20 ms (the tunnel RTT is ~1 ms)
            with socket.create_connection(addr, timeout=0.02):
                ok = True
        except OSError:
            ok = False
        if ok != state:
            f.write("%f %d\n" % (time.monotonic(), ok))
            state = ok
        time.sleep(0.005)
"""


class Prober:
    def __init__(self, ns: Netns, host: str, port: int, out: Path) -> None:
        self.out = out
        ns.popen([sys.executable, "-I", "-c", PROBER, host, str(port), str(out)],
                 name=f"prober-{host}")  # fmt: skip

    def first_up_after(self, t0: float) -> float | None:
        try:
            lines = self.out.read_text().split("\n")
        except FileNotFoundError:
            return None
        for line in lines:
            if line.strip():
                at, ok = line.split()
                if float(at) >= t0 and ok == "1":
                    return float(at)
        return None

    def is_down(self) -> bool:
        try:
            lines = [ln for ln in self.out.read_text().split("\n") if ln.strip()]
        except FileNotFoundError:
            return False
        return bool(lines) and lines[-1].split()[1] == "0"


def api(cell: Cell) -> httpx.Client:
    transport = httpx.HTTPTransport(uds=str(cell.data_dir / "admin.sock"))
    return httpx.Client(transport=transport, base_url="http://picell", timeout=30)


def run(grants: int, burst: int) -> dict[str, Any]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        laptop = topo.add_ns("laptop")
        topo.attach(laptop, inet, "198.51.100.12/24")
        alpha = cell_on_bridge(topo, inet, "alpha", 1)
        beta = cell_on_bridge(topo, inet, "beta", 2)
        a_ns = alpha.ns
        a_ns.serve_http("127.0.0.1", 8000, "web")
        a_ns.serve_tcp_echo("127.0.0.1", 7)
        alpha.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        alpha.cli("services", "add", "echo", "--backend", "127.0.0.1:7")
        for i in range(5):
            alpha.cli("services", "add", f"s{i}", "--backend", f"127.0.0.1:{9000 + i}")
        laptop.device(beta.add_device("laptop"), hint="laptop").up()
        alpha.cli("connect", beta.invite()["string"])
        wait_until(lambda: laptop.ping("10.61.0.1"), 20, "no tunnel")
        by_addr = Prober(laptop, "10.61.0.254", 80, topo.workdir / "probe-addr")
        by_name = Prober(laptop, "web.alpha.test", 80, topo.workdir / "probe-name")
        a_api = api(alpha)

        grant_addr, grant_name, revoke = [], [], []
        for _ in range(grants):
            wait_until(lambda: by_addr.is_down() and by_name.is_down(), 10, "web still open")
            t0 = time.monotonic()
            a_api.post("/api/cells/beta/shares/web").raise_for_status()
            up_addr = wait_until(partial(by_addr.first_up_after, t0), 10, "no grant by address")
            up_name = wait_until(partial(by_name.first_up_after, t0), 10, "no grant by name")
            grant_addr.append(up_addr - t0)
            grant_name.append(up_name - t0)
            a_api.delete("/api/cells/beta/shares/web").raise_for_status()

            a_api.post("/api/cells/beta/shares/echo").raise_for_status()
            session = laptop.tcp_echo_session("10.61.0.253", 7, interval_s=0.01)
            t1 = time.monotonic()
            a_api.delete("/api/cells/beta/shares/echo").raise_for_status()
            wait_until(partial(session.silent_for, 0.5), 10, "the flow went on")
            revoke.append(max(0.0, (session.last_reply() or t1) - t1))
            session.stop()

        before_a = a_api.get("/api/status").json()
        seq_before = _remote_seq(beta)
        rng = random.Random(5)
        chosen: set[str] = set()
        t2 = time.monotonic()
        for _ in range(burst):
            svc = f"s{rng.randrange(5)}"
            if svc in chosen:
                a_api.delete(f"/api/cells/beta/shares/{svc}").raise_for_status()
                chosen.discard(svc)
            else:
                a_api.post(f"/api/cells/beta/shares/{svc}").raise_for_status()
                chosen.add(svc)
        burst_s = time.monotonic() - t2

        def converged() -> bool:
            return {s["name"] for s in beta.links()["alpha"]["outbound"]} == chosen

        wait_until(converged, 60, "beta's view never matched alpha's choice")
        settle_s = time.monotonic() - t2
        after_a = a_api.get("/api/status").json()
        applied = _remote_seq(beta) - seq_before
    return {
        "grant_by_address_s": quantiles(grant_addr),
        "grant_by_name_s": quantiles(grant_name),
        "revoke_flow_stops_s": quantiles(revoke),
        "burst": {
            "changes": burst,
            "seconds_to_issue": burst_s,
            "seconds_until_beta_matches": settle_s,
            "alpha_nft_transactions": _delta(before_a, after_a, "nft grant delta")
            + _delta(before_a, after_a, "nft table"),
            "alpha_pushes": after_a["pushes_sent"] - before_a["pushes_sent"],
            "beta_documents_applied": applied,
            "beta_final_state_exact": True,
        },
    }


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return int(after["applied"].get(key, 0)) - int(before["applied"].get(key, 0))


def _remote_seq(cell: Cell) -> int:
    with sqlite3.connect(f"file:{cell.data_dir / 'picell.db'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT remote_seq FROM links WHERE name = 'alpha'").fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grants", type=int, default=50)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.grants, args.burst)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'figure':<28} {'median ms':>10} {'p95 ms':>10}   (n)")
    for key in ("grant_by_address_s", "grant_by_name_s", "revoke_flow_stops_s"):
        q = result[key]
        print(f"{key:<28} {q['median'] * 1000:>10.1f} {q['p95'] * 1000:>10.1f}   ({q['n']})")
    print("burst:", json.dumps(result["burst"]))


if __name__ == "__main__":
    main()
