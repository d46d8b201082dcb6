"""The desired state of a cell: frozen, sorted values built from the store (pure).

`build_state` is the whole truth handed to the reconciler; renderers turn it into WireGuard, nft
and Unbound configuration text. Nothing here reads the system or the store.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from picell.addressing import peer_address, vip_address
from picell.constants import DNS_PORT
from picell.store.cell import Cell
from picell.store.peers import Peer
from picell.store.services import Service


@dataclass(frozen=True, order=True)
class PeerState:
    public_key: str
    name: str
    allowed_ips: tuple[ipaddress.IPv4Network, ...]
    endpoint: str | None = None
    keepalive_s: int = 0


@dataclass(frozen=True, order=True)
class ServiceState:
    name: str
    vip: ipaddress.IPv4Address
    port: int
    protocol: str
    backend_host: ipaddress.IPv4Address
    backend_port: int

    @property
    def local_backend(self) -> bool:
        return self.backend_host.is_loopback


@dataclass(frozen=True, order=True)
class DnsRecord:
    fqdn: str
    address: ipaddress.IPv4Address


@dataclass(frozen=True)
class DnsState:
    domain: str
    listen: ipaddress.IPv4Address
    port: int
    allow: tuple[ipaddress.IPv4Network, ...]
    records: tuple[DnsRecord, ...]
    upstreams: tuple[ipaddress.IPv4Address, ...]


@dataclass(frozen=True)
class State:
    interface: str
    private_key: str
    listen_port: int
    address: ipaddress.IPv4Interface
    peers: tuple[PeerState, ...]
    services: tuple[ServiceState, ...]
    dns: DnsState

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.address.network


@dataclass(frozen=True)
class Paths:
    """Where a cell keeps its files; everything lives under the data dir."""

    data_dir: Path

    @property
    def db(self) -> Path:
        return self.data_dir / "picell.db"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "admin.sock"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def unbound_dir(self) -> Path:
        return self.data_dir / "unbound"

    @property
    def unbound_conf(self) -> Path:
        return self.unbound_dir / "unbound.conf"

    @property
    def unbound_control(self) -> Path:
        return self.unbound_dir / "control.sock"

    @property
    def wg_conf(self) -> Path:
        return self.run_dir / "wg.conf"

    @property
    def nft_file(self) -> Path:
        return self.run_dir / "ruleset.nft"


def build_state(
    cell: Cell,
    peers: list[Peer],
    services: list[Service],
    upstreams: tuple[ipaddress.IPv4Address, ...],
) -> State:
    net = cell.network
    peer_states = tuple(
        sorted(
            PeerState(
                public_key=p.public_key,
                name=p.name,
                allowed_ips=(ipaddress.IPv4Network(peer_address(net, p.host_index)),),
                keepalive_s=0,
            )
            for p in peers
        )
    )
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
    records = {
        DnsRecord(cell.domain, cell.ip),
        DnsRecord(f"{cell.name}.{cell.domain}", cell.ip),
    }
    records |= {
        DnsRecord(f"{p.name}.{cell.domain}", peer_address(net, p.host_index)) for p in peers
    }
    records |= {DnsRecord(f"{s.name}.{cell.domain}", s.vip) for s in service_states}
    dns = DnsState(
        domain=cell.domain,
        listen=cell.ip,
        port=DNS_PORT,
        allow=(net,),
        records=tuple(sorted(records)),
        upstreams=tuple(u for u in (cell.upstreams or upstreams) if u != cell.ip),
    )
    return State(
        interface=cell.interface,
        private_key=cell.private_key,
        listen_port=cell.listen_port,
        address=cell.address,
        peers=peer_states,
        services=service_states,
        dns=dns,
    )
