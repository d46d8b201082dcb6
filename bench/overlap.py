"""What per-link translation costs (issue 15): grant propagation and throughput through a
translated link against a plain one, from the same serving cell, in the same run.

In namespaces (tests/netns/test_overlap.py's routed topology, reused): alpha and beta both on
10.60.0.0/24, so each maps the other to a free /24 of 10/8 and translates (nft prefix NAT on
both sides); gamma on 10.70.0.0/24, linked to alpha as it is. alpha serves `web` (HTTP) and
`iperf` (iperf3 -s as the backend) to both; beta's laptop and gamma's tablet imported their
configs with wg-quick.

      laptop ──wg──▶ beta ──wg, SNAT 10.60/24 → seen_as──▶ alpha: DNAT (mapped VIP) → backend
      tablet ──wg──▶ gamma ──wg──────────────────────────▶ alpha: DNAT 10.60.0.x → backend

                inet ns: router (198.51.100.62 / .126 / .190 / .254)
        ┌─────────────────────────┼─────────────────────────┐
  alpha 198.51.100.1/26    beta 198.51.100.65/26    gamma 198.51.100.129/26   br-dev .192/26:
  10.60.0.1/24             10.60.0.1/24             10.70.0.1/24              laptop .193 (beta's)
  web 127.0.0.1:8000, iperf 127.0.0.1:5201                                   tablet .194 (gamma's)

1. grant: alpha's admin API (its socket) shares `web` with beta, or with gamma, until a prober in
   that cell's device, connecting every 5 ms (bench/share.py's `Prober`), first connects to web
   at the address its cell presents it (beta: the mapped VIP; gamma: the real one); then
   unshare until the prober's first refused attempt (a dropped SYN: it counts at the end of the
   prober's 20 ms connect timeout, in both cases alike). The cases alternate, the order swapped
   every sample, and each change waits for the other cell's view to follow before the next.
2. throughput: iperf3 (TCP, one stream, upload; bench/dataplane.py's `iperf`, `alternate`,
   `paused`) from the laptop and from the tablet to alpha's `iperf`, daemons paused.
3. RTT: ping from each device to alpha's own address as its cell presents it (a VIP passes
   only its granted port).
Ratios are translated / plain (times: above 1 is slower; throughput: below 1 is slower).

Run as root from the repo root:  .venv/bin/python bench/overlap.py [--samples 30] [--runs 7]
                                                                    [--seconds 3] [--json]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from bench.dataplane import PORT, alternate, iperf, machine, paused  # noqa: E402
from bench.share import Prober, api  # noqa: E402
from tests.netns import test_overlap as overlap  # noqa: E402
from tests.netns.harness import Netns, Topology, wait_until  # noqa: E402

CASES = ("translated", "plain")  # beta (10.60.0.0/24, like alpha) and gamma (10.70.0.0/24)
GAMMA_VPN = "10.70.0.1/24"


def first_down_after(prober: Prober, t0: float) -> float | None:
    """When the prober first recorded a refused attempt at or after `t0`."""
    for line in prober.out.read_text().split("\n"):
        if line.strip():
            at, ok = line.split()
            if float(at) >= t0 and ok == "0":
                return float(at)
    return None


def when(check: Callable[[], float | None], message: str) -> float:
    """The time `check` returns once it returns one (bench/share.py's prober readings)."""
    at = wait_until(check, 10, message)
    assert at is not None
    return at


def rtt_ms(ns: Netns, addr: str, count: int) -> list[float]:
    out = ns.run(["ping", "-n", "-c", str(count), "-i", "0.05", addr], timeout=count + 30).stdout
    return [float(m) for m in re.findall(r"time=([0-9.]+) ms", out)]


def ratios(result: dict[str, Any], key: str) -> dict[str, float]:
    t, p = result[f"translated_{key}"], result[f"plain_{key}"]
    return {"median": t["median"] / p["median"], "p95": t["p95"] / p["p95"]}


def run(samples: int, runs: int, seconds: int, pings: int) -> dict[str, Any]:
    with Topology() as topo:
        inet = topo.add_ns("inet")
        inet.sysctl("net.ipv4.ip_forward", 1)
        dev = topo.bridge("dev")
        topo.attach(inet, dev, "198.51.100.254/26")
        laptop, tablet = topo.add_ns("laptop"), topo.add_ns("tablet")
        topo.attach(laptop, dev, "198.51.100.193/26", gw="198.51.100.254")
        topo.attach(tablet, dev, "198.51.100.194/26", gw="198.51.100.254")
        alpha = overlap._cell(topo, inet, "alpha", 1)
        beta = overlap._cell(topo, inet, "beta", 2)
        gamma = overlap._cell(topo, inet, "gamma", 3, vpn=GAMMA_VPN)
        alpha.ns.serve_http("127.0.0.1", 8000, "alpha web")
        alpha.ns.popen(["iperf3", "-s", "-p", str(PORT)], name="iperf3-alpha")
        web_vip = alpha.cli("services", "add", "web", "--backend", "127.0.0.1:8000",
                            "--port", "80")["vip"]  # fmt: skip
        ipf_vip = alpha.cli("services", "add", "iperf", "--backend", f"127.0.0.1:{PORT}",
                            "--port", str(PORT))["vip"]  # fmt: skip
        laptop.device(beta.add_device("laptop"), hint="laptop").up()
        tablet.device(gamma.add_device("tablet"), hint="tablet").up()
        alpha.cli("connect", beta.invite()["string"])
        alpha.cli("connect", gamma.invite()["string"])
        cells = {"alpha": alpha, "beta": beta, "gamma": gamma}
        w = overlap.World(topo, cells, {"laptop": laptop, "tablet": tablet})
        net = ipaddress.IPv4Interface(alpha.address).network

        def at(cell: str, vip: str) -> str:  # alpha's `vip` where `cell` presents alpha
            return w.address(cell, "alpha", int(ipaddress.IPv4Address(vip)) - int(net[0]))

        wait_until(lambda: laptop.ping(at("beta", alpha.ip)), 30, "laptop cannot reach alpha")
        wait_until(lambda: tablet.ping(at("gamma", alpha.ip)), 30, "tablet cannot reach alpha")
        # the two links differ in the translation alone
        assert w.presented("beta", "alpha") != net and w.presented("alpha", "beta") != net
        assert w.presented("gamma", "alpha") == net
        assert alpha.links()["gamma"]["mapped_subnet"] is None
        assert gamma.links()["alpha"]["mapped_subnet"] is None
        other = {"translated": "beta", "plain": "gamma"}
        device = {"translated": laptop, "plain": tablet}
        # where each device reaches alpha's address, web and iperf (asked once: the CLI cannot
        # answer while the daemons are paused)
        me, web, ipf = ({c: at(other[c], a) for c in CASES} for a in (alpha.ip, web_vip, ipf_vip))
        result: dict[str, Any] = {
            "presented": {c: str(w.presented(other[c], "alpha")) for c in CASES},
            "alpha_presents": {c: str(w.presented("alpha", other[c])) for c in CASES},
        }

        # -- RTT and throughput first: the probers below cannot be stopped on their own --
        for c in CASES:
            alpha.cli("share", other[c], "iperf")
        for c in CASES:
            wait_until(partial(device[c].tcp_connect, ipf[c], PORT), 30,
                       f"{other[c]}'s device cannot reach iperf")  # fmt: skip
            result[f"{c}_rtt_ms"] = quantiles(rtt_ms(device[c], me[c], pings))
        result["rtt"] = ratios(result, "rtt_ms")
        with paused([alpha, beta, gamma]):
            tput = alternate({c: partial(iperf, device[c], ipf[c], seconds) for c in CASES}, runs)
        result["throughput"] = tput

        # -- grant propagation --
        a_api = api(alpha)
        probers = {c: Prober(device[c], web[c], 80, topo.workdir / f"probe-{c}")
                   for c in CASES}  # fmt: skip
        grant: dict[str, list[float]] = {c: [] for c in CASES}
        revoke: dict[str, list[float]] = {c: [] for c in CASES}
        request: dict[str, list[float]] = {c: [] for c in CASES}

        def follows(c: str, shared: bool) -> bool:  # the other cell's view of alpha's offer
            names = {s["name"] for s in cells[other[c]].links()["alpha"]["outbound"]}
            return ("web" in names) == shared

        for i in range(samples):
            for c in CASES if i % 2 == 0 else CASES[::-1]:
                wait_until(probers[c].is_down, 10, f"web still open to {other[c]}")
                t0 = time.monotonic()
                a_api.post(f"/api/cells/{other[c]}/shares/web").raise_for_status()
                request[c].append(time.monotonic() - t0)
                up = when(partial(probers[c].first_up_after, t0), f"no grant, {c}")
                grant[c].append(up - t0)
                wait_until(partial(follows, c, True), 10, f"{other[c]} did not learn the grant")
                t1 = time.monotonic()
                a_api.delete(f"/api/cells/{other[c]}/shares/web").raise_for_status()
                down = when(partial(first_down_after, probers[c], t1), f"still open, {c}")
                revoke[c].append(down - t1)
                wait_until(partial(follows, c, False), 10, f"{other[c]} kept the grant")
        for c in CASES:
            result[f"{c}_share_to_connect_s"] = quantiles(grant[c])
            result[f"{c}_unshare_to_refused_s"] = quantiles(revoke[c])
            result[f"{c}_share_request_s"] = quantiles(request[c])
        result["share_to_connect"] = ratios(result, "share_to_connect_s")
        result["unshare_to_refused"] = ratios(result, "unshare_to_refused_s")
        result["samples_s"] = {"share": grant, "unshare": revoke}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--pings", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    info = machine()
    t0 = time.monotonic()
    result = run(args.samples, args.runs, args.seconds, args.pings)
    result.update(machine=info, load_after=os.getloadavg(), wall_s=time.monotonic() - t0)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    show(result)


def show(result: dict[str, Any]) -> None:
    info = result["machine"]
    print(json.dumps(info))
    print(f"beta's laptop reaches alpha at {result['presented']['translated']} (translated), "
          f"gamma's tablet at {result['presented']['plain']} (plain)")  # fmt: skip
    print(f"{'figure':<24} {'translated':>21} {'plain':>21} {'ratio':>13}")
    print(f"{'':<24} {'median / p95':>21} {'median / p95':>21} {'median / p95':>13}")
    rows = [("share → connect ms", "share_to_connect_s", "share_to_connect", 1000),
            ("unshare → refused ms", "unshare_to_refused_s", "unshare_to_refused", 1000),
            ("share request ms", "share_request_s", None, 1000),
            ("ping RTT ms", "rtt_ms", "rtt", 1)]  # fmt: skip
    for label, key, ratio_key, scale in rows:
        t, p = result[f"translated_{key}"], result[f"plain_{key}"]
        cells = [f"{q['median'] * scale:.2f} / {q['p95'] * scale:.2f} ({q['n']})" for q in (t, p)]
        r = result[ratio_key] if ratio_key else None
        ratio = f"{r['median']:.3f} / {r['p95']:.3f}" if r else ""
        print(f"{label:<24} {cells[0]:>21} {cells[1]:>21} {ratio:>13}")
    tp = result["throughput"]
    t, p = tp["translated_mbit_s"], tp["plain_mbit_s"]
    cells = [f"{q['median']:.1f} / {q['p95']:.1f} ({q['n']})" for q in (t, p)]
    r = tp["translated_over_plain"]
    print(f"{'iperf3 Mbit/s':<24} {cells[0]:>21} {cells[1]:>21} "
          f"{r['ratio_of_medians']:>13.3f}")  # fmt: skip
    print(f"throughput per round: median {r['per_round_median']:.3f}, min "
          f"{r['per_round_min']:.3f}, max {r['per_round_max']:.3f}, "
          f"translated below plain in {r['rounds_below_1']} of {t['n']}")  # fmt: skip
    print(f"load before {info['load_before']}, after {result['load_after']}, "
          f"{result['wall_s']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
