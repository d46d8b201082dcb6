"""The cell's metrics (Prometheus): what the daemon counts, and what a scrape reads.

`Metrics` owns one daemon's `CollectorRegistry` (never the library's global one, so that tests
build several). Two kinds of series:

- events counted where they happen, through one-line hooks: a reconcile (`reconciled`, from
  `Reconciler.set`: duration, count, failures, drift repaired) and a push (`pushed`, from
  `Sender.push`: sent, failed, latency);
- state read at scrape time by `CellCollector`, never kept twice: per link the handshake age and
  rx/tx bytes from the reconciler's last `wg show` (`Reconciler.observed`), the push lag from the
  store (`last_push_at`, the last push the other cell accepted), the grants as last applied
  (`Reconciler.grants`); messages refused by the mesh listener (`Links.rejected`: route x status,
  a fixed set); connections shed by the bounded listeners (`ConnectionGate.shed`); and whether
  each TCP service's backend answers a connect, checked at scrape time, all backends at once
  within `BACKEND_CHECK_S` (no thread of its own, and never a stale answer); and what each
  share's grant carried (its nft element's counter, one `nft -j` while anything is shared).
  Dated shares and offers the timer ended (`mesh.expiry`) are counted where it ends them.

Label values are our own validated names (a linked cell's name, a service's name, a listener's
name, the device name our owner shared with) or members of fixed sets: nothing another cell or
a scraper chooses alone.

`MetricsToken` is the bearer token of the WireGuard-address listener: only its SHA-256 is kept
(0600 file in the data dir); a token is 256 random bits, so a plain hash is as strong as a slow
one. `scrape_refusal` is that listener's whole access check. This module must not serve HTTP
(`picell/api/metrics.py` does) nor change anything it reads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import ipaddress
import os
import secrets
import selectors
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from picell.constants import BACKEND_CHECK_S
from picell.firewall.apply import observe_grant_counters
from picell.mesh.overview import share_grant_of
from picell.store import cell as cell_table
from picell.store import links as link_table
from picell.store import services as service_table

if TYPE_CHECKING:
    from picell.mesh.links import Links
    from picell.reconcile import Report
    from picell.store.cell import Cell
    from picell.store.links import Link
    from picell.store.services import Service

RECONCILE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)
PUSH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# a change with the same desired state that is not drift: a stale link trying its next endpoint
# (`wg set`; a try that `wg syncconf` applies makes the reconciler pass same_state False)
NOT_DRIFT = {("wireguard", "endpoint")}
REFUSAL_ROUTES = ("permissions", "unlink", "rekey", "other")  # `api.peer.refusal_reason`


class Gate(Protocol):
    shed: Any  # Counter[str] by reason ("total", "source")


Target = tuple[str, ipaddress.IPv4Address, int]  # (service, backend host, backend port)
Checker = Callable[[list[Target], float], dict[str, bool]]


def drift_repaired(report: Report, same_state: bool) -> bool:
    """A reconcile of the same desired state as the last one that still changed the system:
    something (a person, a crash, another program) had moved it away, and it was put back."""
    return same_state and any((c.area, c.kind) not in NOT_DRIFT for c in report.changes)


def check_backends(targets: list[Target], timeout_s: float) -> dict[str, bool]:
    """TCP connect to every backend at once, non-blocking; up when the connect completes within
    `timeout_s` (all together). From the cell's own namespace, as the DNAT'd traffic goes."""
    up = {name: False for name, _, _ in targets}
    pending: dict[socket.socket, str] = {}
    with selectors.DefaultSelector() as sel:
        try:
            for name, host, port in targets:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                code = sock.connect_ex((str(host), port))
                if code in (0, errno.EINPROGRESS):
                    pending[sock] = name
                    sel.register(sock, selectors.EVENT_WRITE)
                else:
                    sock.close()
            deadline = time.monotonic() + timeout_s
            while pending and (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    done = key.fileobj
                    assert isinstance(done, socket.socket)
                    name = pending.pop(done)
                    up[name] = done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    sel.unregister(done)
                    done.close()
        finally:
            for sock in pending:
                sock.close()
    return up


class CellCollector:
    """Gauges and counters read at scrape time from what the daemon already holds."""

    def __init__(
        self,
        links: Links,
        gates: Callable[[], dict[str, Gate]],
        clock: Callable[[], float] = time.time,
        checker: Checker = check_backends,
    ) -> None:
        self.links = links
        self.gates = gates
        self.clock = clock
        self.checker = checker

    def _share_use(
        self, cell: Cell, links: list[Link], services: list[Service]
    ) -> Iterator[Metric]:
        """What each share's grant carried (its nft element's counter): per linked cell,
        service and device ("" for the whole cell). One `nft -j` while anything is shared."""
        if not any(ln.choices.shares for ln in links):
            return
        counters = observe_grant_counters(self.links.control.runner)
        labels = ["cell", "service", "device"]
        packets = CounterMetricFamily(
            "picell_share_packets",
            "Packets a share's grant let in from the linked cell since it was made",
            labels=labels,
        )
        size = CounterMetricFamily(
            "picell_share_bytes",
            "Bytes a share's grant let in from the linked cell since it was made",
            labels=labels,
        )
        by_name = {s.name: s for s in services}
        for link in links:
            for share in link.choices.shares:
                svc = by_name.get(share.service)
                grant = share_grant_of(cell, svc, link, share) if svc else None
                if grant is None:
                    continue
                p, b = counters.get((grant.protocol, grant.element), (0, 0))
                packets.add_metric([link.name, share.service, share.device], p)
                size.add_metric([link.name, share.service, share.device], b)
        yield from (packets, size)

    def collect(self) -> Iterator[Metric]:
        reconciler = self.links.control.reconciler
        store = self.links.store
        with store.read() as conn:
            if not cell_table.exists(conn):
                return
            cell = cell_table.load(conn)
            links = link_table.all_links(conn)
            services = service_table.all_services(conn)
        now = self.clock()
        observed = reconciler.observed.get(cell.interface) if reconciler else None
        peers = observed.peers if observed else {}
        grants = reconciler.grants if reconciler else frozenset()
        labels = ["cell"]
        age = GaugeMetricFamily(
            "picell_link_handshake_age_seconds",
            "Seconds since the link's last WireGuard handshake",
            labels=labels,
        )
        rx = CounterMetricFamily(
            "picell_link_receive_bytes",
            "Bytes received from the linked cell (WireGuard)",
            labels=labels,
        )
        tx = CounterMetricFamily(
            "picell_link_transmit_bytes", "Bytes sent to the linked cell (WireGuard)", labels=labels
        )
        lag = GaugeMetricFamily(
            "picell_link_push_lag_seconds",
            "Seconds since the linked cell last accepted our state",
            labels=labels,
        )
        granted = GaugeMetricFamily(
            "picell_link_grants",
            "Our services the linked cell may open (grants applied)",
            labels=labels,
        )
        translated = GaugeMetricFamily(
            "picell_link_translated",
            "1 where a side presents the other's network elsewhere (issue 15): side=ours, we "
            "present the linked cell's; side=theirs, it presents ours",
            labels=["cell", "side"],
        )
        for link in links:
            translated.add_metric([link.name, "ours"], float(link.identity.mapped is not None))
            translated.add_metric([link.name, "theirs"], float(link.mirror.seen_as is not None))
            peer = peers.get(link.public_key)
            if peer is not None:
                if peer.latest_handshake:
                    age.add_metric([link.name], max(0.0, now - peer.latest_handshake))
                rx.add_metric([link.name], peer.rx_bytes)
                tx.add_metric([link.name], peer.tx_bytes)
            if link.sync.last_push_at is not None:
                lag.add_metric([link.name], max(0.0, now - link.sync.last_push_at))
            net = link.identity.network
            granted.add_metric([link.name], sum(1 for g in grants if g.network.subnet_of(net)))
        yield from (age, rx, tx, lag, granted, translated)
        yield from self._share_use(cell, links, services)

        refused = CounterMetricFamily(
            "picell_messages_refused",
            "Messages from linked cells refused, by route and status",
            labels=["route", "status"],
        )
        for key, count in sorted(self.links.rejected.items()):
            route, _, status = key.partition(" ")
            refused.add_metric([route, status], count)
        yield refused

        shed = CounterMetricFamily(
            "picell_listener_shed_connections",
            "Connections closed at accept time over a listener's caps",
            labels=["listener", "reason"],
        )
        for name, gate in sorted(self.gates().items()):
            for reason in ("total", "source"):
                shed.add_metric([name, reason], gate.shed[reason])
        yield shed

        targets = [
            (s.name, s.backend_host, s.backend_port) for s in services if s.protocol == "tcp"
        ]
        up = GaugeMetricFamily(
            "picell_backend_up",
            "1 when the service's backend accepts a TCP connection from the "
            "cell (checked at scrape time; TCP services only)",
            labels=["service"],
        )
        for name, ok in sorted(self.checker(targets, BACKEND_CHECK_S).items()):
            up.add_metric([name], 1.0 if ok else 0.0)
        yield up


class Metrics:
    """One daemon's metrics and their registry. The hooks are safe from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.reconcile_seconds = Histogram(
            "picell_reconcile_duration_seconds",
            "Time a successful reconcile took",
            buckets=RECONCILE_BUCKETS_S,
            registry=r,
        )
        self.reconciles = Counter("picell_reconcile", "Reconciles that converged", registry=r)
        self.reconcile_failures = Counter(
            "picell_reconcile_failures", "Reconciles whose apply failed", registry=r
        )
        self.drift = Counter(
            "picell_drift_repaired",
            "Reconciles of an unchanged desired state that found the system "
            "moved away and put it back",
            registry=r,
        )
        self.pushes = Counter("picell_pushes", "State documents sent to linked cells", registry=r)
        self.push_failures = Counter(
            "picell_push_failures",
            "State documents not accepted (unreachable, refused)",
            registry=r,
        )
        self.push_seconds = Histogram(
            "picell_push_duration_seconds",
            "Time from sending a state document to its answer",
            buckets=PUSH_BUCKETS_S,
            registry=r,
        )
        self.expired = Counter(
            "picell_shares_expired",
            "Dated shares and exit offers ended on their date by the timer",
            registry=r,
        )
        self.gates: dict[str, Gate] = {}  # the daemon's listeners, set once they exist
        self.collector: CellCollector | None = None

    # -- hooks (one line each where the event happens) -------------------------------------------
    def reconciled(self, seconds: float, report: Report | None, same_state: bool) -> None:
        """A reconcile ended: `report` None when its apply failed."""
        if report is None:
            self.reconcile_failures.inc()
            return
        self.reconciles.inc()
        self.reconcile_seconds.observe(seconds)
        if drift_repaired(report, same_state):
            self.drift.inc()

    def pushed(self, seconds: float, ok: bool) -> None:
        self.pushes.inc()
        self.push_seconds.observe(seconds)
        if not ok:
            self.push_failures.inc()

    # -- scrape ----------------------------------------------------------------------------------
    def observe(
        self,
        links: Links,
        clock: Callable[[], float] = time.time,
        checker: Checker = check_backends,
    ) -> None:
        """Read the cell's links, listeners and backends at every scrape."""
        self.collector = CellCollector(links, lambda: dict(self.gates), clock, checker)
        self.registry.register(self.collector)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def samples(self) -> Iterable[Metric]:
        return self.registry.collect()


# -- the WireGuard listener's token and access check ------------------------------------------
def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class MetricsToken:
    """The scrape token's hash in a 0600 file; the token itself is shown once, when issued."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def issued_at(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def issue(self) -> str:
        """A new token; the old one (if any) stops working at once (atomic replace)."""
        token = secrets.token_urlsafe(32)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_digest(token) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return token

    def check(self, token: str) -> bool:
        """Constant-time comparison of the token's hash with the kept one."""
        try:
            kept = self.path.read_text().strip()
        except (FileNotFoundError, OSError):
            return False
        return bool(kept) and hmac.compare_digest(_digest(token), kept)


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def scrape_refusal(
    source: str | None,
    authorization: str | None,
    network: ipaddress.IPv4Network,
    token: MetricsToken,
) -> int | None:
    """Why a scrape of the WireGuard listener is refused (403, 401), or None. The source first:
    only our own devices' network (WireGuard's cryptokey routing vouches for it), so a linked
    cell is refused even with the owner's token; then the bearer token."""
    try:
        ip = ipaddress.ip_address(source or "")
    except ValueError:
        return 403
    if ip not in network:
        return 403
    given = bearer(authorization)
    if given is None or not token.check(given):
        return 401
    return None
