"""Own-zone DNS benchmark: the cell's Unbound against the same Unbound serving a zone file.

What is measured: queries per second and per-query latency (p50, p99) of Unbound answering the
cell's own zone, in two cases measured alternately in one invocation:

* ``picell``  - Unbound started exactly as picell runs it: the config text is
  ``picell.dns.render.render_unbound`` of the ``DnsState`` that ``picell.state.build_state`` makes
  for a cell with ``--devices`` devices and ``--services`` services (no upstreams), started as
  ``unbound -d -p -c CONF``. Names are answered from ``local-zone``/``local-data``.
* ``ceiling`` - the same binary and the same rendered server settings (address and port, one
  thread, same access-control), but the zone's names come from a static zone file
  (``auth-zone:`` with ``zonefile:``, ``for-downstream: yes``, ``for-upstream: no``) instead of
  local data.

How: the script creates its own network namespace (``pcb`` + random hex), re-executes itself in
it, puts 10.61.0.1/32 (the cell; Unbound on port 53) and 10.61.0.100/32 (the querying device) on
that namespace's ``lo`` and never sends a packet anywhere else. A closed-loop UDP load generator
in this same process keeps ``--concurrency`` queries outstanding, cycling through every name of
the zone (A queries, RD set, no EDNS), and times each query from its send to its answer. Every
answer is checked (rcode NOERROR, question echoed, first answer an A record with the expected
address); a wrong answer, a timeout or a stray reply is counted as an error, never as a sample.

``--runs`` rounds alternate the cases (A B, B A, ...). For each run only that case's Unbound is
alive: it is started fresh on 10.61.0.1:53, warmed up for ``--warmup`` s, measured for
``--seconds`` s and stopped, so the cases differ in nothing but where the names come from (in
trials, two Unbounds side by side on ports 53 and 5300 differed by ~10% whatever they served).
With two or more CPUs the generator and Unbound are pinned to different ones. Reported per run:
CPU seconds per wall second of each side (the generator's ``time.process_time``, Unbound's
utime+stime from ``/proc/PID/stat``), so the output says which side was saturated - with one
Python generator against one Unbound thread usually both, or the generator, and qps is then a
lower bound on what Unbound alone can serve; Unbound's CPU time per answer is the figure that
does not depend on the generator. Also per run: how long both processes waited for a CPU
(``/proc/PID/schedstat``) plus hypervisor steal, which flags runs disturbed by other load.

Latency is taken under the window: by Little's law p50 is about concurrency / qps, queueing
included. ``--concurrency 1`` gives the unloaded round trip instead. Windows above ~200 may
overflow Unbound's default socket receive buffer: the lost queries show up as timeouts.

Run (as root, from the project directory; about 45 s with the defaults):

    sudo .venv/bin/python bench/dns.py            # table on stdout
    sudo .venv/bin/python bench/dns.py --json     # JSON on stdout, the table on stderr

The namespace and every process started here are removed on exit, also on failure or Ctrl-C.
The exit status is 1 when any answer was wrong or missing.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import ipaddress
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

from _netns import in_netns, run_in_netns, scratch_netns

from picell.dns.render import render_unbound
from picell.state import DnsState, build_state
from picell.store.cell import Cell
from picell.store.peers import Peer
from picell.store.services import Service

NETNS_PREFIX = "pcb"
CELL = ipaddress.IPv4Interface("10.61.0.1/24")  # the cell's address; Unbound listens on its ip
CLIENT = ipaddress.IPv4Address("10.61.0.100")  # the querying device (inside the cell's network)
CELL_NAME = "bench"
# picell's default domain NAME.cell. Not under test. or another of Unbound's default local zones,
# which would answer NXDOMAIN before the ceiling's auth-zone is consulted.
DOMAIN = f"{CELL_NAME}.cell"
CASES = ("picell", "ceiling")
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
IDLE_POLL_S = 0.05  # the generator looks for lost queries after this long without an answer
EXPIRE_SCAN_NS = 100_000_000  # ... and at least this often while answers flow
SATURATED = 0.90  # a side using this share of one core or more is called saturated
DISTURBED = 0.05  # a run whose processes waited this share of its wall time for a CPU
PR_SET_PDEATHSIG = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
QUERY_FLAGS = 0x0100  # standard query, recursion desired (as a stub resolver sends)
TYPE_A_CLASS_IN = b"\x00\x01\x00\x01"


# --------------------------------------------------------------------------------------------
# The zone


def cell_dns(devices: int, services: int) -> DnsState:
    """The DnsState picell builds for a cell with this many devices and services."""
    hosts = CELL.network.num_addresses - 2
    first_device = int(CELL.ip) - int(CELL.network.network_address) + 1
    if devices + services > hosts - first_device + 1:
        raise SystemExit(
            f"{devices} devices + {services} services do not fit in {CELL.network}"
            f" (at most {hosts - first_device + 1} addresses besides the cell's)"
        )
    cell = Cell(
        name=CELL_NAME,
        domain=DOMAIN,
        address=CELL,
        listen_port=51820,
        endpoint="192.0.2.1:51820",
        private_key="unused-by-dns",
        interface="picell0",
        pair_port=51821,
        mesh_port=3000,
        uplink=None,
        mesh_range=ipaddress.IPv4Network("10.0.0.0/8"),
        upstreams=(),
    )
    peers = [
        Peer(
            name=f"dev{i:03d}",
            public_key=f"bench-public-key-{i}",
            private_key=None,
            host_index=first_device + i,
            route_via=None,
            created_at=0.0,
        )
        for i in range(devices)
    ]
    svcs = [
        Service(
            name=f"svc{i:02d}",
            vip_index=1 + i,
            backend_host=ipaddress.IPv4Address("127.0.0.1"),
            backend_port=8000 + i,
            protocol="tcp",
            port=80,
        )
        for i in range(services)
    ]
    return build_state(cell, peers, svcs, upstreams=()).dns


def picell_conf(dns: DnsState, workdir: Path) -> str:
    return render_unbound(dns, workdir, workdir / "control.sock")


def ceiling_conf(dns: DnsState, workdir: Path, zonefile: Path) -> str:
    """picell's rendered server settings, with the zone served from `zonefile` instead."""
    text = render_unbound(
        dataclasses.replace(dns, records=()),
        workdir,
        workdir / "control.sock",
    )
    lines = text.splitlines()
    zone_lines = [ln for ln in lines if ln.strip().startswith(("local-zone:", "local-data:"))]
    if len(zone_lines) != 1:
        raise RuntimeError(f"unexpected local zone lines in rendered config: {zone_lines}")
    lines = [ln for ln in lines if ln not in zone_lines]
    lines += [
        "",
        "auth-zone:",
        f'\tname: "{dns.domain}."',
        f'\tzonefile: "{zonefile}"',
        "\tfor-downstream: yes",
        "\tfor-upstream: no",
        "\tfallback-enabled: no",
    ]
    return "\n".join(lines) + "\n"


