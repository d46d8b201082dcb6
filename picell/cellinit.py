"""A cell's own settings: defaults at first start (`picell init`), and checked changes.

`plan_cell` turns an `InitRequest` (and the cell as stored, if any) into the `Cell` to store:
defaults are the host name (with a short random suffix when it is a distribution's default, so two
friends' `raspberrypi` cells can link), `<name>.internal` (ICANN's TLD for private use: never
delegated), a random /24 in 10.0.0.0/8 avoiding the host's routes,
and the host's first global address (IPv4, else IPv6). A change must still hold every device and
service and must not collide with a linked cell. Reads the host only through the runner; stores
nothing itself.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import sqlite3
from dataclasses import dataclass

from picell import validate
from picell.addressing import draw_network
from picell.constants import (
    DEFAULT_INTERFACE,
    DEFAULT_LISTEN_PORT,
    DEFAULT_MESH_PORT,
    DEFAULT_PAIR_PORT,
    MESH_RANGE,
)
from picell.errors import BadInput, Conflict
from picell.routing.host import observe_host_addresses, observe_host_networks
from picell.store import peers as peer_table
from picell.store import services as service_table
from picell.store.cell import Cell
from picell.store.links import Link, LinkState
from picell.system.run import Runner
from picell.validate import HostPort
from picell.wireguard import keys


@dataclass(frozen=True)
class InitRequest:
    name: str | None = None
    domain: str | None = None
    address: str | None = None
    endpoint: str | None = None
    interface: str | None = None
    pair_port: int | None = None
    mesh_port: int | None = None
    uplink: str | None = None
    listen_port: int | None = None


def check_links(cell: Cell, links: list[Link], old: Cell | None = None) -> None:
    """A change of our own network or domain must not collide with a linked cell's; a new name
    or domain is refused while links exist (the identity policy: linked cells learn a name or
    a domain only by pairing with a fresh invite)."""
    live = [ln.name for ln in links if ln.state != LinkState.UNLINKING]
    for field, before, after in (("name", old and old.name, cell.name),
                                 ("domain", old and old.domain, cell.domain)):  # fmt: skip
        if old is not None and before != after and live:
            raise Conflict(
                f"{field}: the cell is linked with {', '.join(live)}; linked cells learn a new "
                f"{field} only through a fresh invite: disconnect them, run init with the new "
                f"{field} while the daemon is stopped, and link again with fresh invites",
                field=field,
            )
    for link in links:
        theirs = link.identity
        if cell.network.overlaps(theirs.network):
            raise Conflict(
                f"address: {cell.network} overlaps the network {theirs.network} of linked cell "
                f"{link.name}",
                field="address",
            )
        if (
            cell.domain == theirs.domain
            or cell.domain.endswith("." + theirs.domain)
            or theirs.domain.endswith("." + cell.domain)
        ):
            raise Conflict(
                f"domain: {cell.domain} clashes with the domain {theirs.domain} of linked cell "
                f"{link.name}",
                field="domain",
            )
        if cell.name == link.name:
            raise Conflict(f"name: {cell.name} is the name of a linked cell", field="name")


# host names a distribution or an image gives every machine: a cell named after one would
# clash with a friend's (same name, same domain), so it gets a random suffix
COMMON_HOST_NAMES = frozenset(
    """raspberrypi raspberry pi dietpi armbian orangepi rock64 odroid pine64 debian ubuntu
    fedora localhost localhost-localdomain nas server homeserver home host linux archlinux alarm
    openmediavault omv truenas unraid proxmox pve cell picell box router gateway""".split()
)
SUFFIX_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no look-alikes (l, 1, o, 0)


def default_name(hostname: str | None = None) -> str:
    raw = (hostname if hostname is not None else socket.gethostname()).split(".")[0].lower()
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in raw).strip("-")
    cleaned = cleaned.lstrip("0123456789-")[:32].rstrip("-") or "cell"
    if cleaned in COMMON_HOST_NAMES:
        suffix = "".join(secrets.choice(SUFFIX_ALPHABET) for _ in range(4))
        cleaned = f"{cleaned}-{suffix}"
    return cleaned


def plan_cell(runner: Runner, req: InitRequest, old: Cell | None, conn: sqlite3.Connection) -> Cell:
    name = validate.name(req.name, "name") if req.name else (old.name if old else None)
    name = name or default_name()
    domain = (
        validate.domain(req.domain) if req.domain else (old.domain if old else f"{name}.internal")
    )
    if req.address:
        address = validate.cell_address(req.address)
    elif old:
        address = old.address
    else:
        net = draw_network(observe_host_networks(runner))
        address = ipaddress.IPv4Interface(f"{net[1]}/{net.prefixlen}")
    listen_port = validate.port(req.listen_port, "listen_port") if req.listen_port else None
    source = "owner"
    endpoints: tuple[str, ...] = ()
    if req.endpoint:
        ep = validate.endpoint(req.endpoint)
        endpoint = str(ep)
        listen_port = listen_port or (old.listen_port if old else ep.port)
    elif old:
        endpoint, endpoints, source = old.endpoint, old.endpoints, old.endpoint_source
    else:
        source = "host"
        port = listen_port or DEFAULT_LISTEN_PORT
        # its global IPv4 address first, else (an IPv6-only home) its global IPv6 address;
        # the other family, when the host has both, is announced as a second endpoint
        endpoints = tuple(str(HostPort(a, port)) for a in observe_host_addresses(runner))
        if not endpoints:
            raise BadInput(
                "endpoint: this host has no global address; give --endpoint HOST:PORT",
                field="endpoint",
            )
        endpoint = endpoints[0]
    listen_port = listen_port or (old.listen_port if old else DEFAULT_LISTEN_PORT)
    if old:
        _check_renumber(conn, address)
    return Cell(
        name=name,
        domain=domain,
        address=address,
        listen_port=listen_port,
        endpoint=endpoint,
        endpoints=endpoints or (endpoint,),
        endpoint_source=source,
        mapped_endpoint=old.mapped_endpoint if old else None,
        private_key=old.private_key if old else keys.generate_private(),
        interface=validate.interface(req.interface)
        if req.interface
        else (old.interface if old else DEFAULT_INTERFACE),
        pair_port=validate.port(req.pair_port, "pair_port")
        if req.pair_port
        else (old.pair_port if old else DEFAULT_PAIR_PORT),
        mesh_port=validate.port(req.mesh_port, "mesh_port")
        if req.mesh_port
        else (old.mesh_port if old else DEFAULT_MESH_PORT),
        uplink=validate.interface(req.uplink, "uplink")
        if req.uplink
        else (old.uplink if old else None),
        mesh_range=old.mesh_range if old else MESH_RANGE,
        upstreams=old.upstreams if old else (),
    )


def _check_renumber(conn: sqlite3.Connection, address: ipaddress.IPv4Interface) -> None:
    top = address.network.num_addresses - 2
    peers = peer_table.all_peers(conn)
    services = service_table.all_services(conn)
    used = [p.host_index for p in peers] + [top + 1 - s.vip_index for s in services]
    own = int(address.ip) - int(address.network.network_address)
    if any(i > top for i in used) or len(set(used)) != len(used) or own in used:
        raise Conflict(
            f"address: {address.network} cannot hold the existing devices and services",
            field="address",
        )
