"""Signed cross-cell messages (DESIGN §6): envelopes `{body, mac}` over the tunnel.

`body` always carries `v, type, from_cell, from_public_key, to_public_key, seq, sent_at` (and
the versions the sender speaks); `mac` is HMAC-SHA256 of the body's canonical JSON with the link
key both cells derive on their own. `parse_envelope` types the message (`wire.Envelope` and its
`wire.StateBody`/`wire.UnlinkBody`) before anything reads it; `check_envelope` is the receiving
side's whole authentication, in this order: the direct source address is the sending cell's own
address (inside its network, so WireGuard vouches for it; not one of its devices), the MAC
verifies over the body exactly as sent, the message is addressed to us, it is in a version we
speak, and its `seq` is newer than the last one applied. Pure: the caller fetches the link and
applies.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from picell.errors import BadInput, Forbidden
from picell.mesh import wire
from picell.mesh.crypto import link_key, mac, mac_ok
from picell.store.cell import Cell
from picell.store.links import Link
from picell.wireguard.keys import public_from_private

MESSAGE_TYPES = tuple(wire.BODIES)
B = TypeVar("B", bound=wire.Header)


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
        "v": wire.common_version(link.identity.versions, link.name, "versions"),
        "versions": list(wire.SUPPORTED_VERSIONS),
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
class Envelope(Generic[B]):
    raw_body: dict[str, Any]  # exactly as received: the MAC covers this
    body: B
    mac: str

    @property
    def from_public_key(self) -> str:
        return self.body.from_public_key


def parse_envelope(data: Any, model: type[B]) -> Envelope[B]:
    env = wire.parse(wire.Envelope, data, "message")
    body = wire.parse(model, env.body, "body")
    return Envelope(env.body, body, env.mac)


def check_envelope(
    env: Envelope[B],
    link: Link | None,
    source: ipaddress.IPv4Address | None,
    our_private: str,
    our_public: str,
) -> None:
    """Raise Forbidden unless the message is authentic, fresh and addressed to us."""
    if link is None or source is None or source != link.identity.dns_ip:
        # WireGuard's cryptokey routing makes the source address proof of the sending cell;
        # only the cell's own address speaks for it, not its devices
        raise Forbidden("message: not from the linked cell's own address", field="source")
    if not mac_ok(link_key(our_private, link.public_key), env.raw_body, env.mac):
        raise Forbidden("mac: the signature does not verify", field="mac")
    if env.body.to_public_key != our_public:
        raise Forbidden("body.to_public_key: the message is for another cell", field="body")
    if env.body.v not in wire.SUPPORTED_VERSIONS:
        ours = ", ".join(map(str, wire.SUPPORTED_VERSIONS))
        raise BadInput(
            f"body.v: the message is in protocol version {env.body.v}; this cell speaks {ours}",
            field="body.v",
        )
    if env.body.seq <= link.mirror.seq:
        raise Forbidden(
            f"body.seq: {env.body.seq} was already applied (last {link.mirror.seq})",
            field="body.seq",
        )
