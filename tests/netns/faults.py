"""Fault tooling for the fault and crash suites: loss, delay, partitions, clock skew, kill -9.

Every fault is a real mechanism acting on real traffic or real processes:

* loss: nftables in the router namespace between the cells drops `N %` of the cells' UDP
  (WireGuard) datagrams with `numgen random` (kernel drops, both ways).
* delay: this kernel has no `sch_netem` (`tc qdisc add … netem` fails: "Specified qdisc kind is
  unknown"), so a transparent userspace relay stands in: nftables `tproxy` in the router
  namespace hands every datagram between the cells to :data:`_DELAY_RELAY`, which sends it on
  after `D` ms from a socket bound to the datagram's own source address (`IP_TRANSPARENT`), so
  neither cell sees anything but a slower path. Its queue is bounded (beyond it, datagrams are
  dropped, as netem's `limit` would).
* partition: nftables in the router namespace drops everything between the cells.
* clock skew: the daemon is restarted under libfaketime (`LD_PRELOAD`, `FAKETIME=±N`, the
  monotonic clock left alone as on a real host), and restarted again at the real time to
  heal. The host's clock is never touched.
* kill -9 and restart: SIGKILL of `picell serve`, then a restart (its children, wireguard-go
  and unbound, outlive it and are adopted).

It must not reach into picell's code or store to cause a fault: faults act on the network and the
processes only. Reading a store (read-only, for invariants) is :func:`store_rows`' business.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.netns.cells import Cell
from tests.netns.harness import PYTHON, Netns, Proc, wait_until

SKEW_SITE = Path(__file__).resolve().parent / "skew"
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
WG_PORT = 51820
RELAY_PORT = 9000
RELAY_MARK = 0x77  # the router namespace's only fwmark: datagrams handed to the delay relay
RELAY_TABLE = 77  # its routing table: every address is local there (what tproxy needs)
FAULT_TABLE = "picell_faults"

# A transparent UDP delay relay (standard library only; run with `python -I -c`).
# argv: listen_port, delay_ms, max_queued, ready_file. Datagrams arrive through tproxy on the
# listener; the original destination comes from IP_RECVORIGDSTADDR. Each is sent after delay_ms
# from a transparent socket bound to its original source. Those sockets also receive datagrams
# (tproxy finds them first for their own address): the destination is then their bound address.
_DELAY_RELAY = r"""
import heapq, pathlib, selectors, socket, struct, sys, time
IP_TRANSPARENT, IP_RECVORIGDSTADDR = 19, 20
port, delay_s = int(sys.argv[1]), float(sys.argv[2]) / 1000
limit, ready = int(sys.argv[3]), sys.argv[4]
sel = selectors.DefaultSelector()
def transparent(bind):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
    s.bind(bind)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
    return s
listener = transparent(("0.0.0.0", port))
senders = {}
queue, n, dropped, sent = [], 0, 0, 0
pathlib.Path(ready).write_text("ready")
while True:
    timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 1.0
    for key, _ in sel.select(timeout):
        sock = key.fileobj
        while True:
            try:
                data, anc, _, src = sock.recvmsg(65535, 64)
            except BlockingIOError:
                break
            dst = sock.getsockname()
            for level, kind, raw in anc:
                if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR:
                    port, addr = struct.unpack_from("!H4s", raw, 2)
                    dst = (socket.inet_ntoa(addr), port)
            if len(queue) >= limit:
                dropped += 1
                continue
            n += 1
            heapq.heappush(queue, (time.monotonic() + delay_s, n, data, src, dst))
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _, _, data, src, dst = heapq.heappop(queue)
        out = senders.get(src) or senders.setdefault(src, transparent(src))
        try:
            out.sendto(data, dst)
            sent += 1
        except OSError as exc:
            sys.stderr.write("send %s -> %s: %r\n" % (src, dst, exc))
