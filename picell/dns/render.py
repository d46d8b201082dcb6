"""Render Unbound's configuration for one cell (pure; golden-file tested).

Unbound listens only on the cell's WireGuard address (ip-freebind, so start order does not
matter), answers the cell's zone from local data, and forwards every other name to the host's
upstream resolvers. It is refused to everyone but the cell's own network and loopback, except
that each linked cell's network gets a view holding only what we let it resolve; every other
name is refused to it (no open resolver). Each linked cell's domain is forwarded to that cell's
DNS address, through the tunnel.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

from picell.routing.exits import exit_dns_port
from picell.state import DnsRecord, DnsState, DnsView, ExitTunnel, State


def record_line(record: DnsRecord) -> str:
    """One A record as Unbound reads it, in its config and from `unbound-control`."""
    return f"{record.fqdn}. 60 IN A {record.address}"


def view_zones(dns: DnsState, view: DnsView) -> list[tuple[str, str]]:
    """The local zones of a linked cell's view, as (name with the root dot, type)."""
    # while we relay their devices' internet, internet names resolve for them too (the
    # lookups leave where the traffic leaves); names of the other linked cells never do
    zones = [(f"{d}.", "refuse") for d in view.hidden] if view.internet else [(".", "refuse")]
    return [*zones, (f"{dns.domain}.", "static")]


def _server(workdir: Path, listen: IPv4Address, port: int) -> list[str]:
    """The server clause both resolvers share: one address and port, no DNSSEC validation
    (the upstreams validate or not), refused to everyone but what the caller allows next."""
    return [
        "# rendered by picell; edits are overwritten",
        "server:",
        '\tusername: ""',
        '\tchroot: ""',
        f'\tdirectory: "{workdir}"',
        '\tpidfile: ""',
        "\tuse-syslog: no",
        "\tverbosity: 1",
        "\tinterface-automatic: no",
        f"\tinterface: {listen}@{port}",
        "\tip-freebind: yes",
        "\tdo-ip6: no",
        "\tdo-not-query-localhost: no",
        "\thide-identity: yes",
        "\thide-version: yes",
        '\tmodule-config: "iterator"',
        "\tnum-threads: 1",
        "\taccess-control: 0.0.0.0/0 refuse",
        "\taccess-control: 127.0.0.0/8 allow",
    ]


def _remote_control(control_socket: Path) -> list[str]:
    return [
        "",
        "remote-control:",
        "\tcontrol-enable: yes",
        f'\tcontrol-interface: "{control_socket}"',
        "\tcontrol-use-cert: no",
    ]


def render_unbound(dns: DnsState, workdir: Path, control_socket: Path) -> str:
    lines = [
        *_server(workdir, dns.listen, dns.port),
        *(f"\taccess-control: {net} allow" for net in dns.allow),
        *(f"\taccess-control: {v.network} allow" for v in dns.views),
        *(f"\taccess-control-view: {v.network} link-{v.name}" for v in dns.views),
        f'\tlocal-zone: "{dns.domain}." static',
        *(f'\tlocal-data: "{record_line(r)}"' for r in dns.records),
        # a linked domain under a zone Unbound serves itself by default (test., home.arpa.,
        # ...) must still be forwarded
        *(f'\tlocal-zone: "{f.domain}." transparent' for f in dns.forwards),
        # a mapped linked cell's domain, presented from its signed document (`mesh.mapping`)
        *(f'\tlocal-zone: "{z.domain}." static' for z in dns.zones),
        *(f'\tlocal-data: "{record_line(r)}"' for z in dns.zones for r in z.records),
        *_remote_control(control_socket),
    ]
    for view in dns.views:
        lines += ["", "view:", f'\tname: "link-{view.name}"']
        lines += [f'\tlocal-zone: "{name}" {kind}' for name, kind in view_zones(dns, view)]
        lines += [f'\tlocal-data: "{record_line(r)}"' for r in view.records]
    for fwd in dns.forwards:
        lines += ["", "forward-zone:", f'\tname: "{fwd.domain}."', f"\tforward-addr: {fwd.server}"]
    if dns.upstreams:
        lines += ["", "forward-zone:", '\tname: "."']
        lines += [f"\tforward-addr: {u}" for u in dns.upstreams]
    return "\n".join(lines) + "\n"


def render_exit_resolver(
    state: State, tunnel: ExitTunnel, workdir: Path, control_socket: Path
) -> str:
    """The resolver of the devices that leave through exit cell `tunnel.cell`: our own and our
    linked cells' names from our main resolver, every other name from the exit cell's resolver
    through the link, so that their lookups leave where their traffic leaves. Without a tunnel
    (no offer, no link) it answers only our names: it never asks our upstreams."""
    dns = state.dns
    local = [dns.domain, *dns.linked_domains]
    lines = [
        *_server(workdir, dns.listen, exit_dns_port(tunnel.slot)),
        *(f"\taccess-control: {d}/32 allow" for d in tunnel.devices),
        *(f'\tlocal-zone: "{d}." transparent' for d in local),
        *([] if tunnel.wg is not None and tunnel.dns_server else ['\tlocal-zone: "." refuse']),
        *_remote_control(control_socket),
    ]
    for domain in local:
        lines += ["", "forward-zone:", f'\tname: "{domain}."', f"\tforward-addr: {dns.listen}"]
    if tunnel.wg is not None and tunnel.dns_server:
        lines += ["", "forward-zone:", '\tname: "."', f"\tforward-addr: {tunnel.dns_server}"]
    return "\n".join(lines) + "\n"
