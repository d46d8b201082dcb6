"""Apply and observe the owned nft table: one `nft -f` per change, `nft -j` to read back."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picell.constants import TABLE_NAME
from picell.errors import CommandFailed
from picell.system.run import Runner


@dataclass(frozen=True)
class ObservedTable:
    digest: str | None  # the hash in the input jump rule's comment
    fingerprint: str  # hash of what the kernel holds, handles stripped


def _strip_handles(node: Any) -> Any:
    """Drop what changes without a ruleset change: handles and counter values."""
    if isinstance(node, dict):
        if "counter" in node and isinstance(node["counter"], dict):
            return {"counter": {}}
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
    body = [_strip_handles(i) for i in items if "metainfo" not in i]
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return ObservedTable(digest=digest, fingerprint=fingerprint)


def apply_ruleset(runner: Runner, text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(text)
    runner.run(["nft", "-f", str(path)])


def check_ruleset(runner: Runner, path: Path) -> None:
    """`nft -c -f`: parse and verify without applying (used by tests and tooling)."""
    runner.run(["nft", "-c", "-f", str(path)])
