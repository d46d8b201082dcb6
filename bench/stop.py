"""How long a real cell's daemon takes to exit on SIGTERM, and what a restart keeps.

Inside a scratch network namespace a cell (one device, real wireguard-go, nftables, Unbound) is
started with `picell serve` and stopped with SIGTERM, `--n` times per case:
- idle: nothing in flight;
- web request in flight: a client has sent half a request to the web UI and waits (uvicorn's
  graceful shutdown waits for it, at most `timeout_graceful_shutdown`).
Each figure is SIGTERM → the daemon's exit (waitpid). Baseline in the same run: SIGTERM to an
interpreter that imported `picell.app` and sleeps (process teardown alone). Each restart also
records whether wireguard-go and Unbound kept their pids (adopted, not restarted).
`--source DIR` runs the daemon from another tree (e.g. an older checkout) for comparison.

Run as root from the repo root:  .venv/bin/python bench/stop.py [--n 10] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._netns import run_in_netns, scratch_netns  # noqa: E402
from bench._stats import quantiles  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def pids_of(program: str) -> list[int]:
    """Running (not zombie) processes named `program` (the namespace holds only ours)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            if (entry / "comm").read_text().strip() != program:
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if os.readlink(entry / "ns" / "net") == os.readlink("/proc/self/ns/net"):
                found.append(int(entry.name))
    return sorted(found)


class Cell:
    def __init__(self, source: Path, data_dir: Path) -> None:
        self.source = source
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "picell", "--data-dir", str(self.data_dir), *args]
        return subprocess.run(argv, cwd=self.source, capture_output=True, text=True, check=check)

    def start(self) -> float:
        t0 = time.monotonic()
        log = open(self.data_dir.parent / "serve.log", "ab")  # noqa: SIM115 - the daemon's
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "picell", "--data-dir", str(self.data_dir), "serve"],
            cwd=self.source, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        deadline = t0 + 120
        while self.cli("status", "--json", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("picell serve did not start (see serve.log)")
            time.sleep(0.02)
        return time.monotonic() - t0

    def stop(self) -> tuple[float, int]:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait()
        self.proc = None
        return time.monotonic() - t0, code


def half_request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: in flight
    return sock


def baseline(n: int) -> list[float]:
    code = "import picell.app, sys, time; print('up', flush=True); time.sleep(600)"
    samples = []
    for _ in range(n):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        samples.append(time.monotonic() - t0)
    return samples


def inner(n: int, source: Path) -> dict[str, Any]:
    tag = secrets.token_hex(2)
    with tempfile.TemporaryDirectory(prefix="picell-bench-stop-") as tmp:
        cell = Cell(source, Path(tmp) / "data")
        web_port = 8080  # the namespace is ours: the default port is free
        init = ["init", "--name", "bench", "--domain", "bench.test", "--address", "10.61.0.1/24",
                "--endpoint", "127.0.0.1:51999", "--interface", f"pcbl{tag}",
                "--web-port", str(web_port)]  # fmt: skip
        cell.cli(*init)
        cell.start()
        cell.cli("peers", "add", "phone", "--json")
        results: dict[str, Any] = {"source": str(source), "cases": {}}
        starts, kept = [], []
        for case in ("idle", "web request in flight"):
            stops, codes = [], []
            for _ in range(n):
                if cell.proc is None:
                    before = (pids_of("wireguard-go"), pids_of("unbound"))
                    starts.append(cell.start())
                    kept.append(before == (pids_of("wireguard-go"), pids_of("unbound")))
                held = half_request(web_port) if case != "idle" else None
                took, code = cell.stop()
                stops.append(took)
                codes.append(code)
                if held is not None:
                    held.close()
            results["cases"][case] = {"stop_s": quantiles(stops), "exit_codes": sorted(set(codes))}
        results["start_s"] = quantiles(starts)
        results["restarts_keeping_wireguard_go_and_unbound"] = f"{sum(kept)}/{len(kept)}"
        results["children_after_last_stop"] = {
            "wireguard-go": len(pids_of("wireguard-go")), "unbound": len(pids_of("unbound"))
        }  # fmt: skip
        results["baseline_interpreter_exit_s"] = quantiles(baseline(n))
        return results


def show(results: dict[str, Any]) -> None:
    ms = 1000
    base = results["baseline_interpreter_exit_s"]["median"]
    print(f"daemon from {results['source']}")
    print(f"{'case':<24} {'stop ms med/p95':>18} {'n':>4} {'ratio':>7} exit codes")
    for case, r in results["cases"].items():
        s = r["stop_s"]
        print(f"{case:<24} {s['median'] * ms:>8.1f}/{s['p95'] * ms:<9.1f} {s['n']:>4} "
              f"{s['median'] / base:>7.1f} {r['exit_codes']}")  # fmt: skip
    b = results["baseline_interpreter_exit_s"]
    print(f"{'baseline (interpreter)':<24} {b['median'] * ms:>8.1f}/{b['p95'] * ms:<9.1f}")
    st = results["start_s"]
    print(f"start until status answers: {st['median'] * ms:.0f}/{st['p95'] * ms:.0f} ms")
    print(f"restarts keeping wireguard-go and Unbound: "
          f"{results['restarts_keeping_wireguard_go_and_unbound']}; after the last stop: "
          f"{results['children_after_last_stop']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--source", default=str(REPO), help="tree the daemon runs from")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inner", help=argparse.SUPPRESS)  # file for the results
    args = parser.parse_args()
    source = Path(args.source).resolve()
    if args.inner:
        Path(args.inner).write_text(json.dumps(inner(args.n, source)))
        return
    with scratch_netns("pcbs") as ns, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        argv = [sys.executable, __file__, "--inner", str(out), "--n", str(args.n)]
        if run_in_netns(ns, [*argv, "--source", str(source)]) != 0:
            sys.exit("the benchmark failed inside its namespace")
        results = json.loads(out.read_text())
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        show(results)


if __name__ == "__main__":
    main()
