"""The admin API's typed requests and answers: one pydantic model per body the API reads or writes.

The request models say exactly what the API accepts (`extra="forbid"`, strict types, full-match
patterns, bounded lengths and ranges), so the published OpenAPI schema is the contract a client
can generate data from; `picell.validate` stays the second line behind them. The answer models are
the routes' `response_model`s, and the CLI (`picell.cli`) reads the daemon's answers with the same
classes instead of indexing dicts. Must not import FastAPI (the CLI imports this module) nor hold
logic beyond the shape of the data.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from picell.constants import DEFAULT_INVITE_TTL_S, INVITE_MAX_TTL_S, INVITE_MIN_TTL_S

# -- value types -------------------------------------------------------------------------------
# A DNS label that is also safe as a file name, an nft comment and a log word (`validate.name`).
# `$` is the end of the text for pydantic's regex engine, so a trailing newline is refused.
NAME_PATTERN = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
NAME_MAX = 63
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
# A service backend, IPV4:PORT (`validate.backend`): 0.0.0.0, multicast and the broadcast
# address are refused by the handler; the pattern keeps the first octet to 1-223 for that reason
# and leaves 255.255.255.255 out with it.
_FIRST = r"(22[0-3]|2[01][0-9]|1[0-9][0-9]|[1-9][0-9]?)"
BACKEND_PATTERN = rf"^{_FIRST}(\.{_OCTET}){{3}}:{_PORT}$"
# A WireGuard key: 32 bytes in standard base64; the last character carries 4 zero bits.
WG_KEY_PATTERN = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
# The admin password (`auth.check_password`): one line of 10-1024 characters.
PASSWORD_PATTERN = r"^[^\r\n\x00]{10,1024}$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=NAME_MAX)]


def _whole(value: Any) -> Any:
    """JSON Schema counts 80.0 as an integer; strict pydantic would not: let a whole float in
    (only that: "80" and true stay refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Port = Annotated[int, Field(ge=1, le=65535), BeforeValidator(_whole)]
WgKey = Annotated[str, StringConstraints(pattern=WG_KEY_PATTERN, min_length=44, max_length=44)]
Backend = Annotated[str, StringConstraints(pattern=BACKEND_PATTERN, max_length=21)]


class Request(BaseModel):
    """A request body: unknown fields and coerced types are refused (a 422 naming the field)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Answer(BaseModel):
    """An answer of the daemon. Unknown fields are kept, so that a CLI older than its daemon
    still shows (and `--json` still passes on) what it does not know."""

    model_config = ConfigDict(extra="allow")


# -- requests ----------------------------------------------------------------------------------
class PeerCreate(Request):
    name: Name
    public_key: WgKey | None = None


class RouteVia(Request):
    via_cell: Name | None


class ServiceCreate(Request):
    name: Name
    backend: Backend = Field(description="IPV4:PORT that serves it (the cell host or its LAN)")
    port: Port | None = Field(default=None, description="port on the service address")
    protocol: Literal["tcp", "udp"] = "tcp"


class CellConnect(Request):
    invite: str = Field(
        min_length=1,
        max_length=16384,
        description="the other cell's invite: its string, its JSON, or `invite --json` output",
    )
    trust_domain: bool = Field(
        default=False,
        description="accept a domain outside the private-use suffixes (the owner's own word)",
    )
    via: Name | None = Field(
        default=None,
        description="a linked cell offering us its relay: the link travels through it",
    )


# An end date, ISO 8601 (`2026-12-24T18:00`; seconds and an offset allowed; the cell's local
# time without an offset); `mesh.shares.parse_until` checks it is a real date in the future
_DAY = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
UNTIL_PATTERN = rf"^{_DAY}T{_TIME}(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?$"
Until = Annotated[str, StringConstraints(pattern=UNTIL_PATTERN, max_length=40)]


class ShareEntry(Request):
    """One share: a service, to one published device of the cell (or all of it), until a date
    (or for good)."""

    service: Name
    device: Name | None = None
    until: Until | None = None


class Permissions(Request):
    """The whole list of shares with a cell; a plain name shares with all of it for good."""

    services: list[Name | ShareEntry] = Field(max_length=1024)


class Shares(Request):
    services: list[Name] = Field(min_length=1, max_length=256)
    device: Name | None = None
    until: Until | None = None


class ExitOffer(Request):
    offered: bool
    until: Until | None = None  # with an offer: it ends by itself then


class PublishDevices(Request):
    published: bool


class EndpointSet(Request):
    endpoints: list[Annotated[str, StringConstraints(max_length=300)]] = Field(
        min_length=1, max_length=4, description="HOST:PORT, best first (IPv6 as [ADDR]:PORT)"
    )


class RelayOffer(Request):
    offered: bool


class LinksImport(Request):
    content: str = Field(max_length=4_000_000)


class InviteCreate(Request):
    expires_s: float = Field(
        default=DEFAULT_INVITE_TTL_S,
        ge=INVITE_MIN_TTL_S,
        le=INVITE_MAX_TTL_S,
        description="seconds until the token expires",
    )


class PasswordSet(Request):
    password: str = Field(pattern=PASSWORD_PATTERN, min_length=10, max_length=1024)


class MetricsTokenAsk(Request):
    rotate: bool = Field(default=False, description="issue a new token; the old one stops working")


# -- answers -----------------------------------------------------------------------------------
class ReportOut(Answer):
    changed: bool
    changes: list[str]
    commands: list[list[str]] = []
    processes: int = 0
    write_commands: int = 0
    warnings: list[str] = []  # what the owner should act on (a host route over a link, ...)
    anomalies: list[str] = []  # what an observer could not read: repaired as drift


class LinkConflict(Answer):
    """A link whose network a host address or route overlaps (one that appeared later)."""

    cell: str
    network: str
    overlaps: str  # in words: "this host's route to 172.17.0.0/16 on docker0"


class PortMappingOut(Answer):
    protocol: Literal["pcp", "nat-pmp", "upnp"]
    external_address: str
    external_port: int
    pair_external_port: int | None
    expires_at: float
    warning: str | None = None  # CGNAT or double NAT: the mapping does not reach outside


class HostFirewallOut(Answer):
    """A base chain of another table (Docker, ufw, firewalld...) that drops what picell needs."""

    owner: Literal["docker", "ufw", "firewalld", "other"]
    table: str  # "ip filter"
    chain: str
    hook: Literal["input", "forward"]
    what: str  # "drops forwarded traffic"
    action: str  # "accept rules added in DOCKER-USER" or "run: <the owner's command>"


class StatusOut(Answer):
    name: str
    domain: str
    address: str
    network: str
    endpoint: str
    interface: str
    public_key: str
    listen_port: int
    dns: str
    devices: int
    services: int
    dns_running: bool
    endpoints: list[str] = []  # every endpoint we announce, best first
    endpoint_source: str = "owner"
    endpoint_warnings: list[str] = []
    device_endpoint_note: str | None = None
    last_reconcile: ReportOut | None
    last_error: str | None
    conflicts: list[LinkConflict] = []
    rejected_messages: dict[str, int] = {}
    applied: dict[str, int] = {}
    pushes_sent: int = 0
    port_mapping: PortMappingOut | None = None
    port_mapping_error: str | None = None
    host_firewall: list[HostFirewallOut] = []
    key_rotation: KeyRotationOut | None = None  # `picell keys rotate` (mesh.rekey)
    restored_at: float | None = None  # when this store was restored from a backup


class KeyRotationOut(Answer):
    in_flight: bool  # a new key waits until every linked cell holds it
    waiting_for: list[str] = []  # linked cells that have not answered yet
    rotated_at: float | None = None  # when the last rotation completed


class KeysRotated(Answer):
    public_key: str  # the new key (or the one the rotation in flight moves to)
    switched: bool  # False: some linked cells did not answer; the old key stays in use
    moved: list[str]  # linked cells that moved to the new key
    pending: dict[str, str]  # linked cell -> why it has not (yet)
    devices: list[str]  # devices that must import their config again


class PeerOut(Answer):
    name: str
    address: str
    public_key: str
    fqdn: str
    own_key: bool
    route_via: str | None
    created_at: float


class PeerLive(PeerOut):
    latest_handshake: int = 0
    handshake_age_s: int | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    endpoint: str | None = None


class PeerCreated(PeerOut):
    config: str


class RouteViaOut(PeerLive):
    full_tunnel: bool
    config: str
    message: str


class ServiceOut(Answer):
    name: str
    fqdn: str
    vip: str
    port: int
    protocol: str
    backend: str


class SharedServiceOut(Answer):
    name: str
    vip: str | None = None
    ports: list[int] = []
    protocol: str = "tcp"
    # a share with one published device, until a date (ISO 8601, local time); `devices`: the
    # devices of ours a cell shares it with (what it told us)
    device: str | None = None
    until: str | None = None
    devices: list[str] | None = None
    published: bool | None = None  # the device is listed by its cell now (else: no grant)
    # what the share's grant carried since it was made (per-grant nft counters) and the
    # flows open through it now
    packets: int | None = None
    bytes: int | None = None
    flows: int | None = None


class PublishedDeviceOut(Answer):
    name: str
    address: str  # as this cell presents it (inside `mapped_subnet` when the link is mapped)


class CellOut(Answer):
    """A linked cell as `picell cells --json` shows it (DESIGN §9)."""

    name: str
    state: str
    domain: str
    vpn_subnet: str
    dns_ip: str
    endpoint: str
    public_key: str
    auth_string: str
    handshake_age_s: int | None
    online: bool
    rx_bytes: int
    tx_bytes: int
    inbound: list[SharedServiceOut]
    outbound: list[SharedServiceOut]
    exit_offered: bool
    exit_until: str | None = None  # our offer ends by itself then (ISO 8601, local time)
    remote_exit_offered: bool
    exit_relay_active: bool
    remote_exit_relay_active: bool
    relaying: bool
    pending_push: int
    last_push_status: str | None
    last_push_at: float | None
    last_push_error: str | None
    last_remote_update_at: float | None
    linked_at: float | None
    pending_message: str | None
    pending_error: str | None
    endpoints: list[str] = []  # every endpoint it announced, best first
    seen_at: str | None = None  # where it sees us (its WireGuard's view of our address)
    # translation (issue 15): where we present its network, and where it presents ours
    mapped_subnet: str | None = None
    seen_as: str | None = None
    # introductions and the relay (issue 12)
    relay_offered: bool = False  # we relay between it and our other cells we offer it to
    remote_relay_offered: bool = False  # it would relay for us
    via: str | None = None  # the linked cell this link travels through (connect --via)
    path: str = "direct"  # "direct", "introduced by B", "via B"
    relay_note: str | None = None  # why a relayed link waits
    # one side seems to hold the link and the other not (shown, never acted on): the reason
    orphan: bool = False
    orphan_reason: str | None = None
    # key rotation (mesh.rekey): "pending"/"prepared"/"told" ours; their announced next key
    rekey_state: str | None = None
    remote_next_key: str | None = None
    # device shares (issue 15): whether we publish our devices to it, the devices it publishes
    publish_devices: bool = False
    devices: list[PublishedDeviceOut] = []


class JournalEntryOut(Answer):
    id: int
    at: float
    link: str
    event: str
    actor: str
    detail: str | None


class ImportedOut(Answer):
    name: str
    unknown_fields: list[str]


class ImportOut(Answer):
    imported: list[ImportedOut]


class PairingOut(Answer):
    port: int
    token: str
    expires_at: float


class InviteJson(Answer):
    """The invite as another cell imports it (DESIGN §5); fields the wire adds pass through."""

    cell_name: str
    domain: str
    public_key: str
    endpoint: str
    vpn_subnet: str
    dns_ip: str
    mesh_port: int
    pairing: PairingOut | None = None


InviteState = Literal["open", "used", "expired"]


class InviteRow(Answer):
    """An invite this cell handed out; its token is never stored, so never shown again."""

    id: int
    created_at: float
    expires_at: float
    used_at: float | None
    used_by: str | None
    state: InviteState


class InviteCreated(Answer):
    """A fresh invite in one answer: the JSON, the copy-paste string and the QR code (SVG)."""

    id: int
    expires_at: float
    invite: InviteJson
    string: str
    svg: str


class PasswordChanged(Answer):
    changed: bool


class MetricsTokenOut(Answer):
    token: str  # shown this once: only its hash is kept
    issued_at: float
    port: int  # where the owner's devices scrape, on the cell's WireGuard address
    url: str


def dump(model: BaseModel | list[Any]) -> Any:
    """The JSON-ready value of an answer (or a list of them), unknown fields included."""
    if isinstance(model, list):
        return [dump(m) for m in model]
    return model.model_dump(mode="json")
