"""Signed cross-cell messages (DESIGN §6): envelopes `{body, mac}` over the tunnel.

`body` always carries `v, type, from_cell, from_public_key, to_public_key, seq, sent_at`; `mac`
is HMAC-SHA256 of the body's canonical JSON with the link key both cells derive on their own.
`check_envelope` is the receiving side's whole authentication, in this order: the direct source
address is the sending cell's own address (inside its network, so WireGuard vouches for it; not
one of its devices), the MAC verifies, the message is addressed to us,
and its `seq` is newer than the last one applied. Pure: the caller fetches the link and applies.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from picell.errors import BadInput, Forbidden
from picell.mesh.crypto import link_key, mac, mac_ok
from picell.store.cell import Cell
from picell.store.links import Link
from picell.wireguard.keys import public_from_private

VERSION = 1
MESSAGE_TYPES = ("unlink", "state")


def make_envelope(
    *,
    kind: str,
    from_cell: str,
    our_private: str,
    our_public: str,
    link: Link,
    seq: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": VERSION,
        "type": kind,
        "from_cell": from_cell,
        "from_public_key": our_public,
        "to_public_key": link.public_key,
        "seq": seq,
        "sent_at": time.time(),
        **(extra or {}),
    }
    return {"body": body, "mac": mac(link_key(our_private, link.public_key), body)}


def envelope_from(
    cell: Cell, link: Link, kind: str, seq: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A message from our `cell` to `link`, signed with the key both derive."""
    return make_envelope(
        kind=kind,
        from_cell=cell.name,
        our_private=cell.private_key,
        our_public=public_from_private(cell.private_key),
        link=link,
        seq=seq,
        extra=extra,
    )


@dataclass(frozen=True)
class Envelope:
    body: dict[str, Any]
    mac: str

    @property
    def from_public_key(self) -> str:
        return str(self.body.get("from_public_key", ""))


def parse_envelope(data: Any, kind: str) -> Envelope:
    if not isinstance(data, dict) or not isinstance(data.get("body"), dict):
        raise BadInput("body: a signed message {body, mac} is expected", field="body")
    body, claimed = data["body"], data.get("mac")
    if not isinstance(claimed, str):
        raise BadInput("mac: missing", field="mac")
    if body.get("v") != VERSION:
        raise BadInput(f"body.v: version {body.get('v')!r} is not supported", field="body.v")
    if body.get("type") != kind:
        raise BadInput(f"body.type: {kind!r} expected", field="body.type")
    if not isinstance(body.get("seq"), int) or body["seq"] < 1:
        raise BadInput("body.seq: a positive integer is expected", field="body.seq")
    return Envelope(body, claimed)


def check_envelope(
    env: Envelope,
    link: Link | None,
    source: ipaddress.IPv4Address | None,
    our_private: str,
    our_public: str,
) -> None:
    """Raise Forbidden unless the message is authentic, fresh and addressed to us."""
    if link is None or source is None or source != link.dns_ip:
        # WireGuard's cryptokey routing makes the source address proof of the sending cell;
        # only the cell's own address speaks for it, not its devices
        raise Forbidden("message: not from the linked cell's own address", field="source")
    if not mac_ok(link_key(our_private, link.public_key), env.body, env.mac):
        raise Forbidden("mac: the signature does not verify", field="mac")
    if env.body.get("to_public_key") != our_public:
        raise Forbidden("body.to_public_key: the message is for another cell", field="body")
    if env.body["seq"] <= link.remote_seq:
        raise Forbidden(
            f"body.seq: {env.body['seq']} was already applied (last {link.remote_seq})",
            field="body.seq",
        )