def zone_file(dns: DnsState) -> str:
    apex = f"{dns.domain}."
    lines = [
        f"$ORIGIN {apex}",
        "$TTL 60",
        f"@ IN SOA {apex} hostmaster.{apex} 1 3600 600 86400 60",
        f"@ IN NS {apex}",
        *(f"{r.fqdn}. 60 IN A {r.address}" for r in dns.records),
    ]
    return "\n".join(lines) + "\n"


def qname_wire(name: str) -> bytes:
    labels = name.rstrip(".").split(".")
    return b"".join(bytes([len(lb)]) + lb.encode("ascii") for lb in labels) + b"\x00"


@dataclass(frozen=True)
class QuerySet:
    """Each name's query without its 2-byte id, and the address its answer must carry."""

    names: tuple[str, ...]
    tails: tuple[bytes, ...]
    addrs: tuple[bytes, ...]

    @classmethod
    def of(cls, dns: DnsState) -> QuerySet:
        header = struct.pack("!HHHHH", QUERY_FLAGS, 1, 0, 0, 0)
        return cls(
            names=tuple(r.fqdn for r in dns.records),
            tails=tuple(header + qname_wire(r.fqdn) + TYPE_A_CLASS_IN for r in dns.records),
            addrs=tuple(r.address.packed for r in dns.records),
        )


