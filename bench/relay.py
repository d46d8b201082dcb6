"""Introductions and the relay through a mutually linked cell: timings between real cells
(issue 12; tests/netns/test_relay.py's topology: alpha and gamma each in a home behind a
masquerading router with no forward, beta public, both linked with beta; alpha's phone imported
alpha's config with wg-quick).

Each run builds two fresh topologies (so the figures are for a pair that never linked before);
each figure runs from the start of the first `connect` command (the CLI, as an owner types it):
- baseline: `connect <beta's invite>` on alpha (beta is public: pairing answers) until both show
  the link `linked`; then beta shares a web service with alpha, until alpha's phone gets its page;
- introduced: alpha and gamma each import the other's invite (both wait: the pairing ports are
  unreachable) until both show `linked` (beta introduces them: a hole punch), then gamma shares
  its web service, until alpha's phone gets its page;
- relayed: the switch drops everything between the two routers (two carrier-grade NATs); beta
  offers its relay to both, alpha and gamma `connect --via beta`, until linked and the page;
- withdraw: a prober in the phone asks gamma's page every 10 ms (100 ms timeout) over the
  relayed link; beta's admin API withdraws the relay for gamma, until the last answer (fail
  closed); then offers it again, until the first answer;
- *_again: the same pair, `disconnect`ed (until neither side holds it) and linked again at once
  in the same topology (what beta kept from the first time may help or hinder).
The share command (a CLI start-up, ~0.3 s) is part of each "page" figure; state is read from the
cells' stores directly every 20 ms (a CLI call would take ~0.3 s), which bounds the resolution.

Run as root from the repo root:  .venv/bin/python bench/relay.py [--n 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from tests.netns import test_relay as topo_module  # noqa: E402
from tests.netns.cells import Cell  # noqa: E402
from tests.netns.harness import Netns, Topology, wait_until  # noqa: E402

POLL_S = 0.02
BETA_WEB = "10.62.0.254"  # a service's address: the cell's network's highest host
GAMMA_WEB = "10.63.0.254"

PROBER = r"""
import sys, time, urllib.request
url, out = sys.argv[1], sys.argv[2]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with open(out, "a", buffering=1) as f:
    while True:
        t = time.monotonic()
        try:
            with opener.open(url, timeout=0.1) as r:
                ok = "ok" if r.read() else "-"
        except Exception:
            ok = "-"
        f.write("%f %s\n" % (t, ok))
        time.sleep(0.01)