"""


class Faults:
    """Faults on the path between cells whose traffic crosses the router namespace `router`.

    `cell_ips`: the cells' own (public) addresses; only traffic between two of them is touched,
    so a device talking to its own cell is never hit by a fault meant for the link."""

    def __init__(self, router: Netns, cell_ips: list[str], workdir: Path) -> None:
        self.router = router
        self.cell_ips = cell_ips
        self.workdir = workdir
        self.relay: Proc | None = None
        router.run(["ip", "rule", "add", "fwmark", str(RELAY_MARK), "lookup", str(RELAY_TABLE)])
        router.run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo",
                    "table", str(RELAY_TABLE)])  # fmt: skip

    def _between(self) -> str:
        ips = ", ".join(self.cell_ips)
        return f"ip saddr {{ {ips} }} ip daddr {{ {ips} }}"

    def _install(self, prerouting: list[str], forward: list[str]) -> None:
        """Replace the fault table by one with these rules (one atomic nft transaction)."""
        lines = [
            f"table inet {FAULT_TABLE} {{}}",
            f"delete table inet {FAULT_TABLE}",
            f"table inet {FAULT_TABLE} {{",
            "  chain pre { type filter hook prerouting priority mangle; policy accept;",
            *[f"    {r}" for r in prerouting],
            "  }",
            "  chain through { type filter hook forward priority filter; policy accept;",
            *[f"    {r}" for r in forward],
            "  }",
            "}",
            "",
        ]
        self.router.run(["nft", "-f", "-"], input="\n".join(lines))

    def loss(self, percent: int) -> None:
        """Drop `percent` % of the WireGuard datagrams between the cells, each way."""
        if not 0 < percent < 100:
            raise ValueError(f"loss percent {percent} outside 1..99")
        self._install([], [f"{self._between()} udp dport {WG_PORT} counter "
                           f"numgen random mod 100 < {percent} drop"])  # fmt: skip

    def partition(self) -> None:
        """Drop everything between the cells."""
        self._install([], [f"{self._between()} drop"])

    def delay(self, delay_ms: int, limit: int = 1000) -> None:
        """Delay every WireGuard datagram between the cells by `delay_ms`, each way."""
        self.heal()
        ready = self.workdir / "delay-relay.ready"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-I", "-c", _DELAY_RELAY, str(RELAY_PORT), str(delay_ms),
                str(limit), str(ready)]  # fmt: skip
        relay = self.router.popen(argv, name="delay-relay")
        self.relay = relay

        def listening() -> bool:
            if not relay.running():
                raise RuntimeError(f"delay relay exited: {relay.log_text()}")
            return ready.exists()

        wait_until(listening, 15, "the delay relay did not start")
        self._install(
            [f"{self._between()} udp dport {WG_PORT} "
             f"counter tproxy ip to 127.0.0.1:{RELAY_PORT} meta mark set {RELAY_MARK} accept"],
            [],
        )  # fmt: skip

    def heal(self) -> None:
        """Remove every fault on the path (rules first, then the relay)."""
        self.router.run(["nft", "delete", "table", "inet", FAULT_TABLE], check=False)
        if self.relay is not None:
            self.relay.stop()
            self.relay = None

    def counters(self) -> str:
        return self.router.run(["nft", "list", "table", "inet", FAULT_TABLE], check=False).stdout

    def counted(self) -> int:
        """Datagrams that met the fault's rule so far (the relay's, or the loss rule's)."""
        match = re.search(r"counter packets (\d+)", self.counters())
        return int(match.group(1)) if match else 0


def skew_env(offset_s: int) -> dict[str, str]:
    """The environment that runs a daemon with its wall clock `offset_s` seconds off ({} for
    none), its monotonic clock left alone as on a real host whose clock is off. libfaketime
    0.9.10 then fails Python's `time.sleep` (EINVAL from clock_nanosleep): `skew/`'s
    sitecustomize puts that one wait through `select` (it changes nothing else)."""
    if offset_s == 0:
        return {}
    path = os.environ.get("PYTHONPATH")
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": f"{offset_s:+d}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "PYTHONPATH": f"{SKEW_SITE}:{path}" if path else str(SKEW_SITE),
    }


class _AdminConnection(http.client.HTTPConnection):
    """HTTP over the cell's admin socket, as the CLI speaks it (stdlib: no start-up cost)."""

    def __init__(self, path: Path) -> None:
        super().__init__("picell", timeout=60)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


