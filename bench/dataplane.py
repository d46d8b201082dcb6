"""Data-plane cost: iperf3 (TCP, one stream) through picell against raw WireGuard, between real
cells in namespaces (tests/netns harness; devices import their config with wg-quick).

(a) grants: beta's phone uploads to alpha's service `iperf` (shared with beta; backend
    127.0.0.1:5201 on alpha, reached by its service address) with 1,000 grants in alpha's
    grant set: the one for beta and 999 of 50 other linked cells (bench/nft_grants.py's
    `state_with`, added as set elements). This is the path where picell's rules do the most
    per packet: every packet from a linked cell is looked up in the grant set, established
    flows too (`link_gate`). Baseline, same wireguard-go pair: picell's nft table deleted on
    both cells and the phone talking to alpha's own address on the same port; the table (with
    its 1,000 grants) is put back after each baseline run. A third case, picell with beta's
    grant only (the 999 others deleted for that run), tells the grant set's size apart from
    the rest of picell's path (conntrack, DNAT to loopback, the chains).

      phone ──wg──▶ beta ──wg──▶ alpha: DNAT 10.61.0.x:5201 → 127.0.0.1:5201 (iperf3 -s)
                                        (raw: 10.61.0.1:5201, no nft table)

(b) exit relay (tests/netns/test_exit.py's topology): alpha's phone routed via beta's exit
    (phone → alpha → beta → internet) against alpha's pad on a direct full tunnel (pad → alpha
    → internet), both uploading to an iperf3 server at 192.0.2.80 in the "internet".

The cases alternate, the order rotated every round, so that the load of other work on the
shared cores falls on each alike. The picell daemons are paused (SIGSTOP) while iperf3 runs: the
data plane is the kernel's and wireguard-go's, and a paused daemon neither repairs the
baseline's deleted table (drift) nor adds its periodic work to one case only. Figures: median
and p95 of each case (Mbit/s); against the baseline (the last case), the ratio of medians and
the spread of the per-round ratios.

Run as root from the repo root:  .venv/bin/python bench/dataplane.py [--runs 7] [--seconds 5]
                                                                      [--only grants|exit] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from bench.nft_grants import state_with  # noqa: E402
from picell.constants import TABLE_NAME  # noqa: E402
from picell.firewall.render import grant_elements  # noqa: E402
from tests.netns import test_exit as exit_topo  # noqa: E402
from tests.netns.cells import Cell, cell_on_bridge  # noqa: E402
from tests.netns.harness import Netns, Topology, wait_until  # noqa: E402

PORT = 5201
GRANTS = 1000


def iperf(client: Netns, host: str, seconds: int) -> float:
    """One TCP upload from `client` to `host`: the receiver's Mbit/s (first second omitted)."""
    proc = client.run(
        ["iperf3", "-c", host, "-p", str(PORT), "-t", str(seconds), "-O", "1", "-J"],
        check=False, timeout=seconds + 60,
    )  # fmt: skip
    out = json.loads(proc.stdout or "{}")
    if proc.returncode != 0 or "error" in out:
        raise RuntimeError(f"iperf3 to {host} failed: {out.get('error')} {proc.stderr}")
    return float(out["end"]["sum_received"]["bits_per_second"]) / 1e6


