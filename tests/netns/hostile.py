"""What a hostile linked cell ("mallory") and a hostile internet host do, for tests/netns.

Owns: a small builder of signed state documents (the cross-cell wire format of DESIGN §6, kept
here on purpose so that the proof does not lean on picell's own protocol code, which it tests),
crafted pairing requests, posting raw bytes from inside a namespace, a document flood at a fixed
rate, a hostile HTTP server answering alpha's pushes (huge, trickled or deeply nested bodies),
a flood of idle TCP connections, and snapshots of what a cell holds in the kernel (WireGuard
peers, its nft table, routes) and in its rendered Unbound config.

Must not: import picell's protocol, sync or link modules (only `picell.mesh.crypto` for the key
derivation and the MAC, which are the wire's definition), touch anything outside the test
namespaces, or sleep outside `wait_until`-driven scripts.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import resource
import secrets
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picell.mesh.crypto import link_key, mac, pairing_key
from tests.netns.harness import PYTHON, Netns, Proc, Topology, run, wait_until

# -- the wire, built by hand -----------------------------------------------------------------


def private_key_of(data_dir: Path) -> str:
    """A cell's WireGuard private key, read from its store as its owner (root) could."""
    return _cell_column(data_dir, "private_key")


def epoch_of(data_dir: Path) -> str:
    """A cell's current incarnation (`epoch`): its signed bodies carry it."""
    return _cell_column(data_dir, "epoch")


def _cell_column(data_dir: Path, column: str) -> str:
    db = sqlite3.connect(f"file:{data_dir / 'picell.db'}?mode=ro", uri=True)
    try:
        row = db.execute(f"SELECT {column} FROM cell").fetchone()  # our own constant names
    finally:
        db.close()
    return str(row[0])


@dataclass
class Signer:
    """Signs state documents from one cell to another with their real link key."""

    from_cell: str
    private_key: str
    public_key: str
    to_public_key: str
    epoch: str | None = None  # the sender's incarnation, as its daemon signs it

    def envelope(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"body": body, "mac": mac(link_key(self.private_key, self.to_public_key), body)}

    def state(self, seq: int, **fields: Any) -> dict[str, Any]:
        """A state document: `fields` add to (or override) the minimal honest body."""
        body: dict[str, Any] = {
            "v": 1,
            "type": "state",
            "from_cell": self.from_cell,
            "from_public_key": self.public_key,
            "to_public_key": self.to_public_key,
            "seq": seq,
            "sent_at": time.time(),
            "shared_services": [],
            "exit_offered": False,
            "use_as_exit_relay": False,
            "exit_relay": None,
            "exit_client": None,
            **({"epoch": self.epoch} if self.epoch else {}),
        }
        body.update(fields)
        return self.envelope(body)


def services(count: int, subnet_prefix: str) -> list[dict[str, Any]]:
    """`count` shared services with addresses in `<subnet_prefix>.0/24` (names s0, s1, ...)."""
    return [
        {"name": f"s{i}", "vip": f"{subnet_prefix}.{2 + i % 250}", "ports": [80],
         "protocol": "tcp"}
        for i in range(count)
    ]  # fmt: skip


def pairing_request(identity: dict[str, Any], token: str) -> dict[str, Any]:
    """A pairing request as `connect` sends it, MACed with the invite's token."""
    request = {"identity": identity, "nonce": secrets.token_hex(16)}
    return {**request, "mac": mac(pairing_key(token), request)}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- posting from inside a namespace ---------------------------------------------------------

_POST_RAW = r"""
import socket, sys
from urllib.parse import urlsplit
url, timeout = urlsplit(sys.argv[1]), float(sys.argv[2])
body = sys.stdin.buffer.read()
head = (f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n").encode()
try:
    conn = socket.create_connection((url.hostname, url.port), timeout=timeout)
except OSError as exc:
    print(0); print(f"no connection: {exc}"); sys.exit()
sent_all = True
try:
    conn.sendall(head + body)
except OSError:
    # A server may answer an over-long body before reading it, and close: its answer is
    # still in our receive queue, ahead of the reset.
    sent_all = False
answer = b""
try:
    while chunk := conn.recv(65536):
        answer += chunk
except OSError as exc:
    if not answer:
        print(0); print(f"no answer ({'body sent' if sent_all else 'body cut'}): {exc}")
        sys.exit()
top, _, text = answer.partition(b"\r\n\r\n")
parts = top.split(b" ", 2)
print(int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0)
print(text[:65536].decode(errors="replace"))
"""


