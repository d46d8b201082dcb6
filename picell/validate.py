"""Validation of every name, address, port and key before it reaches the store or a command.

Each function takes raw input and the field name it came from, and returns a typed value or raises
`BadInput(field=...)`. Nothing here touches the system.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass

from picell.errors import BadInput

# A DNS label that is also safe as a file name, an nft comment and a log word.
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
IFNAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,14}$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def name(value: str, field: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise BadInput(
            f"{field}: {value!r} is not a valid name (1-32 of a-z, 0-9, '-', starting with a "
            "letter, not ending with '-')",
            field=field,
        )
    return value


def domain(value: str, field: str = "domain") -> str:
    value = value.strip().lower().rstrip(".") if isinstance(value, str) else ""
    labels = value.split(".")
    if len(value) > 200 or len(labels) < 1 or not all(HOSTNAME_RE.match(lb) for lb in labels):
        raise BadInput(f"{field}: {value!r} is not a valid DNS domain", field=field)
    if labels[-1].isdigit():
        raise BadInput(f"{field}: {value!r} looks like an address, not a domain", field=field)
    return value


def interface(value: str, field: str = "interface") -> str:
    if not isinstance(value, str) or not IFNAME_RE.match(value):
        raise BadInput(
            f"{field}: {value!r} is not a valid interface name (1-15 of letters, digits, _ -)",
            field=field,
        )
    return value


def port(value: int | str, field: str = "port") -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadInput(f"{field}: {value!r} is not a port number", field=field) from None
    if not 1 <= number <= 65535:
        raise BadInput(f"{field}: {number} is outside 1-65535", field=field)
    return number


def cell_address(value: str, field: str = "address") -> ipaddress.IPv4Interface:
    """The cell's own address with its VPN network, e.g. 10.0.0.1/24."""
    try:
        iface = ipaddress.IPv4Interface(value)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError):
        raise BadInput(f"{field}: {value!r} is not an IPv4 address/prefix", field=field) from None
    net = iface.network
    if net.prefixlen > 29 or net.prefixlen < 8:
        raise BadInput(f"{field}: the VPN network must be between /8 and /29", field=field)
    if not net.is_private:
        raise BadInput(f"{field}: the VPN network {net} is not a private range", field=field)
    if iface.ip in (net.network_address, net.broadcast_address):
        raise BadInput(f"{field}: {iface.ip} is not a host address of {net}", field=field)
    return iface


def ipv4(value: str, field: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError):
        raise BadInput(f"{field}: {value!r} is not an IPv4 address", field=field) from None


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def endpoint(value: str, field: str = "endpoint") -> HostPort:
    """HOST:PORT where HOST is an IP address or a DNS name (a cell's public endpoint)."""
    if not isinstance(value, str) or ":" not in value:
        raise BadInput(f"{field}: {value!r} must be HOST:PORT", field=field)
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.split(".")
        if not host or len(host) > 253 or not all(HOSTNAME_RE.match(lb) for lb in labels):
            raise BadInput(
                f"{field}: {host!r} is neither an IP address nor a host name", field=field
            ) from None
    return HostPort(host, port(port_text, field))


def backend(value: str, field: str = "backend") -> tuple[ipaddress.IPv4Address, int]:
    """A service backend: IPv4:PORT, on the cell host (127.0.0.1) or on its LAN."""
    if not isinstance(value, str) or ":" not in value:
        raise BadInput(f"{field}: {value!r} must be IPV4:PORT", field=field)
    host, _, port_text = value.rpartition(":")
    addr = ipv4(host, field)
    if addr.is_multicast or addr.is_unspecified or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise BadInput(f"{field}: {addr} cannot be a backend", field=field)
    return addr, port(port_text, field)


def wg_key(value: str, field: str = "public_key") -> str:
    """A WireGuard key: 32 bytes in standard base64 (44 characters)."""
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32 or len(value) != 44:
        raise BadInput(f"{field}: not a WireGuard key (32 bytes in base64)", field=field)
    return value