def check_answer(data: bytes, tail: bytes, addr: bytes) -> str | None:
    """None for a right answer, else the kind of error."""
    qend = 2 + len(tail)  # header (12) + question; `tail` lacks the id
    if len(data) < 12 or not data[2] & 0x80:
        return "malformed"
    rcode = data[3] & 0x0F
    if rcode:
        return f"rcode-{RCODES.get(rcode, str(rcode))}"
    if data[2] & 0x02:
        return "truncated"
    if data[12:qend] != tail[10:]:
        return "wrong-question"
    if data[6:8] == b"\x00\x00" or len(data) < qend + 16:
        return "no-answer"
    off = qend
    if data[off] & 0xC0 == 0xC0:
        if data[off : off + 2] != b"\xc0\x0c":
            return "wrong-answer"
        off += 2
    else:
        qname = tail[10:-4]
        if data[off : off + len(qname)].lower() != qname.lower():
            return "wrong-answer"
        off += len(qname)
    if (
        data[off : off + 4] != TYPE_A_CLASS_IN
        or data[off + 8 : off + 10] != b"\x00\x04"
        or data[off + 10 : off + 14] != addr
    ):
        return "wrong-answer"
    return None


# --------------------------------------------------------------------------------------------
# Unbound


def _child_setup(cpu: int | None) -> None:
    """In the forked child: die with the benchmark, and run on `cpu`."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sched_wait_s(pid: int | str) -> float:
    """Seconds a process spent runnable but waiting for a CPU (/proc/PID/schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def steal_s() -> float:
    """Host-wide CPU seconds stolen by the hypervisor (/proc/stat)."""
    with open("/proc/stat") as stat:
        return int(stat.readline().split()[8]) / CLK_TCK


def disturbance_s(pid: int) -> float:
    return sched_wait_s("self") + sched_wait_s(pid) + steal_s()


@dataclass
class Server:
    case: str
    conf: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> tuple[str, int]:
        return (str(CELL.ip), self.port)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.case}: Unbound is not running")
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, cpu: int | None) -> None:
        check = subprocess.run(
            ["unbound-checkconf", str(self.conf)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"{self.case}: unbound-checkconf failed:\n{check.stdout}")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["unbound", "-d", "-p", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stopped by us, in order, not by the terminal's Ctrl-C
                preexec_fn=lambda: _child_setup(cpu),
            )

    def wait_ready(self, queries: QuerySet) -> None:
        """Poll until Unbound answers the first name of the zone correctly."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((str(CLIENT), 0))
            sock.settimeout(0.2)
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.case}: Unbound exited:\n{self.log_tail()}")
                try:
                    sock.sendto(b"\x12\x34" + queries.tails[0], self.target)
                    data = sock.recv(2048)
                except (TimeoutError, ConnectionRefusedError) as exc:
                    last = repr(exc)
                    continue
                err = check_answer(data, queries.tails[0], queries.addrs[0])
                if err is None:
                    return
                last = err
        raise RuntimeError(
            f"{self.case}: not ready after {READY_TIMEOUT_S} s ({last}):\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------------------------
# Load generator


@dataclass
class RunResult:
    case: str
    run: int  # 0 = warm-up
    wall_s: float
    sent: int
    ok: int
    qps: float
    lat_p50_ms: float
    lat_p99_ms: float
    lat_mean_ms: float
    generator_cpu: float  # CPU seconds per wall second
    unbound_cpu: float
    waited: float  # both processes' CPU-wait plus hypervisor steal, per wall second
    errors: dict[str, int] = field(default_factory=dict)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in 0..100) of an ascending sequence."""
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


_IDS = tuple(struct.pack("!H", i) for i in range(65536))


def load_run(
    server: Server,
    queries: QuerySet,
    order: Sequence[int],
    run: int,
    args: argparse.Namespace,
    seconds: float,
    rng: random.Random,
) -> RunResult:
    """Keep `args.concurrency` queries outstanding for `seconds` (or `args.max_queries`), then
    wait for the outstanding ones (at most `args.timeout` s each)."""
    concurrency: int = args.concurrency
    max_queries: int = args.max_queries
    timeout_s: float = args.timeout
    tails, addrs, ids = queries.tails, queries.addrs, _IDS
    clock = time.perf_counter_ns
    pending: dict[int, tuple[int, int]] = {}
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    n_order = len(order)
    pos = rng.randrange(n_order)
    qid = rng.randrange(65536)
    sent = 0
    timeout_ns = int(timeout_s * 1e9)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((str(CLIENT), 0))
        sock.connect(server.target)
        sock.setblocking(False)
        send, recv = sock.send, sock.recv

        def send_next() -> None:
            nonlocal pos, qid, sent
            qid = (qid + 1) & 0xFFFF
            while qid in pending:
                qid = (qid + 1) & 0xFFFF
            idx = order[pos]
            pos = pos + 1 if pos + 1 < n_order else 0
            pending[qid] = (clock(), idx)
            send(ids[qid] + tails[idx])
            sent += 1

        def expire(now: int) -> int:
            lost = [k for k, (ts, _) in pending.items() if now - ts > timeout_ns]
            for k in lost:
                del pending[k]
            if lost:
                errors["timeout"] += len(lost)
            return len(lost)

        t0 = clock()
        cpu0 = time.process_time()
        srv0 = proc_cpu_s(server.pid)
        dist0 = disturbance_s(server.pid)
        stop_at = t0 + int(seconds * 1e9)
        hard_stop = stop_at + timeout_ns + 1_000_000_000
        next_scan = t0 + EXPIRE_SCAN_NS
        for _ in range(min(concurrency, max_queries)):
            send_next()
        sending = True
        while pending:
            try:
                data = recv(4096)
            except BlockingIOError:
                if not select.select([sock], [], [], IDLE_POLL_S)[0]:
                    now = clock()
                    lost = expire(now)
                    if now > hard_stop and pending:
                        errors["timeout"] += len(pending)
                        pending.clear()
                    elif sending and now < stop_at:
                        for _ in range(min(lost, max_queries - sent)):
                            send_next()
                continue
            except ConnectionRefusedError:  # ICMP port unreachable; the query will time out
                errors["port-unreachable"] += 1
                continue
            now = clock()
            entry = pending.pop((data[0] << 8) | data[1], None)
            if entry is None:
                errors["stray"] += 1
                continue
            ts, idx = entry
            err = check_answer(data, tails[idx], addrs[idx])
            if err is None:
                latencies.append(now - ts)
            else:
                errors[err] += 1
            if now > next_scan:
                next_scan = now + EXPIRE_SCAN_NS
                lost = expire(now)
            else:
                lost = 0
            if sending:
                if now >= stop_at or sent >= max_queries:
                    sending = False
                else:
                    for _ in range(1 + lost):
                        send_next()
        t_end = clock()
        cpu = time.process_time() - cpu0
        srv = proc_cpu_s(server.pid) - srv0
        dist = disturbance_s(server.pid) - dist0

    wall = (t_end - t0) / 1e9
    latencies.sort()
    lat_ms = [v / 1e6 for v in latencies]
    return RunResult(
        case=server.case,
        run=run,
        wall_s=round(wall, 3),
        sent=sent,
        ok=len(latencies),
        qps=len(latencies) / wall if wall > 0 else 0.0,
        lat_p50_ms=percentile(lat_ms, 50),
        lat_p99_ms=percentile(lat_ms, 99),
        lat_mean_ms=sum(lat_ms) / len(lat_ms) if lat_ms else float("nan"),
        generator_cpu=cpu / wall if wall > 0 else 0.0,
        unbound_cpu=srv / wall if wall > 0 else 0.0,
        waited=dist / wall if wall > 0 else 0.0,
        errors=dict(errors),
    )


# --------------------------------------------------------------------------------------------
# Summary and output


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 50)


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r.errors)
    qps = sorted(r.qps for r in runs)
    gen = median([r.generator_cpu for r in runs])
    srv = median([r.unbound_cpu for r in runs])
    return {
        "runs": len(runs),
        "answered": sum(r.ok for r in runs),
        "qps_median": median(qps),
        "qps_p95": percentile(qps, 95),
        "qps_min": qps[0],
        "qps_max": qps[-1],
        "lat_p50_ms_median": median([r.lat_p50_ms for r in runs]),
        "lat_p99_ms_median": median([r.lat_p99_ms for r in runs]),
        "lat_mean_ms_median": median([r.lat_mean_ms for r in runs]),
        "generator_cpu_median": gen,
        "unbound_cpu_median": srv,
        # Unbound's CPU time per answered query, and the qps one full core of it would give
        "unbound_us_per_query": srv / median(qps) * 1e6 if median(qps) else float("nan"),
        "unbound_capacity_qps": median(qps) / srv if srv else float("nan"),
        "saturated": saturated_side(gen, srv),
        "disturbed_runs": sum(r.waited >= DISTURBED for r in runs),
        "errors": dict(errors),
    }


