"""`picell status` during a connection flood on the pairing port, against the same command
without a flood (baseline, same run, same daemon).

In namespaces (tests/netns harness): cell alpha runs `picell serve` under
`prlimit --nofile=1024:HARD` (systemd's default soft limit), and an "internet" host holds
1,500 idle TCP connections to alpha's pairing port (tests/netns/flooder.py), re-opening each one
alpha closes at up to REOPEN per second. Each sample is one whole `picell status --json` (the
CLI's own start-up included), run back to back; the baseline is sampled before and after the
flood (half each), so that a change in the machine's load during the run weighs on both.

Run as root from the repo root:
    .venv/bin/python bench/flood.py [--samples 30] [--flood-s 40] [--reopen 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from tests.netns.cells import Cell  # noqa: E402
from tests.netns.harness import PYTHON, Topology, wait_until  # noqa: E402

FLOODER = str(Path(__file__).resolve().parent.parent / "tests" / "netns" / "flooder.py")


def _status_s(alpha: Cell) -> float:
    t0 = time.perf_counter()
    proc = alpha.run("status", "--json", check=False, timeout=120)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"picell status failed: {proc.stdout}{proc.stderr}")
    return elapsed


def run(samples: int, flood_s: float, reopen: float, connections: int) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with Topology() as topo:
        inet = topo.bridge("inet")
        alpha_ns = topo.add_ns("alpha")
        internet = topo.add_ns("internet")
        topo.attach(alpha_ns, inet, "198.51.100.1/24")
        topo.attach(internet, inet, "198.51.100.9/24")
        alpha = Cell(topo, alpha_ns, "alpha", "alpha.test", "10.61.0.1/24", "198.51.100.1:51820")
        alpha.init()
        alpha.start(nofile=(1024, hard))
        _status_s(alpha)  # warm the page cache
        baseline = [_status_s(alpha) for _ in range(samples // 2)]

        report = topo.workdir / "flood.json"
        flood = internet.popen(
            [PYTHON, FLOODER, "198.51.100.1", "51821", str(connections), str(flood_s),
             str(reopen), str(report)], name="flooder",
        )  # fmt: skip
        wait_until(
            lambda: "pairing listener: closed a new connection" in alpha.log(), 30, "no shedding"
        )
        during: list[float] = []
        while flood.running():
            during.append(_status_s(alpha))
        wait_until(report.exists, 30, "the flooder wrote no report")
        stats = json.loads(report.read_text())
        baseline += [_status_s(alpha) for _ in range(samples - samples // 2)]
        log_lines = len(alpha.log().splitlines())
    return {
        "connections": connections,
        "flood_s": flood_s,
        "reopen_per_s": reopen,
        "baseline_status_s": quantiles(baseline),
        "flood_status_s": quantiles(during),
        "ratio_median_flood_over_baseline": statistics.median(during) / statistics.median(baseline),
        "flooder": stats,
        "daemon_log_lines": log_lines,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--flood-s", type=float, default=40.0)
    parser.add_argument("--reopen", type=float, default=300.0)
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.samples, args.flood_s, args.reopen, args.connections)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'figure':<28} {'median ms':>10} {'p95 ms':>10}   (n)")
    for key in ("baseline_status_s", "flood_status_s"):
        q = result[key]
        print(f"{key:<28} {q['median'] * 1000:>10.1f} {q['p95'] * 1000:>10.1f}   ({q['n']})")
    print(f"flood / baseline (median): {result['ratio_median_flood_over_baseline']:.2f}")
    print(f"flooder: {result['flooder']}; daemon log: {result['daemon_log_lines']} lines")


if __name__ == "__main__":
    main()
