"""Whether other cells and our devices can reach us (pure): what `status`, `init` and the web
pages say about our endpoints.

- An endpoint that is a private address (RFC 1918, 100.64/10 carrier-grade NAT, link-local,
  loopback, IPv6 ULA) reaches nobody outside this network: the owner should set a public one
  (`picell endpoint`), forward the port, or let the router map it.
- Linked cells tell us where they see us (`seen_at`, from their WireGuard). When every one of
  them sees us at another address than any we announce, a NAT sits between us: cells that
  cannot reach that address (no port forward) cannot reach us first.
- Device configs carry our first endpoint: a host name survives a new home address, a literal
  address means every device must import its config again when it changes.

Host names are never resolved here (no I/O): they are compared with nothing and named as such.
Must not: read the store or the system.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from picell.store.cell import Cell
from picell.store.links import Link, LinkState
from picell.validate import endpoint as parse_endpoint

# reachable only inside a home or a carrier: RFC 1918, carrier-grade NAT, link-local, loopback,
# IPv6 ULA. (Python's `is_private` also holds the documentation ranges, which the IANA lists
# as not global but which our test topologies use as public addresses.)
PRIVATE = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
              "127.0.0.0/8", "fc00::/7", "fe80::/10", "::1/128")
)  # fmt: skip


def endpoint_address(endpoint: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP literal of HOST:PORT, or None for a host name (or anything unreadable)."""
    try:
        host = parse_endpoint(endpoint).host
    except Exception:  # an observed value, never trusted: unreadable is "not an address"
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_private(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Unreachable from the internet: private, carrier-grade NAT, link-local, loopback, ULA."""
    return any(addr.version == net.version and addr in net for net in PRIVATE)


def endpoint_warnings(cell: Cell, links: Sequence[Link]) -> list[str]:
    """What the owner should know about our announced endpoints, in words."""
    announced = cell.announced
    out = []
    for ep in announced:
        addr = endpoint_address(ep)
        if addr is not None and is_private(addr):
            out.append(
                f"our endpoint {ep} is a private address: cells and devices outside this "
                "network cannot reach it (set a public one with `picell endpoint HOST:PORT`, "
                "forward UDP port on the router, or let the router map it)"
            )
    ours = {endpoint_address(ep) for ep in announced} - {None}
    seen = sorted(
        {ln.mirror.seen_at for ln in links if ln.mirror.seen_at and ln.state != LinkState.UNLINKING}
    )
    seen_hosts = {endpoint_address(s) for s in seen} - {None}
    if seen_hosts and ours and not (seen_hosts & ours):
        out.append(
            f"linked cells see us at {', '.join(seen)}, but we announce {', '.join(announced)}: "
            "a NAT lies between us (a cell behind its own NAT can reach us only if our "
            "announced endpoint is forwarded or mapped to this host)"
        )
    return out


def device_endpoint_note(cell: Cell) -> str | None:
    """Said when device configs carry a literal address (a changed one needs re-imports)."""
    first = cell.primary_endpoint
    if endpoint_address(first) is None:
        return None
    return (
        f"device configs carry the address {first}: if it changes, every device must import "
        "its config again (a host name, set with `picell endpoint NAME:PORT`, avoids that)"
    )


def init_warning(cell: Cell) -> str | None:
    """`init` chose the host's own address, and it is private (a home server's LAN address)."""
    if cell.endpoint_source != "host":
        return None
    addr = endpoint_address(cell.endpoint)
    if addr is None or not is_private(addr):
        return None
    return (
        f"the default endpoint {cell.endpoint} is this host's private address: nobody outside "
        "this network can reach it. Give `--endpoint HOST:PORT` (your router's public address "
        "or a DNS name, with UDP port forwarded), or let the router map the port."
    )
