"""A fake kernel behind the runner: enough of wg, ip and nft to test the reconciler without root.

It models what the real commands would leave behind (WireGuard peers with handshakes, interface
addresses, the nft table) and answers the same machine-readable read commands.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from picell.errors import CommandFailed
from picell.system.run import Result, Runner


def _elem(element: str) -> object:
    if element.count(" . ") != 2:
        return element  # a shape render never writes: `nft -j` shows it some other way
    net, vip, port = (p.strip() for p in element.split(" . "))
    addr, length = net.split("/")
    return {"concat": [{"prefix": {"addr": addr, "len": int(length)}}, vip, int(port)]}


@dataclass
class FakeChild:
    name: str
    argv: list[str]
    started: int = 0
    alive: bool = False
    pid: int = 4242
    adoptable: bool = False  # a process of an earlier daemon runs it: adopt() takes it over
    detached: bool = False

    def running(self) -> bool:
        return self.alive

    def adopt(self) -> bool:
        if self.adoptable and not self.alive:
            self.alive, self.adoptable = True, False
        return self.alive

    def detach(self) -> None:
        self.detached = True

    def start(self) -> None:
        if not self.alive:
            self.started += 1
            self.alive = True

    def stop(self) -> None:
        self.alive = False


@dataclass
class FakeKernel(Runner):
    interfaces: set[str] = field(default_factory=set)
    wg: dict[str, dict[str, object]] = field(default_factory=dict)  # ifname -> key, port, peers
    addrs: dict[str, set[str]] = field(default_factory=dict)
    up: set[str] = field(default_factory=set)
    routes: dict[str, set[str]] = field(default_factory=dict)
    table_routes: set[tuple[int, str, str | None]] = field(default_factory=set)
    # the host's own routes, as `ip -j -N` prints them: picell must never change them
    host_routes: list[dict[str, object]] = field(
        default_factory=lambda: [{"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"}]
    )
    rules: set[tuple[int, int]] = field(default_factory=set)
    nft_text: str | None = None
    nft_extra: list[object] = field(default_factory=list)  # objects someone else added
    grants: dict[str, set[str]] = field(default_factory=dict)
    flows_cut: list[tuple[str, ...]] = field(default_factory=list)
    flows: list[str] = field(default_factory=list)  # `conntrack -L` lines
    batches: list[str] = field(default_factory=list)  # every `ip -batch -` input, in order
    fail_on: str | None = None  # argv[0] of a command to fail
    handshake_resets: int = 0

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        ok_codes: Sequence[int] = (0,),
        timeout_s: float = 0,
    ) -> Result:
        args = tuple(argv)
        self.history.append(args)
        if self.fail_on and args[0] == self.fail_on and args[1] != "-j" and "show" not in args:
            raise CommandFailed(args, 1, f"{args[0]}: simulated failure")
        out = self._dispatch(args, stdin)
        return Result(args, 0, out, "")

    def _dispatch(self, a: tuple[str, ...], stdin: str | None) -> str:
        if a[:2] == ("ip", "link") and a[2] == "add":
            raise CommandFailed(a, 2, "Error: Unknown device type.")
        if a[:4] == ("ip", "link", "del", "dev"):
            self.delete_interface(a[4])
            return ""
        if a[:2] == ("wg", "show"):
            dev = self.wg.get(a[2])
            if dev is None:
                raise CommandFailed(a, 1, "Unable to access interface")
            lines = [f"{dev['key']}\tpub\t{dev['port']}\toff"]
            peers: dict[str, dict[str, object]] = dev["peers"]  # type: ignore[assignment]
            for key, p in peers.items():
                lines.append(
                    f"{key}\t(none)\t{p.get('endpoint') or '(none)'}\t{p['allowed'] or '(none)'}\t"
                    f"{p['handshake']}\t0\t0\t"
                    f"{p['keepalive'] or 'off'}"
                )
            return "\n".join(lines) + "\n"
        if a[:2] == ("wg", "syncconf"):
            self._syncconf(a[2], Path(a[3]).read_text())
            return ""
        if a[:2] == ("wg", "set") and a[3] == "peer" and a[5:6] == ("endpoint",):
            self.wg[a[2]]["peers"][a[4]]["endpoint"] = a[6]  # type: ignore[index]
            return ""
        if a[:3] == ("ip", "-j", "addr") or a[:4] == ("ip", "-j", "-4", "addr"):
            links = []
            for ifname in sorted(self.interfaces):
                info = [
                    {"family": "inet", "local": str(i.ip), "prefixlen": i.network.prefixlen}
                    for i in map(ipaddress.IPv4Interface, sorted(self.addrs.get(ifname, set())))
                ]
                flags = ["UP"] if ifname in self.up else []
                mtu = 1340 if ifname in self.up else 1420
                links.append({"ifname": ifname, "flags": flags, "mtu": mtu, "addr_info": info})
            return json.dumps(links)
        if a[:5] == ("ip", "-j", "-N", "-4", "route"):
            main = [
                {"dst": r, "dev": dev, "protocol": "77"}
                for dev, rs in sorted(self.routes.items())
                for r in sorted(rs)
            ]
            tables = [
                {"dst": dst, "table": str(table), "protocol": "77"}
                | ({"dev": dev} if dev else {"type": "6", "metric": 4096})
                for table, dst, dev in sorted(self.table_routes, key=str)
            ]
            return json.dumps(self.host_routes + main + tables)
        if a[:4] == ("ip", "-j", "-4", "rule"):
            return json.dumps(
                [{"priority": 7700, "fwmark": hex(m), "table": str(t)} for m, t in self.rules]
            )
        if a[:2] == ("ip", "-batch"):
            self.batches.append(stdin or "")
            for line in (stdin or "").splitlines():
                w = line.split()
                if w[:2] == ["address", "replace"]:
                    self.addrs.setdefault(w[4], set()).add(w[2])
                elif w[:2] == ["address", "del"]:
                    self.addrs.get(w[4], set()).discard(w[2])
                elif w[:3] == ["link", "set", "dev"]:
                    self.up.add(w[3])
                elif w[:1] == ["route"] and "table" in w:
                    blackhole = w[2] == "blackhole"
                    dst = w[3] if blackhole else w[2]
                    entry = (int(w[w.index("table") + 1]), dst, None if blackhole else w[4])
                    if w[1] == "replace":
                        self.table_routes.add(entry)
                    else:
                        self.table_routes.discard(entry)
                elif w[:1] == ["rule"]:
                    rule = (int(w[3], 16), int(w[5]))
                    if w[1] == "add":
                        self.rules.add(rule)
                    else:
                        self.rules.discard(rule)
                elif w[:2] in (["route", "replace"], ["route", "add"]):
                    self.routes.setdefault(w[4], set()).add(w[2])
                elif w[:2] == ["route", "del"]:
                    self.routes.get(w[4], set()).discard(w[2])
            return ""
        if a[:3] == ("nft", "-j", "list"):
            if self.nft_text is None:
                raise CommandFailed(a, 1, "No such file or directory")
            comment = next(
                (
                    ln.split('comment "')[1].rstrip('"')
                    for ln in self.nft_text.splitlines()
                    if 'comment "picell ' in ln
                ),
                "",
            )
            sets = [
                {"set": {"name": name, "elem": [_elem(e) for e in sorted(elems)]}}
                for name, elems in sorted(self.grants.items())
            ]
            rule = {"rule": {"comment": comment, "n": len(self.nft_text)}}
            items = [{"table": {"name": "picell"}}, rule, *sets, *self.nft_extra]
            return json.dumps({"nftables": items})
        if a[:3] == ("nft", "-f", "-"):
            for line in (stdin or "").splitlines():
                verb, _, _, _, name, rest = line.split(" ", 5)
                elems = {e.strip() for e in rest.strip("{} ").split(",")}
                target = self.grants.setdefault(name, set())
                if verb == "add":
                    target |= elems
                else:
                    target -= elems
            return ""
        if a[:2] == ("nft", "-f"):
            self.nft_text = Path(a[2]).read_text()
            self.grants = {}
            current = None
            for line in self.nft_text.splitlines():
                words = line.split()
                if words[:1] == ["set"]:
                    current = words[1]
                    self.grants[current] = set()
                elif current and words[:2] == ["elements", "="]:
                    inner = line.split("{", 1)[1].rsplit("}", 1)[0]
                    self.grants[current] = {e.strip() for e in inner.split(",")}
                elif words == ["}"]:
                    current = None
            self.grants = {k: v for k, v in self.grants.items() if k.startswith("grants_")}
            return ""
        if a[0] == "unbound-control":
            return "ok\n"
        if a[:2] == ("conntrack", "-L"):
            return "".join(f"{line}\n" for line in self.flows)
        if a[:2] == ("conntrack", "-D"):
            self.flows_cut.append(a)
            return ""
        raise AssertionError(f"unexpected command {a}")

    def _syncconf(self, ifname: str, text: str) -> None:
        key, port, peers = "", 0, {}
        current: dict[str, object] | None = None
        for line in text.splitlines():
            if " = " not in line:
                continue
            k, v = line.split(" = ", 1)
            if k == "PrivateKey":
                key = v
            elif k == "ListenPort":
                port = int(v)
            elif k == "PublicKey":
                current = {"allowed": "", "handshake": 0, "keepalive": 0}
                peers[v] = current
            elif k == "AllowedIPs" and current is not None:
                current["allowed"] = ",".join(s.strip() for s in v.split(","))
            elif k == "PersistentKeepalive" and current is not None:
                current["keepalive"] = int(v)
            elif k == "Endpoint" and current is not None:
                current["endpoint"] = v
        old = self.wg.get(ifname, {}).get("peers", {})
        assert isinstance(old, dict)
        for pk, p in peers.items():
            prev = old.get(pk)
            # like wg syncconf: an unchanged peer keeps its session (and handshake time)
            p["handshake"] = prev["handshake"] if prev else 0
            if "endpoint" not in p and prev and prev.get("endpoint"):
                p["endpoint"] = prev["endpoint"]  # no Endpoint line: the learned one stays
        self.wg[ifname] = {"key": key, "port": port, "peers": peers}

    def create_interface(self, ifname: str) -> None:
        self.interfaces.add(ifname)
        self.wg[ifname] = {"key": "(none)", "port": 0, "peers": {}}

    def delete_interface(self, ifname: str) -> None:
        self.interfaces.discard(ifname)
        self.wg.pop(ifname, None)
        self.addrs.pop(ifname, None)
        self.up.discard(ifname)
        self.routes.pop(ifname, None)
        self.table_routes = {r for r in self.table_routes if r[2] != ifname}


class FakeClock:
    """The sender's `Clock`, moved only by the test. A thread that waits on it blocks until the
    test advances the time past its timeout or its event is set; `sleeper` lets the test wait
    (on real time, generously) until the thread is parked in a given wait."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.waits: list[float] = []  # timeouts asked for, in order
        self._parked: int | None = None  # index in `waits` of the wait in progress
        self._cv = threading.Condition()

    def time(self) -> float:
        with self._cv:
            return self.now

    def monotonic(self) -> float:
        return self.time()

    def advance(self, seconds: float) -> None:
        with self._cv:
            self.now += seconds
            self._cv.notify_all()

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        with self._cv:
            deadline = self.now + timeout_s
            self.waits.append(timeout_s)
            self._parked = len(self.waits) - 1
            self._cv.notify_all()
            try:
                # an Event cannot notify this condition: poll it in short real-time steps
                while not event.is_set() and self.now < deadline:
                    self._cv.wait(0.002)
            finally:
                self._parked = None
            return event.is_set()

    def sleeper(self, index: int, real_timeout_s: float = 20.0) -> float:
        """Wait until the `index`-th wait (0-based) is in progress; return its timeout."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._parked == index, real_timeout_s):
                raise AssertionError(f"no wait #{index} within {real_timeout_s} s: {self.waits}")
            return self.waits[index]
