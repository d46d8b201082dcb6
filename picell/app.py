"""Composition root: builds the store, runner, reconciler, control and servers. No logic.

`serve()` is the daemon: it reconciles once before it serves, then serves the admin API on the
root-only unix socket, re-reconciles on a period and whenever a supervised child exits, and stops
its children on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from picell import __version__
from picell.api import admin, errors
from picell.constants import CHILD_RESTART_BACKOFF_S, RECONCILE_PERIOD_S
from picell.control import Control, InitRequest
from picell.errors import PicellError
from picell.reconcile import Reconciler
from picell.state import Paths
from picell.store import cell as cell_table
from picell.store.db import Store
from picell.system.children import Child
from picell.system.run import Runner

log = logging.getLogger("picell")


def _backoff(attempt: int) -> float:
    return CHILD_RESTART_BACKOFF_S[min(attempt, len(CHILD_RESTART_BACKOFF_S) - 1)]


def build_api(control: Control) -> FastAPI:
    app = FastAPI(title="picell admin API", version=__version__)
    app.state.control = control
    errors.install(app)
    app.include_router(admin.router)
    return app


class Daemon:
    def __init__(self, data_dir: Path) -> None:
        self.paths = Paths(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(data_dir, 0o700)
        for d in (self.paths.run_dir, self.paths.unbound_dir):
            d.mkdir(exist_ok=True, mode=0o700)
        self.store = Store(self.paths.db)
        self.runner = Runner()
        self.reconciler = Reconciler(self.runner, self.paths, self._make_child)
        self.control = Control(self.store, self.runner, self.reconciler)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failures = 0

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

    def _converge_quietly(self) -> bool:
        try:
            self.control.converge()
        except PicellError:
            return False
        return True

    def _loop(self) -> None:
        """Reconcile on the period, after a failure with backoff, and when a child exits: a
        child that keeps crashing is restarted ever more slowly (up to the last backoff)."""
        crashes, last_crash = 0, 0.0
        while not self._stop.is_set():
            delay = RECONCILE_PERIOD_S if self._failures == 0 else _backoff(self._failures)
            woke = self._wake.wait(delay)
            if self._stop.is_set():
                return
            if woke:
                self._wake.clear()
                now = time.monotonic()
                crashes = crashes + 1 if now - last_crash < RECONCILE_PERIOD_S else 1
                last_crash = now
                self._stop.wait(_backoff(crashes - 1))
            self._failures = 0 if self._converge_quietly() else self._failures + 1

    def serve(self) -> None:
        self.ensure_cell()
        if not self._converge_quietly():
            self._failures = 1
        sock = self.paths.admin_socket
        if sock.exists():
            sock.unlink()
        old_umask = os.umask(0o077)  # the admin socket is root-only
        config = uvicorn.Config(
            build_api(self.control), uds=str(sock), log_level="warning", access_log=False
        )
        server = uvicorn.Server(config)
        loop = threading.Thread(target=self._loop, name="reconcile", daemon=True)
        loop.start()
        # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler
        # lets the daemon then stop its children instead of dying with them still running.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        try:
            server.run()
        finally:
            os.umask(old_umask)
            self._stop.set()
            self._wake.set()
            loop.join(timeout=5)
            self.reconciler.stop()
            if sock.exists():
                sock.unlink()
            self.store.close()