def api(cell: Cell, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One call on the cell's admin API: (HTTP status, JSON answer or text). OSError when the
    daemon does not answer. Reads use it instead of the CLI in polls (no start-up cost)."""
    conn = _AdminConnection(cell.data_dir / "admin.sock")
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    finally:
        conn.close()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


def cells_view(cell: Cell) -> dict[str, dict[str, Any]]:
    """`picell cells` as its API answers it: the links by name."""
    code, body = api(cell, "GET", "/api/cells")
    assert code == 200, body
    return {c["name"]: c for c in body}


def start_daemon(cell: Cell, offset_s: int = 0) -> None:
    """Start (or restart) `cell`'s daemon, its wall clock `offset_s` seconds off."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **skew_env(offset_s))
    cell.proc = cell.ns.popen([*cell.picell, "--data-dir", str(cell.data_dir), "serve"],
                              name=f"picell-{cell.name}", env=env)  # fmt: skip
    proc = cell.proc

    def answers() -> bool:
        if not proc.running():
            raise RuntimeError(f"picell serve exited:\n{proc.log_text()}")
        with contextlib.suppress(OSError):
            return api(cell, "GET", "/api/status")[0] == 200
        return False

    wait_until(answers, 60, f"cell {cell.name} did not start serving")


def store_rows(cell: Cell, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Rows of a read-only query on the cell's store (WAL: never blocks the daemon)."""
    uri = f"file:{cell.data_dir / 'picell.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as conn:
        conn.row_factory = sqlite3.Row
        return list(conn.execute(sql, args))


def integrity_ok(cell: Cell) -> bool:
    return [tuple(r) for r in store_rows(cell, "PRAGMA integrity_check")] == [("ok",)]


# A device's probe of many TCP endpoints at once: prints one "host:port 1|0" line each.
_PROBE = r"""
import socket, sys, threading
timeout, targets = float(sys.argv[1]), sys.argv[2:]
ok = {}
def probe(t):
    host, port = t.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        ok[t] = 1
    except OSError:
        ok[t] = 0
threads = [threading.Thread(target=probe, args=(t,)) for t in targets]
for t in threads: t.start()
for t in threads: t.join()
for t in targets: print(t, ok[t])
"""


def resolve(ns: Netns, names: list[str], timeout_s: int = 1) -> dict[str, list[str]]:
    """The A records of each name as `ns`'s resolver answers them ([] for NXDOMAIN, REFUSED or
    no answer), every name asked by one `dig` (one process, however many names)."""
    argv = ["dig", "+noall", "+answer", f"+time={timeout_s}", "+tries=1"]
    for name in names:
        argv += [name, "A"]
    out = ns.run(argv, check=False, timeout=len(names) * (timeout_s + 1) + 10).stdout
    got: dict[str, list[str]] = {name: [] for name in names}
    for line in out.splitlines():
        words = line.split()
        if len(words) == 5 and words[2:4] == ["IN", "A"] and words[0].rstrip(".") in got:
            got[words[0].rstrip(".")].append(words[4])
    return {name: sorted(addrs) for name, addrs in got.items()}


def reachable(
    probes: dict[Netns, list[str]], timeout_s: float = 1.0
) -> dict[Netns, dict[str, bool]]:
    """Which `host:port` targets accept a TCP connection from their namespace, every target of
    every namespace probed at once (one process per namespace). By namespace: two namespaces
    may reach different things at one address (each cell presents the other where it likes)."""
    running = {}
    for ns, targets in probes.items():
        argv = ns.argv([PYTHON, "-I", "-c", _PROBE, str(timeout_s), *targets])
        running[ns] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    got: dict[Netns, dict[str, bool]] = {}
    for ns, proc in running.items():
        out, err = proc.communicate(timeout=timeout_s + 30)
        if proc.returncode != 0:
            raise AssertionError(f"probe failed: {err}")
        got[ns] = {t: v == "1" for t, v in (line.split() for line in out.splitlines())}
    return got
