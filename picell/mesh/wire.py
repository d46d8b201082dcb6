"""The cross-cell wire (DESIGN §5, §6): one strict model per message another cell sends us.

Everything that arrives from another cell (an invite we import, a pairing request on the open
port, the answer to ours, a signed envelope and its state or unlink body, the answer to our
push) is parsed into one of these models before anything reads it:
- strict: no silent coercion (`"5"` is not a port, `1` is not `true`);
- bounded: every string, list and number has a limit, written down here and in DESIGN §5;
- unknown fields are ignored, never refused, so that a newer cell can add fields;
- every value goes through `picell.validate` (full-match patterns, no control character, an
  endpoint is an IP literal without scope id or a host name, stored normalised).

Syntax only: whether another cell may use a domain or a network is the identity policy's
question (`picell.mesh.policy`). MACs are computed over the raw JSON as it was sent, never over a
re-serialised model, so the callers keep the raw dicts next to the models.

Must not: read the store, touch the system, or trust any field before its model accepted it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from picell import validate
from picell.errors import BadInput, Conflict

# -- the protocol's numbers (DESIGN §5) --------------------------------------------------------
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)  # the wire versions this cell speaks
VERSION_MAX = 1000  # a version number beyond this is malformed, not "newer"
VERSIONS_MAX = 16  # versions a cell may list
PAIRING_BODY_MAX = 8192  # bytes of a pairing request or answer
MESH_BODY_MAX = 65536  # bytes of a message on the mesh API, and of an answer to our push
SHARED_SERVICES_MAX = 256  # services one state document may list
PORTS_PER_SERVICE_MAX = 16
ENDPOINTS_MAX = 4  # endpoints a cell may announce (reachability issue)
PUBLISHED_DEVICES_MAX = 1000  # devices a state document may publish (overlap issue)
WANTED_MAX = 64  # links a document may ask introductions or relaying for (NAT issue)
SEQ_MAX = 2**53
INVITE_PREFIX = "picell-invite:"  # JSON numbers stay exact below this
NAME_MAX = validate.NAME_MAX
DOMAIN_MAX = validate.DOMAIN_MAX
MAC_PATTERN = r"^[0-9a-f]{64}$"  # HMAC-SHA256, hex
NONCE_PATTERN = r"^[0-9a-f]{16,64}$"
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{16,128}$"  # secrets.token_urlsafe
KEY_PATTERN = r"^[A-Za-z0-9+/]{43}=$"  # 32 bytes in standard base64
EPOCH_PATTERN = r"^[0-9a-f]{32}$"  # a cell's incarnation: 128 random bits, hex

T = TypeVar("T")


def _checked(check: Callable[[Any, str], T]) -> Callable[[Any], T]:
    """A pydantic validator from a `picell.validate` function: its BadInput becomes the
    ValueError pydantic reports at the field's location."""

    def run(value: Any) -> T:
        try:
            return check(value, "value")
        except BadInput as exc:
            raise ValueError(exc.message.removeprefix("value: ")) from None

    return run


def _ipv4(value: Any, field: str) -> ipaddress.IPv4Address:
    if isinstance(value, ipaddress.IPv4Address):  # built by this cell, not parsed
        return value
    if not isinstance(value, str) or len(value) > 15:
        raise BadInput(f"{field}: an IPv4 address as a string is expected", field=field)
    return validate.ipv4(value, field)


def _network(value: Any, field: str) -> ipaddress.IPv4Network:
    if isinstance(value, ipaddress.IPv4Network):
        return value
    if not isinstance(value, str) or len(value) > 18 or not value.isascii():
        raise BadInput(f"{field}: an IPv4 network as a string is expected", field=field)
    try:
        return ipaddress.IPv4Network(value)  # strict: no host bits
    except ValueError:
        raise BadInput(f"{field}: {value!r} is not an IPv4 network", field=field) from None


def _endpoint(value: Any, field: str) -> str:
    return str(validate.endpoint(value, field))


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("a finite number is expected")
    return value


