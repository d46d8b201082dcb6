"""The identity policy for another cell (DESIGN §5): what a linked cell may call itself.

Applied at every door (an invite we import, a pairing on our listener, a re-pairing, the state
document), after the wire models accepted the syntax:
- **Domain**: at least two labels, not a public suffix (the maintained Public Suffix List, from
  the `publicsuffixlist` package), and under a private-use suffix. Any other domain would capture
  that name for our devices (a linked `com` would receive every `*.com` lookup): it needs the
  importing owner's explicit `connect --trust-domain`, and never arrives through pairing.
- **Network**: at most a /24, inside 10/8, 172.16/12, 192.168/16 or 100.64/10. One that
  overlaps our network, another link's, an address of our host or a route but the default and
  picell's own (a route to it would pull the host's own traffic, its LAN, into the tunnel), or
  that lies outside the mesh range, is not refused: it is mapped (`plan_mapping`,
  `mesh.mapping`), and refused only when no free block is left.

- **Conflicts** with this cell and its other links (`check_conflicts`): a clashing domain or
  name is refused naming the cell in conflict; the link with the same key (a re-pairing) is no
  conflict with itself, but may not rename itself.

Reads the host (`ip -j`) through the runner; decides nothing else and changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from publicsuffixlist import PublicSuffixList

from picell.constants import ROUTE_PROTO
from picell.errors import BadInput, Conflict
from picell.mesh.mapping import choose, overlap_reason
from picell.mesh.wire import Identity
from picell.store.cell import Cell
from picell.store.links import Link
from picell.system.run import Runner
from picell.wireguard import keys

# Suffixes set aside for private use: RFC 6761 (test), RFC 8375 (home.arpa), ICANN's 2024
# `.internal`, picell's default `.cell`, and the never-delegated names home networks use.
PRIVATE_SUFFIXES = ("internal", "home.arpa", "test", "cell", "lan", "home", "corp", "intranet",
                    "private")  # fmt: skip
LINKABLE_RANGES = tuple(
    ipaddress.IPv4Network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
LINK_PREFIX_MIN = 24  # a linked network is at most a /24


@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def is_private_use(domain: str) -> bool:
    return any(domain.endswith("." + s) for s in PRIVATE_SUFFIXES)


def check_domain(domain: str, field: str, *, trusted: bool = False) -> None:
    """Refuse a domain another cell may not bring in; `trusted`: the owner's --trust-domain."""
    labels = domain.split(".")
    if len(labels) < 2:
        raise BadInput(
            f"{field}: {domain} has a single label; a linked cell's domain needs at least two "
            "(e.g. beta.cell)",
            field=field,
        )
    if _psl().is_public(domain):
        raise BadInput(
            f"{field}: {domain} is a public suffix; linking it would send every name under it "
            "to the other cell",
            field=field,
        )
    if not trusted and not is_private_use(domain):
        raise BadInput(
            f"{field}: {domain} is not under a private-use suffix "
            f"(.{', .'.join(PRIVATE_SUFFIXES)}); it could capture a public name for this cell's "
            "devices. If you own it, connect with --trust-domain",
            field=field,
        )


@dataclass(frozen=True)
class HostNets:
    """The host's own IPv4 addresses and routes, as `ip -j` reports them."""

    addresses: tuple[tuple[str, ipaddress.IPv4Interface], ...] = ()  # (interface, address)
    routes: tuple[tuple[str, ipaddress.IPv4Network], ...] = ()  # (device, destination)


def _ours(dev: str, interface: str) -> bool:
    # the cell's WireGuard interface and its exit tunnels (<if>x<slot>)
    return dev == interface or (dev.startswith(interface + "x") and dev[len(interface) + 1 :]
                                .isdigit())  # fmt: skip


def _parse_json(text: str) -> list[Any]:
    try:
        data = json.loads(text or "[]")
    except ValueError:
        return []
    return data if isinstance(data, list) else []


def observe_host(runner: Runner, interface: str) -> HostNets:
    """Every IPv4 address and route of the host but picell's own (its interfaces, proto 77)
    and default routes."""
    addresses = []
    for link in _parse_json(runner.run(["ip", "-j", "-4", "addr", "show"]).stdout):
        dev = str(link.get("ifname", "")) if isinstance(link, dict) else ""
        if not dev or _ours(dev, interface):
            continue
        for a in link.get("addr_info") or []:
            try:
                addresses.append(
                    (dev, ipaddress.IPv4Interface(f"{a['local']}/{a.get('prefixlen', 32)}"))
                )
            except (KeyError, TypeError, ValueError):
                continue
    routes = []
    # -N: protocol numbers as numbers, whatever the host's rt_protos file names them
    out = runner.run(["ip", "-j", "-N", "-4", "route", "show", "table", "all"]).stdout
    for r in _parse_json(out):
        if not isinstance(r, dict):
            continue
        dst, dev = r.get("dst"), str(r.get("dev", ""))
        if dst in (None, "default") or _ours(dev, interface):
            continue
        if r.get("protocol") in (ROUTE_PROTO, str(ROUTE_PROTO)):
            continue
        if r.get("type") in ("broadcast", "multicast"):
            continue  # the host's addresses already stand for their broadcast routes
        try:
            routes.append((dev, ipaddress.IPv4Network(str(dst), strict=False)))
        except ValueError:
            continue
    return HostNets(tuple(sorted(set(addresses))), tuple(sorted(set(routes))))


