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
from picell.state import Grant
from picell.system.run import Runner


@dataclass(frozen=True)
class ObservedTable:
    digest: str | None  # the hash in the input jump rule's comment
    fingerprint: str  # hash of what the kernel holds, handles, counters and grants stripped
    grants: dict[str, frozenset[str]]  # elements of each grant set, as render writes them


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
    items = json.loads(out).get("nftables", [])
    digest = None
    for item in items:
        comment = str(item.get("rule", {}).get("comment", ""))
        if comment.startswith("picell "):
            digest = comment
    grants = {name: frozenset[str]() for name in GRANT_SETS.values()}
    for item in items:
        nft_set = item.get("set", {})
        if nft_set.get("name") in grants:
            grants[nft_set["name"]] = frozenset(_element(e) for e in nft_set.get("elem", []))
    body = [_strip_handles(i) for i in items if "metainfo" not in i]
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return ObservedTable(digest=digest, fingerprint=fingerprint, grants=grants)


def _element(elem: Any) -> str:
    """A grant set element from `nft -j` back to `NET . VIP . PORT` as render writes it."""
    if isinstance(elem, dict) and "elem" in elem:
        elem = elem["elem"].get("val")
    parts = elem.get("concat", []) if isinstance(elem, dict) else []
    out = []
    for part in parts:
        if isinstance(part, dict) and "prefix" in part:
            out.append(f"{part['prefix']['addr']}/{part['prefix']['len']}")
        elif isinstance(part, dict) and "range" in part:
            low, high = part["range"]
            nets = list(ipaddress.summarize_address_range(IPv4Address(low), IPv4Address(high)))
            out.append(str(nets[0]) if len(nets) == 1 else f"{low}-{high}")
        else:
            out.append(str(part))
    if out and "/" not in out[0] and "-" not in out[0]:
        out[0] += "/32"
    return " . ".join(out)


def apply_ruleset(runner: Runner, text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(text)
    runner.run(["nft", "-f", str(path)])


def apply_grant_delta(runner: Runner, lines: list[str]) -> None:
    """Grant set elements added and removed in one nft transaction."""
    runner.run(["nft", "-f", "-"], stdin="\n".join(lines) + "\n")


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
