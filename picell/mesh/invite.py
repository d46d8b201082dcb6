"""Invites (DESIGN §5): the JSON a cell hands out, its copy-paste string, and parsing them back
with every field validated (errors name `invite.<field>`)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from picell import validate
from picell.errors import BadInput

VERSION = 1
PREFIX = "picell-invite:"


@dataclass(frozen=True)
class Identity:
    """What a cell tells another about itself (an invite without its pairing block)."""

    cell_name: str
    domain: str
    public_key: str
    endpoint: str
    vpn_subnet: ipaddress.IPv4Network
    dns_ip: ipaddress.IPv4Address
    mesh_port: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "cell_name": self.cell_name,
            "domain": self.domain,
            "public_key": self.public_key,
            "endpoint": self.endpoint,
            "vpn_subnet": str(self.vpn_subnet),
            "dns_ip": str(self.dns_ip),
            "mesh_port": self.mesh_port,
        }


@dataclass(frozen=True)
class Pairing:
    port: int
    token: str
    expires_at: float


@dataclass(frozen=True)
class Invite:
    identity: Identity
    pairing: Pairing | None

    def as_dict(self) -> dict[str, Any]:
        data = self.identity.as_dict()
        if self.pairing:
            data["pairing"] = {
                "port": self.pairing.port,
                "token": self.pairing.token,
                "expires_at": self.pairing.expires_at,
            }
        return data

    def encode(self) -> str:
        raw = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _field(data: dict[str, Any], name: str, prefix: str) -> Any:
    if name not in data:
        raise BadInput(f"{prefix}{name}: missing", field=f"{prefix}{name}")
    return data[name]


def parse_identity(data: Any, prefix: str = "invite.") -> Identity:
    if not isinstance(data, dict):
        raise BadInput(f"{prefix.rstrip('.')}: must be a JSON object", field=prefix.rstrip("."))
    version = data.get("version", VERSION)
    if version != VERSION:
        raise BadInput(f"{prefix}version: {version!r} is not supported", field=f"{prefix}version")
    vpn_raw = _field(data, "vpn_subnet", prefix)
    try:
        vpn = ipaddress.IPv4Network(vpn_raw)
    except (ValueError, TypeError):
        raise BadInput(
            f"{prefix}vpn_subnet: {vpn_raw!r} is not an IPv4 network", field=f"{prefix}vpn_subnet"
        ) from None
    if not vpn.is_private or vpn.prefixlen < 8 or vpn.prefixlen > 29:
        raise BadInput(
            f"{prefix}vpn_subnet: {vpn} must be a private /8-/29", field=f"{prefix}vpn_subnet"
        )
    dns_ip = validate.ipv4(str(_field(data, "dns_ip", prefix)), f"{prefix}dns_ip")
    if dns_ip not in vpn:
        raise BadInput(
            f"{prefix}dns_ip: {dns_ip} lies outside vpn_subnet {vpn}", field=f"{prefix}dns_ip"
        )
    return Identity(
        cell_name=validate.name(_field(data, "cell_name", prefix), f"{prefix}cell_name"),
        domain=validate.domain(_field(data, "domain", prefix), f"{prefix}domain"),
        public_key=validate.wg_key(_field(data, "public_key", prefix), f"{prefix}public_key"),
        endpoint=str(validate.endpoint(_field(data, "endpoint", prefix), f"{prefix}endpoint")),
        vpn_subnet=vpn,
        dns_ip=dns_ip,
        mesh_port=validate.port(data.get("mesh_port", 3000), f"{prefix}mesh_port"),
    )


def parse_invite(text: str) -> Invite:
    """An invite from its copy-paste string or its JSON."""
    text = text.strip() if isinstance(text, str) else ""
    if text.startswith(PREFIX):
        body = text[len(PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            data = json.loads(raw)
        except (binascii.Error, ValueError):
            raise BadInput(
                "invite: the string is damaged (copy all of it)", field="invite"
            ) from None
    else:
        try:
            data = json.loads(text)
        except ValueError:
            raise BadInput(
                "invite: neither an invite string (picell-invite:…) nor invite JSON",
                field="invite",
            ) from None
    identity = parse_identity(data)
    pairing = None
    block = data.get("pairing")
    if block is not None:
        if not isinstance(block, dict):
            raise BadInput("invite.pairing: must be an object", field="invite.pairing")
        token = _field(block, "token", "invite.pairing.")
        if not isinstance(token, str) or not 16 <= len(token) <= 128:
            raise BadInput("invite.pairing.token: malformed", field="invite.pairing.token")
        expires = _field(block, "expires_at", "invite.pairing.")
        if not isinstance(expires, int | float):
            raise BadInput(
                "invite.pairing.expires_at: must be a number", field="invite.pairing.expires_at"
            )
        pairing = Pairing(
            port=validate.port(_field(block, "port", "invite.pairing."), "invite.pairing.port"),
            token=token,
            expires_at=float(expires),
        )
    return Invite(identity, pairing)