Name = Annotated[
    str,
    Field(min_length=1, max_length=NAME_MAX, pattern=r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"),
    AfterValidator(_checked(validate.name)),
]
Domain = Annotated[
    str, Field(min_length=1, max_length=DOMAIN_MAX), AfterValidator(_checked(validate.domain))
]
WgKey = Annotated[str, Field(pattern=KEY_PATTERN), AfterValidator(_checked(validate.wg_key))]
Endpoint = Annotated[str, Field(min_length=3, max_length=300), AfterValidator(_checked(_endpoint))]
Port = Annotated[int, Field(ge=1, le=65535)]
Version = Annotated[int, Field(ge=1, le=VERSION_MAX)]
IPv4 = Annotated[ipaddress.IPv4Address, BeforeValidator(_checked(_ipv4))]
Network = Annotated[ipaddress.IPv4Network, BeforeValidator(_checked(_network))]
Endpoints = Annotated[list[Endpoint], Field(min_length=1, max_length=ENDPOINTS_MAX)]
Mac = Annotated[str, Field(pattern=MAC_PATTERN)]
Nonce = Annotated[str, Field(pattern=NONCE_PATTERN)]
Seconds = Annotated[float, Field(ge=0), AfterValidator(_finite)]


class Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Identity(Wire):
    """What a cell tells another about itself: an invite without its pairing block."""

    version: Version = 1  # the one version cells before `versions` checked; kept for them
    versions: list[Version] | None = Field(default=None, min_length=1,
                                                 max_length=VERSIONS_MAX)  # fmt: skip
    cell_name: Name
    domain: Domain
    public_key: WgKey
    endpoint: Endpoint
    vpn_subnet: Network
    dns_ip: IPv4
    mesh_port: Port = 3000
    # every endpoint, best first (`endpoint` repeats the first, for cells that read only it)
    endpoints: Endpoints | None = None

    @model_validator(mode="after")
    def _address_in_network(self) -> Identity:
        if self.dns_ip not in self.vpn_subnet:
            raise ValueError(f"dns_ip: {self.dns_ip} lies outside vpn_subnet {self.vpn_subnet}")
        return self

    def candidates(self) -> tuple[str, ...]:
        """Every endpoint to try, best first: `endpoints`, or `endpoint` alone."""
        return tuple(dict.fromkeys((self.endpoint, *(self.endpoints or ()))))[:ENDPOINTS_MAX]

    def speaks(self) -> tuple[int, ...]:
        return tuple(self.versions or (self.version,))

    def as_dict(self) -> dict[str, Any]:
        """The JSON we send (absent optional fields left out)."""
        return _json(self)


class Pairing(Wire):
    port: Port
    token: Annotated[str, Field(pattern=TOKEN_PATTERN)]
    expires_at: Seconds


class Invite(Identity):
    pairing: Pairing | None = None

    def encode(self) -> str:
        """The one-line copy-paste form: `picell-invite:` and the JSON in URL-safe base64."""
        raw = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":")).encode()
        return INVITE_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


class PairingRequest(Wire):
    """A redemption on our pairing listener: their identity and nonce, MAC'd with the key the
    invite's token gives. `key_proof`, a MAC with the link key, proves they hold the private
    key of `identity.public_key`: required when that key is already linked (a re-pairing)."""

    identity: Identity
    nonce: Nonce
    mac: Mac
    key_proof: Mac | None = None
    # where the redeemer presents our network (`mesh.mapping`): it overlaps its own or its links'
    mapped_subnet: Network | None = None


class PairingAnswer(Wire):
    identity: Identity
    nonce: Nonce
    mac: Mac
    mapped_subnet: Network | None = None  # where the answering cell presents ours


class SharedService(Wire):
    name: Name
    vip: IPv4
    ports: list[Port] = Field(min_length=1, max_length=PORTS_PER_SERVICE_MAX)
    protocol: Literal["tcp", "udp"] = "tcp"
    # shared with these published devices of the receiver only (absent: its whole network),
    # and until this date (absent: for good); the receiver shows them, the sender enforces
    devices: list[Name] | None = Field(default=None, max_length=PUBLISHED_DEVICES_MAX)
    until: Seconds | None = None


class PublishedDevice(Wire):
    """One device the sender publishes (`picell cells publish-devices`): its name and its
    address in the sender's network."""

    name: Name
    address: IPv4


class ExitEnd(Wire):
    """One end of a nested exit tunnel (DESIGN §8): its WireGuard public key and port."""

    public_key: WgKey
    port: Port


