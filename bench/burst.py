"""A burst of concurrent owner changes: what it costs, and whether readers wait behind it.

In namespaces (tests/netns harness): cells alpha and beta linked on a test bridge; alpha has
100 services. Each round sends 100 changes at once as 100 concurrent requests on alpha's admin
socket (one connection each): a share of each service to beta, then an unshare of each. Per
round it prints:
- how many nft transactions, reconciles and pushes alpha made (from `/api/status`),
- how long until every request was answered (each is answered once applied), and until beta's
  view equals alpha's choice,
- the latency of `GET /api/status` and `GET /api/cells` during the burst, against the same
  reads on the idle cell in the same run (readers read a snapshot: they must not wait).
It also times the batch form, `POST /api/cells/beta/shares` with all 100 services, one request.

Run as root from the repo root:  .venv/bin/python bench/burst.py [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from bench.share import api  # noqa: E402
from tests.netns.cells import Cell, cell_on_bridge  # noqa: E402
from tests.netns.harness import Topology, wait_until  # noqa: E402

N = 100


def _counts(cell: Cell) -> dict[str, int]:
    status = api(cell).get("/api/status").json()
    applied = status.get("applied", {})
    return {
        "nft": int(applied.get("nft grant delta", 0)) + int(applied.get("nft table", 0)),
        "pushes": int(status["pushes_sent"]),
    }


class Reader:
    """Reads `/api/status` and `/api/cells` back to back on a connection of its own until
    stopped; keeps each read's latency."""

    def __init__(self, cell: Cell) -> None:
        self.client = api(cell)
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in ("/api/status", "/api/cells"):
                t0 = time.monotonic()
                self.client.get(path).raise_for_status()
                self.samples.append(time.monotonic() - t0)

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _round(alpha: Cell, beta: Cell, method: str, want: set[str]) -> dict[str, Any]:
    clients = [api(alpha) for _ in range(N)]
    before = _counts(alpha)
    start = threading.Barrier(N + 1)

    def one(i: int) -> float:
        start.wait()
        resp = clients[i].request(method, f"/api/cells/beta/shares/s{i}")
        resp.raise_for_status()
        return time.monotonic()

    with ThreadPoolExecutor(max_workers=N) as pool, Reader(alpha) as reader:
        futures = [pool.submit(one, i) for i in range(N)]
        start.wait()
        t0 = time.monotonic()
        answered = [f.result() for f in futures]
    all_answered = max(answered) - t0

    def matches() -> bool:
        return {s["name"] for s in beta.links()["alpha"]["outbound"]} == want

    wait_until(matches, 60, "beta's view never matched alpha's choice")
    settled = time.monotonic() - t0
    after = _counts(alpha)
    return {
        "changes": N,
        "all_answered_s": all_answered,
        "answer_s": quantiles([a - t0 for a in answered]),
        "beta_matches_s": settled,
        "nft_transactions": after["nft"] - before["nft"],
        "pushes": after["pushes"] - before["pushes"],
        "reads_during_burst_s": quantiles(reader.samples),
    }


def run(rounds: int) -> dict[str, Any]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        alpha = cell_on_bridge(topo, inet, "alpha", 1)
        beta = cell_on_bridge(topo, inet, "beta", 2)
        a_api = api(alpha)
        for i in range(N):
            body = {"name": f"s{i}", "backend": f"127.0.0.1:{9000 + i}", "port": 80}
            a_api.post("/api/services", json=body).raise_for_status()
        alpha.cli("connect", beta.invite()["string"])
        wait_until(lambda: "alpha" in beta.links(), 20, "no link")
        idle: list[float] = []
        for _ in range(100):
            for path in ("/api/status", "/api/cells"):
                t0 = time.monotonic()
                a_api.get(path).raise_for_status()
                idle.append(time.monotonic() - t0)
        everything = {f"s{i}" for i in range(N)}
        shares, unshares, batch = [], [], []
        for _ in range(rounds):
            shares.append(_round(alpha, beta, "POST", everything))
            unshares.append(_round(alpha, beta, "DELETE", set()))
            before = _counts(alpha)
            t0 = time.monotonic()
            body = {"services": sorted(everything)}
            a_api.post("/api/cells/beta/shares", json=body).raise_for_status()
            answered = time.monotonic() - t0
            after = _counts(alpha)
            batch.append({"answered_s": answered, "nft_transactions": after["nft"] - before["nft"]})
            a_api.put("/api/cells/beta/permissions", json={"services": []}).raise_for_status()
            wait_until(lambda: not beta.links()["alpha"]["outbound"], 60, "unshare all")
    return {
        "reads_idle_s": quantiles(idle),
        "share_rounds": shares,
        "unshare_rounds": unshares,
        "batch_request": batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    idle = result["reads_idle_s"]
    print(f"reads, idle cell: median {idle['median'] * 1000:.1f} ms, p95 {idle['p95'] * 1000:.1f}")
    for kind in ("share_rounds", "unshare_rounds"):
        for r in result[kind]:
            reads = r["reads_during_burst_s"]
            print(
                f"{kind[:-7]:>7}: {r['changes']} concurrent, all answered in"
                f" {r['all_answered_s'] * 1000:.0f} ms (median answer"
                f" {r['answer_s']['median'] * 1000:.0f} ms), beta matches at"
                f" {r['beta_matches_s'] * 1000:.0f} ms; nft transactions {r['nft_transactions']},"
                f" pushes {r['pushes']}; reads during it: median"
                f" {reads['median'] * 1000:.1f} ms, p95 {reads['p95'] * 1000:.1f} ms"
                f" (ratio to idle {reads['median'] / idle['median']:.2f})"
            )
    for b in result["batch_request"]:
        print(f"batch request of {N}: answered in {b['answered_s'] * 1000:.0f} ms,"
              f" nft transactions {b['nft_transactions']}")  # fmt: skip


if __name__ == "__main__":
    main()
