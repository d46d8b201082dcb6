"""Render WireGuard configuration text (pure; golden-file tested).

`render_interface` is the cell side, fed to `wg syncconf`. `render_device` is what a phone imports
with a stock WireGuard app: its AllowedIPs cover the whole mesh range (10.0.0.0/8 by default) plus
the cell's own network, so networks of cells linked later route into the tunnel without re-import.
"""

from __future__ import annotations

import ipaddress

from picell.constants import DEVICE_KEEPALIVE_S
from picell.state import WgDevice


def render_interface(dev: WgDevice) -> str:
    lines = [
        "[Interface]",
        f"PrivateKey = {dev.private_key}",
        f"ListenPort = {dev.listen_port}",
    ]
    for peer in dev.peers:
        lines += ["", f"# {peer.name}", "[Peer]", f"PublicKey = {peer.public_key}"]
        lines.append("AllowedIPs = " + ", ".join(str(n) for n in peer.allowed_ips))
        if peer.endpoint:
            lines.append(f"Endpoint = {peer.endpoint}")
        if peer.keepalive_s:
            lines.append(f"PersistentKeepalive = {peer.keepalive_s}")
    return "\n".join(lines) + "\n"


def device_allowed_ips(
    network: ipaddress.IPv4Network, mesh_range: ipaddress.IPv4Network, full_tunnel: bool = False
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Split tunnel: the cell's network and the mesh range. Full tunnel (the device's internet
    through the cell, or through the exit cell it is routed via): everything, IPv6 included,
    so that nothing leaks around the tunnel on a network with IPv6."""
    if full_tunnel:
        return [ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")]
    return list(ipaddress.collapse_addresses([network, mesh_range]))


def render_device(
    *,
    device_name: str,
    private_key: str | None,
    address: ipaddress.IPv4Address,
    dns: ipaddress.IPv4Address,
    domain: str,
    cell_public_key: str,
    endpoint: str,
    allowed_ips: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str:
    """A config for a stock WireGuard app. Without a private key the device brought its own."""
    key_line = (
        f"PrivateKey = {private_key}"
        if private_key
        else "# PrivateKey = <this device's own private key: the cell never saw it>"
    )
    return "\n".join(
        [
            f"# picell device {device_name}.{domain}",
            "[Interface]",
            key_line,
            f"Address = {address}/32",
            f"DNS = {dns}, {domain}",
            "",
            "[Peer]",
            f"PublicKey = {cell_public_key}",
            f"Endpoint = {endpoint}",
            "AllowedIPs = " + ", ".join(str(n) for n in allowed_ips),
            f"PersistentKeepalive = {DEVICE_KEEPALIVE_S}",
            "",
        ]
    )
