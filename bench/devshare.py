"""Device shares and dates (issue 15, part 2): how long an established flow outlives its share's
date, against an explicit unshare in the same run; and how soon a share with one device lets
that device in, against a share with the whole cell.

In namespaces (tests/netns/test_devshare.py's topology, reused): alpha and beta both on
10.60.0.0/24 (a translated link), beta's phone and laptop imported their configs with wg-quick,
beta publishes its devices to alpha.

1. end: a share of alpha's echo with beta/phone, dated 3 s ahead (or for good, then unshared:
   the baseline), and an echo session from the phone sending every 20 ms; the figure is the
   last reply's time minus the date (or minus the unshare request's start): how long the flow
   outlived its end. The timer (`mesh.expiry`) sleeps until the date; the unshare is one request.
2. open: share alpha's web with beta/phone (or with all of beta: the baseline) until the phone
   first connects, then unshare; bench/share.py's `Prober` connecting every 5 ms.
Cases alternate, the order swapped every sample.

Run as root from the repo root:  .venv/bin/python bench/devshare.py [--samples 10] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._stats import quantiles  # noqa: E402
from bench.share import Prober, api  # noqa: E402
from tests.netns.harness import Topology, wait_until  # noqa: E402
from tests.netns.test_devshare import World, build  # noqa: E402

INTERVAL_S = 0.02


def _share(w: World, service: str, device: str | None, until: float | None) -> None:
    body: dict[str, Any] = {"services": [service], "device": device}
    if until is not None:
        body["until"] = dt.datetime.fromtimestamp(until).astimezone().isoformat()
    with api(w.alpha) as client:
        client.post("/api/cells/beta/shares", json=body).raise_for_status()


def _unshare(w: World, service: str, device: str | None) -> None:
    with api(w.alpha) as client:
        params = {"device": device} if device else None
        client.delete(f"/api/cells/beta/shares/{service}", params=params).raise_for_status()


def end_after(w: World, echo: str, dated: bool) -> float:
    """Seconds the phone's echo flow outlived its share's end (date or unshare)."""
    ahead = 3.0
    wall, mono = time.time(), time.monotonic()
    _share(w, "echo", "phone", wall + ahead if dated else None)
    session = w.devices["phone"].tcp_echo_session(echo, 7, INTERVAL_S, wait_s=10)
    if dated:
        end = mono + ahead
    else:
        time.sleep(max(0.0, mono + ahead - time.monotonic()))
        end = time.monotonic()
        _unshare(w, "echo", "phone")
    wait_until(lambda: session.silent_for(1.0), 30, "the flow outlived its end")
    last = session.last_reply()
    session.stop()
    assert last is not None
    return last - end


def open_after(w: World, prober: Prober, device: str | None) -> float:
    t0 = time.monotonic()
    _share(w, "web", device, None)
    wait_until(lambda: prober.first_up_after(t0) is not None, 15, "the phone never connected")
    first = prober.first_up_after(t0)
    assert first is not None
    _unshare(w, "web", device)
    wait_until(prober.is_down, 15, "the grant stayed")
    return first - t0


def run(samples: int) -> dict[str, Any]:
    with Topology() as topo:
        w = build(topo)
        w.beta.cli("cells", "publish-devices", "alpha", "on")
        wait_until(lambda: w.alpha.links()["beta"]["devices"], 15, "beta publishes no devices")
        at = {}
        for svc in ("web", "echo"):  # where beta presents them (the phone has no grant yet)
            _share(w, svc, "laptop", None)
            wait_until(lambda s=svc: w.devices["phone"].dig(f"{s}.alpha.test"), 15, "no name")
            at[svc] = w.devices["phone"].dig(f"{svc}.alpha.test")[0]
            _unshare(w, svc, "laptop")
        target = at["web"]
        out: dict[str, list[float]] = {"dated": [], "unshared": [], "device": [], "cell": []}
        for i in range(samples):
            for dated in (True, False) if i % 2 == 0 else (False, True):
                out["dated" if dated else "unshared"].append(end_after(w, at["echo"], dated))
        prober = Prober(w.devices["phone"], target, 80, topo.workdir / "devshare-probe")
        wait_until(prober.is_down, 15, "the prober did not start")
        for i in range(samples):
            for device in ("phone", None) if i % 2 == 0 else (None, "phone"):
                out["device" if device else "cell"].append(open_after(w, prober, device))
    return {k: quantiles(v) for k, v in out.items()} | {"samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces)")
    result = run(args.samples)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    ms = {k: (v["median"] * 1000, v["p95"] * 1000) for k, v in result.items() if k != "samples"}
    print(f"samples: {args.samples} per case")
    print(f"flow outlives its end, dated (timer): {ms['dated'][0]:.0f} / {ms['dated'][1]:.0f} ms")
    print(f"flow outlives its end, unshare (API): {ms['unshared'][0]:.0f} / "
          f"{ms['unshared'][1]:.0f} ms")  # fmt: skip
    print(f"  ratio of medians: {ms['dated'][0] / ms['unshared'][0]:.2f}")
    print(
        f"share -> phone connects, device share: {ms['device'][0]:.1f} / {ms['device'][1]:.1f} ms"
    )
    print(f"share -> phone connects, cell share:   {ms['cell'][0]:.1f} / {ms['cell'][1]:.1f} ms")
    print(f"  ratio of medians: {ms['device'][0] / ms['cell'][0]:.2f}")


if __name__ == "__main__":
    main()