@contextmanager
def paused(cells: list[Cell]) -> Iterator[None]:
    pids = [c.proc.pid for c in cells if c.proc is not None]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def alternate(cases: dict[str, Callable[[], float]], runs: int) -> dict[str, Any]:
    """Run every case once a round, the order rotated each round; the last case is the
    baseline: each other case's ratio of medians to it, and the spread of its per-round ratio."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for i in range(runs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            samples[name].append(cases[name]())
    base = names[-1]
    out: dict[str, Any] = {f"{name}_mbit_s": quantiles(s) for name, s in samples.items()}
    out["samples_mbit_s"] = samples
    for name in names[:-1]:
        ratios = [a / b for a, b in zip(samples[name], samples[base], strict=True)]
        out[f"{name}_over_{base}"] = {
            "ratio_of_medians": statistics.median(samples[name]) / statistics.median(samples[base]),
            "per_round_median": statistics.median(ratios), "per_round_min": min(ratios),
            "per_round_max": max(ratios), "rounds_below_1": sum(r < 1 for r in ratios),
        }  # fmt: skip
    return out


def nft(ns: Netns, *args: str, stdin: str | None = None) -> str:
    return ns.run(["nft", *args], input=stdin).stdout


def grants(runs: int, seconds: int) -> dict[str, Any]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        phone = topo.add_ns("phone")
        topo.attach(phone, inet, "198.51.100.11/24")
        alpha = cell_on_bridge(topo, inet, "alpha", 1)
        beta = cell_on_bridge(topo, inet, "beta", 2)
        alpha.ns.popen(["iperf3", "-s", "-p", str(PORT)], name="iperf3-alpha")
        vip = alpha.cli("services", "add", "iperf", "--backend", f"127.0.0.1:{PORT}",
                        "--port", str(PORT))["vip"]  # fmt: skip
        alpha.cli("connect", beta.invite()["string"])
        phone.device(beta.add_device("phone"), hint="phone").up()
        alpha.cli("share", "beta", "iperf")
        wait_until(lambda: phone.tcp_connect(vip, PORT), 60, "beta's phone cannot reach iperf")
        assert not phone.tcp_connect(alpha.ip, PORT, timeout_s=1), "picell let the phone by"
        others = sorted(grant_elements(state_with(GRANTS))["grants_tcp"])[: GRANTS - 1]
        with paused([alpha, beta]):
            element_list = f"inet {TABLE_NAME} grants_tcp {{ {', '.join(others)} }}\n"
            nft(alpha.ns, "-f", "-", stdin=f"add element {element_list}")
            listed = json.loads(nft(alpha.ns, "-j", "list", "set", "inet", TABLE_NAME,
                                    "grants_tcp"))  # fmt: skip
            loaded = next(x["set"] for x in listed["nftables"] if "set" in x).get("elem", [])
            assert len(loaded) == GRANTS, f"{len(loaded)} grants in alpha's set"
            saved = {c.name: nft(c.ns, "list", "table", "inet", TABLE_NAME) for c in (alpha, beta)}

            def raw() -> float:
                for c in (alpha, beta):
                    nft(c.ns, "delete", "table", "inet", TABLE_NAME)
                try:
                    return iperf(phone, alpha.ip, seconds)
                finally:
                    for c in (alpha, beta):
                        nft(c.ns, "-f", "-", stdin=saved[c.name])

            def one_grant() -> float:  # the same table with beta's grant only
                nft(alpha.ns, "-f", "-", stdin=f"delete element {element_list}")
                try:
                    return iperf(phone, vip, seconds)
                finally:
                    nft(alpha.ns, "-f", "-", stdin=f"add element {element_list}")

            result = alternate(
                {
                    "picell_1000_grants": lambda: iperf(phone, vip, seconds),
                    "picell_1_grant": one_grant,
                    "raw_wireguard": raw,
                },
                runs,
            )
            after = nft(alpha.ns, "list", "table", "inet", TABLE_NAME)
            assert after.count(" . ") == saved[alpha.name].count(" . "), "grants not restored"
    result["grants"] = GRANTS
    return result


def exit_relay(runs: int, seconds: int) -> dict[str, Any]:
    gen = exit_topo.world._get_wrapped_function()()  # type: ignore[attr-defined]
    world = next(gen)
    try:
        exit_topo.routed._get_wrapped_function()(world)  # type: ignore[attr-defined]
        world.inet.popen(["iperf3", "-s", "-B", exit_topo.ORACLE, "-p", str(PORT)],
                         name="iperf3-inet")  # fmt: skip
        for ns, cell in ((world.phone, "beta"), (world.pad, "alpha")):
            exit_topo.leaves_through(ns, world, cell, 60, f"{ns.role} does not leave via {cell}")
        wait_until(lambda: world.pad.tcp_connect(exit_topo.ORACLE, PORT), 30, "no iperf3 server")
        with paused([world.alpha, world.beta, world.charlie]):
            result = alternate(
                {
                    "via_beta_exit": lambda: iperf(world.phone, exit_topo.ORACLE, seconds),
                    "direct_full_tunnel": lambda: iperf(world.pad, exit_topo.ORACLE, seconds),
                },
                runs,
            )
        # the relay was the path all along: the oracle still sees beta for the phone
        assert exit_topo.exit_of(world, world.phone, "after") == exit_topo.UPLINK["beta"]
    finally:
        try:
            next(gen)
        except StopIteration:
            pass
    return result


def machine() -> dict[str, Any]:
    def out(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()

    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                  .splitlines() if ln.startswith("model name")), "?")  # fmt: skip
    return {"cpu": model, "cores": os.cpu_count(), "kernel": out(["uname", "-r"]),
            "iperf3": out(["iperf3", "--version"]).splitlines()[0],
            "load_before": os.getloadavg()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--only", choices=["grants", "exit"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": machine()}
    t0 = time.monotonic()
    if args.only in (None, "grants"):
        result["grants"] = grants(args.runs, args.seconds)
        result["grants"]["load_after"] = os.getloadavg()
    if args.only in (None, "exit"):
        result["exit"] = exit_relay(args.runs, args.seconds)
        result["exit"]["load_after"] = os.getloadavg()
    result["wall_s"] = time.monotonic() - t0
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(json.dumps(result["machine"]))
    for part in ("grants", "exit"):
        if part not in result:
            continue
        r = result[part]
        print(f"\n{part}:  {'case':<22} {'median Mbit/s':>14} {'p95':>8}   (n)")
        for key, q in r.items():
            if key.endswith("_mbit_s") and key != "samples_mbit_s":
                print(f"{'':8}{key[:-7]:<22} {q['median']:>14.1f} {q['p95']:>8.1f}   ({q['n']})")
        for key, q in r.items():
            if "_over_" in key:
                print(
                    f"{'':8}{key}: ratio of medians {q['ratio_of_medians']:.3f}; per round: "
                    f"median {q['per_round_median']:.3f}, min {q['per_round_min']:.3f}, "
                    f"max {q['per_round_max']:.3f}, below 1 in {q['rounds_below_1']}"
                )
        print(f"{'':8}load after {r['load_after']}")


if __name__ == "__main__":
    main()
