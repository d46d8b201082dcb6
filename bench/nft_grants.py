"""nftables cost of per-link grants: the whole table with 1,000 and 10,000 grants across 50
links (one `nft -f` transaction each), against one grant changed as a set-element delta.

Inside a scratch network namespace, with the table picell renders (`render_ruleset`) for a cell
with 50 linked cells and N grants (N/50 services shared with each link), and the delta picell
applies when only grants change (`render_grant_delta`, one `nft -f -`). Baselines in the same
run: the same table with no grants at all, and each size without the grant sets' per-element
counters (what `cells` and /metrics read per share since issue 15), so their cost shows.

Run as root from the repo root:  .venv/bin/python bench/nft_grants.py [--runs 15] [--json]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._netns import run_in_netns, scratch_netns  # noqa: E402
from bench._stats import quantiles  # noqa: E402
from picell.firewall.apply import apply_grant_delta, apply_ruleset, observe_table  # noqa: E402
from picell.firewall.render import grant_elements, render_grant_delta, render_ruleset  # noqa: E402
from picell.state import State, build_state  # noqa: E402
from picell.store.cell import Cell  # noqa: E402
from picell.store.links import Link, LinkIdentity, LinkState, OwnerChoices, Share  # noqa: E402
from picell.store.services import Service  # noqa: E402
from picell.system.run import Runner  # noqa: E402
from picell.wireguard import keys  # noqa: E402

LINKS = 50


def state_with(grants: int) -> State:
    per_link = grants // LINKS
    cell = Cell(
        name="bench", domain="bench.test", address=ipaddress.IPv4Interface("10.64.0.1/16"),
        listen_port=51820, endpoint="198.51.100.1:51820", private_key=keys.generate_private(),
        interface="pcbn0", pair_port=51821, mesh_port=3000, uplink=None,
        mesh_range=ipaddress.IPv4Network("10.0.0.0/8"), upstreams=(),
    )  # fmt: skip
    services = [
        Service(f"s{i}", i + 1, ipaddress.IPv4Address("127.0.0.1"), 10000 + i, "tcp", 80)
        for i in range(max(per_link, 1))
    ]
    shared = tuple(s.name for s in services[:per_link])
    links = [
        Link(
            f"l{j}",
            keys.public_from_private(keys.generate_private()),
            LinkIdentity(
                "198.51.100.9:1",
                ipaddress.IPv4Network(f"10.{100 + j}.0.0/24"),
                ipaddress.IPv4Address(f"10.{100 + j}.0.1"),
                f"l{j}.test",
            ),
            state=LinkState.LINKED,
            choices=OwnerChoices(tuple(Share(n) for n in shared)),
        )
        for j in range(LINKS)
    ]
    return build_state(cell, [], services, (), links)


def inner(runs: int, sizes: list[int]) -> dict[str, Any]:
    runner = Runner()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ruleset.nft"
        for n, counters in [(0, True), *((m, c) for m in sizes for c in (False, True))]:
            state = state_with(n)
            text, _ = render_ruleset(state)
            if not counters:  # the baseline: grant sets without per-element counters
                text = text.replace("\t\tflags interval\n\t\tcounter\n", "\t\tflags interval\n")
            full = []
            for _ in range(runs):
                subprocess.run(["nft", "flush", "ruleset"], check=True)
                t0 = time.perf_counter()
                apply_ruleset(runner, text, path)
                full.append(time.perf_counter() - t0)
            observed = observe_table(runner)
            assert observed is not None and observed.grants == grant_elements(state), "mismatch"
            entry: dict[str, Any] = {"grants": len(state.grants), "counters": counters,
                                     "full_table_s": quantiles(full)}  # fmt: skip
            if n:
                have = grant_elements(state)
                extra = "10.200.0.0/24 . 10.64.255.254 . 80"
                add = {k: (v | {extra} if k == "grants_tcp" else v) for k, v in have.items()}
                deltas = []
                for _ in range(runs):
                    for want, base in ((add, have), (have, add)):
                        lines = render_grant_delta(base, want)
                        t0 = time.perf_counter()
                        apply_grant_delta(runner, lines)
                        deltas.append(time.perf_counter() - t0)
                entry["one_grant_delta_s"] = quantiles(deltas)
                entry["full_over_delta"] = statistics.median(full) / statistics.median(deltas)
            out[f"{n}{'' if counters else ' no counters'}"] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.inner:
        Path(args.inner).write_text(json.dumps(inner(args.runs, sizes)))
        return
    with scratch_netns("pcbn") as ns, tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "out.json"
        argv = [sys.executable, __file__, "--inner", str(result_file), "--runs", str(args.runs)]
        if run_in_netns(ns, [*argv, "--sizes", args.sizes]) != 0:
            sys.exit("the benchmark failed inside its namespace")
        result = json.loads(result_file.read_text())
    if args.json:
        print(json.dumps(result, indent=2))
        return
    head = f"{'grants':>7} {'counters':>8} {'full table ms med/p95':>22}"
    print(f"{head} {'one-grant delta ms med/p95':>27} {'ratio':>7}")
    for entry in result.values():
        full, delta = entry["full_table_s"], entry.get("one_grant_delta_s")
        d = f"{delta['median'] * 1000:.2f}/{delta['p95'] * 1000:.2f}" if delta else "-"
        ratio = f"{entry['full_over_delta']:.1f}" if delta else "-"
        print(f"{entry['grants']:>7} {'yes' if entry['counters'] else 'no':>8}"
              f" {full['median'] * 1000:>11.1f}/{full['p95'] * 1000:<10.1f}"
              f" {d:>27} {ratio:>7}")  # fmt: skip


if __name__ == "__main__":
    main()
