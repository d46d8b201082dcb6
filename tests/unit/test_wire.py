"""The typed wire: strict parsing of every cross-cell message, the identity policy, strict
JSON, version negotiation, and the protocol's golden JSON schema."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest

from picell.api.strict_json import loads_strict
from picell.errors import BadInput, Conflict
from picell.mesh import policy, wire
from picell.mesh.invite import parse_invite
from picell.wireguard import keys

GOLDEN = Path(__file__).parent / "golden" / "wire_schema.json"
KEY = keys.public_from_private(keys.generate_private())


def ident(**over: Any) -> dict[str, Any]:
    base = {"version": 1, "cell_name": "beta", "domain": "beta.test", "public_key": KEY,
            "endpoint": "198.51.100.2:51820", "vpn_subnet": "10.62.0.0/24",
            "dns_ip": "10.62.0.1", "mesh_port": 3000}  # fmt: skip
    return {**base, **over}


def test_the_wire_schema_is_the_golden_file() -> None:
    """Any change to the cross-cell protocol is a visible diff of this file
    (PICELL_UPDATE_GOLDEN=1 rewrites it)."""
    text = json.dumps(wire.json_schema(), indent=1, sort_keys=True) + "\n"
    if os.environ.get("PICELL_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_unknown_fields_are_ignored_and_old_invites_parse() -> None:
    old = ident()  # a cell at 01e3ef2 sends `version` and no `versions`
    got = wire.parse(wire.Identity, {**old, "future": {"x": [1]}}, "invite")
    assert got.speaks() == (1,) and got.as_dict()["version"] == 1
    newer = wire.parse(wire.Identity, {**old, "versions": [1, 7]}, "invite")
    assert wire.common_version(newer.speaks(), "beta", "invite.versions") == 1
    with pytest.raises(Conflict) as err:
        wire.common_version((7, 8), "beta", "invite.versions")
    assert "beta speaks protocol versions 7, 8; this cell speaks 1" in err.value.message


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"mesh_port": "3000"}, "invite.mesh_port"),  # no silent coercion
        ({"mesh_port": True}, "invite.mesh_port"),
        ({"mesh_port": 3000.0}, "invite.mesh_port"),
        ({"cell_name": "beta\n"}, "invite.cell_name"),
        ({"cell_name": "b" * 64}, "invite.cell_name"),
        ({"domain": "beta.test\n"}, "invite.domain"),
        ({"domain": "a" * 254}, "invite.domain"),
        ({"endpoint": "[fe80::1%1]:51820"}, "invite.endpoint"),
        ({"endpoint": "[fe80::1%eth0\n[Peer]\nAllowedIPs = 0.0.0.0/0]:1"}, "invite.endpoint"),
        ({"vpn_subnet": "10.62.0.0/24\n"}, "invite.vpn_subnet"),
        ({"vpn_subnet": ["10.62.0.0/24"]}, "invite.vpn_subnet"),
        ({"dns_ip": "10.62.0.1 "}, "invite.dns_ip"),
        ({"dns_ip": "10.63.0.1"}, "invite.dns_ip"),
        ({"public_key": KEY[:-1] + "\n"}, "invite.public_key"),
        ({"versions": [0]}, "invite.versions[0]"),
        ({"versions": list(range(1, 40))}, "invite.versions"),
    ],
)
def test_every_identity_field_is_strict(over: dict[str, Any], field: str) -> None:
    with pytest.raises(BadInput) as err:
        wire.parse(wire.Identity, ident(**over), "invite")
    assert err.value.field == field


def state(**over: Any) -> dict[str, Any]:
    base = {"v": 1, "type": "state", "from_cell": "beta", "from_public_key": KEY,
            "to_public_key": KEY, "seq": 1, "sent_at": 1.5}  # fmt: skip
    return {**base, **over}


def test_state_documents_are_bounded() -> None:
    svc = {"name": "web", "vip": "10.62.0.254", "ports": [80]}
    wire.parse(wire.StateBody, state(shared_services=[svc]), "body")
    many = [{**svc, "name": f"s{i}"} for i in range(wire.SHARED_SERVICES_MAX + 1)]
    cases = {
        "body.shared_services": many,
        "body.shared_services[0].ports": [{**svc, "ports": list(range(1, 18))}],
        "body.shared_services[0].protocol": [{**svc, "protocol": "sctp"}],
        "body.shared_services[0].name": [{**svc, "name": "Web"}],
    }
    for field, services in cases.items():
        with pytest.raises(BadInput) as err:
            wire.parse(wire.StateBody, state(shared_services=services), "body")
        assert err.value.field == field
    for over, field in [({"seq": 0}, "body.seq"), ({"seq": 2**60}, "body.seq"),
                        ({"exit_offered": 1}, "body.exit_offered"),
                        ({"sent_at": float("inf")}, "body.sent_at"),
                        ({"type": "unlink"}, "body.type")]:  # fmt: skip
        with pytest.raises(BadInput) as err:
            wire.parse(wire.StateBody, state(**over), "body")
        assert err.value.field == field


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        '{"a": Infinity}',
        '{"a": -Infinity}',
        "[" * 100_000,
        '{"a": 1, "a": 2}',
        b"\xff\xfe".decode("latin-1"),
        "",
        "1" * 5000,
    ],
)
def test_strict_json_refuses_what_python_would_take_or_choke_on(text: str) -> None:
    with pytest.raises(BadInput) as err:
        raw = text.encode("latin-1") if text.startswith("\xff") else text.encode()
        loads_strict(raw, max_bytes=10_000_000)
    assert err.value.field == "body"


def test_strict_json_counts_depth_outside_strings_only() -> None:
    text = json.dumps({"a": "[{" * 60})
    assert loads_strict(text.encode(), max_bytes=1000) == {"a": "[{" * 60}


def test_every_exported_form_of_an_invite_is_read_back() -> None:
    inv = wire.Invite(**wire.parse(wire.Identity, ident(), "i").model_dump(),
                      pairing=wire.Pairing(port=51821, token="t" * 32, expires_at=1.0))  # fmt: skip
    as_json = json.dumps(inv.as_dict(), indent=2)
    wrapped = json.dumps({"invite": inv.as_dict(), "string": inv.encode()})  # invite --json
    for text in (inv.encode(), as_json, wrapped, "  " + inv.encode() + "\n"):
        assert parse_invite(text) == inv
    for bad in ("picell-invite:" + "A" * 100_000, "hello", "picell-invite:@@@"):
        with pytest.raises(BadInput) as err:
            parse_invite(bad)
        assert err.value.field == "invite"


@pytest.mark.parametrize(
    ("domain", "trusted", "ok"),
    [
        ("beta.test", False, True),
        ("beta.cell", False, True),
        ("x.home.arpa", False, True),
        ("corp.internal", False, True),
        ("com", True, False),  # a public suffix, even with the owner's word
        ("co.uk", True, False),
        ("github.io", True, False),
        ("cell", True, False),  # a single label
        ("home.arpa", True, False),
        ("google.com", False, False),  # anyone could register it: the owner's word only
        ("google.com", True, True),
        ("beta.example", False, False),
    ],
)
def test_domain_policy(domain: str, trusted: bool, ok: bool) -> None:
    if ok:
        policy.check_domain(domain, "invite.domain", trusted=trusted)
        return
    with pytest.raises(BadInput) as err:
        policy.check_domain(domain, "invite.domain", trusted=trusted)
    assert err.value.field == "invite.domain"


HOST = policy.HostNets(
    addresses=(("eth0", ipaddress.IPv4Interface("192.168.77.5/24")),),
    routes=(("eth0", ipaddress.IPv4Network("192.168.77.0/24")),
            ("docker0", ipaddress.IPv4Network("172.17.0.0/16"))),
)  # fmt: skip


@pytest.mark.parametrize(
    ("net", "error"),
    [
        ("10.62.0.0/24", None),
        ("10.62.0.0/28", None),
        ("100.64.9.0/24", None),
        ("192.168.77.0/24", None),  # the host's LAN: mapped (test_mapping.py), not refused
        ("10.62.0.0/16", BadInput),  # larger than a /24
        ("127.0.0.0/24", BadInput),
        ("169.254.0.0/24", BadInput),
        ("0.0.0.0/24", BadInput),
        ("8.8.8.0/24", BadInput),
    ],
)
def test_network_policy(net: str, error: type[Exception] | None) -> None:
    network = ipaddress.IPv4Network(net)
    if error is None:
        policy.check_network(network, "invite.vpn_subnet", "beta")
        return
    with pytest.raises(error) as err:
        policy.check_network(network, "invite.vpn_subnet", "beta")
    assert getattr(err.value, "field", None) == "invite.vpn_subnet"
    assert "beta" in str(err.value)


class _Ip:
    def __init__(self, addrs: Any, routes: Any) -> None:
        self.out = {"addr": json.dumps(addrs), "route": json.dumps(routes)}

    def run(self, argv: list[str], **_: Any) -> Any:
        class R:
            stdout = self.out["route" if "route" in argv else "addr"]

        return R()


def test_observe_host_leaves_out_picell_and_default_routes() -> None:
    addrs = [{"ifname": "eth0", "addr_info": [{"local": "192.168.77.5", "prefixlen": 24}]},
             {"ifname": "picell0", "addr_info": [{"local": "10.61.0.1", "prefixlen": 24}]},
             {"ifname": "picell0x1", "addr_info": [{"local": "10.61.0.1", "prefixlen": 32}]},
             {"ifname": "weird"}, "junk"]  # fmt: skip
    routes = [{"dst": "default", "dev": "eth0"},
              {"dst": "192.168.77.0/24", "dev": "eth0", "protocol": "kernel"},
              {"dst": "10.62.0.0/24", "dev": "picell0", "protocol": "77"},
              {"dst": "10.63.0.0/24", "dev": "tun0", "protocol": "static"},
              {"dst": "192.168.77.255", "type": "broadcast", "dev": "eth0"},
              {"dev": "lo"}, 7]  # fmt: skip
    host = policy.observe_host(_Ip(addrs, routes), "picell0")  # type: ignore[arg-type]
    assert host.addresses == (("eth0", ipaddress.IPv4Interface("192.168.77.5/24")),)
    assert [str(r) for _, r in host.routes] == ["192.168.77.0/24", "10.63.0.0/24"]
