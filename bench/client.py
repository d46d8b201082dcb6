"""Cost of one outgoing mesh request: the bounded `MeshClient.send` (a fresh event loop and
transport per request, one shared TLS context) against the baseline of main at 01e3ef2 (a sync
httpx client and transport per request, which builds a TLS context each time), in one process.

Against a local HTTP server on 127.0.0.1 answering `{"ok": true, "seq": 1}`; both bind the
sending address, as the sender does. No root needed.

Run from the repo root:  .venv/bin/python bench/client.py [--runs 300] [--json]
"""

from __future__ import annotations

import argparse
import http.server
import ipaddress
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench._stats import quantiles  # noqa: E402
from picell.mesh.client import MESH_ROUTES, MeshClient  # noqa: E402

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        body = b'{"ok": true, "seq": 1}'
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def baseline(port: int) -> Callable[[], Any]:
    url = f"http://{LOOPBACK}:{port}{MESH_ROUTES['state']}"

    def send() -> Any:  # picell/mesh/client.py at 01e3ef2, minus its error mapping
        transport = httpx.HTTPTransport(local_address=str(LOOPBACK))
        with httpx.Client(transport=transport, timeout=8.0, trust_env=False) as c:
            return c.post(url, json={}).json()

    return send


def bounded(port: int) -> Callable[[], Any]:
    c = MeshClient()
    return lambda: c.send(LOOPBACK, LOOPBACK, port, "state", {})


def measure(send: Callable[[], Any], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        send()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer((str(LOOPBACK), 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    results: dict[str, Any] = {}
    for name, make in (("baseline_01e3ef2", baseline), ("bounded", bounded)):
        send = make(port)
        send()  # warm imports
        results[name] = quantiles(measure(send, args.runs))
    results["median_ratio"] = results["bounded"]["median"] / results["baseline_01e3ef2"]["median"]
    server.shutdown()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name in ("baseline_01e3ef2", "bounded"):
        q = results[name]
        print(f"{name:18} median {q['median']:7.2f} ms  p95 {q['p95']:7.2f} ms  n={q['n']}")
    print(f"bounded / baseline (median): {results['median_ratio']:.3f}")


if __name__ == "__main__":
    main()
