"""Apply and observe the owned nft table: one `nft -f` per change, `nft -j` to read back."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from picell.constants import TABLE_NAME
from picell.errors import CommandFailed
from picell.firewall.render import GRANT_SETS
from picell.mesh.relay import RelayRule
from picell.state import Grant
from picell.system.run import Runner


@dataclass(frozen=True)
class ObservedTable:
    digest: str | None  # the hash in the input jump rule's comment
    fingerprint: str  # hash of what the kernel holds, handles, counters and grants stripped
    grants: dict[str, frozenset[str]]  # elements of each grant set, as render writes them
    # what we could not read (garbled JSON, a grant element of an unknown shape): the table is
    # then replaced whole, never patched with a delta built from a guess
    anomalies: tuple[str, ...] = ()


def _strip_handles(node: Any) -> Any:
    """Drop what changes without a ruleset change: handles, counter values, grant elements."""
    if isinstance(node, dict):
        if "counter" in node and isinstance(node["counter"], dict):
            return {"counter": {}}
        if node.get("name") in GRANT_SETS.values() and "elem" in node:
            node = {k: v for k, v in node.items() if k != "elem"}
        return {k: _strip_handles(v) for k, v in node.items() if k != "handle"}
    if isinstance(node, list):
        return [_strip_handles(v) for v in node]
    return node


def observe_table(runner: Runner) -> ObservedTable | None:
    try:
        out = runner.run(["nft", "-j", "list", "table", "inet", TABLE_NAME]).stdout
    except CommandFailed:
        return None
    return parse_table(out)


def parse_table(out: str) -> ObservedTable:
    """Read `nft -j list table` without raising: objects of any kind (flowtables, maps, quotas,
    whatever a later nft prints) go into the fingerprint, so that anything we did not render
    is drift that the next apply removes."""
    anomalies: list[str] = []
    try:
        data = json.loads(out)
    except ValueError:
        data = None
        anomalies.append("nft: output is not JSON")
    items = data.get("nftables") if isinstance(data, dict) else None
    if not isinstance(items, list):
        if data is not None:
            anomalies.append("nft: no list of objects")
        items = []
    items = [i for i in items if isinstance(i, dict)]
    digest = None
    for item in items:
        rule = item.get("rule")
        comment = str(rule.get("comment", "")) if isinstance(rule, dict) else ""
        if comment.startswith("picell "):
            digest = comment
    grants = {name: frozenset[str]() for name in GRANT_SETS.values()}
    for item in items:
        nft_set = item.get("set")
        if not isinstance(nft_set, dict) or nft_set.get("name") not in grants:
            continue
        elems = nft_set.get("elem", [])
        found = set()
        for e in elems if isinstance(elems, list) else [elems]:
            element = _element(e)
            if element is None:
                anomalies.append(f"nft: unreadable element of {nft_set['name']}")
            else:
                found.add(element)
        grants[str(nft_set["name"])] = frozenset(found)
    body = [_strip_handles(i) for i in items if "metainfo" not in i]
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return ObservedTable(digest, fingerprint, grants, tuple(anomalies))


def _element(elem: Any) -> str | None:
    """A grant set element from `nft -j` back to `NET . VIP . PORT` as render writes it;
    None for a shape render never writes."""
    try:
        if isinstance(elem, dict) and "elem" in elem:
            elem = elem["elem"].get("val")
        parts = elem.get("concat") if isinstance(elem, dict) else None
        if not isinstance(parts, list) or len(parts) != 3:
            return None
        out = []
        for part in parts:
            if isinstance(part, dict) and "prefix" in part:
                net = ipaddress.IPv4Network(f"{part['prefix']['addr']}/{part['prefix']['len']}")
                out.append(str(net))
            elif isinstance(part, dict) and "range" in part:
                low, high = (IPv4Address(a) for a in part["range"])
                nets = list(ipaddress.summarize_address_range(low, high))
                out.append(str(nets[0]) if len(nets) == 1 else f"{low}-{high}")
            elif isinstance(part, (str, int)) and not isinstance(part, bool):
                out.append(str(part))
            else:
                return None
        if "/" not in out[0] and "-" not in out[0]:
            out[0] += "/32"
        return " . ".join(out)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


# a grant's use: (packets, bytes) of the connecting side, by (protocol, element)
GrantCounters = dict[tuple[str, str], tuple[int, int]]


def observe_grant_counters(runner: Runner) -> GrantCounters:
    """What each grant admitted since it was added (the sets' per-element counters); {} when
    the table cannot be read."""
    try:
        out = runner.run(["nft", "-j", "list", "table", "inet", TABLE_NAME]).stdout
        items = json.loads(out).get("nftables", [])
    except (CommandFailed, ValueError, AttributeError):
        return {}
    protocols = {name: proto for proto, name in GRANT_SETS.items()}
    counters: GrantCounters = {}
    for item in items if isinstance(items, list) else []:
        nft_set = item.get("set") if isinstance(item, dict) else None
        if not isinstance(nft_set, dict) or nft_set.get("name") not in protocols:
            continue
        elems = nft_set.get("elem", [])
        for e in elems if isinstance(elems, list) else [elems]:
            element = _element(e)
            counter = e.get("elem", {}).get("counter") if isinstance(e, dict) else None
            if element is None or not isinstance(counter, dict):
                continue
            key = (protocols[nft_set["name"]], element)
            counters[key] = (int(counter.get("packets", 0)), int(counter.get("bytes", 0)))
    return counters


def apply_ruleset(runner: Runner, text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(text)
    runner.run(["nft", "-f", str(path)])


def apply_grant_delta(runner: Runner, lines: list[str]) -> None:
    """Grant set elements added and removed in one nft transaction."""
    runner.run(["nft", "-f", "-"], stdin="\n".join(lines) + "\n")


# a tracked flow's original tuple: protocol, source, destination, destination port
Flow = tuple[str, IPv4Address, IPv4Address, int]


def list_flows(runner: Runner) -> set[Flow] | None:
    """The original tuples of the tracked IPv4 TCP and UDP flows, in one `conntrack -L`; None
    when they cannot be read (the caller then cuts as if every grant had flows)."""
    try:
        out = runner.run(["conntrack", "-L", "-f", "ipv4"]).stdout
    except CommandFailed:
        return None
    flows: set[Flow] = set()
    for line in out.splitlines():
        words = line.split()
        if not words or words[0] not in ("tcp", "udp"):
            continue
        first: dict[str, str] = {}
        for word in words:  # the first src=, dst=, dport= are the original direction's
            key, _, value = word.partition("=")
            if key in ("src", "dst", "dport") and key not in first:
                first[key] = value
        try:
            flows.add((words[0], IPv4Address(first["src"]), IPv4Address(first["dst"]),
                       int(first["dport"])))  # fmt: skip
        except (KeyError, ValueError):
            continue
    return flows


def plan_revocations(old: set[Grant], new: tuple[Grant, ...]) -> list[Grant]:
    """The grants `old` held and `new` does not, whose flows must stop: not a device's /32
    that its cell's whole network now covers (only a /32 can be covered: two links' networks
    never overlap), so the check looks only at the grants of the same target."""
    wanted = set(new)
    gone = [g for g in old if g not in wanted]
    if not any(g.network.prefixlen == 32 for g in gone):
        return sorted(gone)
    by_target: dict[tuple[str, IPv4Address, int], list[Grant]] = {}
    for h in new:
        by_target.setdefault((h.protocol, h.vip, h.port), []).append(h)
    return sorted(
        g for g in gone
        if not any(g.covered_by(h) for h in by_target.get((g.protocol, g.vip, g.port), ()))
    )  # fmt: skip


def has_flows(grant: Grant, flows: set[Flow] | None) -> bool:
    if flows is None:
        return True
    return any(
        proto == grant.protocol and dst == grant.vip and port == grant.port
        and src in grant.network
        for proto, src, dst, port in flows
    )  # fmt: skip


def cut_flows(runner: Runner, grant: Grant) -> None:
    """Delete the conntrack entries of a revoked grant (original tuple: before DNAT), so that
    established flows stop too. Exit status 1 means there were none."""
    runner.run(
        [
            "conntrack", "-D", "-p", grant.protocol,
            "-s", str(grant.network.network_address), "--mask-src", str(grant.network.netmask),
            "-d", str(grant.vip), "--dport", str(grant.port),
        ],
        ok_codes=(0, 1),
    )  # fmt: skip


def cut_relay_flows(runner: Runner, rule: RelayRule) -> None:
    """Delete the conntrack entries of a relayed flow that ended (original tuple: the source
    cell to our relay port), so that the relayed path stops at once. Status 1: there were none."""
    runner.run(
        ["conntrack", "-D", "-p", "udp", "-s", str(rule.source), "--dport", str(rule.port)],
        ok_codes=(0, 1),
    )
