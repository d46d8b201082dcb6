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

# Every pattern is used with `fullmatch`: `re.match(... $)` accepts a trailing newline.
# A DNS label that is also safe as a file name, an nft comment and a log word.
NAME_MAX = 63  # a DNS label's limit (RFC 1035); protocol, see DESIGN §5
DOMAIN_MAX = 253  # a DNS name's limit in text form
NAME_RE = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
IFNAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,14}")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: object, limit: int) -> str:
    """One line of at most `limit` characters without control characters: for text another
    cell sent (an error, a refusal) on its way to the journal or a terminal."""
    line = "".join(ch if ch.isprintable() else "?" for ch in str(text)[: limit + 1])
    return line if len(line) <= limit else line[: limit - 1] + "…"


def no_control(value: str, field: str) -> str:
    """`value` unless it holds a control character (a line break, NUL, escape...): such a
    character must never reach a rendered file or a terminal."""
    if CONTROL_RE.search(value):
        raise BadInput(f"{field}: control characters are not allowed", field=field)
    return value


def name(value: str, field: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise BadInput(
            f"{field}: {value!r} is not a valid name (1-{NAME_MAX} of a-z, 0-9, '-', starting "
            "with a letter, not ending with '-')",
            field=field,
        )
    return value


def domain(value: str, field: str = "domain") -> str:
    """A DNS domain, stored lower-case without the root dot."""
    raw = value if isinstance(value, str) else ""
    # ASCII first: str.lower() maps look-alikes such as the Kelvin sign onto ASCII letters
    value = raw.lower().removesuffix(".") if raw.isascii() else "\x00"
    labels = value.split(".")
    if len(value) > DOMAIN_MAX or not all(HOSTNAME_RE.fullmatch(lb) for lb in labels):
        raise BadInput(f"{field}: {raw!r} is not a valid DNS domain", field=field)
    if labels[-1].isdigit():
        raise BadInput(f"{field}: {value!r} looks like an address, not a domain", field=field)
    return value


def interface(value: str, field: str = "interface") -> str:
    if not isinstance(value, str) or not IFNAME_RE.fullmatch(value):
        raise BadInput(
            f"{field}: {value!r} is not a valid interface name (1-15 of letters, digits, _ -)",
            field=field,
        )
    return value


def port(value: int | str, field: str = "port") -> int:
    if isinstance(value, bool) or (isinstance(value, str) and not value.isascii()):
        raise BadInput(f"{field}: {value!r} is not a port number", field=field)
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
        if not isinstance(value, str) or not value.isascii():
            raise ValueError(value)
        return ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError):
        raise BadInput(f"{field}: {value!r} is not an IPv4 address", field=field) from None


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


ENDPOINT_RE = re.compile(
    r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<p6>[0-9]{1,5})|(?P<host>[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})"
)


def endpoint(value: str, field: str = "endpoint") -> HostPort:
    """HOST:PORT (IPv6 as [ADDR]:PORT) where HOST is an IP literal without a scope id or a host
    name; normalised (compressed address, lower-case name) so that equal endpoints compare equal.
    """
    found = ENDPOINT_RE.fullmatch(value) if isinstance(value, str) and len(value) < 300 else None
    if found is None:
        raise BadInput(
            f"{field}: {value!r} must be HOST:PORT (an IPv6 address as [ADDR]:PORT)", field=field
        )
    if found["v6"] is not None:
        try:
            addr = ipaddress.IPv6Address(found["v6"])
        except ValueError:
            message = f"{field}: {found['v6']!r} is not an IPv6 address"
            raise BadInput(message, field=field) from None
        if addr.is_link_local or addr.is_multicast or addr.is_unspecified:
            raise BadInput(f"{field}: {addr} cannot be reached as an endpoint", field=field)
        return HostPort(str(addr), port(found["p6"], field))
    host = found["host"].lower().removesuffix(".")  # the pattern admits ASCII only
    try:
        addr4 = ipaddress.IPv4Address(host)
    except ValueError:
        addr4 = None
    if addr4 is not None:
        if addr4.is_multicast or addr4.is_unspecified or addr4.is_reserved:
            raise BadInput(f"{field}: {addr4} cannot be reached as an endpoint", field=field)
        return HostPort(str(addr4), port(found["port"], field))
    labels = host.split(".")
    if len(host) > DOMAIN_MAX or not all(HOSTNAME_RE.fullmatch(lb) for lb in labels):
        raise BadInput(f"{field}: {host!r} is neither an IP address nor a host name", field=field)
    if labels[-1].isdigit():
        raise BadInput(f"{field}: {host!r} is not a valid IPv4 address", field=field)
    return HostPort(host, port(found["port"], field))


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
    if len(raw) != 32 or len(value) != 44 or not value.isascii():
        raise BadInput(f"{field}: not a WireGuard key (32 bytes in base64)", field=field)
    return value
