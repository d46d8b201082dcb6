"""The cell interface's addresses and link state: observe with `ip -j`, apply with one
`ip -batch -` (adds before deletes, so the cell is never without its address)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from picell.errors import CommandFailed
from picell.system.run import Runner


@dataclass(frozen=True)
class ObservedLink:
    up: bool
    addresses: frozenset[ipaddress.IPv4Interface]


def observe_link(runner: Runner, ifname: str) -> ObservedLink | None:
    try:
        out = runner.run(["ip", "-j", "addr", "show", "dev", ifname]).stdout
    except CommandFailed:
        return None
    data = json.loads(out or "[]")
    if not data:
        return None
    link = data[0]
    addrs = frozenset(
        ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    )
    return ObservedLink(up="UP" in link.get("flags", []), addresses=addrs)


def plan_link(
    ifname: str, address: ipaddress.IPv4Interface, observed: ObservedLink | None
) -> list[str]:
    """`ip -batch` lines that make the interface carry exactly `address` and be up."""
    have = observed.addresses if observed else frozenset()
    lines: list[str] = []
    if address not in have:
        lines.append(f"address replace {address} dev {ifname}")
    if observed is None or not observed.up:
        lines.append(f"link set dev {ifname} up")
    lines += [f"address del {a} dev {ifname}" for a in sorted(have) if a != address]
    return lines


def apply_link(runner: Runner, lines: list[str]) -> None:
    runner.run(["ip", "-batch", "-"], stdin="\n".join(lines) + "\n")
