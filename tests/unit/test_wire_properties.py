"""Property tests of the cross-cell wire (issue 11, "Proof"): every field of every wire model,
fed what an attacker would send, is either refused with BadInput naming that field or stored
clean and normalised; and the two doors another cell knocks on (`Links.accept`, the pairing
redemption, and `Sync.receive_state`, a signed state document) raise nothing but PicellError,
store exactly what they accepted and render exactly the expected WireGuard peers.

Pure: the fake kernel of tests/unit stands in for the system. The real checkers (wg, nft,
unbound-checkconf) run over the same strategies in tests/netns/test_render_checkers.py.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from picell import validate
from picell.control import Control
from picell.errors import BadInput, PicellError
from picell.mesh import wire
from picell.mesh.crypto import link_key, mac, pairing_key
from picell.mesh.links import Links
from picell.mesh.sync import Sync
from picell.paths import Paths
from picell.store import links as link_table
from picell.wireguard import keys
from tests.unit import hostile
from tests.unit.fakes import FakeKernel

PREFIX = {"invite": "invite", "pairing_request": "body", "pairing_answer": "answer",
          "envelope": "message", "state": "body", "unlink": "body",
          "state_answer": "answer", "rekey": "body", "rekey_answer": "answer",
          "explain": "body", "explain_answer": "answer"}  # fmt: skip
IDENTITY_KINDS = ("invite", "pairing_request", "pairing_answer")
QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
FAST = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                suppress_health_check=QUIET)  # fmt: skip

# -- a message of each kind with every optional field present ----------------------------------
_PRIV = [keys.derive_private("A" * 43 + "=", label) for label in ("beta", "alpha")]
_PUB = [keys.public_from_private(p) for p in _PRIV]
_IDENT = {"version": 1, "versions": [1, 2], "cell_name": "beta", "domain": "beta.test",
          "public_key": _PUB[0], "endpoint": "[2001:db8::7]:51820", "vpn_subnet": "10.62.0.0/24",
          "dns_ip": "10.62.0.1", "mesh_port": 3000,
          "endpoints": ["[2001:db8::7]:51820", "198.51.100.2:51820"]}  # fmt: skip
_HEADER = {**hostile.header("state", "beta", _PUB[0], _PUB[1], 7), "epoch": "e" * 32}
FULL: dict[str, dict[str, Any]] = {
    "invite": {**_IDENT, "pairing": {"port": 51821, "token": "t" * 32, "expires_at": 1.0}},
    "pairing_request": {"identity": _IDENT, "nonce": "ab" * 16, "mac": "0" * 64,
                        "key_proof": "1" * 64, "mapped_subnet": "10.201.7.0/24"},
    "pairing_answer": {"identity": _IDENT, "nonce": "ab" * 16, "mac": "0" * 64,
                       "mapped_subnet": "10.201.9.0/24"},
    "state": {**_HEADER,
              "shared_services": [{"name": "web", "vip": "10.62.0.254", "ports": [80, 443],
                                   "protocol": "tcp", "devices": ["phone"],
                                   "until": 1800000000.0},
                                  {"name": "dns", "vip": "10.62.0.253", "ports": [53],
                                   "protocol": "udp"}],
              "exit_offered": True, "use_as_exit_relay": False,
              "exit_relay": {"public_key": _PUB[0], "port": 51830},
              "exit_client": {"public_key": _PUB[1], "port": 51831},
              "identity": {"endpoint": "beta.example:51820", "vpn_subnet": "10.62.0.0/24",
                           "dns_ip": "10.62.0.1", "domain": "beta.test",
                           "endpoints": ["beta.example:51820"], "listen_port": 51820},
              "invite_proof": "2" * 64,
              "seen_at": "203.0.113.7:40000", "relay_offered": True,
              "wanted": [_PUB[1]],
              "introductions": [{"public_key": _PUB[1], "seen_at": "192.0.2.9:51820"}],
              "relay_ports": [{"public_key": _PUB[1], "port": 52001}],
              "mapped_subnet": "10.201.9.0/24",
              "devices": [{"name": "phone", "address": "10.62.0.2"},
                          {"name": "laptop", "address": "10.62.0.3"}]},
    "unlink": {**_HEADER, "type": "unlink"},
    "rekey": {**_HEADER, "type": "rekey", "new_public_key": _PUB[1], "proof": "4" * 64,
              "switch": True},
    "rekey_answer": {"ok": True, "new_public_key": _PUB[1]},
    "envelope": {"body": {**_HEADER, "type": "unlink"}, "mac": "3" * 64},
    "state_answer": {"ok": True, "seq": 7},
    "explain": {**_HEADER, "type": "explain", "service": "web", "device": "phone"},
    "explain_answer": {"ok": True, "service": "web", "allowed": True, "since": 1.5, "until": 9.5,
                       "ports": [80, 443], "protocol": "tcp"},
}  # fmt: skip


def model_paths(model: type[BaseModel], at: hostile.Path = ()) -> list[hostile.Path]:
    """Every field of `model`, nested models and list items (index 0) included."""
    out = []
    for name, info in model.model_fields.items():
        here = (*at, name)
        out.append(here)
        for arg in _types(info.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out += model_paths(arg, here)
            elif getattr(arg, "__origin__", None) is list:
                out.append((*here, 0))
                (item,) = arg.__args__
                for sub in _types(item):
                    if isinstance(sub, type) and issubclass(sub, BaseModel):
                        out += model_paths(sub, (*here, 0))
    return out


def _types(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if args and getattr(annotation, "__origin__", None) is not list:  # a union
        return [a for a in args if a is not type(None)]
    return [annotation]


def test_the_full_examples_reach_every_field_of_every_model() -> None:
    """The property below runs once per path of these examples: this holds it to every
    field of every model, so a field added to the wire is fuzzed from the day it exists."""
    for kind, model in wire.MESSAGES.items():
        wire.parse(model, FULL[kind], PREFIX[kind])  # valid as written
        assert set(model_paths(model)) <= set(hostile.paths(FULL[kind])), kind


def _cases(kind: str) -> list[hostile.Path]:
    # the envelope keeps its body raw: only the body as a whole is the envelope's field
    return [p for p in hostile.paths(FULL[kind]) if not (kind == "envelope" and len(p) > 1)]


def _named(field: str | None, prefix: str, path: hostile.Path, value: Any) -> bool:
    want = hostile.where(prefix, path)
    if field == want or (field or "").startswith((want + ".", want + "[")):
        return True
    if value is hostile.DELETE and isinstance(path[-1], int):
        return field == hostile.where(prefix, path[:-1])  # a list left too short
    if path[-1] == "vpn_subnet":  # the check across fields: dns_ip must lie inside it
        return field == hostile.where(prefix, (*path[:-1], "dns_ip"))
    if len(path) == 3 and path[0] == "shared_services" and path[2] == "name":
        return field == hostile.where(prefix, ("shared_services",))  # a name listed twice
    if path == ("allowed",) and value is False:  # a refusal that carries an allowance's fields
        return field in {hostile.where(prefix, (f,)) for f in ("ports", "since", "protocol",
                                                                "until")}  # fmt: skip
    if len(path) == 3 and path[0] == "devices":  # a name or an address listed twice
        return field == hostile.where(prefix, ("devices",))
    return False


def _strings(data: Any) -> list[str]:
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        return [s for k, v in data.items() for s in [k, *_strings(v)]]
    if isinstance(data, list):
        return [s for v in data for s in _strings(v)]
    return []


def assert_stored_clean(model: BaseModel, kind: str, prefix: str) -> None:
    """What a model accepted: ASCII without control or syntax characters, in its normal form,
    and parsing its own dump gives it back (normalisation is idempotent)."""
    dumped = model.model_dump(mode="json")
    stored = {k: v for k, v in dumped.items() if not (kind == "envelope" and k == "body")}
    for text in _strings(stored):
        assert text.isascii() and text.isprintable(), text
        assert not set(text) & hostile.NEVER_STORED, text
    again = wire.parse(type(model), dumped, prefix)
    assert again == model
    assert (
        wire.parse(type(model), model.model_dump(mode="json", exclude_none=True), prefix) == model
    )
    for ident in (model, getattr(model, "identity", None)):
        endpoint = getattr(ident, "endpoint", None)
        if endpoint is not None:
            assert str(validate.endpoint(endpoint)) == endpoint
        domain = getattr(ident, "domain", None)
        if domain is not None:
            assert domain == domain.lower().removesuffix(".") == validate.domain(domain)


@pytest.mark.parametrize("kind", sorted(wire.MESSAGES))
def test_every_field_is_refused_by_name_or_stored_clean(kind: str) -> None:
    """Each path of the full example (every field, see above) gets hostile values: each is
    refused with BadInput naming that field, or accepted and stored clean."""
    model, prefix, base = wire.MESSAGES[kind], PREFIX[kind], FULL[kind]
    cases = _cases(kind)
    values = {p: st.one_of(hostile.hostile_for(hostile.get(base, p)), st.just(hostile.DELETE))
              for p in cases}  # fmt: skip
    seen: set[hostile.Path] = set()

    @settings(FAST, max_examples=10 * len(cases))
    @given(data=st.data())
    def attack(data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(cases), "path")
        value = data.draw(values[path], "value")
        seen.add(path)
        message = hostile.replaced(base, path, value)
        try:
            parsed = wire.parse(model, message, prefix)
        except BadInput as err:
            assert _named(err.field, prefix, path, value), (err.field, err.message)
            assert err.message.startswith(f"{err.field}: ")
            return
        if isinstance(value, str):  # a hostile character is never stored, whatever the field
            assert value.isascii() and value.isprintable(), repr(value)
            assert not set(value) & hostile.NEVER_STORED, repr(value)
        assert_stored_clean(parsed, kind, prefix)

    attack()
    assert seen == set(cases)  # derandomized: the same paths every run, all of them


@pytest.mark.parametrize("kind", sorted(wire.MESSAGES))
@settings(FAST, max_examples=15)
@given(data=st.data())
def test_valid_messages_are_accepted_and_normalised_once(kind: str, data: st.DataObject) -> None:
    """The other half: everything the strategies call valid is accepted, so the refusals above
    are not a model that refuses everything."""
    message = data.draw(hostile.messages(kind))
    parsed = wire.parse(wire.MESSAGES[kind], message, PREFIX[kind])
    assert_stored_clean(parsed, kind, PREFIX[kind])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("domain", "\u212a.test"),  # KELVIN SIGN lower-cases to "k"
        ("domain", "beta.\u0131nternal"),  # dotless i upper-cases to "I"
        ("domain", "bet\u0430.test"),  # Cyrillic а
        ("domain", "beta\uff0etest"),  # fullwidth full stop
        ("cell_name", "bet\u0430"),
        ("cell_name", "\u212aey"),
        ("endpoint", "198.51.100.\uff11:51820"),  # fullwidth digit one
        ("endpoint", "198.51.100.1:5182\u0665"),  # Arabic-Indic five: int() takes it
        ("endpoint", "[2001:db8::1%eth0]:51820"),
        ("endpoint", "[2001:db8::1%25lo]:51820"),
        ("endpoint", "beta.example:51820\nAllowedIPs = 10.61.0.0/24"),
        ("endpoint", "bet\u0430.example:51820"),
        ("vpn_subnet", "10.62.0.0/2\uff14"),
        ("dns_ip", "10.62.0.\uff11"),
        ("mesh_port", "\uff13\uff10\uff10\uff10"),
        ("public_key", _PUB[0][:-2] + "\uff1d"),
    ],
)
def test_look_alikes_never_fold_into_ascii(field: str, value: str) -> None:
    with pytest.raises(BadInput) as err:
        wire.parse(wire.Identity, {**_IDENT, field: value}, "invite")
    assert err.value.field == f"invite.{field}"


# -- the two doors, end to end in-process -------------------------------------------------------
ENTRY = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                 phases=[Phase.explicit, Phase.generate],
                 suppress_health_check=QUIET)  # fmt: skip


def _peer_sections(text: str) -> dict[str, dict[str, str]]:
    """The [Peer] sections of a rendered interface config, by public key; every line must be
    a known key (an injected line would show here)."""
    peers: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line in ("[Interface]", "[Peer]"):
            current = {} if line == "[Peer]" else None
            continue
        key, sep, value = line.partition(" = ")
        assert sep and key in ("PrivateKey", "ListenPort", "PublicKey", "AllowedIPs", "Endpoint",
                               "PersistentKeepalive"), line  # fmt: skip
        if current is not None:
            assert key not in current, f"{key} twice in one peer"
            current[key] = value
            if key == "PublicKey":
                assert value not in peers, "two peers with one key"
                peers[value] = current
    return peers


def _independent_endpoint(raw: str) -> tuple[str, int]:
    """The host and port of an accepted endpoint, read by the standard library alone."""
    host, _, port = raw.rpartition(":")
    if host.startswith("["):
        return str(ipaddress.IPv6Address(host[1:-1])), int(port)
    return host.lower().removesuffix("."), int(port)


def _check_rendered(control: Control, kernel: FakeKernel, paths: Paths) -> None:
    """The store's links are exactly the fake kernel's peers and the rendered file's."""
    with control.store.read() as conn:
        links = {ln.public_key: ln for ln in link_table.all_links(conn)}
    peers = _peer_sections(paths.wg_conf.read_text()) if links else {}
    assert set(peers) == set(links)
    for key, link in links.items():
        # where we present its network: its own, or the block we map it to
        assert peers[key]["AllowedIPs"] == str(link.identity.network)
        assert peers[key]["Endpoint"] == link.identity.endpoint
    kernel_peers = kernel.wg.get("pctest0", {}).get("peers", {})
    assert isinstance(kernel_peers, dict)
    assert {k: p["allowed"] for k, p in kernel_peers.items()} == {
        k: str(ln.identity.network) for k, ln in links.items()
    }


