"""Signed cross-cell messages (DESIGN §6): envelopes `{body, mac}` over the tunnel.

`body` always carries `v, type, from_cell, from_public_key, to_public_key, seq, sent_at` (and
the versions the sender speaks); `mac` is HMAC-SHA256 of the body's canonical JSON with the link
key both cells derive on their own. `parse_envelope` types the message (`wire.Envelope` and its
`wire.StateBody`/`wire.UnlinkBody`) before anything reads it; `check_envelope` is the receiving
side's whole authentication, in this order: the direct source address is the sending cell's own
address (inside its network, so WireGuard vouches for it; not one of its devices), the MAC
verifies over the body exactly as sent, the message is addressed to us, it is in a version we
speak, and it is fresh (`check_fresh`). Pure: the caller fetches the link and applies.

Restore-proof freshness (`check_fresh`, never the wall clock, since clocks may be skewed): each
cell has an `epoch`, 128 random bits drawn at init and anew by every restore, carried in every
signed body. A receiver keeps, per link, the other cell's current epoch, its last applied `seq`
within it, and its last `RETIRED_MAX` retired epochs. Within the current epoch `seq` must grow;
a message in an epoch never seen (made by the holder of the link key, as its MAC proves) starts
a new incarnation whose `seq` may start anywhere, and the old epoch is retired; a message in a
retired epoch is a replay. A cell restored from an old copy therefore is heard again at its
first document, and whatever it sent before the restore stays refused.
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
RETIRED_MAX = 32  # retired epochs kept per link: a replay from an older one would be "new"


def make_envelope(
    *,
    kind: str,
    from_cell: str,
    our_private: str,
    our_public: str,
    link: Link,
    seq: int,
    extra: dict[str, Any] | None = None,
    epoch: str = "",
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
        **({"epoch": epoch} if epoch else {}),
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
        epoch=cell.epoch,
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
    if link is None or source is None or source != link.identity.address:
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
    check_fresh(env.body, link)


def check_fresh(body: wire.Header, link: Link) -> bool:
    """Raise Forbidden for a replay; True when `body` starts a new epoch of the other cell
    (see the module's docstring). A body without an epoch (a cell before epochs) is in epoch
    "", so an older cell keeps the plain rule: `seq` must grow."""
    epoch = body.epoch or ""
    mirror = link.mirror
    if epoch != mirror.epoch:
        if epoch in mirror.retired_epochs or (epoch == "" and mirror.epoch):
            raise Forbidden(
                "body.epoch: a message from an earlier incarnation of that cell (a replay)",
                field="body.epoch",
            )
        return True
    if body.seq <= mirror.seq:
        raise Forbidden(
            f"body.seq: {body.seq} was already applied (last {mirror.seq})", field="body.seq"
        )
    return False


def retire(link: Link, epoch: str) -> tuple[str, ...]:
    """The retired epochs once `epoch` is current: the old current one joins them (bounded)."""
    old = link.mirror.epoch
    kept = [e for e in link.mirror.retired_epochs if e != epoch]
    if old != epoch and (old or link.mirror.seq):  # "" is an epoch only once it was used
        kept.append(old)
    return tuple(kept[-RETIRED_MAX:])
