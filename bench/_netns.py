"""A scratch network namespace for benchmarks: create one, run a command in it, remove it.

    with scratch_netns("pcb") as ns:          # e.g. "pcb3f9a1c"; lo is up
        code = run_in_netns(ns, [sys.executable, script, "--inner", ns])

On exit (also on an exception or Ctrl-C) every process still inside the namespace is stopped
(the namespace is uniquely named and ours alone, so they are ours) and the namespace is deleted.
A process inside can check where it runs with `in_netns(name)` before touching the network.
Commands are argv lists run as root; nothing here touches the host's own namespace.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

NETNS_DIR = Path("/run/netns")
PR_SET_PDEATHSIG = 1
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,8}$")  # prefix + 6 hex digits <= 15 characters


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def netns_pids(name: str) -> list[int]:
    """Pids of the processes whose network namespace is `name`."""
    out = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _stop_leftovers(name: str, grace_s: float = 2.0) -> None:
    pids = [p for p in netns_pids(name) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.05)
        if not pids:
            return


@contextmanager
def scratch_netns(prefix: str) -> Iterator[str]:
    """Create a uniquely named namespace `<prefix><6 hex>` with lo up; remove it on exit."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"netns prefix must match {_PREFIX_RE.pattern}: {prefix!r}")
    for _ in range(8):
        name = f"{prefix}{secrets.token_hex(3)}"
        if not (NETNS_DIR / name).exists():
            break
    else:
        raise RuntimeError(f"no free namespace name with prefix {prefix!r}")
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        _stop_leftovers(name)
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def in_netns(name: str) -> bool:
    """True when the calling process runs in the named namespace."""
    try:
        mine = os.stat("/proc/self/ns/net")
        named = os.stat(NETNS_DIR / name)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def _term_with_parent() -> None:
    """In the forked child: get SIGTERM if the parent dies (even by SIGKILL)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_in_netns(name: str, argv: Sequence[str], grace_s: float = 10.0) -> int:
    """Run `ip netns exec NAME argv...` in the foreground and return its exit code.

    On Ctrl-C the child (same process group, so it got SIGINT too) is given `grace_s` to clean
    up before SIGTERM, then SIGKILL; on any other exception it is sent SIGTERM at once. If this
    process is killed outright the child gets SIGTERM (PR_SET_PDEATHSIG); the namespace's name
    then stays behind until `ip netns delete NAME`.
    """
    proc = subprocess.Popen(["ip", "netns", "exec", name, *argv], preexec_fn=_term_with_parent)
    try:
        return proc.wait()
    except BaseException as exc:
        wait_first = grace_s if isinstance(exc, KeyboardInterrupt) else 0.0
        try:
            proc.wait(timeout=wait_first)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