def post_raw(ns: Netns, url: str, data: str, timeout_s: float = 30) -> tuple[int, Any]:
    """POST `data` (any text, any size: it goes through stdin) from inside `ns`, on a raw
    socket, reading the answer even when the server closed before taking the whole body.

    Returns (status, parsed JSON or text); status 0 when no HTTP answer came (reset, timeout).
    """
    proc = ns.run([PYTHON, "-I", "-c", _POST_RAW, url, str(timeout_s)], input=data,
                  check=False, timeout=timeout_s * 2 + 15)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"POST {url} failed: {proc.stderr}")
    status, _, text = proc.stdout.partition("\n")
    try:
        return int(status), json.loads(text)
    except ValueError:
        return int(status), text.strip()


_FLOOD_DOCS = """
import json, sys, threading, time, urllib.error, urllib.request
url, rate, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
bodies = json.load(sys.stdin)
statuses = [None] * len(bodies)

def send(i):
    req = urllib.request.Request(url, data=json.dumps(bodies[i]).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            statuses[i] = resp.status
    except urllib.error.HTTPError as exc:
        statuses[i] = exc.code
    except Exception as exc:
        statuses[i] = f"{exc.__class__.__name__}: {exc}"

start = time.monotonic()
threads = []
for i in range(len(bodies)):
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)  # the flood's own pace, not a test wait
    t = threading.Thread(target=send, args=(i,))
    t.start()
    threads.append(t)
sent_s = time.monotonic() - start
for t in threads:
    t.join()
print(json.dumps({"statuses": statuses, "sent_s": sent_s,
                  "done_s": time.monotonic() - start}))
"""


def flood_documents(
    ns: Netns, url: str, bodies: list[dict[str, Any]], rate: float, timeout_s: float = 300
) -> dict[str, Any]:
    """POST `bodies` from `ns` at `rate` per second, each on its own connection and thread,
    without waiting for answers; returns {"statuses": [...], "sent_s", "done_s"}."""
    proc = ns.run([PYTHON, "-I", "-c", _FLOOD_DOCS, url, str(rate), str(timeout_s)],
                  input=json.dumps(bodies), timeout=timeout_s + 60)  # fmt: skip
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# -- the hostile HTTP server answering alpha's pushes ----------------------------------------

HOSTILE_MODES = ("ok", "huge", "trickle", "nested")
HUGE_BYTES = 100_000_000
NESTED_DEPTH = 100_000

_HOSTILE_SERVER = r"""
import json, socketserver, sys, threading, time
addr, port, mode_file, hits_file, huge, depth, ready = sys.argv[1:8]
huge, depth = int(huge), int(depth)
lock = threading.Lock()
count = [0]

def mode():
    try:
        with open(mode_file) as f:
            return f.read().strip() or "ok"
    except OSError:
        return "ok"

def note(**entry):
    entry["at"] = time.time()
    with lock, open(hits_file, "a") as f:
        f.write(json.dumps(entry) + "\n")

def head(conn, length, ctype="application/json"):
    conn.sendall((f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode())

class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        conn = self.request
        conn.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        top, _, body = data.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        with lock:
            count[0] += 1
            n = count[0]
        m = mode()
        note(n=n, mode=m, event="start", path=lines[0].split()[1], source=self.client_address[0])
        sent = 0
        try:
            if m == "huge":
                # honest-looking JSON, only very long
                pre, post = b'{"ok":true,"pad":"', b'"}'
                head(conn, huge)
                conn.sendall(pre)
                sent = len(pre)
                block = b"a" * (1 << 20)
                while sent < huge - len(post):
                    piece = block[: huge - len(post) - sent]
                    conn.sendall(piece)
                    sent += len(piece)
                conn.sendall(post)
                sent += len(post)
            elif m == "trickle":
                # 1 byte a second of a body announced as 1,000 bytes, until the test moves on
                head(conn, 1000)
                started = time.monotonic()
                while mode() == "trickle" and time.monotonic() - started < 600:
                    conn.sendall(b" ")
                    sent += 1
                    time.sleep(1)
            elif m == "nested":
                text = ("[" * depth + "]" * depth).encode()
                head(conn, len(text))
                conn.sendall(text)
                sent = len(text)
            else:
                text = json.dumps({"ok": True}).encode()
                head(conn, len(text))
                conn.sendall(text)
                sent = len(text)
        except OSError as exc:
            note(n=n, mode=m, event="aborted", sent=sent, error=str(exc))
            return
        note(n=n, mode=m, event="done", sent=sent)

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

server = Server((addr, int(port)), Handler)
open(ready, "w").close()
server.serve_forever()
"""


