"""Exit relay timings between real cells (tests/netns/test_exit.py's topology).

alpha's phone is routed via beta, its laptop via charlie, its pad uses alpha as home exit; an
"internet" oracle answers each HTTP request with the caller's source address. A prober in the
phone asks it every 10 ms (300 ms timeout) and records who answered.
- switch: `route-via phone charlie|beta` (admin API) until the first answer from the new exit;
  baseline in the same run: `route-via phone none` (alpha's own uplink, no other cell involved)
  until the first answer from alpha;
- withdraw: `exit-offer alpha off` on beta until the last answer through beta (fail closed),
  then `on` until the first answer through beta again;
- exit down: beta's daemon stopped (tunnels gone) and started again, until the first answer.
Never once may the oracle see alpha's address for the phone while it is routed via a cell.

Run as root from the repo root:  .venv/bin/python bench/exit.py [--n 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from tests.netns import test_exit as topo_module  # noqa: E402
from tests.netns.cells import Cell  # noqa: E402
from tests.netns.harness import Netns, wait_until  # noqa: E402

PROBER = r"""
import sys, time, urllib.request
url, out = sys.argv[1], sys.argv[2]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with open(out, "a", buffering=1) as f:
    n = 0
    while True:
        n += 1
        t = time.monotonic()
        try:
            with opener.open("%s/bench-%d" % (url, n), timeout=0.3) as r:
                who = r.read().decode()
        except Exception:
            who = "-"
        f.write("%f %s\n" % (t, who))
        time.sleep(0.01)
"""


class Prober:
    def __init__(self, ns: Netns, out: Path) -> None:
        self.out = out
        ns.popen([sys.executable, "-I", "-c", PROBER, f"http://{topo_module.ORACLE}", str(out)],
                 name="exit-prober")  # fmt: skip

    def samples(self) -> list[tuple[float, str]]:
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [(float(a), b) for a, b in (ln.split() for ln in lines if len(ln.split()) == 2)]

    def first(self, who: str, after: float) -> float | None:
        return next((t for t, w in self.samples() if t >= after and w == who), None)

    def last(self, who: str, after: float) -> float | None:
        hits = [t for t, w in self.samples() if t >= after and w == who]
        return hits[-1] if hits else None


def api(cell: Cell) -> httpx.Client:
    transport = httpx.HTTPTransport(uds=str(cell.data_dir / "admin.sock"))
    return httpx.Client(transport=transport, base_url="http://picell", timeout=30)


def run(n: int, restarts: int) -> dict[str, Any]:
    up = topo_module.UPLINK
    gen = topo_module.world._get_wrapped_function()()  # type: ignore[attr-defined]
    world = next(gen)
    try:
        topo_module.routed._get_wrapped_function()(world)  # type: ignore[attr-defined]
        prober = Prober(world.phone, world.topo.workdir / "exit-probe")
        a_api, b_api = api(world.alpha), api(world.beta)

        def route(via: str | None, who: str) -> float:
            t0 = time.monotonic()
            a_api.put("/api/peers/phone/route-via", json={"via_cell": via}).raise_for_status()
            return wait_until(lambda: prober.first(who, t0), 30, f"no answer via {via}") - t0

        route("beta", up["beta"])
        switch, home = [], []
        home_windows = []  # while the phone is routed home on purpose (the baseline)
        for _ in range(n):
            switch.append(route("charlie", up["charlie"]))
            switch.append(route("beta", up["beta"]))
            h0 = time.monotonic()
            home.append(route(None, up["alpha"]))
            route("beta", up["beta"])
            home_windows.append((h0, time.monotonic()))
        closed, reopened = [], []
        for _ in range(n):
            t0 = time.monotonic()
            b_api.put("/api/cells/alpha/exit-offer", json={"offered": False}).raise_for_status()
            wait_until(lambda t=t0: any(w == "-" for s, w in prober.samples() if s > t + 0.4),
                       10, "the exit did not close")  # fmt: skip
            closed.append(max(0.0, (prober.last(up["beta"], t0) or t0) - t0))
            t1 = time.monotonic()
            b_api.put("/api/cells/alpha/exit-offer", json={"offered": True}).raise_for_status()
            reopened.append(
                wait_until(lambda t=t1: prober.first(up["beta"], t), 30, "no reopening") - t1
            )
        down_back = []
        for _ in range(restarts):
            world.beta.stop()
            t0 = time.monotonic()
            world.beta.start()
            b_api = api(world.beta)
            down_back.append(
                wait_until(lambda t=t0: prober.first(up["beta"], t), 90, "beta never came back")
                - t0
            )
        leaked = [
            t
            for t, w in prober.samples()
            if w == up["alpha"] and not any(a <= t <= b for a, b in home_windows)
        ]
    finally:
        try:
            next(gen)
        except StopIteration:
            pass
    return {
        "switch_to_other_cell_s": quantiles(switch),
        "switch_home_baseline_s": quantiles(home),
        "withdraw_until_closed_s": quantiles(closed),
        "reoffer_until_open_s": quantiles(reopened),
        "exit_restart_until_open_s": quantiles(down_back),
        "answers_from_alpha_while_routed": len(leaked),
        "probes": len(prober.samples()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.n, args.restarts)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    base = result["switch_home_baseline_s"]["median"]
    print(f"{'figure':<28} {'median ms':>10} {'p95 ms':>10} {'x baseline':>11}   (n)")
    for key, q in result.items():
        if not isinstance(q, dict):
            print(f"{key}: {q}")
        else:
            ratio = q["median"] / base if base else float("nan")
            print(f"{key:<28} {q['median'] * 1000:>10.1f} {q['p95'] * 1000:>10.1f} "
                  f"{ratio:>11.2f}   ({q['n']})")  # fmt: skip


if __name__ == "__main__":
    main()