@st.composite
def redemptions(draw: st.DrawFn, taken: list[str]) -> tuple[dict[str, Any], bool]:
    """(a pairing request, whether it was mutated): an identity the policy admits, sometimes with
    one field or the payload's shape made hostile, sometimes with a key already linked."""
    _, ident = draw(hostile.identities())
    if taken and draw(st.integers(0, 9)) == 0:
        ident = {**ident, "public_key": draw(st.sampled_from(taken))}  # a takeover, no proof
    request: dict[str, Any] = {"identity": ident, "nonce": draw(hostile.NONCES)}
    mutated = draw(st.booleans())
    if mutated:
        request = draw(hostile.mutations(request))[2]
    if draw(st.integers(0, 5)) == 0:
        request = {**request, "future": draw(hostile.json_values())}  # ignored, never refused
    if draw(st.integers(0, 7)) == 0:
        request = draw(hostile.WRONG_TYPES)  # not even an object
    return request, mutated


def test_a_redemption_is_refused_or_links_exactly_what_it_said(
    control: Control, kernel: FakeKernel, paths: Paths
) -> None:
    """Hypothesis redeems our invites with hostile requests (MAC'd with the invite's key, so
    they reach the identity policy): each one raises a PicellError and changes no link, or is
    stored as sent, normalised, and rendered as exactly one peer with exactly its network."""
    links = Links(control)
    taken: list[str] = []
    outcomes: list[str] = []

    @ENTRY
    @given(case=redemptions(taken), sign=st.integers(0, 9))
    def redeem(case: tuple[Any, bool], sign: int) -> None:
        payload, _ = case
        inv = links.invite(3600)
        assert inv.pairing is not None
        if isinstance(payload, dict) and "identity" in payload and "nonce" in payload:
            signed = {"identity": payload["identity"], "nonce": payload["nonce"]}
            payload = {**payload, "mac": mac(pairing_key(inv.pairing.token), signed)}
            if sign == 0:  # now and then a forged one
                payload["mac"] = "f" * 64
        with control.store.read() as conn:
            before = link_table.all_links(conn)
        try:
            answer = links.accept(payload)
        except PicellError as exc:
            outcomes.append(type(exc).__name__)
            with control.store.read() as conn:
                assert link_table.all_links(conn) == before
            _check_rendered(control, kernel, paths)
            return
        outcomes.append("linked")
        ident = payload["identity"]
        with control.store.read() as conn:
            link = link_table.by_key(conn, ident["public_key"])
        assert link is not None and ident["public_key"] not in taken
        taken.append(link.public_key)
        assert str(link.identity.vpn_subnet) == ident["vpn_subnet"]
        assert link.identity.domain == ident["domain"].lower().removesuffix(".")
        assert link.name == ident["cell_name"]
        assert _independent_endpoint(link.identity.endpoint) == _independent_endpoint(
            ident["endpoint"]
        )
        assert answer["identity"]["cell_name"] == "alpha"
        _check_rendered(control, kernel, paths)

    redeem()
    # the run was not all refusals, nor all acceptances
    assert "linked" in outcomes and {"BadInput", "Forbidden"} <= set(outcomes), outcomes