class DocIdentity(Wire):
    """The sender's identity as its state document repeats it; absent fields are unchanged."""

    endpoint: Endpoint | None = None
    vpn_subnet: Network | None = None
    dns_ip: IPv4 | None = None
    domain: Domain | None = None
    endpoints: Endpoints | None = None
    listen_port: Port | None = None  # its WireGuard port (a relay forwards to it)


class Introduction(Wire):
    """A mutually linked cell's word on where it sees a cell we asked about (`wanted`)."""

    public_key: WgKey
    seen_at: Endpoint


class RelayPort(Wire):
    """The UDP port at the relaying cell that carries our link with `public_key`."""

    public_key: WgKey
    port: Port


class Header(Wire):
    """What every signed body carries (DESIGN §6)."""

    v: Version
    type: Annotated[str, Field(max_length=32, pattern=r"^[a-z]+$")]
    from_cell: Name
    from_public_key: WgKey
    to_public_key: WgKey
    seq: Annotated[int, Field(ge=1, le=SEQ_MAX)]
    sent_at: Seconds
    versions: list[Version] | None = Field(default=None, min_length=1,
                                                 max_length=VERSIONS_MAX)  # fmt: skip
    # the sender's incarnation (restore-proof sequence numbers, `mesh.protocol.check_fresh`):
    # drawn at init and by every restore; `seq` counts within it. Cells before it send none,
    # and cells before it ignore it (unknown fields are ignored).
    epoch: Annotated[str, Field(pattern=EPOCH_PATTERN)] | None = None


class StateBody(Header):
    type: Literal["state"]
    shared_services: list[SharedService] = Field(default=[],
                                                       max_length=SHARED_SERVICES_MAX)  # fmt: skip
    exit_offered: bool = False
    use_as_exit_relay: bool = False
    exit_relay: ExitEnd | None = None
    exit_client: ExitEnd | None = None
    identity: DocIdentity | None = None
    # proves the sender imported one of our invites (a MAC with the invite's pairing key over
    # both public keys), so that invite is spent when the link completes without pairing
    invite_proof: Mac | None = None
    # reachability (NAT issue): where the sender sees us (as its WireGuard shows our address)
    seen_at: Endpoint | None = None
    relay_offered: bool = False  # the sender would relay between us and its other links
    # the cells we link with through the sender or cannot reach: introduce them, relay them
    wanted: list[WgKey] = Field(default=[], max_length=WANTED_MAX)
    introductions: list[Introduction] = Field(default=[], max_length=WANTED_MAX)
    relay_ports: list[RelayPort] = Field(default=[], max_length=WANTED_MAX)
    # translation (overlap issue, `mesh.mapping`): where the sender presents our network; absent
    # when it presents it as it is
    mapped_subnet: Network | None = None
    # the sender's devices, while it publishes them to us (overlap issue, part 2)
    devices: list[PublishedDevice] | None = Field(default=None, max_length=PUBLISHED_DEVICES_MAX)

    @model_validator(mode="after")
    def _unique_services(self) -> StateBody:
        names = [s.name for s in self.shared_services]
        if len(names) != len(set(names)):
            raise ValueError("shared_services: a service is listed twice")  # names the field
        devices = self.devices or []
        if len({d.name for d in devices}) != len(devices):
            raise ValueError("devices: a device name is listed twice")
        if len({d.address for d in devices}) != len(devices):
            raise ValueError("devices: an address is listed twice")
        return self


class UnlinkBody(Header):
    type: Literal["unlink"]


class RekeyBody(Header):
    """A key rotation (`mesh.rekey`), signed with the link key of the sender's current key:
    `new_public_key` is the key it moves to, and `proof` a MAC with the link key of that new
    key over both keys, so only the holder of the new private key can make it. `switch`: the
    sender moves now (the receiver answers, then moves its peer to the new key); without it
    the receiver only keeps the new key, ready."""

    type: Literal["rekey"]
    new_public_key: WgKey
    proof: Mac
    switch: bool = False


class RekeyAnswer(Wire):
    """The answer to a `rekey`: the receiver holds the new key (and moved, with `switch`)."""

    ok: Literal[True]
    new_public_key: WgKey


