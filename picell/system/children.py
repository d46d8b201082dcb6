"""Supervised long-running children (wireguard-go -f, unbound -d) that outlive the daemon.

A `Child` is started in the foreground mode of its program, in a session of its own, and
watched by a thread; when it exits unexpectedly `on_exit` tells the daemon so it can reconcile
(and restart it) again. The watcher never dies of an exception (`run_forever`).

The tunnels and DNS answers must outlive a stopped daemon (an upgrade, a restart): a child is
never stopped with the daemon (`detach`), and the next daemon `adopt`s it from its pid file
(`<name>.pid`: pid and start time, checked against /proc with its exact argv, so a recycled pid
is never mistaken for it). An adopted child is watched through a pidfd. `stop` ends a child for
good (an interface removed, a resolver no longer wanted).

Children write to their log file directly (they outlive the daemon, a pipe would not);
`bound_log` keeps each file bounded (copy-truncate into `<name>.log.1`).
It must not hold any policy: what to run and when is the caller's business.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from picell.system.limits import run_forever

log = logging.getLogger(__name__)

LOG_MAX_BYTES = 1 << 20  # a child's log file beyond this is moved to <name>.log.1


def process_start_time(pid: int) -> int | None:
    """The start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), or None when
    it does not run (gone, or a zombie its new parent has not reaped yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def process_argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _wait_gone(pid: int, timeout_s: float | None) -> bool:
    """Wait until `pid` (not necessarily our child) has exited; True when it has."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd (an old kernel): poll /proc
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while Path(f"/proc/{pid}").exists():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


class Child:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        on_exit: Callable[[str, int], None] | None = None,
        pidfile: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.pidfile = pidfile or log_path.with_suffix(".pid")
        self.on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._adopted: tuple[int, int] | None = None  # (pid, start time) of an earlier daemon's
        self._stopping = False
        self._lock = threading.Lock()
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        return self._adopted[0] if self._adopted else None

    @property
    def adopted(self) -> bool:
        return self._adopted is not None

    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        if self._adopted is not None:
            return process_start_time(self._adopted[0]) == self._adopted[1]
        return False

    def adopt(self) -> bool:
        """Take over the process our pid file names, if it still runs exactly our argv."""
        with self._lock:
            if self.running():
                return True
            try:
                pid, started = (int(f) for f in self.pidfile.read_text().split()[:2])
            except (OSError, ValueError):
                return False
            if process_start_time(pid) != started or process_argv(pid) != self.argv:
                return False
            self._proc, self._adopted, self._stopping = None, (pid, started), False
            log.info("adopted %s (pid %d) left running by the previous daemon", self.name, pid)
            threading.Thread(target=self._watch_adopted, args=(pid,), daemon=True).start()
            return True

    def start(self) -> None:
        """Start the child if it is not running (idempotent)."""
        with self._lock:
            if self.running():
                return
            self._stopping = False
            self._adopted = None
            logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            try:
                self._proc = subprocess.Popen(  # noqa: S603 - argv list
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ, LC_ALL="C"),
                    # its own session: a terminal's Ctrl-C or the end of the daemon's process
                    # group leaves it running (systemd: KillMode=process)
                    start_new_session=True,
                )
            finally:
                logf.close()
            proc = self._proc
            self._write_pidfile(proc.pid)
            log.info("started %s (pid %d): %s", self.name, proc.pid, " ".join(self.argv))
            threading.Thread(target=self._watch, args=(proc,), daemon=True).start()

    def _write_pidfile(self, pid: int) -> None:
        started = process_start_time(pid)
        tmp = self.pidfile.with_suffix(".pid.tmp")
        tmp.write_text(f"{pid} {started if started is not None else 0}\n")
        os.replace(tmp, self.pidfile)

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        # an error of the wait itself (EINTR, ECHILD, ...) is logged and the wait retried
        run_forever(f"{self.name} watcher", lambda: proc.wait() is not None, threading.Event())
        if self._stopping or proc is not self._proc:
            return
        self._exited(proc.returncode)

    def _watch_adopted(self, pid: int) -> None:
        run_forever(f"{self.name} watcher", lambda: _wait_gone(pid, None), threading.Event())
        if self._stopping or self._adopted is None or self._adopted[0] != pid:
            return
        self._exited(-1)  # not our child: its exit status is its parent's (init's)

    def _exited(self, code: int) -> None:
        self.restarts += 1
        log.warning("%s exited with %d; the daemon will restart it", self.name, code)
        if self.on_exit:
            try:
                self.on_exit(self.name, code)
            except Exception:  # noqa: BLE001 - told once; the periodic reconcile restarts it
                log.exception("%s watcher: telling the daemon failed", self.name)

    def detach(self) -> None:
        """The daemon stops: leave the child running (the next daemon adopts it)."""
        with self._lock:
            self._stopping = True

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the child for good (SIGTERM, SIGKILL after `timeout_s`)."""
        with self._lock:
            self._stopping = True
            proc, adopted = self._proc, self._adopted
            self._adopted = None
            self.pidfile.unlink(missing_ok=True)
            if proc is not None:
                if proc.poll() is not None:
                    return
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            elif adopted is not None and process_start_time(adopted[0]) == adopted[1]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(adopted[0], signal.SIGTERM)
                    if not _wait_gone(adopted[0], timeout_s):
                        os.kill(adopted[0], signal.SIGKILL)
                        _wait_gone(adopted[0], timeout_s)


def bound_log(path: Path, max_bytes: int = LOG_MAX_BYTES) -> bool:
    """Copy-truncate `path` into `path.1` once it is larger than `max_bytes` (the child keeps
    writing to the same file with O_APPEND, so it continues at the new end). True if rotated."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
        shutil.copyfile(path, path.with_name(path.name + ".1"))
        os.truncate(path, 0)
    except OSError:
        return False
    return True


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
