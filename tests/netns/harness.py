"""Harness for root-run network-namespace tests of picell.

Everything here is plain Python driving ``ip``, ``wg``, ``wg-quick``, ``wireguard-go``, ``nft``,
``dig`` and ``ping`` with argv lists (never a shell). It provides:

* :func:`wait_until` - the only place where tests may sleep: poll a check until it holds.
* :class:`Topology` - uniquely named network namespaces (``pc<tag><role>``), bridges living in a
  dedicated switch namespace, veth links, addresses and default routes; it always removes what
  it created (processes, namespaces, ``/etc/netns/<ns>``, WireGuard sockets), also from
  ``atexit`` and, for runs killed outright, at the start of the next run.
* :class:`Netns` - one namespace: ``run``/``popen`` commands in it, set its resolver, and probe it
  (``ping``, ``dig``, ``tcp_connect``, ``http_get``), serve HTTP or TCP echo, keep a long-lived
  TCP echo session (:class:`EchoSession`) whose liveness can be checked.
* :class:`Device` - a WireGuard config text, exactly as a phone would receive it, brought up with
  the real ``wg-quick up`` inside a namespace, using the two shims of ``tests/netns/shims``.

Network safety: namespaces are only ever joined to each other, never to the host, and the
addresses given to :meth:`Topology.attach` and :meth:`Topology.link` must come from the
documentation ranges 192.0.2.0/24, 198.51.100.0/24 and 203.0.113.0/24.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SHIMS_DIR = Path(__file__).resolve().parent / "shims"
WG_SOCKET_DIR = Path("/var/run/wireguard")
ETC_NETNS = Path("/etc/netns")
# One JSON file per live Topology, naming what it owns: lets a later run reap what a run killed
# with SIGKILL left behind.
STATE_DIR = Path("/run/picell-netns-tests")
PREFIX = "pc"
IFNAME_MAX = 15
TEST_NETS = tuple(
    ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)
_ROLE_RE = re.compile(r"^[a-z0-9]+$")
_IFNAME_RE = re.compile(r"^[a-zA-Z0-9_=+.-]{1,15}$")
PYTHON = sys.executable


# --------------------------------------------------------------------------------------------
# Polling


def wait_until(
    check: Callable[[], T], timeout_s: float, message: str, interval_s: float = 0.1
) -> T:
    """Call ``check`` until it returns a truthy value, and return that value.

    An exception raised by ``check`` counts as "not yet" (it is remembered for the failure
    message); a falsy result too. An assertion-style check should therefore ``return True`` at
    its end. On deadline, raise ``AssertionError(message + last result/error)``.
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    last_result: object = None
    while True:
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 - any failure of the check means "not yet"
            last_error = exc
        else:
            if result:
                return result
            last_result = result
            last_error = None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = (
                f"last error: {last_error!r}" if last_error else f"last result: {last_result!r}"
            )
            raise AssertionError(f"{message} (not within {timeout_s:g} s; {detail})")
        # The one sleep of the test suite: polling interval between two checks.
        time.sleep(min(interval_s, remaining))


# --------------------------------------------------------------------------------------------
# Commands