class ExplainBody(Header):
    """A question (`picell doctor`, `mesh.explain`): may our cell, or its `device`, use the
    receiver's `service`? Signed and replay-checked like every body. `device` is the asking
    cell's word for its own device: a share with one device it publishes (`devices` of its
    state document) answers for that device only; a share with the whole cell, for all."""

    type: Literal["explain"]
    service: Name
    device: Name | None = None


class ExplainAnswer(Wire):
    """The answer to an `explain`. `allowed: false` carries nothing else (no ports, no since),
    and is the same for a service not shared with the asker and for one that does not exist:
    the answer reveals nothing the receiver does not share. `since`: when the share was made
    (seconds since the epoch), None when its record is gone."""

    ok: Literal[True]
    service: Name
    allowed: bool
    since: Seconds | None = None
    until: Seconds | None = None  # the share ends then by itself
    ports: list[Port] = Field(default=[], max_length=PORTS_PER_SERVICE_MAX)
    protocol: Literal["tcp", "udp"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ExplainAnswer:
        if self.allowed:
            if not self.ports:
                raise ValueError("ports: an allowed service names its ports")
            if self.protocol is None:
                raise ValueError("protocol: an allowed service names its protocol")
            return self
        for field, value in (("ports", self.ports), ("since", self.since),
                             ("protocol", self.protocol), ("until", self.until)):  # fmt: skip
            if value:  # a refusal says nothing more: it must look the same for every reason
                raise ValueError(f"{field}: a refusal carries no {field}")
        return self


class Envelope(Wire):
    """A signed message: `mac` is HMAC-SHA256 of the body's canonical JSON with the link key.
    `body` stays raw here (the MAC covers it as sent); the typed body is parsed next to it."""

    body: dict[str, Any]
    mac: Mac


class StateAnswer(Wire):
    """The other cell's answer to our state document (`Sync.receive_state`): it applied `seq`.
    A push counts only with this answer for the `seq` we sent."""

    ok: Literal[True]
    seq: Annotated[int, Field(ge=1, le=SEQ_MAX)]


MESSAGES: dict[str, type[Wire]] = {
    "invite": Invite,
    "pairing_request": PairingRequest,
    "pairing_answer": PairingAnswer,
    "envelope": Envelope,
    "state": StateBody,
    "unlink": UnlinkBody,
    "rekey": RekeyBody,
    "state_answer": StateAnswer,
    "rekey_answer": RekeyAnswer,
    "explain": ExplainBody,
    "explain_answer": ExplainAnswer,
}
BODIES: dict[str, type[Header]] = {"state": StateBody, "unlink": UnlinkBody, "rekey": RekeyBody,
                                   "explain": ExplainBody}  # fmt: skip

W = TypeVar("W", bound=Wire)


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(model: type[W], data: Any, prefix: str) -> W:
    """`data` as `model`, or BadInput naming the first wrong field as `<prefix>.<field>`."""
    if not isinstance(data, dict):
        raise BadInput(f"{prefix}: a JSON object is expected", field=prefix)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = _where(tuple(err["loc"]))
        message = str(err["msg"]).removeprefix("Value error, ")
        named = re.fullmatch(r"([a-z_]+): (.*)", message, re.DOTALL)
        if named:  # a check across fields names its field in its message (nested ones too)
            where = f"{where}.{named.group(1)}" if where else named.group(1)
            message = named.group(2)
        field = f"{prefix}.{where}" if where else prefix
        raise BadInput(f"{field}: {message}", field=field) from None


def _json(model: Wire) -> dict[str, Any]:
    data: dict[str, Any] = model.model_dump(mode="json", exclude_none=True)
    return data


def common_version(theirs: tuple[int, ...], cell: str, field: str) -> int:
    """The highest version both cells speak, or Conflict naming both lists."""
    common = set(SUPPORTED_VERSIONS) & set(theirs)
    if not common:
        ours = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise Conflict(
            f"{field}: cell {cell} speaks protocol versions "
            f"{', '.join(map(str, sorted(theirs)))}; this cell speaks {ours}: no common version",
            field=field,
        )
    return max(common)


def json_schema() -> dict[str, Any]:
    """The JSON schema of every cross-cell message (the protocol's golden file)."""
    return {name: model.model_json_schema() for name, model in sorted(MESSAGES.items())}