@st.composite
def documents(draw: st.DrawFn, net: ipaddress.IPv4Network, head: dict[str, Any]) -> Any:
    """A state document body's hostile variations: valid for beta's network, then sometimes one
    field (header included) or the shape made hostile. A `seq` of 0 is filled in fresh."""
    body = {**head, "seq": 0, **draw(hostile.state_extras(net))}
    if draw(st.booleans()):
        body = draw(hostile.mutations(body))[2]
    if draw(st.integers(0, 7)) == 0:
        body = {**body, "future": draw(hostile.json_values())} if isinstance(body, dict) else body
    return body


def test_a_state_document_is_refused_or_mirrored_exactly(
    control: Control, kernel: FakeKernel, paths: Paths
) -> None:
    """Hypothesis sends beta's signed state documents with hostile fields: each raises a
    PicellError and changes nothing, or is mirrored (what they share, the endpoint) exactly,
    and the rendered peer follows."""
    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    beta_private = keys.generate_private()
    beta_public = keys.public_from_private(beta_private)
    net = ipaddress.IPv4Network("10.62.0.0/24")
    ident = {"cell_name": "beta", "domain": "beta.test", "public_key": beta_public,
             "endpoint": "198.51.100.2:51820", "vpn_subnet": str(net),
             "dns_ip": "10.62.0.1"}  # fmt: skip
    request = {"identity": ident, "nonce": "ab" * 16}
    links.accept({**request, "mac": mac(pairing_key(inv.pairing.token), request)})
    alpha_public = keys.public_from_private(control.cell().private_key)
    key = link_key(beta_private, alpha_public)
    sync = Sync(links)
    seq = itertools.count(1)
    outcomes: list[str] = []
    head = hostile.header("state", "beta", beta_public, alpha_public, 0)

    @ENTRY
    @given(body=documents(net, head), source=st.one_of(st.just("10.62.0.1"), st.just("10.62.0.1"),
                                                 st.text(max_size=20), st.none()))  # fmt: skip
    def send(body: Any, source: str | None) -> None:
        full = body
        if isinstance(body, dict) and body.get("seq") == 0:
            full = {**body, "seq": next(seq)}
        env = {"body": full, "mac": mac(key, full)}
        with control.store.read() as conn:
            before = link_table.get(conn, "beta")
        try:
            sync.receive_state(env, source)
        except PicellError as exc:
            outcomes.append(type(exc).__name__)
            with control.store.read() as conn:
                assert link_table.get(conn, "beta") == before
            _check_rendered(control, kernel, paths)
            return
        outcomes.append("mirrored")
        with control.store.read() as conn:
            after = link_table.get(conn, "beta")
        shared = sorted(full.get("shared_services", []), key=lambda s: s["name"])
        assert [s["name"] for s in after.mirror.outbound] == [s["name"] for s in shared]
        assert [s["ports"] for s in after.mirror.outbound] == [s["ports"] for s in shared]
        moved = (full.get("identity") or {}).get("endpoint")
        if moved:
            assert _independent_endpoint(after.identity.endpoint) == _independent_endpoint(moved)
        assert after.mirror.seq == full["seq"]
        if after.mirror.seq >= wire.SEQ_MAX - 10**6:  # keep later documents fresh
            with control.store.transaction() as conn:
                link_table.save(conn, replace(after, mirror=replace(after.mirror, seq=0)))
        _check_rendered(control, kernel, paths)

    send()
    assert "mirrored" in outcomes and {"BadInput", "Forbidden"} <= set(outcomes), outcomes


def test_a_check_across_fields_of_a_nested_model_names_its_field() -> None:
    """Found by the property above: a pairing request whose identity's dns_ip lies outside its
    vpn_subnet was refused as `body.identity` (the whole identity), not `body.identity.dns_ip`."""
    outside = {**FULL["pairing_request"], "identity": {**_IDENT, "dns_ip": "10.99.0.1"}}
    with pytest.raises(BadInput) as err:
        wire.parse(wire.PairingRequest, outside, "body")
    assert err.value.field == "body.identity.dns_ip"
    assert err.value.message.startswith("body.identity.dns_ip: 10.99.0.1 lies outside")
