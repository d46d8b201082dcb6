"""The desired state of a cell: frozen, sorted values built from the store (pure).

`build_state` is the whole truth handed to the reconciler; renderers turn it into WireGuard, nft
and Unbound configuration text. Nothing here reads the system or the store.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from picell.addressing import peer_address, vip_address
from picell.constants import DNS_PORT, EXIT_MTU, LINK_KEEPALIVE_S, NOT_INTERNET
from picell.mesh import relay as relaying
from picell.mesh.shares import share_network
from picell.routing.exits import exit_ifname, exit_mark, exit_port, exit_table
from picell.store.cell import Cell
from picell.store.links import Link, Share
from picell.store.links import LinkState as Phase  # state.LinkState is the desired link
from picell.store.peers import Peer
from picell.store.services import Service
from picell.wireguard import keys

ANY = ipaddress.IPv4Network("0.0.0.0/0")


@dataclass(frozen=True, order=True)
class PeerState:
    public_key: str
    name: str
    allowed_ips: tuple[ipaddress.IPv4Network, ...]
    endpoint: str | None = None
    keepalive_s: int = 0
    # a linked cell's endpoints to try in turn while its link is stale (the reconciler keeps
    # the endpoint WireGuard learned while it is fresh); () for a fixed endpoint
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True, order=True)
class WgDevice:
    """One WireGuard interface as `wg syncconf` sets it."""

    interface: str
    private_key: str
    listen_port: int
    peers: tuple[PeerState, ...]


@dataclass(frozen=True, order=True)
class ExitTunnel:
    """An exit tunnel (DESIGN §8): a WireGuard interface of its own, nested in the link.

    Slot 0 is the relay: our uplink lent to the linked cells in `relayed` (each offered our exit
    and asked for it). Slot k >= 1 carries `devices` to exit cell `cell`; `wg` is None while
    that cell does not offer its exit (or we do not know its tunnel's key yet): its devices'
    traffic is then dropped, never sent out of our own uplink.
    """

    slot: int
    interface: str
    wg: WgDevice | None
    cell: str = ""
    devices: tuple[ipaddress.IPv4Address, ...] = ()
    relayed: tuple[ipaddress.IPv4Network, ...] = ()
    # where the exit cell presents our network (`mesh.mapping`): our devices' packets enter
    # the tunnel with their addresses moved there; None: as they are
    seen_as: ipaddress.IPv4Network | None = None
    dns_server: ipaddress.IPv4Address | None = None  # exit cell's resolver, through the link
    mtu: int = EXIT_MTU

    @property
    def mark(self) -> int:
        return exit_mark(self.slot)

    @property
    def table(self) -> int:
        return exit_table(self.slot)

    @property
    def relay(self) -> bool:
        return self.slot == 0


@dataclass(frozen=True, order=True)
class ServiceState:
    name: str
    vip: ipaddress.IPv4Address
    port: int
    protocol: str
    backend_host: ipaddress.IPv4Address
    backend_port: int


def _grant_order(g: Grant) -> tuple[str, int, int, int, int]:
    # Grant's own order, on integers: comparing 10,000 ipaddress objects took most of a sort
    net = g.network
    return (g.protocol, int(net.network_address), net.prefixlen, int(g.vip), g.port)


@dataclass(frozen=True, order=True)
class Grant:
    """A linked cell's network may open `protocol` `vip:port` (one nft set element)."""

    protocol: str
    network: ipaddress.IPv4Network
    vip: ipaddress.IPv4Address
    port: int

    @property
    def element(self) -> str:
        return f"{self.network} . {self.vip} . {self.port}"

    def covered_by(self, other: Grant) -> bool:
        """`other` admits every flow this grant admits."""
        return (other.protocol, other.vip, other.port) == (
            self.protocol,
            self.vip,
            self.port,
        ) and self.network.subnet_of(other.network)


@dataclass(frozen=True, order=True)
class DnsRecord:
    fqdn: str
    address: ipaddress.IPv4Address


@dataclass(frozen=True, order=True)
class DnsForward:
    """A linked cell's domain, resolved by its own DNS through the tunnel."""

    domain: str
    server: ipaddress.IPv4Address


@dataclass(frozen=True, order=True)
class DnsZone:
    """A linked cell's domain that we present ourselves (its network is mapped, so its own
    answers would name addresses we do not route): its cell and the services it shares with
    us, at the addresses we present them, from its signed document."""

    domain: str
    records: tuple[DnsRecord, ...]


@dataclass(frozen=True, order=True)
class DnsView:
    """What a linked cell's network may resolve here: only `records` of our domain, and
    internet names only while we relay its devices' internet (`internet`), never the domains
    of the other cells we are linked with (`hidden`)."""

    name: str
    network: ipaddress.IPv4Network
    records: tuple[DnsRecord, ...]
    internet: bool = False
    hidden: tuple[str, ...] = ()


@dataclass(frozen=True)
class DnsState:
    domain: str
    listen: ipaddress.IPv4Address
    port: int
    allow: tuple[ipaddress.IPv4Network, ...]
    records: tuple[DnsRecord, ...]
    upstreams: tuple[ipaddress.IPv4Address, ...]
    forwards: tuple[DnsForward, ...] = ()
    views: tuple[DnsView, ...] = ()
    zones: tuple[DnsZone, ...] = ()  # linked domains we present (mapped links)

    @property
    def linked_domains(self) -> tuple[str, ...]:
        """Every linked cell's domain: forwarded or presented."""
        return tuple(sorted([*(f.domain for f in self.forwards), *(z.domain for z in self.zones)]))


@dataclass(frozen=True, order=True)
class LinkState:
    """A linked cell as the kernel sees it: a WireGuard peer, a route, firewall and DNS rules."""

    name: str
    public_key: str
    endpoint: str | None  # None: a link via a relay that does not relay it (yet)
    network: ipaddress.IPv4Network
    dns_ip: ipaddress.IPv4Address
    mesh_port: int
    unlinking: bool  # only the other cell's address stays reachable, to deliver `unlink`
    candidates: tuple[str, ...] = ()  # endpoints to try while stale, `endpoint` first
    # translation (`mesh.mapping`): `network` and `dns_ip` are as we present them; `seen_as` is
    # where the other cell presents our network (None: as it is)
    seen_as: ipaddress.IPv4Network | None = None

    @property
    def routed(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.dns_ip) if self.unlinking else self.network


@dataclass(frozen=True)
class State:
    interface: str
    private_key: str
    listen_port: int
    address: ipaddress.IPv4Interface
    peers: tuple[PeerState, ...]
    services: tuple[ServiceState, ...]
    dns: DnsState
    links: tuple[LinkState, ...] = ()
    mesh_port: int = 3000
    grants: tuple[Grant, ...] = ()
    exits: tuple[ExitTunnel, ...] = ()
    not_internet: tuple[ipaddress.IPv4Network, ...] = NOT_INTERNET
    uplink: str | None = None
    relay: relaying.RelayState = relaying.RelayState()  # pairs we relay, cells relaying for us

    @property
    def wg(self) -> WgDevice:
        return WgDevice(self.interface, self.private_key, self.listen_port, self.peers)

    @property
    def wg_interfaces(self) -> tuple[str, ...]:
        return (self.interface, *(t.interface for t in self.exits))

    @property
    def linked_networks(self) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(sorted(link.network for link in self.links if not link.unlinking))

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.address.network


def build_state(
    cell: Cell,
    peers: list[Peer],
    services: list[Service],
    upstreams: tuple[ipaddress.IPv4Address, ...],
    links: Sequence[Link] = (),
    exit_slots: dict[str, int] | None = None,
    onlink: Sequence[tuple[str, ipaddress.IPv4Network]] = (),
) -> State:
    net = cell.network
    link_states = tuple(
        sorted(
            LinkState(
                name=link.name,
                public_key=link.public_key,
                # the relay (a link via a cell), introductions, then the declared endpoints
                endpoint=next(iter(relaying.peer_candidates(link, links)), None),
                candidates=relaying.peer_candidates(link, links),
                network=link.identity.network,
                dns_ip=link.identity.address,
                mesh_port=link.identity.mesh_port,
                unlinking=link.state == Phase.UNLINKING,
                seen_as=link.mirror.seen_as,
            )
            for link in links
        )
    )
    device_peers = (
        PeerState(
            public_key=p.public_key,
            name=p.name,
            allowed_ips=(ipaddress.IPv4Network(peer_address(net, p.host_index)),),
            keepalive_s=0,
        )
        for p in peers
    )
    cell_peers = (
        PeerState(
            public_key=link.public_key,
            name=f"cell {link.name}",
            allowed_ips=(link.routed,),
            endpoint=link.endpoint,
            keepalive_s=LINK_KEEPALIVE_S,
            candidates=link.candidates,
        )
        for link in link_states
    )
    peer_states = tuple(sorted([*device_peers, *cell_peers]))
    service_states = tuple(
        sorted(
            ServiceState(
                name=s.name,
                vip=vip_address(net, s.vip_index),
                port=s.port,
                protocol=s.protocol,
                backend_host=s.backend_host,
                backend_port=s.backend_port,
            )
            for s in services
        )
    )
    by_name = {s.name: s for s in service_states}
    # what a linked cell may resolve: every service shared with it in some form (a device
    # share's name too: its cell's resolver asks for all its devices, from the cell's own
    # address, and our document tells it the name anyway; the grant stays the device's)
    shared = {
        link.name: [by_name[n] for n in link.choices.services if n in by_name] for link in links
    }
    grants = tuple(
        sorted(
            (
                grant
                for link in links
                if link.state != Phase.UNLINKING
                for share in link.choices.shares
                if (svc := by_name.get(share.service)) is not None
                and (grant := share_grant(link, share, svc.protocol, svc.vip, svc.port, net))
                is not None
            ),
            key=_grant_order,
        )
    )
    records = {
        DnsRecord(cell.domain, cell.ip),
        DnsRecord(f"{cell.name}.{cell.domain}", cell.ip),
    }
    records |= {
        DnsRecord(f"{p.name}.{cell.domain}", peer_address(net, p.host_index)) for p in peers
    }
    records |= {DnsRecord(f"{s.name}.{cell.domain}", s.vip) for s in service_states}
    exits = _exits(cell, peers, links, exit_slots or {})
    relayed = {n for t in exits for n in t.relayed}
    live_domains = sorted(ln.identity.domain for ln in links if ln.state != Phase.UNLINKING)
    dns = DnsState(
        domain=cell.domain,
        listen=cell.ip,
        port=DNS_PORT,
        allow=(net,),
        records=tuple(sorted(records)),
        upstreams=tuple(u for u in (cell.upstreams or upstreams) if u != cell.ip),
        forwards=tuple(
            sorted(
                DnsForward(ln.identity.domain, ln.identity.dns_ip)
                for ln in links
                if ln.state != Phase.UNLINKING and ln.identity.mapped is None
            )
        ),
        zones=tuple(
            sorted(
                _presented_zone(ln)
                for ln in links
                if ln.state != Phase.UNLINKING and ln.identity.mapped is not None
            )
        ),
        views=tuple(
            sorted(
                DnsView(
                    link.name,
                    link.identity.network,
                    _view_records(cell, shared[link.name], link),
                    internet=link.identity.network in relayed,
                    hidden=tuple(d for d in live_domains if d != link.identity.domain),
                )
                for link in links
                if link.state != Phase.UNLINKING
            )
        ),
    )
    return State(
        interface=cell.interface,
        private_key=cell.private_key,
        listen_port=cell.listen_port,
        address=cell.address,
        peers=peer_states,
        services=service_states,
        dns=dns,
        links=link_states,
        mesh_port=cell.mesh_port,
        grants=grants,
        exits=exits,
        not_internet=_not_internet(cell, links, exits, onlink),
        uplink=cell.uplink,
        relay=relaying.relay_state(links, relay_reserved(cell)),
    )


def share_grant(
    link: Link,
    share: Share,
    protocol: str,
    vip: ipaddress.IPv4Address,
    port: int,
    ours: ipaddress.IPv4Network,
) -> Grant | None:
    """The grant `share` of our service `vip` (of our network `ours`) holds in the nft sets, at
    the addresses the link presents and is presented (None: it has none of its own,
    `shares.share_network`)."""
    network = share_network(link, share)
    if network is None:
        return None
    return Grant(protocol, network, link.seen(vip, ours), port)


def relay_reserved(cell: Cell) -> set[int]:
    """Our own ports, which no relay port may shadow."""
    return relaying.reserved_ports(cell.listen_port, cell.mesh_port, cell.pair_port)


def _exits(
    cell: Cell, peers: Sequence[Peer], links: Sequence[Link], slots: dict[str, int]
) -> tuple[ExitTunnel, ...]:
    """The relay (slot 0) while any link both has our offer and asked for it, and one tunnel
    per exit cell our devices leave through (their slot from the store)."""
    tunnels = []
    relay_peers = tuple(
        sorted(
            PeerState(
                public_key=str(ln.mirror.exit_client_key),
                name=f"exit client {ln.name}",
                allowed_ips=(ln.identity.network,),
                endpoint=f"{ln.identity.address}:{ln.mirror.exit_client_port}",
                keepalive_s=LINK_KEEPALIVE_S,
            )
            for ln in links
            if ln.state == Phase.LINKED
            and ln.choices.exit_offered
            and ln.mirror.exit_relay_active
            and ln.mirror.exit_client_key
            and ln.mirror.exit_client_port
        )
    )
    if relay_peers:
        ifname = exit_ifname(cell.interface, 0)
        relay = WgDevice(ifname, exit_private_key(cell, None), exit_port(cell.listen_port, 0),
                         relay_peers)  # fmt: skip
        relayed = tuple(sorted(n for p in relay_peers for n in p.allowed_ips))
        tunnels.append(ExitTunnel(0, ifname, relay, relayed=relayed))
    by_name = {ln.name: ln for ln in links}
    for via, slot in sorted(slots.items(), key=lambda kv: kv[1]):
        devices = tuple(
            sorted(peer_address(cell.network, p.host_index) for p in peers if p.route_via == via)
        )
        if not devices:
            continue
        link = by_name.get(via)
        ifname = exit_ifname(cell.interface, slot)
        up = (
            link is not None
            and link.state == Phase.LINKED
            and link.mirror.exit_offered
            and link.mirror.exit_relay_key
            and link.mirror.exit_relay_port
        )
        wg: WgDevice | None = None
        if up and link is not None:
            peer = PeerState(
                public_key=str(link.mirror.exit_relay_key),
                name=f"exit {via}",
                allowed_ips=(ANY,),
                endpoint=f"{link.identity.address}:{link.mirror.exit_relay_port}",
                keepalive_s=LINK_KEEPALIVE_S,
            )
            wg = WgDevice(ifname, exit_private_key(cell, link.public_key),
                          exit_port(cell.listen_port, slot), (peer,))  # fmt: skip
        live = link is not None and link.state != Phase.UNLINKING
        dns = link.identity.address if live and link is not None else None
        seen = link.mirror.seen_as if link is not None else None
        tunnels.append(ExitTunnel(slot, ifname, wg, cell=via, devices=devices, dns_server=dns,
                                  seen_as=seen))  # fmt: skip
    return tuple(tunnels)


def exit_private_key(cell: Cell, their_public_key: str | None) -> str:
    """Our end of an exit tunnel: the relay's (None) or the one toward an exit cell."""
    label = "exit relay" if their_public_key is None else f"exit via {their_public_key}"
    return keys.derive_private(cell.private_key, label)


def _not_internet(
    cell: Cell,
    links: Sequence[Link],
    exits: Sequence[ExitTunnel],
    onlink: Sequence[tuple[str, ipaddress.IPv4Network]],
) -> tuple[ipaddress.IPv4Network, ...]:
    """Where an exit (ours as home exit, or as relay) never leads: private and reserved ranges,
    our network, linked networks and the host's own on-link networks (its LANs)."""
    ours = {cell.interface, *(t.interface for t in exits)}
    nets = [*NOT_INTERNET, cell.network, *(ln.identity.network for ln in links)]
    nets += [n for dev, n in onlink if dev not in ours]
    return tuple(ipaddress.collapse_addresses(nets))


def _view_records(cell: Cell, shared: Sequence[ServiceState], link: Link) -> tuple[DnsRecord, ...]:
    """What a linked cell may resolve in our domain: the cell itself and what we share, at
    the addresses where it presents our network."""
    me = link.seen(cell.ip, cell.network)
    records = {DnsRecord(cell.domain, me), DnsRecord(f"{cell.name}.{cell.domain}", me)}
    records |= {DnsRecord(f"{s.name}.{cell.domain}", link.seen(s.vip, cell.network))
                for s in shared}  # fmt: skip
    return tuple(sorted(records))


def _presented_zone(link: Link) -> DnsZone:
    """A mapped link's domain as we present it: from its signed document (its cell's name and
    the services it shares with us), never from its resolver's answers, which name addresses
    of its own network (DESIGN §3, `mesh.mapping`)."""
    ident = link.identity
    records = {DnsRecord(ident.domain, ident.address),
               DnsRecord(f"{link.name}.{ident.domain}", ident.address)}  # fmt: skip
    for svc in link.mirror.outbound:
        vip = ipaddress.IPv4Address(str(svc["vip"]))
        records.add(DnsRecord(f"{svc['name']}.{ident.domain}", ident.view(vip)))
    return DnsZone(ident.domain, tuple(sorted(records)))