def saturated_side(gen: float, srv: float) -> str:
    if gen >= SATURATED and srv >= SATURATED:
        return "both"
    if gen >= SATURATED:
        return "generator"
    if srv >= SATURATED:
        return "unbound"
    return "neither"


def bottleneck_note(case: str, s: dict[str, Any]) -> str:
    gen, srv = s["generator_cpu_median"], s["unbound_cpu_median"]
    cpus = f"generator {gen:.0%}, unbound {srv:.0%} of a core"
    side = s["saturated"]
    if side == "both":
        why = "both sides saturated: qps is what this generator and Unbound reach together"
    elif side == "generator":
        why = "generator saturated: qps is a lower bound on Unbound's capacity"
    elif side == "unbound":
        why = "Unbound saturated: qps is its capacity on one core"
    else:
        why = "neither side at a full core: bound by wake-ups and the window"
    capacity = s["unbound_capacity_qps"]
    return f"{case}: {cpus}; {why}; Unbound's own CPU alone would allow ~{capacity:,.0f} qps"


def render_table(report: dict[str, Any], out: TextIO) -> None:
    p = report["setup"]
    print(
        f"Own-zone DNS: Unbound {p['unbound_version']}, {p['names']} names "
        f"({p['devices']} devices, {p['services']} services), window {p['concurrency']}, "
        f"{p['runs']} runs x {p['seconds']} s per case, each after a fresh start and a "
        f"{p['warmup_s']} s warm-up",
        file=out,
    )
    pin = p["pinning"]
    print(
        "pinning: "
        + (f"generator cpu{pin['generator']}, unbound cpu{pin['unbound']}" if pin else "none")
        + f"; load average before/after: {p['loadavg_before']:.2f}/{p['loadavg_after']:.2f}",
        file=out,
    )
    print("", file=out)
    print("per run:      qps   p50 ms   p99 ms  gen CPU  unb CPU   waited  errors", file=out)
    for r in report["runs"]:
        errs = ",".join(f"{k}={v}" for k, v in sorted(r["errors"].items())) or "0"
        print(
            f"  {r['case']:<8}{r['run']:>2} {r['qps']:>8,.0f} {r['lat_p50_ms']:>8.3f} "
            f"{r['lat_p99_ms']:>8.3f} {r['generator_cpu']:>8.0%} {r['unbound_cpu']:>8.0%} "
            f"{r['waited']:>8.1%}{'*' if r['waited'] >= DISTURBED else ' '} {errs}",
            file=out,
        )
    print("", file=out)
    head = (
        f"{'case':<9}{'qps med':>9}{'qps p95':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'gen CPU':>9}{'unb CPU':>9}{'unb us/q':>9}  errors"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for case in CASES:
        s = report["cases"][case]
        errs = ",".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "0"
        print(
            f"{case:<9}{s['qps_median']:>9,.0f}{s['qps_p95']:>9,.0f}"
            f"{s['lat_p50_ms_median']:>9.3f}{s['lat_p99_ms_median']:>9.3f}"
            f"{s['generator_cpu_median']:>9.0%}{s['unbound_cpu_median']:>9.0%}"
            f"{s['unbound_us_per_query']:>9.2f}  {errs}",
            file=out,
        )
    ratio = report["ratio"]
    print(
        f"\npicell/ceiling: qps {ratio['qps']:.3f}, p50 latency {ratio['lat_p50']:.3f}, "
        f"p99 latency {ratio['lat_p99']:.3f}, "
        f"Unbound CPU per query {ratio['unbound_us_per_query']:.3f}",
        file=out,
    )
    print(
        "(medians over runs; p50/p99 are per run over every answered query; unb us/q is"
        " Unbound's CPU time per answer)",
        file=out,
    )
    for case in CASES:
        print(bottleneck_note(case, report["cases"][case]), file=out)
    print(
        f"latency is measured under a window of {p['concurrency']} outstanding queries"
        " (p50 ~ window/qps); --concurrency 1 gives the unloaded round trip",
        file=out,
    )
    disturbed = sum(s["disturbed_runs"] for s in report["cases"].values())
    if disturbed:
        print(
            f"WARNING: {disturbed} run(s) marked * were disturbed by other load on this host"
            f" (waited = time the generator and Unbound were runnable but had no CPU, plus"
            f" hypervisor steal, >= {DISTURBED:.0%}); medians resist a few, rerun when quiet",
            file=out,
        )
    warm = {c: s["warmup_errors"] for c, s in report["cases"].items() if s["warmup_errors"]}
    if warm:
        print(f"errors during warm-ups: {warm}", file=out)
    if report["errors_total"]:
        print(f"ERRORS: {report['errors_total']} wrong or missing answers (see above)", file=out)


# --------------------------------------------------------------------------------------------
# Inside the namespace


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def progress(msg: str) -> None:
    print(f"[dns-bench] {msg}", file=sys.stderr, flush=True)


def inner(args: argparse.Namespace) -> int:
    if not in_netns(args.inner):
        progress(f"refusing to run: this process is not in network namespace {args.inner!r}")
        return 2
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    for addr in (CELL.ip, CLIENT):
        _ip("addr", "add", f"{addr}/32", "dev", "lo")

    dns = cell_dns(args.devices, args.services)
    queries = QuerySet.of(dns)
    order = list(range(len(queries.names)))
    rng = random.Random(args.seed)
    rng.shuffle(order)

    cpus = sorted(os.sched_getaffinity(0))
    pinning: dict[str, int] | None = None
    if len(cpus) >= 2 and not args.no_pin:
        pinning = {"generator": cpus[0], "unbound": cpus[1]}
        os.sched_setaffinity(0, {pinning["generator"]})
    version = subprocess.run(
        ["unbound", "-V"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    loadavg_before = os.getloadavg()[0]

    results: list[RunResult] = []
    warmups: list[RunResult] = []
    unbound_cpu = pinning["unbound"] if pinning else None
    with tempfile.TemporaryDirectory(prefix="picell-bench-dns-") as tmp:
        root = Path(tmp)
        servers: dict[str, Server] = {}
        for case in CASES:
            work = root / case
            work.mkdir()
            conf = work / "unbound.conf"
            if case == "picell":
                conf.write_text(picell_conf(dns, work))
            else:
                zonefile = work / f"{dns.domain}.zone"
                zonefile.write_text(zone_file(dns))
                conf.write_text(ceiling_conf(dns, work, zonefile))
            servers[case] = Server(case, conf, dns.port, work / "unbound.log")
        try:
            for run in range(1, args.runs + 1):
                for case in CASES if run % 2 else CASES[::-1]:
                    server = servers[case]
                    server.start(unbound_cpu)
                    server.wait_ready(queries)
                    if args.warmup > 0:
                        warmups.append(load_run(server, queries, order, 0, args, args.warmup, rng))
                    res = load_run(server, queries, order, run, args, args.seconds, rng)
                    if server.proc is None or server.proc.poll() is not None:
                        raise RuntimeError(f"{case}: Unbound died:\n{server.log_tail()}")
                    server.stop()
                    results.append(res)
                    progress(
                        f"run {run} {case:<7} (Unbound pid {server.pid}): {res.qps:,.0f} qps,"
                        f" p50 {res.lat_p50_ms:.3f} ms, errors {res.errors or 0}"
                    )
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            for server in servers.values():
                server.stop()

    report = build_report(args, dns, results, warmups, version, pinning, loadavg_before)
    if args.json:
        render_table(report, sys.stderr)
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        render_table(report, sys.stdout)
    return 1 if report["errors_total"] else 0


def build_report(
    args: argparse.Namespace,
    dns: DnsState,
    results: list[RunResult],
    warmups: list[RunResult],
    version: list[str],
    pinning: dict[str, int] | None,
    loadavg_before: float,
) -> dict[str, Any]:
    cases = {c: summarize([r for r in results if r.case == c]) for c in CASES}
    for case, summary in cases.items():
        warm: Counter[str] = Counter()
        for r in warmups:
            if r.case == case:
                warm.update(r.errors)
        summary["warmup_errors"] = dict(warm)
    a, b = cases["picell"], cases["ceiling"]
    return {
        "setup": {
            "unbound_version": version[0].split()[-1] if version else "unknown",
            "names": len(dns.records),
            "devices": args.devices,
            "services": args.services,
            "concurrency": args.concurrency,
            "runs": args.runs,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "query_timeout_s": args.timeout,
            "max_queries_per_run": args.max_queries,
            "pinning": pinning,
            "cpus": os.cpu_count(),
            "loadavg_before": loadavg_before,
            "loadavg_after": os.getloadavg()[0],
        },
        "cases": cases,
        "ratio": {
            "qps": a["qps_median"] / b["qps_median"] if b["qps_median"] else float("nan"),
            "lat_p50": a["lat_p50_ms_median"] / b["lat_p50_ms_median"],
            "lat_p99": a["lat_p99_ms_median"] / b["lat_p99_ms_median"],
            "unbound_us_per_query": a["unbound_us_per_query"] / b["unbound_us_per_query"],
        },
        "errors_total": sum(
            sum(s["errors"].values()) + sum(s["warmup_errors"].values()) for s in cases.values()
        ),
        "runs": [dataclasses.asdict(r) for r in results],
    }


# --------------------------------------------------------------------------------------------
# Entry point


def _bounded(kind: Callable[[str], float], lo: float, hi: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return value

    return parse


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Own-zone DNS qps and latency: picell's Unbound vs a zone-file ceiling."
    )
    ap.add_argument("--seconds", type=_bounded(float, 0.2, 60), default=3.0, help="per run")
    ap.add_argument("--runs", type=_bounded(int, 1, 50), default=5, help="runs per case")
    ap.add_argument("--warmup", type=_bounded(float, 0, 30), default=0.5, help="s before each run")
    ap.add_argument(
        "--concurrency", type=_bounded(int, 1, 4096), default=64, help="outstanding queries"
    )
    ap.add_argument("--devices", type=_bounded(int, 0, 252), default=200)
    ap.add_argument("--services", type=_bounded(int, 0, 252), default=50)
    ap.add_argument(
        "--max-queries", type=_bounded(int, 1, 10_000_000), default=2_000_000, help="per run"
    )
    ap.add_argument("--timeout", type=_bounded(float, 0.01, 5), default=1.0, help="per query, s")
    ap.add_argument("--seed", type=int, default=1, help="shuffles the query order")
    ap.add_argument("--no-pin", action="store_true", help="do not pin to separate CPUs")
    ap.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    ap.add_argument("--inner", metavar="NETNS", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        if args.inner:
            return inner(args)
        if os.geteuid() != 0:
            print("run as root: sudo .venv/bin/python bench/dns.py", file=sys.stderr)
            return 2
        for tool in ("ip", "unbound", "unbound-checkconf"):
            if shutil.which(tool) is None:
                print(f"missing command: {tool}", file=sys.stderr)
                return 2
        signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the namespace is removed
        with scratch_netns(NETNS_PREFIX) as ns:
            script = str(Path(__file__).resolve())
            code: int = run_in_netns(ns, [sys.executable, script, "--inner", ns, *argv])
            return code
    except KeyboardInterrupt:
        what = "Unbound stopped" if args.inner else "namespace removed"
        print(f"interrupted; {what}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