class HostileServer:
    """Mallory's answers to alpha's pushes, switched by `set_mode`; every request is logged."""

    def __init__(self, ns: Netns, addr: str, port: int) -> None:
        topo = ns.topology
        self.mode_file = topo.workdir / "hostile.mode"
        self.hits_file = topo.workdir / "hostile.hits"
        self.set_mode("ok")
        ready = topo.workdir / "hostile.ready"
        argv = [PYTHON, "-I", "-c", _HOSTILE_SERVER, addr, str(port), str(self.mode_file),
                str(self.hits_file), str(HUGE_BYTES), str(NESTED_DEPTH), str(ready)]  # fmt: skip
        self.proc: Proc = ns.popen(argv, name="hostile-server")
        proc = self.proc

        def listening() -> bool:
            if not proc.running():
                raise RuntimeError(f"hostile server exited: {proc.log_text()}")
            return ready.exists()

        wait_until(listening, 10, "the hostile server did not start")

    def set_mode(self, mode: str) -> None:
        assert mode in HOSTILE_MODES, mode
        self.mode_file.write_text(mode)

    def hits(self) -> list[dict[str, Any]]:
        try:
            text = self.hits_file.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def served(self, mode: str, event: str = "start") -> list[dict[str, Any]]:
        return [h for h in self.hits() if h["mode"] == mode and h["event"] == event]


def redirect_mesh_port(ns: Netns, source: str, dest: str, port: int, to_port: int) -> None:
    """In `ns`, send `source`'s connections to `dest:port` to `dest:to_port` instead.

    A table of the test's own at a priority before picell's NAT: the redirected connection is
    `ct status dnat`, which picell's link input accepts, so mallory's own daemon keeps its
    tunnel, its firewall and its mesh port while the hostile server answers alpha.
    """
    rules = (
        "table ip hostile {\n chain prerouting {\n"
        "  type nat hook prerouting priority dstnat - 10; policy accept;\n"
        f"  ip saddr {source} ip daddr {dest} tcp dport {port} dnat to {dest}:{to_port}\n"
        " }\n}\n"
    )
    ns.run(["nft", "-f", "-"], input=rules)


# -- idle connections from the internet ------------------------------------------------------

_IDLE_FLOOD = r"""
import errno, json, os, resource, selectors, socket, sys, time
host, port, count, duration, stats_path, stop_path = sys.argv[1:7]
port, count, duration = int(port), int(count), float(duration)
hard = max(resource.getrlimit(resource.RLIMIT_NOFILE)[1], count + 1024)
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 1024, hard))
sel = selectors.DefaultSelector()
stats = {"pending": 0, "open": 0, "max_open": 0, "connected_total": 0, "closed_by_server": 0,
         "failed": 0, "running": True}
state = {}
budget, last = 300.0, time.monotonic()  # reconnects a second: 2 cores are shared

def dial():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((host, port))
    sel.register(s, selectors.EVENT_WRITE)
    state[s] = "pending"

def drop(s, why):
    sel.unregister(s)
    del state[s]
    s.close()
    stats[why] += 1

for _ in range(count):
    dial()
started, written = time.monotonic(), 0.0
while time.monotonic() - started < duration and not os.path.exists(stop_path):
    for key, _ in sel.select(timeout=0.2):
        s = key.fileobj
        if state[s] == "pending":
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                drop(s, "failed")
            else:
                state[s] = "open"
                stats["connected_total"] += 1
                sel.modify(s, selectors.EVENT_READ)
        else:  # an idle client never reads: anything readable means the server closed it
            drop(s, "closed_by_server")
    now = time.monotonic()
    budget = min(300.0, budget + 300.0 * (now - last))
    last = now
    while len(state) < count and budget >= 1:
        dial()
        budget -= 1
    stats["open"] = sum(1 for v in state.values() if v == "open")
    stats["pending"] = len(state) - stats["open"]
    stats["max_open"] = max(stats["max_open"], stats["open"])
    if now - written > 0.5:
        with open(stats_path + ".tmp", "w") as f:
            json.dump(stats, f)
        os.replace(stats_path + ".tmp", stats_path)
        written = now
stats["running"] = False
with open(stats_path, "w") as f:
    json.dump(stats, f)
"""