def host_overlap(net: ipaddress.IPv4Network, host: HostNets) -> str | None:
    """What of the host's own `net` would capture, in words, or None."""
    for dev, iface in host.addresses:
        if iface.ip in net or net.subnet_of(iface.network):
            return f"this host's address {iface} on {dev}"
    for dev, route in host.routes:
        if route.overlaps(net):
            return f"this host's route to {route}" + (f" on {dev}" if dev else "")
    return None


def check_network(net: ipaddress.IPv4Network, field: str, cell: str) -> None:
    if not any(net.subnet_of(r) for r in LINKABLE_RANGES):
        raise BadInput(
            f"{field}: cell {cell}'s network {net} lies outside 10.0.0.0/8, 172.16.0.0/12, "
            "192.168.0.0/16 and 100.64.0.0/10",
            field=field,
        )
    if net.prefixlen < LINK_PREFIX_MIN:
        raise BadInput(
            f"{field}: cell {cell}'s network {net} is larger than a /{LINK_PREFIX_MIN}",
            field=field,
        )


def plan_mapping(
    cell: Cell, links: list[Link], other: Identity, host: HostNets, prefix: str = "invite."
) -> ipaddress.IPv4Network | None:
    """Where this cell presents `other`'s network (`mesh.mapping`), or None to use it as it
    is. A re-pairing keeps its block while that is still free. Conflict naming the cell when
    the network must be mapped and no block is left."""
    existing = next((ln for ln in links if ln.public_key == other.public_key), None)
    rest = [ln for ln in links if ln.public_key != other.public_key]
    views = [(ln.name, ln.identity.network) for ln in rest]
    reason = overlap_reason(other.vpn_subnet, cell.network, cell.mesh_range, views,
                            host_overlap(other.vpn_subnet, host))  # fmt: skip
    if reason is None:
        return None
    taken = [cell.network, *(n for _, n in views), *(a.network for _, a in host.addresses),
             *(r for _, r in host.routes)]  # fmt: skip
    keep = existing.identity.mapped if existing else None
    try:
        return choose(other.vpn_subnet, other.public_key, taken, cell.mesh_range,
                      other.cell_name, keep=keep)  # fmt: skip
    except Conflict as exc:
        raise Conflict(f"{prefix}{exc.message}", field=f"{prefix}vpn_subnet") from None


def _domains_clash(a: str, b: str) -> bool:
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def check_conflicts(
    cell: Cell, links: list[Link], other: Identity, prefix: str = "invite."
) -> None:
    """Refuse a link that would collide, naming the cell in conflict. The link with the same
    public key (a re-pairing) is not a conflict with itself, but may not change its name."""
    name = other.cell_name
    if other.public_key == keys.public_from_private(cell.private_key):
        raise Conflict(
            f"{prefix}public_key: that is this cell's own invite", field=f"{prefix}public_key"
        )
    if _domains_clash(other.domain, cell.domain):
        raise Conflict(
            f"{prefix}domain: cell {name}'s domain {other.domain} clashes with this cell's "
            f"domain {cell.domain}",
            field=f"{prefix}domain",
        )
    if name == cell.name:
        raise Conflict(
            f"{prefix}cell_name: {name} is this cell's own name", field=f"{prefix}cell_name"
        )
    for link in links:
        if link.public_key == other.public_key:
            if link.name != name:
                raise Conflict(
                    f"{prefix}cell_name: that key is linked as cell {link.name}; a pairing "
                    "never renames a link",
                    field=f"{prefix}cell_name",
                )
            continue
        if link.name == name:
            raise Conflict(
                f"{prefix}cell_name: a cell named {name} is already linked with another key",
                field=f"{prefix}cell_name",
            )
        if _domains_clash(other.domain, link.identity.domain):
            raise Conflict(
                f"{prefix}domain: cell {name}'s domain {other.domain} clashes with the domain of "
                f"linked cell {link.name}",
                field=f"{prefix}domain",
            )
