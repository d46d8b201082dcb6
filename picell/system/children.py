"""Supervised long-running children (wireguard-go -f, unbound -d).

A `Child` is started in the foreground mode of its program, watched by a thread, and restarted
with backoff when it exits unexpectedly; `on_exit` tells the daemon so it can reconcile again.
The watcher never dies of an exception (`run_forever`): a failed wait is retried after a backoff,
a failing `on_exit` is logged.
It must not hold any policy: what to run and when is the caller's business.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from picell.system.limits import run_forever

log = logging.getLogger(__name__)


class Child:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        on_exit: Callable[[str, int], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the child if it is not running (idempotent)."""
        with self._lock:
            if self.running():
                return
            self._stopping = False
            logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            try:
                self._proc = subprocess.Popen(  # noqa: S603 - argv list
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ, LC_ALL="C"),
                    start_new_session=True,
                )
            finally:
                logf.close()
            proc = self._proc
            log.info("started %s (pid %d): %s", self.name, proc.pid, " ".join(self.argv))
            threading.Thread(target=self._watch, args=(proc,), daemon=True).start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        # an error of the wait itself (EINTR, ECHILD, ...) is logged and the wait retried
        run_forever(f"{self.name} watcher", lambda: proc.wait() is not None, threading.Event())
        if self._stopping or proc is not self._proc:
            return
        self.restarts += 1
        log.warning("%s exited with %d; the daemon will restart it", self.name, proc.returncode)
        if self.on_exit:
            try:
                self.on_exit(self.name, proc.returncode)
            except Exception:  # noqa: BLE001 - told once; the periodic reconcile restarts it
                log.exception("%s watcher: telling the daemon failed", self.name)

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            proc = self._proc
            if proc is None or proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def kill_stale(pidfile: Path, program: str) -> None:
    """Kill a process left behind by an earlier daemon, if the pidfile names `program`."""
    try:
        pid = int(pidfile.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except (OSError, ValueError, IndexError):
        return
    if os.path.basename(cmdline.decode(errors="replace")) == program:
        log.warning("killing stale %s (pid %d)", program, pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(50):  # up to 5 s for it to release its sockets
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)


def write_sysctl(key: str, value: str) -> bool:
    """Set /proc/sys/<key>; returns True when the value changed. No process is spawned."""
    path = Path("/proc/sys") / key.replace(".", "/")
    current = path.read_text().strip()
    if current == value:
        return False
    path.write_text(value + "\n")
    return True