"""


class Prober:
    """Asks `url` from `ns` every 10 ms; each line: monotonic start time, "ok" or "-"."""

    def __init__(self, ns: Netns, url: str, out: Path) -> None:
        self.out = out
        ns.popen([sys.executable, "-I", "-c", PROBER, url, str(out)], name="relay-prober")

    def samples(self) -> list[tuple[float, bool]]:
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [
            (float(a), b == "ok") for a, b in (ln.split() for ln in lines if len(ln.split()) == 2)
        ]

    def first_ok(self, after: float) -> float | None:
        return next((t for t, ok in self.samples() if t >= after and ok), None)

    def last_ok(self, after: float) -> float | None:
        hits = [t for t, ok in self.samples() if t >= after and ok]
        return hits[-1] if hits else None

    def failing_since(self, since: float, span: float) -> bool:
        """True once every probe started in the last `span` s (all after `since`) failed."""
        recent = [(t, ok) for t, ok in self.samples() if t >= since]
        if not recent or recent[-1][0] - span < since:
            return False
        return not any(ok for t, ok in recent if t >= recent[-1][0] - span)


def api(cell: Cell) -> httpx.Client:
    transport = httpx.HTTPTransport(uds=str(cell.data_dir / "admin.sock"))
    return httpx.Client(transport=transport, base_url="http://picell", timeout=30)


def state(cell: Cell, other: str) -> str | None:
    """The link's state in `cell`'s store (read-only, no CLI start-up)."""
    with sqlite3.connect(f"file:{cell.data_dir / 'picell.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT state FROM links WHERE name = ?", (other,)).fetchone()
    return None if row is None else str(row[0])


def _until(check: Callable[[], Any], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"{what} (not within {timeout_s:g} s)")
        time.sleep(POLL_S)
    return time.monotonic()


def both_linked(a: Cell, b: Cell) -> Callable[[], bool]:
    return lambda: state(a, b.name) == "linked" and state(b, a.name) == "linked"


def page(phone: Netns, ip: str, body: str) -> Callable[[], bool]:
    return lambda: phone.http_get(f"http://{ip}/", timeout_s=0.5) == body


def unlink(a: Cell, b: Cell) -> None:
    """`disconnect` on `a`, until neither side holds the link."""
    a.cli("disconnect", b.name)
    _until(lambda: state(a, b.name) is None and state(b, a.name) is None, 60,
           f"{a.name} and {b.name} still hold their link")  # fmt: skip


def _pair(
    a: Cell, b: Cell, phone: Netns, out: dict[str, list[float]], kind: str, *via: str
) -> float:
    """Each imports the other's invite (`--via` if given); the time until both show the link
    `linked` and until alpha's phone gets b's shared page. Returns the start."""
    b_inv, a_inv = b.invite()["string"], a.invite()["string"]
    t0 = time.monotonic()
    first = a.cli("connect", b_inv, *via)
    b.cli("connect", a_inv, *via)
    out[f"{kind}_commands_s"].append(time.monotonic() - t0)
    assert first["state"] == "waiting", first  # no pairing: the routers drop it
    out[f"{kind}_linked_s"].append(_until(both_linked(a, b), 300, f"no {kind} link") - t0)
    b.cli("share", "alpha", "web")
    out[f"{kind}_page_s"].append(_until(page(phone, GAMMA_WEB, "gamma web"), 60, "no page") - t0)
    return t0


def _world(topo: Topology, blocked: bool) -> tuple[topo_module.World, Netns]:
    world = topo_module.build(topo, blocked=blocked)
    assert world.alpha.phone is not None
    return world, world.alpha.phone


def _open_world(topo: Topology, out: dict[str, list[float]], paths: list[str]) -> None:
    """Baseline, then a first introduction, then the same pair linked again."""
    t0 = time.monotonic()
    world, phone = _world(topo, blocked=False)
    out["setup_s"].append(time.monotonic() - t0)
    alpha, beta, gamma = world.alpha.cell, world.beta, world.gamma.cell
    beta.ns.serve_http("127.0.0.1", 8000, "beta web")
    beta.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
    # (1) baseline: alpha (behind its router) -> beta (public): pairing answers
    unlink(alpha, beta)
    invite = beta.invite()["string"]
    t0 = time.monotonic()
    alpha.cli("connect", invite)
    out["baseline_linked_s"].append(_until(both_linked(alpha, beta), 60, "no link") - t0)
    beta.cli("share", "alpha", "web")
    out["baseline_page_s"].append(
        _until(page(phone, BETA_WEB, "beta web"), 60, "no page from beta") - t0
    )
    # (2) introduced by beta: the first time, then again (beta's introduction kept)
    _pair(alpha, gamma, phone, out, "introduced")
    paths.append(alpha.links()["gamma"]["path"])
    unlink(alpha, gamma)
    _pair(alpha, gamma, phone, out, "introduced_again")


def _blocked_world(topo: Topology, out: dict[str, list[float]], paths: list[str]) -> None:
    """No path between the routers: a first relayed link, its withdrawal and re-offer, then the
    same pair linked again through the relay."""
    t0 = time.monotonic()
    world, phone = _world(topo, blocked=True)
    out["setup_s"].append(time.monotonic() - t0)
    alpha, beta, gamma = world.alpha.cell, world.beta, world.gamma.cell
    b_api = api(beta)
    for cell in (alpha, gamma):
        b_api.put(f"/api/cells/{cell.name}/relay-offer", json={"offered": True}).raise_for_status()
        wait_until(lambda c=cell: c.links()["beta"]["remote_relay_offered"], 60,
                   f"{cell.name} does not see beta's relay offer")  # fmt: skip
    prober = Prober(phone, f"http://{GAMMA_WEB}/", topo.workdir / "relay-probe")
    # (3) relayed by beta
    t0 = _pair(alpha, gamma, phone, out, "relayed", "--via", "beta")
    paths.append(alpha.links()["gamma"]["path"])
    _until(lambda: prober.first_ok(t0), 30, "the prober gets no page")
    # (4) beta withdraws the relay for gamma, then offers it again
    t1 = time.monotonic()
    b_api.put("/api/cells/gamma/relay-offer", json={"offered": False}).raise_for_status()
    _until(lambda: prober.failing_since(t1, 2.0), 30, "the relay did not close")
    out["withdraw_until_closed_s"].append(max(0.0, (prober.last_ok(t1) or t1) - t1))
    t2 = time.monotonic()
    b_api.put("/api/cells/gamma/relay-offer", json={"offered": True}).raise_for_status()
    out["reoffer_until_open_s"].append(
        _until(lambda: prober.first_ok(t2), 300, "the relay did not reopen") - t2
    )
    unlink(alpha, gamma)
    _pair(alpha, gamma, phone, out, "relayed_again", "--via", "beta")


def run(n: int) -> dict[str, Any]:
    out: dict[str, list[float]] = {k: [] for k in (
        "baseline_linked_s", "baseline_page_s",
        "introduced_commands_s", "introduced_linked_s", "introduced_page_s",
        "introduced_again_commands_s", "introduced_again_linked_s", "introduced_again_page_s",
        "relayed_commands_s", "relayed_linked_s", "relayed_page_s",
        "withdraw_until_closed_s", "reoffer_until_open_s",
        "relayed_again_commands_s", "relayed_again_linked_s", "relayed_again_page_s",
        "setup_s")}  # fmt: skip
    paths: list[str] = []
    for _ in range(n):
        with Topology() as topo:
            _open_world(topo, out, paths)
        with Topology() as topo:
            _blocked_world(topo, out, paths)
    result: dict[str, Any] = {"n": n, "paths": paths}
    result.update({k: quantiles(v) for k, v in out.items()})
    return result


RATIOS = {  # figure -> its baseline (medians)
    f"{kind}_{what}_s": f"baseline_{what}_s"
    for kind in ("introduced", "introduced_again", "relayed", "relayed_again")
    for what in ("linked", "page")
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    result = run(args.n)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'figure':<30} {'median ms':>10} {'p95 ms':>10} {'x baseline':>11}   (n)")
    for key, q in result.items():
        if not isinstance(q, dict):
            continue
        base = result[RATIOS[key]]["median"] if key in RATIOS else None
        ratio = f"{q['median'] / base:>11.2f}" if base else f"{'-':>11}"
        print(f"{key:<30} {q['median'] * 1000:>10.1f} {q['p95'] * 1000:>10.1f} {ratio}   "
              f"({q['n']})")  # fmt: skip
    print(f"alpha's path to gamma: {', '.join(result['paths'])}")
    print(f"wall time: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