class IdleFlood:
    """`count` idle TCP connections from `ns` to `host:port`, each re-dialled when the server
    closes it, for at most `duration_s` or until `stop()`."""

    def __init__(self, ns: Netns, host: str, port: int, count: int, duration_s: float) -> None:
        topo = ns.topology
        self.stats_file = topo.workdir / "idle-flood.json"
        self.stop_file = topo.workdir / "idle-flood.stop"
        self.stop_file.unlink(missing_ok=True)
        argv = [PYTHON, "-I", "-c", _IDLE_FLOOD, host, str(port), str(count), str(duration_s),
                str(self.stats_file), str(self.stop_file)]  # fmt: skip
        self.proc = ns.popen(argv, name="idle-flood")

    def stats(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.stats_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data

    def stop(self) -> None:
        self.stop_file.touch()
        proc = self.proc
        wait_until(lambda: not proc.running(), 30, "the idle flood did not stop")


# -- the victim's file-descriptor limit -------------------------------------------------------


@contextlib.contextmanager
def nofile_soft(limit: int) -> Iterator[None]:
    """Children started inside inherit a soft RLIMIT_NOFILE of `limit` (systemd's default for
    services is 1,024 soft), so that a daemon is tested under the limit it meets in the field."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def vm_hwm_kib(pid: int) -> int:
    """Peak resident memory of `pid` (VmHWM), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


# -- what a cell holds ------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything a hostile message must not change: WireGuard peers (key, endpoint, allowed
    IPs), the nft table without counters, every route, the rendered Unbound config."""

    wg: tuple[tuple[str, str, str], ...]
    nft: str
    routes: str
    unbound: str

    def diff(self, other: Snapshot) -> list[str]:
        """One entry per changed part, as the changed lines only."""
        out = []
        for part in ("wg", "nft", "routes", "unbound"):
            before, after = _lines(getattr(self, part)), _lines(getattr(other, part))
            if before != after:
                delta = difflib.unified_diff(before, after, n=0, lineterm="")
                out.append(f"{part} changed: " + " | ".join(list(delta)[2:]))
        return out


def _lines(value: Any) -> list[str]:
    if isinstance(value, tuple):
        return ["  ".join(row) for row in value]
    return str(value).splitlines()


_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


def snapshot(ns: Netns, interface: str, unbound_conf: Path) -> Snapshot:
    dump = ns.run(["wg", "show", interface, "dump"]).stdout.splitlines()[1:]
    peers = tuple(sorted((f[0], f[2], f[3]) for f in (line.split("\t") for line in dump)))
    nft = ns.run(["nft", "list", "table", "inet", "picell"]).stdout
    routes = ns.run(["ip", "route", "show", "table", "all"]).stdout
    routes6 = ns.run(["ip", "-6", "route", "show", "table", "all"]).stdout
    return Snapshot(
        wg=peers,
        nft=_COUNTER.sub("counter", nft),
        routes=routes + routes6,
        unbound=unbound_conf.read_text(),
    )


def unbound_checkconf(ns: Netns, conf: Path) -> subprocess.CompletedProcess[str]:
    return ns.run(["unbound-checkconf", str(conf)], check=False)


def lan_link(topo: Topology, cell: Netns, cell_addr: str, lan: Netns, lan_addr: str) -> str:
    """A veth between a cell's namespace and its LAN's, with private (RFC 1918) addresses.

    The harness's `link` admits documentation ranges only; a home LAN is private by nature,
    and this one exists only between two test namespaces. Returns the cell's interface name.
    """
    for addr in (cell_addr, lan_addr):
        assert addr.startswith("192.168."), addr
    cell_if, lan_if = topo.ifname("lan"), topo.ifname("lanh")
    run(["ip", "link", "add", cell_if, "netns", cell.name, "type", "veth",
         "peer", "name", lan_if, "netns", lan.name])  # fmt: skip
    for ns, ifname, addr in ((cell, cell_if, cell_addr), (lan, lan_if, lan_addr)):
        ns.run(["ip", "addr", "add", addr, "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])
    return cell_if