class CommandError(subprocess.CalledProcessError):
    """A failed command, whose message includes its output (CalledProcessError's does not)."""

    def __str__(self) -> str:
        out = _text(self.stdout).strip()
        err = _text(self.stderr).strip()
        return (
            f"{' '.join(map(str, self.cmd))!s} exited with {self.returncode}"
            + (f"\n--- stdout ---\n{out}" if out else "")
            + (f"\n--- stderr ---\n{err}" if err else "")
        )


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
    input: str | None = None,  # noqa: A002 - same name as subprocess.run's argument
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` on the host (text mode, output captured); raise CommandError if ``check``."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def wg_keypair() -> tuple[str, str]:
    """A fresh WireGuard ``(private_key, public_key)``, keys passed through stdin only."""
    private = run(["wg", "genkey"]).stdout.strip()
    public = run(["wg", "pubkey"], input=private + "\n").stdout.strip()
    return private, public


def check_test_address(addr: str) -> None:
    """Raise ValueError unless ``addr`` (``A.B.C.D`` or CIDR) lies in a documentation range."""
    iface = ipaddress.ip_interface(addr)
    if not any(
        isinstance(iface.network, ipaddress.IPv4Network) and iface.network.subnet_of(net)
        for net in TEST_NETS
    ):
        allowed = ", ".join(map(str, TEST_NETS))
        raise ValueError(f"{addr} is outside the test ranges ({allowed})")


# --------------------------------------------------------------------------------------------
# Processes


def _pid_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time), to tell a pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a process that is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    match = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
    return match is not None and match.group(1) not in ("Z", "X")


def _become_subreaper() -> None:
    """Make this process adopt orphans (PR_SET_CHILD_SUBREAPER).

    wg-quick's wireguard-go is detached with setsid and outlives its parent; PID 1 of these
    machines does not reap orphans, so they would stay zombies forever. As subreaper we adopt
    them and reap them in teardown (only pids we saw in our own namespaces).
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER = 36


def _reap(pids: set[int]) -> None:
    """Collect exit statuses of those ``pids`` that are our (adopted) children."""
    for pid in list(pids):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pids.discard(pid)  # not our child (or already reaped)
            continue
        if done:
            pids.discard(pid)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def netns_pids(name: str) -> list[int]:
    """Pids of the processes whose network namespace is ``name`` (``ip netns pids``)."""
    proc = run(["ip", "netns", "pids", name], check=False, timeout=10)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _kill_netns_processes(name: str, reaped: set[int]) -> None:
    """SIGTERM, then SIGKILL, every process in namespace ``name``; reap our children."""
    pids = netns_pids(name)
    reaped.update(pids)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    try:
        wait_until(
            lambda: not [p for p in netns_pids(name) if pid_alive(p)],
            timeout_s=3,
            message=f"processes of {name} did not stop on SIGTERM",
        )
    except AssertionError:
        for pid in netns_pids(name):
            reaped.add(pid)
            _signal(pid, signal.SIGKILL)
        wait_until(
            lambda: not [p for p in netns_pids(name) if pid_alive(p)],
            timeout_s=5,
            message=f"processes of {name} did not stop on SIGKILL",
        )
    _reap(reaped)


def _destroy_netns(name: str, reaped: set[int]) -> None:
    """Kill the processes of ``name``, delete it and its /etc/netns directory."""
    if (Path("/run/netns") / name).exists():
        _kill_netns_processes(name, reaped)
        run(["ip", "netns", "del", name], check=False, timeout=10)
    shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


class Proc:
    """A background process started in a namespace, output sent to a log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 3) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; always reaps."""
        if self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, pid={self.pid}, log={str(self.log)!r})"


# Inline programs run with the harness's own interpreter (`python -I -c`) inside a namespace.

_HTTP_SERVER = r"""
import http.server, pathlib, socketserver, sys
host, port, body, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        # "@caller": answer with the caller's address (an "internet" oracle for exit tests)
        reply = self.client_address[0].encode() if body == b"@caller" else body
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.client_address[0], fmt % args))
        sys.stderr.flush()
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        # HTTPServer.server_bind looks up its own name (getfqdn): a DNS query nobody needs
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = host, port
server = Server((host, port), Handler)
pathlib.Path(ready).write_text("ready")
server.serve_forever()
"""

_HTTP_GET = r"""
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=float(sys.argv[2])) as response:
        sys.stdout.write(response.read().decode("utf-8", "replace"))
except Exception as exc:
    sys.stderr.write(repr(exc))
    sys.exit(1)
"""

_TCP_CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError as exc:
    sys.stderr.write(repr(exc))
    sys.exit(1)
"""

_ECHO_SERVER = r"""
import pathlib, socket, sys, threading
host, port, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
server = socket.create_server((host, port))
def handle(conn, peer):
    sys.stderr.write("connection from %s:%d\n" % peer)
    sys.stderr.flush()
    with conn:
        for line in conn.makefile("rb"):
            conn.sendall(line)
pathlib.Path(ready).write_text("ready")
while True:
    conn, peer = server.accept()
    threading.Thread(target=handle, args=(conn, peer), daemon=True).start()
"""

# Sends a numbered line every INTERVAL seconds on one TCP connection, and appends
# "<time.monotonic()> <line>" to OUT for each echoed line (CLOCK_MONOTONIC is system-wide).
_ECHO_CLIENT = r"""
import socket, sys, threading, time
host, port, out, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
conn = socket.create_connection((host, port), timeout=10)
conn.settimeout(None)
sys.stderr.write("connected from %s:%d\n" % conn.getsockname()[:2])
sys.stderr.flush()
def read():
    with open(out, "a", buffering=1) as f:
        for line in conn.makefile("rb"):
            f.write("%f %s\n" % (time.monotonic(), line.decode().strip()))
    sys.stderr.write("connection closed by peer\n")
    sys.stderr.flush()
threading.Thread(target=read, daemon=True).start()
n = 0
while True:
    n += 1
    conn.sendall(b"ping %d\n" % n)
    time.sleep(interval)
"""


class EchoSession(Proc):
    """A long-lived TCP connection to an echo server, sending a line every ``interval_s``.

    Each echoed line is recorded with its ``time.monotonic()`` arrival time, so a test can ask
    whether replies still arrive (e.g. that an established flow stops after a revocation).
    """

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path, replies: Path) -> None:
        super().__init__(name, popen, log)
        self.replies_file = replies

    def reply_times(self) -> list[float]:
        try:
            text = self.replies_file.read_text()
        except FileNotFoundError:
            return []
        return [float(line.split()[0]) for line in text.splitlines() if line.strip()]

    def last_reply(self) -> float | None:
        times = self.reply_times()
        return times[-1] if times else None

    def alive(self, since: float) -> bool:
        """True if a reply arrived after ``since`` (a ``time.monotonic()`` value)."""
        last = self.last_reply()
        return last is not None and last > since

    def silent_for(self, seconds: float) -> bool:
        """True if no reply arrived during the last ``seconds`` (and at least one ever did)."""
        last = self.last_reply()
        return last is not None and time.monotonic() - last >= seconds


# --------------------------------------------------------------------------------------------
# Namespaces


@dataclass(eq=False)
class Bridge:
    """A Linux bridge inside the topology's switch namespace."""

    role: str
    name: str
    switch: Netns


@dataclass(eq=False)
class Netns:
    """One network namespace of a :class:`Topology`."""

    name: str
    role: str
    topology: Topology = field(repr=False)

    # -- commands --

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed with ``ip netns exec NAME``."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
        input: str | None = None,  # noqa: A002
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace, text output captured; CommandError if ``check``."""
        return run(self.argv(argv), check=check, timeout=timeout, env=env, input=input)

    def python(
        self, code: str, *args: str, check: bool = False, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run inline Python ``code`` (with ``args`` as sys.argv[1:]) in the namespace."""
        return self.run([PYTHON, "-I", "-c", code, *args], check=check, timeout=timeout)

    def popen(
        self, argv: Sequence[str], *, name: str | None = None, env: Mapping[str, str] | None = None
    ) -> Proc:
        """Start ``argv`` in the background in the namespace; stopped at teardown.

        stdin is /dev/null and stdout/stderr go to a log file (``Proc.log``). ``ip netns exec``
        execs the command, so ``Proc.pid`` is the command's own pid.
        """
        return self.topology._popen(self, argv, name=name, env=env)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a sysctl inside the namespace (``net.*`` keys are per namespace)."""
        self.run(["sysctl", "-qw", f"{key}={value}"])

    def set_resolver(self, *ips: str) -> None:
        """Make ``ips`` the namespace's only resolvers (/etc/netns/NS/resolv.conf).

        Only commands started after the file first exists see it (ip netns exec bind-mounts it
        at start); it is written in place so that those see later changes.
        """
        path = ETC_NETNS / self.name / "resolv.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.writelines(f"nameserver {ip}\n" for ip in ips)

    def resolv_conf(self) -> str | None:
        """Contents of /etc/netns/NS/resolv.conf, None if absent."""
        try:
            return (ETC_NETNS / self.name / "resolv.conf").read_text()
        except FileNotFoundError:
            return None

    # -- probes --

    def ping(self, addr: str, count: int = 1, timeout_s: float = 2) -> bool:
        """True if at least one of ``count`` pings of ``addr`` is answered."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", f"{timeout_s:g}", addr]
        return self.run(argv, check=False, timeout=count * (timeout_s + 1) + 5).returncode == 0

    def dig(self, name: str, server: str | None = None, timeout_s: int = 1) -> list[str]:
        """IPv4 addresses of ``name`` (A records); [] on NXDOMAIN/REFUSED/timeout.

        Uses the namespace's resolv.conf unless ``server`` is given.
        """
        argv = ["dig", "+short", f"+time={timeout_s}", "+tries=1"]
        argv += [f"@{server}"] if server else []
        out = self.run([*argv, name, "A"], check=False, timeout=timeout_s + 10).stdout
        addrs = []
        for line in out.split():
            with contextlib.suppress(ValueError):
                addrs.append(str(ipaddress.IPv4Address(line)))
        return addrs

    def dig_status(self, name: str, server: str | None = None, timeout_s: int = 1) -> str:
        """The DNS rcode (``NOERROR``, ``NXDOMAIN``, ``REFUSED``...) or ``TIMEOUT``."""
        argv = ["dig", "+noall", "+comments", f"+time={timeout_s}", "+tries=1"]
        argv += [f"@{server}"] if server else []
        out = self.run([*argv, name, "A"], check=False, timeout=timeout_s + 10).stdout
        match = re.search(r"status: ([A-Z]+)", out)
        return match.group(1) if match else "TIMEOUT"

    def tcp_connect(self, host: str, port: int, timeout_s: float = 2) -> bool:
        """True if a TCP connection to ``host:port`` is accepted within ``timeout_s``."""
        proc = self.python(_TCP_CONNECT, host, str(port), str(timeout_s), timeout=timeout_s + 10)
        return proc.returncode == 0

    def http_get(self, url: str, timeout_s: float = 3) -> str | None:
        """Body of a 2xx answer to GET ``url`` (no proxy, ns resolver); None on any failure."""
        proc = self.python(_HTTP_GET, url, str(timeout_s), timeout=timeout_s + 10)
        return proc.stdout if proc.returncode == 0 else None

    # -- servers and sessions --

    def _start_ready(self, code: str, args: Sequence[str], name: str, timeout_s: float) -> Proc:
        ready = self.topology.workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        proc = self.popen([PYTHON, "-I", "-c", code, *args, str(ready)], name=name)

        def is_ready() -> bool:
            if not proc.running():
                raise RuntimeError(f"{name} exited: {proc.log_text()}")
            return ready.exists()

        wait_until(is_ready, timeout_s, f"{name} in {self.name} did not start listening")
        return proc

    def serve_http(self, addr: str, port: int, body: str, timeout_s: float = 10) -> Proc:
        """An HTTP server on ``addr:port`` answering every GET with ``body`` (200, text/plain),
        or with the caller's source address when ``body`` is ``"@caller"``. Its log has one
        ``SOURCE "GET PATH HTTP/1.1" 200 -`` line per request.

        Returns once it listens; stopped at teardown (or with ``Proc.stop``).
        """
        name = self.topology._unique_name(f"http-{self.role}-{port}")
        return self._start_ready(_HTTP_SERVER, [addr, str(port), body], name, timeout_s)

    def serve_tcp_echo(self, addr: str, port: int, timeout_s: float = 10) -> Proc:
        """A line-echo TCP server on ``addr:port`` (one thread per connection)."""
        name = self.topology._unique_name(f"echo-{self.role}-{port}")
        return self._start_ready(_ECHO_SERVER, [addr, str(port)], name, timeout_s)

    def tcp_echo_session(
        self, host: str, port: int, interval_s: float = 0.2, wait_s: float | None = 10
    ) -> EchoSession:
        """Open one TCP connection to an echo server at ``host:port`` and keep it busy.

        With ``wait_s`` set, returns once the first reply arrived (AssertionError otherwise).
        """
        name = self.topology._unique_name(f"session-{self.role}-{port}")
        replies = self.topology.workdir / f"{name}.replies"
        argv = [PYTHON, "-I", "-c", _ECHO_CLIENT, host, str(port), str(replies), str(interval_s)]
        base = self.popen(argv, name=name)
        session = EchoSession(name, base.popen, base.log, replies)
        self.topology._replace_proc(base, session)
        if wait_s is not None:

            def first_reply() -> bool:
                if session.reply_times():
                    return True
                if not session.running():
                    raise RuntimeError(f"session exited: {session.log_text()}")
                return False

            wait_until(first_reply, wait_s, f"no echo from {host}:{port} in {self.name}")
        return session

    # -- WireGuard --

    def wireguard_go(self, ifname: str, timeout_s: float = 10) -> Proc:
        """Start ``wireguard-go -f IFNAME`` here (supervised child); return once usable.

        ``ifname`` must be unique per host (see :meth:`Topology.ifname`): the UAPI socket
        /var/run/wireguard/IFNAME.sock is shared by all namespaces.
        """
        self.topology.claim_wg_ifname(ifname)
        proc = self.popen(["wireguard-go", "-f", ifname], name=f"wireguard-go-{ifname}")
        sock = WG_SOCKET_DIR / f"{ifname}.sock"

        def ready() -> bool:
            if not proc.running():
                raise RuntimeError(f"wireguard-go exited: {proc.log_text()}")
            link = self.run(["ip", "link", "show", "dev", ifname], check=False)
            return link.returncode == 0 and sock.is_socket()

        wait_until(ready, timeout_s, f"wireguard-go {ifname} in {self.name} not ready")
        return proc

    def device(self, config_text: str, hint: str = "wg") -> Device:
        """A :class:`Device` for ``config_text`` with a fresh host-unique interface name.

        Not up yet: call :meth:`Device.up`. Removed at teardown.
        """
        return Device(self, config_text, self.topology.ifname(hint))

    def pids(self) -> list[int]:
        return netns_pids(self.name)


class Topology:
    """Network namespaces, bridges and links for one test module; always cleaned up.

    Use as a context manager (or call :meth:`close`). Names: namespaces ``pc<tag><role>``
    where ``<tag>`` is 4 random hex digits shared by the topology; interfaces also carry the
    tag so that every name is unique per host and at most 15 characters.
    """

    _live: set[Topology] = set()
    _atexit_registered = False

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("network-namespace tests must run as root")
        _become_subreaper()
        reap_stale()
        self.tag = self._fresh_tag()
        self.namespaces: list[Netns] = []
        self.bridges: list[Bridge] = []
        self.procs: list[Proc] = []
        self.devices: list[Device] = []
        self.wg_ifnames: list[str] = []
        self._seen_pids: set[int] = set()
        self._counter = 0
        self._names: set[str] = set()
        self._switch: Netns | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.workdir = Path(tempfile.mkdtemp(prefix=f"picell-netns-{self.tag}-"))
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._state_file = STATE_DIR / f"{self.tag}.json"
        self._save_state()
        Topology._live.add(self)
        if not Topology._atexit_registered:
            atexit.register(Topology._close_all)
            Topology._atexit_registered = True

    # -- naming --

    @staticmethod
    def _fresh_tag() -> str:
        existing = run(["ip", "netns", "list"], check=False).stdout
        while True:
            tag = secrets.token_hex(2)
            if f"{PREFIX}{tag}" not in existing and not (STATE_DIR / f"{tag}.json").exists():
                return tag

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def _unique_name(self, base: str) -> str:
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}-{n}"
        self._names.add(name)
        return name

    def ifname(self, hint: str = "wg") -> str:
        """A fresh interface name ``<hint><tag><n>`` (≤ 15 chars), unique per host."""
        suffix = f"{self.tag}{self._next()}"
        name = f"{hint[: IFNAME_MAX - len(suffix)]}{suffix}"
        if not _IFNAME_RE.match(name):
            raise ValueError(f"bad interface name {name!r}")
        return name

    def claim_wg_ifname(self, ifname: str) -> None:
        """Record a WireGuard interface name (e.g. one picell will create) for teardown.

        Raises ValueError if the name is invalid or already in use on this host. Teardown
        removes /var/run/wireguard/IFNAME.sock; its wireguard-go dies with the namespace.
        """
        if not _IFNAME_RE.match(ifname):
            raise ValueError(f"bad interface name {ifname!r} (wg-quick: [a-zA-Z0-9_=+.-]{{1,15}})")
        if ifname in self.wg_ifnames or (WG_SOCKET_DIR / f"{ifname}.sock").exists():
            raise ValueError(f"WireGuard interface {ifname} already exists on this host")
        self.wg_ifnames.append(ifname)
        self._save_state()

    # -- namespaces --

    def add_ns(self, role: str) -> Netns:
        """Create namespace ``pc<tag><role>`` with ``lo`` up (role: [a-z0-9], ≤ 9 chars)."""
        if not _ROLE_RE.match(role) or len(PREFIX) + len(self.tag) + len(role) > IFNAME_MAX:
            raise ValueError(f"bad role {role!r}: [a-z0-9]+, at most 9 characters")
        name = f"{PREFIX}{self.tag}{role}"
        if any(ns.name == name for ns in self.namespaces):
            raise ValueError(f"role {role!r} already used in this topology")
        ns = Netns(name=name, role=role, topology=self)
        # Recorded before creation so that a failure half-way is still cleaned up.
        self.namespaces.append(ns)
        self._save_state()
        run(["ip", "netns", "add", name])
        (ETC_NETNS / name).mkdir(parents=True, exist_ok=True)
        # Until a test names a resolver, name lookups stay inside the namespace: without this
        # file, `ip netns exec` would use the host's resolv.conf and its resolver's address.
        ns.set_resolver("127.0.0.1")
        ns.run(["ip", "link", "set", "lo", "up"])
        return ns

    @property
    def switch(self) -> Netns:
        """The namespace holding every bridge (created on first use)."""
        if self._switch is None:
            self._switch = self.add_ns("switch")
        return self._switch

    def bridge(self, role: str) -> Bridge:
        """A bridge named ``br-<role>`` in the switch namespace."""
        if not _ROLE_RE.match(role) or len(role) > IFNAME_MAX - 3:
            raise ValueError(f"bad bridge role {role!r}")
        name = f"br-{role}"
        if any(b.name == name for b in self.bridges):
            raise ValueError(f"bridge {role!r} already exists")
        sw = self.switch
        sw.run(["ip", "link", "add", name, "type", "bridge"])
        sw.run(["ip", "link", "set", name, "up"])
        bridge = Bridge(role=role, name=name, switch=sw)
        self.bridges.append(bridge)
        return bridge

    def attach(self, ns: Netns, bridge: Bridge, addr_cidr: str, gw: str | None = None) -> str:
        """Plug ``ns`` into ``bridge`` with a veth holding ``addr_cidr``; return its ifname.

        ``gw`` (optional) becomes the namespace's default route.
        """
        check_test_address(addr_cidr)
        if gw is not None:
            check_test_address(gw)
        n = self._next()
        inner = f"e{self.tag}{n}{bridge.role}"[:IFNAME_MAX]
        outer = f"s{self.tag}{n}{ns.role}"[:IFNAME_MAX]
        run(["ip", "link", "add", inner, "netns", ns.name, "type", "veth",
             "peer", "name", outer, "netns", bridge.switch.name])  # fmt: skip
        bridge.switch.run(["ip", "link", "set", outer, "master", bridge.name, "up"])
        self._configure(ns, inner, addr_cidr, gw)
        return inner

    def link(self, ns1: Netns, addr1: str, ns2: Netns, addr2: str) -> tuple[str, str]:
        """A direct veth between ``ns1`` (``addr1``, CIDR) and ``ns2``; return both ifnames."""
        check_test_address(addr1)
        check_test_address(addr2)
        n = self._next()
        if1 = f"a{self.tag}{n}{ns2.role}"[:IFNAME_MAX]
        if2 = f"b{self.tag}{n}{ns1.role}"[:IFNAME_MAX]
        run(["ip", "link", "add", if1, "netns", ns1.name, "type", "veth",
             "peer", "name", if2, "netns", ns2.name])  # fmt: skip
        self._configure(ns1, if1, addr1, None)
        self._configure(ns2, if2, addr2, None)
        return if1, if2

    @staticmethod
    def _configure(ns: Netns, ifname: str, addr_cidr: str, gw: str | None) -> None:
        ns.run(["ip", "addr", "add", addr_cidr, "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])
        if gw is not None:
            ns.run(["ip", "route", "replace", "default", "via", gw])

    # -- partitions on a bridge --

    def partition(self, ip_a: str, ip_b: str) -> None:
        """Drop all traffic between ``ip_a`` and ``ip_b`` on every bridge (both ways)."""
        check_test_address(ip_a)
        check_test_address(ip_b)
        rules = "\n".join(
            [
                "table bridge picell_partition {",
                "  chain forward {",
                "    type filter hook forward priority 0; policy accept;",
                f"    ip saddr {ip_a} ip daddr {ip_b} drop",
                f"    ip saddr {ip_b} ip daddr {ip_a} drop",
                "  }",
                "}",
                "",
            ]
        )
        self.switch.run(["nft", "-f", "-"], input=rules)

    def heal(self) -> None:
        """Remove every partition."""
        self.switch.run(["nft", "delete", "table", "bridge", "picell_partition"], check=False)

    # -- processes --

    def _popen(
        self,
        ns: Netns,
        argv: Sequence[str],
        *,
        name: str | None,
        env: Mapping[str, str] | None,
    ) -> Proc:
        name = self._unique_name(name or f"{ns.role}-{Path(argv[0]).name}")
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                ns.argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _replace_proc(self, old: Proc, new: Proc) -> None:
        self.procs[self.procs.index(old)] = new

    # -- diagnostics --

    def logs(self, tail: int = 40) -> str:
        """The last ``tail`` lines of every log in the work directory (for failure reports)."""
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- teardown --

    def _save_state(self) -> None:
        state = {
            "owner_pid": os.getpid(),
            "owner_start": _pid_start_time(os.getpid()),
            "namespaces": [ns.name for ns in self.namespaces],
            "wg_ifnames": self.wg_ifnames,
            "workdir": str(self.workdir),
        }
        self._state_file.write_text(json.dumps(state))

    def close(self) -> None:
        """Remove everything this topology created; idempotent.

        Every step is attempted even if an earlier one fails; failures are raised together at
        the end as a RuntimeError.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[str] = []

        def attempt(what: str, step: Callable[[], None]) -> None:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - teardown goes on regardless
                errors.append(f"{what}: {exc}")

        for device in reversed(self.devices):
            attempt(f"device {device.ifname}", device.close)
        for proc in reversed(self.procs):
            self._seen_pids.add(proc.pid)
            attempt(f"process {proc.name}", proc.stop)
        for ns in reversed(self.namespaces):
            attempt(f"namespace {ns.name}", partial(_destroy_netns, ns.name, self._seen_pids))
        for ifname in self.wg_ifnames:
            sock = WG_SOCKET_DIR / f"{ifname}.sock"
            attempt(f"socket {ifname}", partial(sock.unlink, missing_ok=True))
        _reap(self._seen_pids)
        if os.environ.get("PICELL_NETNS_KEEP_LOGS"):
            print(f"harness: logs kept in {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._state_file.unlink(missing_ok=True)
        Topology._live.discard(self)
        if errors:
            raise RuntimeError("topology teardown incomplete:\n" + "\n".join(errors))

    @classmethod
    def _close_all(cls) -> None:
        for topo in list(cls._live):
            try:
                topo.close()
            except Exception as exc:  # noqa: BLE001 - at exit, report and go on
                print(f"harness: {exc}", file=sys.stderr)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def reap_stale() -> list[str]:
    """Remove what topologies of dead processes (killed outright) left; return ns names."""
    removed: list[str] = []
    if not STATE_DIR.is_dir():
        return removed
    for path in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = int(state.get("owner_pid", 0))
        if pid and _pid_start_time(pid) == state.get("owner_start"):
            continue  # owner still running
        seen: set[int] = set()
        for name in state.get("namespaces", []):
            with contextlib.suppress(Exception):
                _destroy_netns(name, seen)
                removed.append(name)
        for ifname in state.get("wg_ifnames", []):
            (WG_SOCKET_DIR / f"{ifname}.sock").unlink(missing_ok=True)
        if state.get("workdir"):
            shutil.rmtree(state["workdir"], ignore_errors=True)
        path.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------------------------
# WireGuard device importing a config with the real wg-quick


class Device:
    """A config text brought up with the real ``wg-quick`` inside ``ns``.

    The text is written to ``<workdir>/<ifname>.conf`` (0600) exactly as given; ``wg-quick up``
    runs with ``tests/netns/shims`` first on PATH and ``WG_QUICK_USERSPACE_IMPLEMENTATION``
    pointing at the shim starting wireguard-go, so its DNS line lands in
    /etc/netns/NS/resolv.conf only. Usable as a context manager; always removed at teardown.
    """

    def __init__(self, ns: Netns, config_text: str, ifname: str) -> None:
        topo = ns.topology
        topo.claim_wg_ifname(ifname)
        self.ns = ns
        self.ifname = ifname
        self.config_text = config_text
        self.conf_path = topo.workdir / f"{ifname}.conf"
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(config_text)
        self.is_up = False
        topo.devices.append(self)

    @property
    def _pid_file(self) -> Path:
        return self.ns.topology.workdir / f"wireguard-go-{self.ifname}.pid"

    @property
    def pid(self) -> int | None:
        """Pid of this device's wireguard-go (as started by the shim), if any."""
        try:
            return int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _env(self) -> dict[str, str]:
        _ensure_shims_executable()
        # wg-quick puts its own directory first on PATH: a real resolvconf there would win over
        # the shim and rewrite the host's resolver.
        wg_quick = shutil.which("wg-quick")
        if wg_quick is None:
            raise RuntimeError("wg-quick is not installed")
        shadow = Path(os.path.realpath(wg_quick)).parent / "resolvconf"
        if shadow.exists():
            raise RuntimeError(f"{shadow} would shadow the resolvconf shim; refusing to run")
        env = dict(os.environ)
        env["PATH"] = f"{SHIMS_DIR}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        env["WG_QUICK_USERSPACE_IMPLEMENTATION"] = str(SHIMS_DIR / "wg-userspace")
        env["PICELL_TEST_NETNS"] = self.ns.name
        env["PICELL_TEST_WORKDIR"] = str(self.ns.topology.workdir)
        return env

    def up(self, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        """``wg-quick up FILE`` in the namespace; CommandError (with its output) on failure."""
        proc = self.ns.run(
            ["wg-quick", "up", str(self.conf_path)], env=self._env(), timeout=timeout_s
        )
        self.is_up = True
        pid = self.pid
        if pid is not None:
            self.ns.topology._seen_pids.add(pid)
        return proc

    def down(self, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        """``wg-quick down FILE``; waits until its wireguard-go has exited."""
        proc = self.ns.run(
            ["wg-quick", "down", str(self.conf_path)], env=self._env(), timeout=timeout_s
        )
        self.is_up = False
        self._wait_gone()
        return proc

    def show(self) -> str:
        """``wg show IFNAME dump`` in the namespace."""
        return self.ns.run(["wg", "show", self.ifname, "dump"]).stdout

    def latest_handshake(self) -> int:
        """Unix time of the latest handshake with the (first) peer, 0 if none yet."""
        lines = self.show().splitlines()
        return int(lines[1].split("\t")[4]) if len(lines) > 1 else 0

    def _wait_gone(self) -> None:
        pid = self.pid
        if pid is None:
            return
        seen = self.ns.topology._seen_pids
        seen.add(pid)

        def gone() -> bool:
            _reap(seen)
            return not pid_alive(pid)

        wait_until(gone, 5, f"wireguard-go of {self.ifname} still running")
        # Forget the pid once gone, so that a reused pid is never signalled later.
        self._pid_file.unlink(missing_ok=True)

    def close(self) -> None:
        """Best-effort removal: ``wg-quick down``, else kill wireguard-go and delete the link."""
        if self.is_up:
            with contextlib.suppress(Exception):
                self.down(timeout_s=15)
        pid = self.pid
        if pid is not None:
            if pid_alive(pid):
                _signal(pid, signal.SIGTERM)
            try:
                self._wait_gone()
            except AssertionError:
                _signal(pid, signal.SIGKILL)
                self._wait_gone()
        self.ns.run(["ip", "link", "del", "dev", self.ifname], check=False)
        (WG_SOCKET_DIR / f"{self.ifname}.sock").unlink(missing_ok=True)
        self.is_up = False

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ensure_shims_executable() -> None:
    for shim in (SHIMS_DIR / "wg-userspace", SHIMS_DIR / "resolvconf"):
        mode = shim.stat().st_mode
        if mode & 0o111 != 0o111:
            shim.chmod(mode | 0o755)


__all__ = [
    "Bridge",
    "CommandError",
    "Device",
    "EchoSession",
    "Netns",
    "Proc",
    "Topology",
    "check_test_address",
    "netns_pids",
    "pid_alive",
    "reap_stale",
    "run",
    "wait_until",
    "wg_keypair",
]
