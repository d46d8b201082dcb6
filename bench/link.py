"""Linking and unlinking two real cells, end to end, as their owners experience it.

In namespaces (tests/netns harness): cells alpha and beta on a test bridge, and alpha's phone
that imported its config with wg-quick. Each cycle:
- link: `picell connect <beta's invite>` on alpha, then the phone resolves `beta.beta.test`
  through alpha's DNS (forwarded to beta through the new tunnel); time from the start of the
  command to the first right answer;
- unlink: `picell disconnect beta` on alpha, until beta's store no longer holds alpha.
Baselines, same run: one cross-cell lookup on an established link (what the wait is made of)
and one `picell status` (the CLI's own start-up, part of every command's figure).
Polling every 20 ms bounds the resolution of each figure.

Run as root from the repo root:  .venv/bin/python bench/link.py [--cycles 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import quantiles  # noqa: E402
from tests.netns.cells import cell_on_bridge  # noqa: E402
from tests.netns.harness import Topology, wait_until  # noqa: E402

POLL_S = 0.02


def _until(check: Any, timeout_s: float) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError("timed out")
        time.sleep(POLL_S)
    return time.perf_counter()


def run(cycles: int) -> dict[str, Any]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        phone = topo.add_ns("phone")
        topo.attach(phone, inet, "198.51.100.11/24")
        # nobody answers at .53: there is no internet here
        alpha = cell_on_bridge(topo, inet, "alpha", 1, resolver="198.51.100.53")
        beta = cell_on_bridge(topo, inet, "beta", 2, resolver="198.51.100.53")
        phone.device(alpha.add_device("phone"), hint="phone").up()
        wait_until(lambda: phone.ping("10.61.0.1"), 15, "phone cannot reach alpha")

        def resolves() -> bool:
            return phone.dig("beta.beta.test", server="10.61.0.1") == ["10.62.0.1"]

        def beta_forgot() -> bool:  # read beta's store directly: a CLI call takes ~0.3 s
            with sqlite3.connect(f"file:{beta.data_dir / 'picell.db'}?mode=ro", uri=True) as db:
                return db.execute("SELECT 1 FROM links WHERE name = 'alpha'").fetchone() is None

        link_s, command_s, unlink_s, baseline_s, cli_s = [], [], [], [], []
        for _ in range(cycles):
            invite = beta.invite()["string"]
            t0 = time.perf_counter()
            alpha.cli("connect", invite)
            command_s.append(time.perf_counter() - t0)
            link_s.append(_until(resolves, 30) - t0)
            for _ in range(3):
                t1 = time.perf_counter()
                assert resolves()
                baseline_s.append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            alpha.cli("status")
            cli_s.append(time.perf_counter() - t1)
            t2 = time.perf_counter()
            alpha.cli("disconnect", "beta")
            unlink_s.append(_until(beta_forgot, 60) - t2)
            wait_until(lambda: "beta" not in alpha.links(), 30, "alpha kept its side")
    return {
        "cycles": cycles,
        "connect_to_lookup_s": quantiles(link_s),
        "connect_command_s": quantiles(command_s),
        "disconnect_to_other_side_gone_s": quantiles(unlink_s),
        "baseline_lookup_on_link_s": quantiles(baseline_s),
        "baseline_cli_status_s": quantiles(cli_s),
        "ratio_connect_to_lookup_over_baseline": (
            statistics.median(link_s) / statistics.median(baseline_s)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.cycles)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'figure':<36} {'median ms':>10} {'p95 ms':>10}   (n)")
    for key in ("connect_to_lookup_s", "connect_command_s", "disconnect_to_other_side_gone_s",
                "baseline_lookup_on_link_s", "baseline_cli_status_s"):  # fmt: skip
        q = result[key]
        print(f"{key:<36} {q['median'] * 1000:>10.1f} {q['p95'] * 1000:>10.1f}   ({q['n']})")
    ratio = result["ratio_connect_to_lookup_over_baseline"]
    print(f"connect-to-lookup / baseline lookup: {ratio:.1f}")


if __name__ == "__main__":
    main()
