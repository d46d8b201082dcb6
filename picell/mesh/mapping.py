"""Per-link network translation (issue 15): link cells whose networks overlap (pure).

A linked cell's network that overlaps ours, another link's (as we present it), or the host's
own, or that lies outside the mesh range our devices route (10.0.0.0/8 by default), is
presented on our side at a free block of the mesh range: its *mapped subnet*, our choice alone.
Both cells must translate, because on one WireGuard interface a packet whose inner source is
one of our own devices' addresses cannot come from a linked cell, and the two cells' own
addresses may be equal. So each cell announces, in its pairing message and its signed state
document, the subnet at which it presents the other (`mapped_subnet`); the other keeps it as
`seen_as`. On the tunnel, a packet from us carries our source as they see us (`seen_as`) and
its destination as we see them (our mapped subnet): we SNAT on the way out, they DNAT on the
way in, and conntrack undoes both for the replies (`firewall.render`).

Everything this cell hands the kernel about a linked cell (its WireGuard AllowedIPs, routes,
grant sets, DNS views, the exit and relay tunnels, the mesh API's address) uses the network as
we present it (`LinkIdentity.network`, `.address`); addresses the other cell tells us (its DNS
address, its services' VIPs, its devices) are moved there with `translate`.

Must not: read the store or the system (the caller hands in what is taken).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from picell.errors import BadInput, Conflict

BLOCK = 24  # a mapped subnet is chosen as a free /24 (a linked network is at most a /24)


def translate(
    address: ipaddress.IPv4Address, src: ipaddress.IPv4Network, dst: ipaddress.IPv4Network
) -> ipaddress.IPv4Address:
    """`address` of `src` at the same offset in `dst` (prefix translation, as nft's `ip
    prefix to` does it); `address` itself when it lies outside `src`."""
    if address not in src:
        return address
    offset = int(address) - int(src.network_address)
    return ipaddress.IPv4Address(int(dst.network_address) + offset)


def overlap_reason(
    net: ipaddress.IPv4Network,
    ours: ipaddress.IPv4Network,
    mesh_range: ipaddress.IPv4Network,
    links: Iterable[tuple[str, ipaddress.IPv4Network]],
    host: str | None,
) -> str | None:
    """Why `net` must be mapped (in words), or None when it can be used as it is.
    `links`: the other links' names and networks as we present them; `host`: what of the
    host's own `net` overlaps (`policy.host_overlap`), or None."""
    if net.overlaps(ours):
        return f"it overlaps this cell's network {ours}"
    for name, other in links:
        if net.overlaps(other):
            return f"it overlaps the network {other} of linked cell {name}"
    if host is not None:
        return f"it overlaps {host}"
    if not net.subnet_of(mesh_range):
        return f"it lies outside the mesh range {mesh_range} that our devices route"
    return None


def choose(
    net: ipaddress.IPv4Network,
    public_key: str,
    taken: Iterable[ipaddress.IPv4Network],
    mesh_range: ipaddress.IPv4Network,
    cell: str,
    keep: ipaddress.IPv4Network | None = None,
) -> ipaddress.IPv4Network:
    """A free block of `mesh_range` at which to present `net` (same prefix length as `net`, at
    the start of a free /24), or Conflict naming `cell` when none is left. `keep`, the link's
    current mapped subnet, stays while it is still free; a new choice starts at a block drawn
    from the cell's key, so that two links (or two cells) rarely start at the same one."""
    busy = list(taken)

    def free(block: ipaddress.IPv4Network) -> bool:
        return not any(block.overlaps(t) for t in busy)

    if keep is not None and keep.prefixlen == net.prefixlen and keep.subnet_of(mesh_range):
        if free(keep):
            return keep
    if mesh_range.prefixlen > BLOCK:
        raise Conflict(f"vpn_subnet: the mesh range {mesh_range} is too small to map cell {cell}",
                       field="vpn_subnet")  # fmt: skip
    blocks = 1 << (BLOCK - mesh_range.prefixlen)
    start = int.from_bytes(hashlib.sha256(public_key.encode()).digest()[:4], "big") % blocks
    base = int(mesh_range.network_address)
    for i in range(blocks):
        first = base + ((start + i) % blocks << (32 - BLOCK))
        block = ipaddress.IPv4Network((first, BLOCK))
        if free(block):
            return ipaddress.IPv4Network((first, net.prefixlen))
    raise Conflict(
        f"vpn_subnet: cell {cell}'s network {net} must be mapped, and no free /{BLOCK} is left "
        f"in {mesh_range}",
        field="vpn_subnet",
    )


def check_seen_as(
    seen: ipaddress.IPv4Network | None,
    ours: ipaddress.IPv4Network,
    ranges: Iterable[ipaddress.IPv4Network],
    field: str,
) -> ipaddress.IPv4Network | None:
    """The other cell's word on where it presents our network, as we keep it: None when it
    presents us as we are. It must be a private block (`ranges`) as large as our network: it
    only ever moves our own addresses, in packets between us and that cell."""
    if seen is None or seen == ours:
        return None
    if seen.prefixlen != ours.prefixlen:
        raise BadInput(
            f"{field}: {seen} is not the size of this cell's network {ours}", field=field
        )
    if not any(seen.subnet_of(r) for r in ranges):
        raise BadInput(f"{field}: {seen} is not a private network", field=field)
    return seen
