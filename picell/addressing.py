"""Address arithmetic of a cell's VPN network (pure).

Devices take host indexes upward from the cell's own address; services take virtual IPs from the
top of the network downward. Both are derived from the configured address, so a renumbered cell
keeps allocating correctly. Also draws a random default network, as IPv6 ULA prefixes are drawn.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable

from picell.constants import CROWDED_RANGES, MESH_RANGE
from picell.errors import Conflict


def peer_address(network: ipaddress.IPv4Network, host_index: int) -> ipaddress.IPv4Address:
    return network[host_index]


def vip_address(network: ipaddress.IPv4Network, vip_index: int) -> ipaddress.IPv4Address:
    """vip_index 1 is the highest host address (.254 in a /24)."""
    return network[-1 - vip_index]


def _host_index(address: ipaddress.IPv4Interface) -> int:
    return int(address.ip) - int(address.network.network_address)


def next_peer_index(
    address: ipaddress.IPv4Interface, used_peers: Iterable[int], used_vips: Iterable[int]
) -> int:
    """The lowest free host index above the cell's own address, below every VIP."""
    net = address.network
    taken = set(used_peers) | {_host_index(address)}
    top = net.num_addresses - 2  # highest host index
    vip_floor = min((top + 1 - v for v in used_vips), default=top + 1)
    index = _host_index(address) + 1
    while index in taken:
        index += 1
    if index >= vip_floor or index > top:
        raise Conflict(f"no free device address left in {net}", field="name")
    return index


def next_vip_index(
    address: ipaddress.IPv4Interface, used_peers: Iterable[int], used_vips: Iterable[int]
) -> int:
    """The lowest free offset below the broadcast address, above every device address."""
    net = address.network
    top = net.num_addresses - 2
    taken = set(used_vips)
    peer_ceiling = max([*used_peers, _host_index(address)])
    index = 1
    while index in taken:
        index += 1
    if top + 1 - index <= peer_ceiling:
        raise Conflict(f"no free service address left in {net}", field="name")
    return index


def draw_network(
    avoid: Iterable[ipaddress.IPv4Network], prefixlen: int = 24, tries: int = 1000
) -> ipaddress.IPv4Network:
    """A random /24 inside 10.0.0.0/8 that overlaps neither `avoid` nor the crowded ranges."""
    blocked = [*CROWDED_RANGES, *avoid]
    count = 2 ** (prefixlen - MESH_RANGE.prefixlen)
    for _ in range(tries):
        start = int(MESH_RANGE.network_address) + secrets.randbelow(count) * 2 ** (32 - prefixlen)
        candidate = ipaddress.IPv4Network((start, prefixlen))
        if not any(candidate.overlaps(b) for b in blocked):
            return candidate
    raise Conflict("could not find a free /24 in 10.0.0.0/8 for the VPN network", field="address")
