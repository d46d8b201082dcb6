"""Bring up the cell's WireGuard interface and converge its peers with `wg syncconf`.

The kernel module is used where `ip link add … type wireguard` works; otherwise `wireguard-go -f`
runs as a supervised child (the socket /var/run/wireguard/<if>.sock is shared by all namespaces,
hence interface names unique per host). wireguard-go outlives the daemon (the tunnels stay up
while it is stopped): `adopt_userspace` takes over the one an earlier daemon left serving an
existing interface. `observe_wg` parses `wg show <if> dump` only.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from picell.errors import ApplyFailed, CommandFailed
from picell.state import PeerState, WgDevice
from picell.system.children import Child
from picell.system.run import Runner

WG_SOCKET_DIR = Path("/var/run/wireguard")


@dataclass(frozen=True)
class ObservedPeer:
    public_key: str
    endpoint: str | None  # "ip:port" or "[v6]:port" as WireGuard shows it
    allowed_ips: tuple[ipaddress.IPv4Network, ...]
    latest_handshake: int
    rx_bytes: int
    tx_bytes: int
    keepalive_s: int
    # allowed IPs we never configure (IPv6) or could not read: drift for the next `wg syncconf`
    foreign_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class ObservedWg:
    private_key: str  # "" when the device has none ("(none)")
    listen_port: int
    peers: dict[str, ObservedPeer]
    anomalies: tuple[str, ...] = ()  # lines or fields we could not read (drift, never an error)


def interface_exists(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def observe_wg(runner: Runner, ifname: str) -> ObservedWg | None:
    """Parse `wg show IF dump`; None when the interface has no WireGuard device behind it."""
    try:
        out = runner.run(["wg", "show", ifname, "dump"]).stdout
    except CommandFailed:
        return None
    return parse_wg_dump(out)


def parse_wg_dump(out: str) -> ObservedWg | None:
    """Every state `wg show dump` prints, without raising: `(none)` for a key, an endpoint or
    allowed IPs (a peer that lost them all to another peer), `off` for keepalive, IPv6
    endpoints, a port of 0. What cannot be read becomes an anomaly and a value that differs
    from any desired one, so that the next reconcile rewrites the device."""
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines:
        return None
    anomalies: list[str] = []
    head = lines[0].split("\t")
    if len(head) < 3:
        anomalies.append(f"wg: unreadable interface line ({len(head)} fields)")
        head += [""] * (3 - len(head))
    private_key = "" if head[0] == "(none)" else head[0]
    listen_port = _number(head[2], anomalies, "listen port")
    peers: dict[str, ObservedPeer] = {}
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) < 8 or not f[0]:
            anomalies.append(f"wg: unreadable peer line ({len(f)} fields)")
            continue
        allowed: list[ipaddress.IPv4Network] = []
        foreign: list[str] = []
        for item in f[3].split(","):
            item = item.strip()
            if not item or item == "(none)":
                continue
            try:
                allowed.append(ipaddress.IPv4Network(item))
            except ValueError:
                foreign.append(item)  # IPv6 (never ours) or unreadable: drift
        keepalive = 0 if f[7] == "off" else _number(f[7], anomalies, "keepalive", -1)
        peers[f[0]] = ObservedPeer(
            public_key=f[0],
            endpoint=None if f[2] in ("(none)", "") else f[2],
            allowed_ips=tuple(sorted(allowed)),
            latest_handshake=_number(f[4], anomalies, "handshake"),
            rx_bytes=_number(f[5], anomalies, "rx bytes"),
            tx_bytes=_number(f[6], anomalies, "tx bytes"),
            keepalive_s=keepalive,
            foreign_ips=tuple(sorted(foreign)),
        )
    return ObservedWg(private_key, listen_port, peers, tuple(anomalies))


def _number(text: str, anomalies: list[str], what: str, unreadable: int = 0) -> int:
    try:
        return int(text)
    except ValueError:
        anomalies.append(f"wg: unreadable {what} {text[:40]!r}")
        return unreadable


def diff_peers(
    desired: tuple[PeerState, ...],
    observed: ObservedWg | None,
    applied_endpoints: dict[str, str] | None = None,
) -> list[tuple[str, str]]:
    """(kind, name) for every peer that differs: add, remove, update.

    An endpoint counts as changed only against the endpoint we last applied: WireGuard updates a
    peer's endpoint itself when the other side roams, and that is not drift.
    """
    have = observed.peers if observed else {}
    applied = applied_endpoints or {}
    want = {p.public_key: p for p in desired}
    changes: list[tuple[str, str]] = []
    for key, peer in want.items():
        got = have.get(key)
        if got is None:
            changes.append(("add", peer.name))
        elif (
            got.allowed_ips != tuple(sorted(peer.allowed_ips))
            or got.foreign_ips
            or got.keepalive_s != peer.keepalive_s
            or (peer.endpoint is not None and applied.get(key) != peer.endpoint)
        ):
            changes.append(("update", peer.name))
    changes += [("remove", key[:8]) for key in have if key not in want]
    return changes


def wg_needs_sync(
    dev: WgDevice, observed: ObservedWg | None, applied_endpoints: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    changes = diff_peers(dev.peers, observed, applied_endpoints)
    if observed is None or observed.private_key != dev.private_key:
        changes.insert(0, ("interface", "private key"))
    elif observed.listen_port != dev.listen_port:
        changes.insert(0, ("interface", "listen port"))
    return changes


def apply_wg(runner: Runner, ifname: str, conf_text: str, conf_path: Path) -> None:
    """Write the config 0600 (it holds the private key) and `wg syncconf` it: one process."""
    conf_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(conf_text)
    runner.run(["wg", "syncconf", ifname, str(conf_path)])


def kernel_wireguard(runner: Runner, ifname: str) -> bool:
    """Try the kernel module; True when it created the interface."""
    try:
        runner.run(["ip", "link", "add", ifname, "type", "wireguard"])
    except CommandFailed:
        return False
    return True


def userspace_child(ifname: str, make_child: Callable[[str, list[str]], Child]) -> Child:
    """The `Child` of the wireguard-go serving `ifname` (its own log and pid file)."""
    return make_child(f"wireguard-go-{ifname}", ["wireguard-go", "-f", ifname])


def adopt_userspace(ifname: str, make_child: Callable[[str, list[str]], Child]) -> Child | None:
    """The wireguard-go an earlier daemon started for the existing `ifname`, if one still
    serves it (its pid file names it and its UAPI socket is there); None otherwise (a kernel
    interface, or nothing to adopt)."""
    if not (WG_SOCKET_DIR / f"{ifname}.sock").exists():
        return None
    child = userspace_child(ifname, make_child)
    return child if child.adopt() else None


def start_userspace(
    ifname: str, make_child: Callable[[str, list[str]], Child], wait_s: float = 10.0
) -> Child:
    """Start `wireguard-go -f IF` and wait for both the interface and its UAPI socket."""
    sock = WG_SOCKET_DIR / f"{ifname}.sock"
    if sock.exists() and not interface_exists(ifname):
        sock.unlink()  # left by a wireguard-go that died with its interface
    child = userspace_child(ifname, make_child)
    if child.adopt():  # one still running without its interface (it exits soon): end it
        child.stop()
    child.start()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if interface_exists(ifname) and sock.exists():
            return child
        if not child.running():
            break
        time.sleep(0.05)  # polling a just-started child; bounded by wait_s
    child.stop()
    raise ApplyFailed(f"wireguard-go could not create interface {ifname} (see its log)")
