"""Composition root: builds the store, runner, reconciler, control and servers. No logic.

`serve()` is the daemon: it reconciles once before it serves, then serves the admin API on the
root-only unix socket, re-reconciles on a period and whenever a supervised child exits. Every
listener is a bounded `Listener` (picell/api/listen.py) with the `Limits` chosen here; the
reconcile thread never dies of an exception (`run_forever`).

One daemon per data dir: `Daemon()` first takes an flock on `<data dir>/picell.lock` (the pid
written in it) and refuses with `AlreadyRunning` before it opens the store, touches the kernel
or the sockets. Under systemd (`Type=notify`) it sends READY=1 once its first reconcile is done
and its listeners serve. On SIGTERM/SIGINT it exits promptly (within `SHUTDOWN_S` of waiting for
its threads) and leaves everything in place: wireguard-go, Unbound, the nft table, routes and
port mappings outlive it, and the next daemon adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio.to_thread
import uvicorn
from fastapi import FastAPI

from picell import __version__
from picell.api import admin, cells, errors, web
from picell.api import metrics as metrics_api
from picell.api.auth import GENERATED_PASSWORD_FILE, Auth, password_router
from picell.api.listen import (
    Limits,
    Listener,
    listen_tcp,
    listen_tcp_any,
    listen_unix,
    loop_exception_handler,
)
from picell.api.peer import build_mesh_api, build_pairing_api
from picell.api.strict_json import StrictJsonBodies
from picell.cellinit import InitRequest
from picell.constants import (
    ADMIN_BODY_MAX,
    ADMIN_CONNECTIONS,
    CHILD_RESTART_BACKOFF_S,
    DOCUMENT_COALESCE_S,
    HANDLER_THREADS,
    LOCAL_REQUEST_S,
    MESH_CONNECTIONS,
    MESH_REQUEST_S,
    METRICS_CONNECTIONS,
    METRICS_PORT,
    METRICS_REQUEST_S,
    METRICS_TOKEN_FILE,
    PAIRING_CONNECTIONS,
    PAIRING_REQUEST_S,
    RECONCILE_PERIOD_S,
    WEB_CONNECTIONS,
)
from picell.control import Coalescer, Control
from picell.errors import PicellError
from picell.mesh.exits import Exits
from picell.mesh.expiry import Expiry
from picell.mesh.links import Links
from picell.mesh.reach import init_warning
from picell.mesh.sender import Sender
from picell.mesh.sync import Sync
from picell.metrics import Metrics, MetricsToken
from picell.paths import Paths
from picell.reconcile import Reconciler
from picell.store import admin as admin_table
from picell.store import cell as cell_table
from picell.store.db import Store
from picell.system.children import Child, bound_log
from picell.system.limits import RepeatLog, install_repeat_filter, raise_nofile, run_forever
from picell.system.portmap import PortMapper
from picell.system.run import Runner

log = logging.getLogger("picell")

LOCK_FILE = "picell.lock"  # in the data dir: flock'ed by the running daemon, its pid inside
SHUTDOWN_S = 1.5  # how long a stopping daemon waits for its threads (they are daemon threads)


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        super().__init__(f"already running (pid {pid if pid is not None else '?'})")
        self.pid = pid


def take_lock(data_dir: Path) -> int:
    """Take the data dir's daemon lock (non-blocking flock) and write our pid in it; return
    its fd (held open for the daemon's life). AlreadyRunning names the holder's pid."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid: int | None = int(os.pread(fd, 32, 0).split()[0])
        except (ValueError, IndexError, OSError):
            pid = None
        os.close(fd)
        raise AlreadyRunning(pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def sd_notify(state: str) -> bool:
    """Tell systemd our state (`READY=1`, `STOPPING=1`) on $NOTIFY_SOCKET; False without one.
    The protocol is one datagram on a unix socket (sd_notify(3)); an '@' is the abstract
    namespace."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.warning("systemd notify %s failed: %s", state, exc)
        return False
    return True


def _stop_all(stoppers: list[tuple[str, Callable[[], None]]], budget_s: float) -> list[str]:
    """Run each stopper on a thread of its own (each joins its thread with its own, longer
    timeout) and wait for all of them together at most `budget_s`; the names still running."""
    threads = []
    for name, stopper in stoppers:
        t = threading.Thread(target=stopper, name=f"stop-{name}", daemon=True)
        t.start()
        threads.append((name, t))
    deadline = time.monotonic() + budget_s
    for _name, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [name for name, t in threads if t.is_alive()]


def _backoff(attempt: int) -> float:
    return CHILD_RESTART_BACKOFF_S[min(attempt, len(CHILD_RESTART_BACKOFF_S) - 1)]


def build_api(
    control: Control,
    links: Links | None = None,
    sync: Sync | None = None,
    sender: Sender | None = None,
    exits: Exits | None = None,
    auth: Auth | None = None,
    *,
    password_route: bool = True,
    metrics: tuple[Metrics, MetricsToken] | None = None,
) -> FastAPI:
    """The admin API; served on the unix socket and, behind login, on the web port."""
    app = FastAPI(title="picell admin API", version=__version__)
    app.state.control = control
    app.state.links = links or Links(control)
    app.state.sync = sync or Sync(app.state.links)
    app.state.sender = sender
    app.state.exits = exits or Exits(control)
    app.state.auth = auth or Auth(control.store)
    errors.install(app)
    # FastAPI parses JSON bodies with json.loads (NaN, deep nesting): check them strictly first
    app.add_middleware(StrictJsonBodies, max_bytes=ADMIN_BODY_MAX)
    app.include_router(admin.router)
    app.include_router(cells.router)
    if password_route:  # root on the cell host only: `picell admin password`
        app.include_router(password_router)
    if metrics is not None:  # the daemon's own: /metrics and `picell metrics token`
        app.state.metrics, app.state.metrics_token = metrics
        app.include_router(metrics_api.router)
    return app


def build_web_api(
    control: Control,
    links: Links | None = None,
    sync: Sync | None = None,
    sender: Sender | None = None,
    exits: Exits | None = None,
    auth: Auth | None = None,
    metrics: tuple[Metrics, MetricsToken] | None = None,
) -> FastAPI:
    """The web listener: the pages and the same admin API, all behind login and CSRF checks."""
    app = build_api(control, links, sync, sender, exits, auth, password_route=False,
                    metrics=metrics)  # fmt: skip
    # Swagger's pages load scripts from a CDN, which the UI's CSP forbids; /openapi.json stays
    app.router.routes = [
        r for r in app.router.routes if getattr(r, "path", "") not in (app.docs_url, app.redoc_url)
    ]
    web.install(app, app.state.auth)
    return app


def _config(app: FastAPI) -> uvicorn.Config:
    # proxy_headers off: the mesh API authenticates the direct source address, never a header.
    # log_config None: uvicorn's records go through the daemon's handlers and their RepeatFilter
    # timeout_graceful_shutdown: a stopping daemon does not wait for slow clients (a peer's
    # request, a browser's keep-alive) beyond a second
    return uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=1,
    )


class Daemon:
    def __init__(self, data_dir: Path) -> None:
        self.paths = Paths(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # first of all: a second daemon on this data dir touches nothing (AlreadyRunning)
        self._lock_fd = take_lock(data_dir)
        os.chmod(data_dir, 0o700)
        for d in (self.paths.run_dir, self.paths.unbound_dir):
            d.mkdir(exist_ok=True, mode=0o700)
        self.store = Store(self.paths.db)
        self.runner = Runner()
        self.reconciler = Reconciler(self.runner, self.paths, self._make_child)
        self.control = Control(self.store, self.runner, self.reconciler)
        self.links = Links(self.control, wake_sender=lambda: self.sender.wake())
        self.sync = Sync(self.links, wake_sender=lambda: self.sender.wake())
        self.sender = Sender(self.links)
        self.exits = Exits(self.control, wake_sender=lambda: self.sender.wake())
        self.auth = Auth(self.store, password_file=data_dir / GENERATED_PASSWORD_FILE)
        self.control.on_service_removed = self.sync.forget_service
        # documents from linked cells converge on a thread of their own, bursts coalesced
        self.coalescer = Coalescer(self.control.converge_and_flush, DOCUMENT_COALESCE_S)
        self.control.coalescer = self.coalescer
        self.control.after_change = self.sender.wake
        self.sync.heard_from = self.sender.heard_from
        # dated shares and exit offers end on their date, by a timer of their own
        self.expiry = Expiry(self.control, wake_sender=lambda: self.sender.wake())
        self.sync.expiry = self.expiry.wake
        # the owner's concurrent changes share one apply, one commit and one push
        self.group = self.control.batch_changes()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failures = 0
        self._crashes, self._last_crash = 0, 0.0
        self._repeats = RepeatLog(log)
        # the home router's port mapping: a new mapped endpoint is pushed to every link
        self.portmap = PortMapper.from_env(
            self.store, self.runner, on_change=self._endpoint_changed, repeats=self._repeats
        )
        self.control.port_mapping_error = lambda: self.portmap.last_error
        # /metrics: the reconciler and the sender count into the daemon's own registry
        self.metrics = Metrics()
        self.metrics_token = MetricsToken(data_dir / METRICS_TOKEN_FILE)
        self.reconciler.metrics = self.sender.metrics = self.metrics
        self.metrics.observe(self.links)
        self.expiry.on_expired = self.metrics.expired.inc

    def _endpoint_changed(self) -> None:
        self.sender.wake()
        self.control.converge_soon()

    def _make_child(self, name: str, argv: list[str]) -> Child:
        return Child(name, argv, self.paths.run_dir / f"{name}.log", on_exit=self._child_exited)

    def _child_exited(self, name: str, code: int) -> None:
        self._wake.set()

    def ensure_cell(self) -> None:
        with self.store.read() as conn:
            initialised = cell_table.exists(conn)
        if not initialised:
            cell = self.control.init_cell(InitRequest())
            log.warning(
                "initialised a new cell with defaults: name=%s domain=%s address=%s endpoint=%s; "
                "to change them stop the daemon and run `picell init --name … --domain … "
                "--address … --endpoint …`",
                cell.name,
                cell.domain,
                cell.address,
                cell.endpoint,
            )
            warning = init_warning(cell)
            if warning:
                log.warning("init: %s", warning)

    def ensure_password(self) -> None:
        """Without an admin password, make one and show it once (only its hash is kept)."""
        password = self.auth.ensure_password()
        if password is not None:
            log.warning(
                "web UI: no admin password was set; generated one: %s (also kept, root-only, "
                "in %s until you change it; log in at http://127.0.0.1:%d; change it with "
                "`picell admin password`)",
                password,
                self.auth.password_file,
                self.web_port(),
            )

    def web_port(self) -> int:
        with self.store.read() as conn:
            return admin_table.load(conn).web_port

    def _converge_quietly(self) -> bool:
        try:
            self.control.converge()
        except PicellError:
            return False
        except Exception as exc:  # noqa: BLE001 - EMFILE once killed the reconcile thread
            self._repeats.note(
                f"converge {type(exc).__name__}",
                logging.ERROR,
                f"reconcile failed: {type(exc).__name__}: {exc}; retrying with backoff",
                exc_info=True,
            )
            return False
        return True

    def _loop(self) -> None:
        run_forever("reconcile", self._round, self._stop)

    def _round(self) -> bool:
        """One round of the reconcile thread; True once the daemon stops. Reconcile on the
        period, after a failure with backoff, and when a child exits: a child that keeps
        crashing is restarted ever more slowly (up to the last backoff)."""
        self.bound_logs()
        delay = RECONCILE_PERIOD_S if self._failures == 0 else _backoff(self._failures)
        woke = self._wake.wait(delay)
        if self._stop.is_set():
            return True
        if woke:
            self._wake.clear()
            now = time.monotonic()
            self._crashes = self._crashes + 1 if now - self._last_crash < RECONCILE_PERIOD_S else 1
            self._last_crash = now
            self._stop.wait(_backoff(self._crashes - 1))
        self._failures = 0 if self._converge_quietly() else self._failures + 1
        return False

    def bound_logs(self) -> None:
        """Children write their logs themselves (they outlive the daemon): keep them bounded."""
        for path in self.paths.run_dir.glob("*.log"):
            if bound_log(path):
                log.info("rotated %s into %s.1", path.name, path.name)

    def close(self) -> None:
        """Release the data dir (store and lock); the daemon's last step."""
        self.store.close()
        os.close(self._lock_fd)

    def serve(self) -> None:
        install_repeat_filter()  # a flood must not write a line per event
        before, after = raise_nofile()
        log.info("open files: soft limit %d (was %d at start)", after, before)
        self.bound_logs()
        self.ensure_cell()
        self.ensure_password()
        if not self._converge_quietly():
            self._failures = 1
        cell = self.control.cell()
        sock = self.paths.admin_socket
        # the admin socket is root-only: listen_unix sets 0600 itself; the umask still keeps the
        # other files the daemon writes while it serves private
        old_umask = os.umask(0o077)
        apis = (self.control, self.links, self.sync, self.sender, self.exits, self.auth)
        metrics = (self.metrics, self.metrics_token)
        metrics_app = metrics_api.build_metrics_api(*metrics, cell.network)
        admin_api = build_api(*apis, metrics=metrics)
        web_api = build_web_api(*apis, metrics=metrics)
        servers: list[tuple[Listener, list[socket.socket]]] = [
            (
                Listener(_config(admin_api), Limits("admin", *ADMIN_CONNECTIONS, LOCAL_REQUEST_S)),
                [listen_unix(sock)],
            ),
            (
                Listener(
                    _config(build_mesh_api(self.links, self.sync)),
                    Limits("mesh", *MESH_CONNECTIONS, MESH_REQUEST_S),
                ),
                [listen_tcp(str(cell.ip), cell.mesh_port)],
            ),
            (
                Listener(
                    _config(build_pairing_api(self.links)),
                    Limits("pairing", *PAIRING_CONNECTIONS, PAIRING_REQUEST_S),
                ),
                # dual-stack: a cell whose only public address is IPv6 is paired with too
                listen_tcp_any(cell.pair_port),
            ),
            (
                # our own devices' Prometheus: a listener of its own on the WireGuard address,
                # opened by the firewall to our network only (docs/ARCHITECTURE.md, metrics)
                Listener(
                    _config(metrics_app),
                    Limits("metrics", *METRICS_CONNECTIONS, METRICS_REQUEST_S),
                ),
                [listen_tcp(str(cell.ip), METRICS_PORT)],
            ),
        ]
        # the web UI: loopback only; from elsewhere through an SSH tunnel. A port in use (a
        # service of the host on 8080, say) must not keep the cell itself from running.
        try:
            servers.append(
                (
                    Listener(_config(web_api), Limits("web", *WEB_CONNECTIONS, LOCAL_REQUEST_S)),
                    [listen_tcp("127.0.0.1", self.web_port())],
                )
            )
        except OSError as exc:
            log.error(
                "web UI: cannot listen on 127.0.0.1:%d (%s); the cell runs without it. Choose "
                "another port: stop the daemon, `picell init --web-port N`, start it again",
                self.web_port(),
                exc.strerror,
            )
        self.metrics.gates = {server.limits.name: server.gate for server, _socks in servers}
        loop = threading.Thread(target=self._loop, name="reconcile", daemon=True)
        loop.start()
        self.sender.start()
        self.expiry.start()
        self.portmap.start()

        async def ready() -> None:
            # READY=1 once every listener serves (the first reconcile ran before them)
            while not all(server.started for server, _socks in servers):
                if any(server.should_exit for server, _socks in servers):
                    return
                await asyncio.sleep(0.05)
            sd_notify("READY=1")
            log.info("serving (picell %s, pid %d)", __version__, os.getpid())

        async def main() -> None:
            def stop(*_: object) -> None:
                sd_notify("STOPPING=1")
                for server, _sockets in servers:
                    server.should_exit = True

            anyio.to_thread.current_default_thread_limiter().total_tokens = HANDLER_THREADS
            running = asyncio.get_running_loop()
            running.set_exception_handler(loop_exception_handler(self._repeats))
            for sig in (signal.SIGTERM, signal.SIGINT):
                running.add_signal_handler(sig, stop)
            notifier = asyncio.create_task(ready())
            await asyncio.gather(*(server.serve(sockets=socks) for server, socks in servers))
            notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await notifier

        try:
            asyncio.run(main())
        finally:
            os.umask(old_umask)
            self._stop.set()
            self._wake.set()
            # everything it put in place stays: children detached, rules, routes, mappings
            self.reconciler.stop()
            if sock.exists():
                sock.unlink()
            # the threads stop together within SHUTDOWN_S; a push or a reconcile still under
            # way is left to die with the process (the store is SQLite: a transaction cut
            # short is rolled back, an undelivered document stays pending for the next daemon)
            slow = _stop_all(
                [
                    ("reconcile", lambda: loop.join()),
                    ("portmap", self.portmap.stop),
                    ("sender", self.sender.stop),
                    ("expiry", self.expiry.stop),
                    ("coalescer", self.coalescer.stop),
                    ("group commit", self.group.stop),
                ],
                SHUTDOWN_S,
            )
            if slow:
                log.info("stopped without waiting for: %s", ", ".join(slow))
            else:
                self.store.close()
            log.info("stopped; tunnels and DNS keep running until the next start")
