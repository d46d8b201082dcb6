"""The long runs of the fault and crash suites (issue 14), with their timings.

Same world, faults and invariants as tests/netns/test_faults.py (tests/netns/faultworld.py): two
real cells behind a router namespace, one device each (wg-quick), both on 10.61.0.0/24, so their
link is translated (each presents the other at a mapped /24 of 10/8, and the mapping must not
move). Two runs, one topology:
- `--cycles` random cycles (default 100): a change (share, unshare, device add) made while one
  fault is on (nft loss 1-30 %, a 50-500 ms delay relay, a partition, kill -9 and restart of a
  daemon, a ±10 min clock skew), then the fault healed and every invariant waited for;
- `--changes` changes on alpha (default 100), `--kills` of them (default 30) with alpha's daemon
  killed (SIGKILL) at a random point; after each kill: integrity_check, restart, one reconcile
  converges, the kernel matches the store, no acknowledged change is lost, and no name of an
  unacknowledged change resolves.
Figures: cycles passed; time to converge after healing each fault kind (median, p95: from the
heal to every invariant observed, one poll of all of them takes about a second); for crashes,
restart to every check passed. This kernel has no netem: see tests/netns/faults.py.

Run as root from the repo root:
    .venv/bin/python bench/faults.py [--seed 14] [--cycles 100] [--changes 100] [--kills 30]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from tests.netns.faultworld import (  # noqa: E402
    FAULT_KINDS,
    build,
    check_converged,
    kill_schedule,
    run_crash,
    run_cycle,
)
from tests.netns.harness import Topology  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no line per cycle")
    args = parser.parse_args()
    started = time.monotonic()

    def log(line: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - started:7.1f}] {line}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {"seed": args.seed}
    with Topology() as topo:
        world = build(topo)
        # baseline: the same wait on a settled world (no change, no fault): the floor of every
        # figure below, one poll of every invariant
        report["baseline_converge_s"] = quantiles([check_converged(world) for _ in range(5)])
        rng = random.Random(args.seed)
        cycles = []
        try:
            for n in range(1, args.cycles + 1):
                cycles.append(run_cycle(world, rng, n, log))
        except Exception:  # noqa: BLE001 - a broken invariant ends the run and is reported
            report["cycle_failure"] = traceback.format_exc(limit=3)
        report["cycles"] = {"asked": args.cycles, "passed": len(cycles)}
        report["converge_s"] = {
            kind: quantiles([c.converge_s for c in cycles if c.fault == kind])
            for kind in FAULT_KINDS
            if any(c.fault == kind for c in cycles)
        }
        crashes = []
        if "cycle_failure" not in report:
            rng = random.Random(args.seed + 1)
            killed = kill_schedule(rng, args.changes, args.kills)
            try:
                for n in range(args.changes):
                    crashes.append(run_crash(world, rng, n, n in killed, log))
                check_converged(world)
            except Exception:  # noqa: BLE001
                report["crash_failure"] = traceback.format_exc(limit=3)
        kills = [c for c in crashes if c.killed]
        report["crashes"] = {
            "changes_asked": args.changes,
            "changes_passed": len(crashes),
            "kills": len(kills),
            "killed_acknowledged": sum(c.acknowledged for c in kills),
            "recover_s": quantiles([c.recover_s for c in kills]) if kills else None,
        }
    report["wall_s"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        c = report["cycles"]
        print(f"seed {args.seed}: {c['passed']}/{c['asked']} cycles passed")
        q = report["baseline_converge_s"]
        print(f"  {'baseline':10s} converge median {q['median']:.2f} s  p95 {q['p95']:.2f} s"
              f"  n={q['n']} (settled: no change, no fault)")  # fmt: skip
        for kind, q in report["converge_s"].items():
            print(f"  {kind:10s} converge median {q['median']:.2f} s  p95 {q['p95']:.2f} s"
                  f"  n={q['n']}")  # fmt: skip
        k = report["crashes"]
        print(f"crashes: {k['changes_passed']}/{k['changes_asked']} changes passed, "
              f"{k['kills']} kills ({k['killed_acknowledged']} of them after the ack)")  # fmt: skip
        if k["recover_s"]:
            q = k["recover_s"]
            print(f"  restart to all checks passed: median {q['median']:.2f} s  p95 "
                  f"{q['p95']:.2f} s")  # fmt: skip
        for key in ("cycle_failure", "crash_failure"):
            if key in report:
                print(f"{key}:\n{report[key]}")
        print(f"wall time {report['wall_s']} s")
    return 1 if "cycle_failure" in report or "crash_failure" in report else 0


if __name__ == "__main__":
    sys.exit(main())
