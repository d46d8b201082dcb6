"""Routing a device via a linked cell's exit, against a fake kernel: refusals, the tunnel and
its fail-closed table, the relay side, and what the state document tells the other cell."""

from __future__ import annotations

import pytest

from picell.control import Control
from picell.errors import ExitNotOffered, NotFound
from picell.mesh.document import document
from picell.mesh.exits import Exits
from picell.mesh.sync import Sync
from picell.routing.exits import TableRoute, plan_exit_routing
from picell.store import exits as exit_table
from picell.store import links as link_table
from picell.wireguard import keys
from tests.unit.fakes import FakeKernel
from tests.unit.test_mesh import _linked_pair, _state_from_beta

RELAY_END = {"public_key": keys.public_from_private(keys.generate_private()), "port": 51821}
CLIENT_END = {"public_key": keys.public_from_private(keys.generate_private()), "port": 51822}


def test_route_via_needs_an_offer_and_builds_a_fail_closed_tunnel(
    control: Control, kernel: FakeKernel
) -> None:
    links, beta_private, _ = _linked_pair(control)
    sync, exits = Sync(links), Exits(control)
    control.add_peer("phone")
    with pytest.raises(ExitNotOffered) as err:
        exits.route_via("phone", "beta")
    assert err.value.field == "via_cell" and "beta" in err.value.message
    with pytest.raises(NotFound):
        exits.route_via("phone", "nobody")
    assert control.list_peers()[0]["route_via"] is None  # nothing half-applied

    sync.receive_state(_state_from_beta(control, beta_private, 1, exit_offered=True,
                                        exit_relay=RELAY_END), "10.62.0.1")  # fmt: skip
    out = exits.route_via("phone", "beta")
    assert out["route_via"] == "beta" and "AllowedIPs = 0.0.0.0/0, ::/0" in out["config"]
    assert "pctest0x1" in kernel.wg
    [(_, peer)] = kernel.wg["pctest0x1"]["peers"].items()  # type: ignore[union-attr]
    assert peer["allowed"] == "0.0.0.0/0"
    assert (7701, "default", "pctest0x1") in kernel.table_routes
    assert (7701, "default", None) in kernel.table_routes  # the blackhole of last resort
    assert (0x5C1, 7701) in kernel.rules
    with control.store.read() as conn:
        beta = link_table.get(conn, "beta")
        slot = exit_table.slots(conn)["beta"]
        assert beta.choices.exit_relay_active
    doc = document(control.cell(), beta, [], slot)
    assert doc["use_as_exit_relay"] and doc["exit_client"]["port"] == 51822

    # beta withdraws: the tunnel goes, the blackhole stays, the device stays routed via beta
    sync.receive_state(_state_from_beta(control, beta_private, 2, exit_offered=False),
                       "10.62.0.1")  # fmt: skip
    assert "pctest0x1" not in kernel.interfaces
    assert (7701, "default", None) in kernel.table_routes
    assert (7701, "default", "pctest0x1") not in kernel.table_routes
    assert control.list_peers()[0]["route_via"] == "beta"

    # removing the device frees the slot, the rule and the table
    control.remove_peer("phone")
    assert kernel.rules == set() and kernel.table_routes == set()
    with control.store.read() as conn:
        assert exit_table.slots(conn) == {}
        assert not link_table.get(conn, "beta").choices.exit_relay_active


def test_the_relay_exists_only_while_offered_and_asked(
    control: Control, kernel: FakeKernel
) -> None:
    links, beta_private, _ = _linked_pair(control)
    sync = Sync(links)
    asked = {"use_as_exit_relay": True, "exit_client": CLIENT_END}
    sync.receive_state(_state_from_beta(control, beta_private, 1, **asked), "10.62.0.1")
    assert "pctest0x0" not in kernel.interfaces  # asked, but never offered to beta
    sync.set_exit_offer("beta", True)
    assert "pctest0x0" in kernel.interfaces
    [(key, peer)] = kernel.wg["pctest0x0"]["peers"].items()  # type: ignore[union-attr]
    assert key == CLIENT_END["public_key"] and peer["allowed"] == "10.62.0.0/24"
    assert (7700, "10.62.0.0/24", "pctest0x0") in kernel.table_routes
    assert "exit_relay" in (kernel.nft_text or "")
    sync.set_exit_offer("beta", False)  # withdrawn: at once
    assert "pctest0x0" not in kernel.interfaces and kernel.rules == set()


def test_exit_routing_plans_tables_before_rules_and_deletes_last() -> None:
    want = frozenset({TableRoute(7701, "default", None), TableRoute(7701, "default", "x1")})
    have = frozenset({TableRoute(7702, "default", None)})
    lines = plan_exit_routing(want, have, frozenset({(0x5C1, 7701)}), frozenset({(0x5C2, 7702)}))
    assert lines == [
        "route replace blackhole default metric 4096 table 7701 proto 77",
        "route replace default dev x1 table 7701 proto 77",
        "rule add fwmark 0x5c1 lookup 7701 priority 7700",
        "rule del fwmark 0x5c2 lookup 7702 priority 7700",
        "route del blackhole default metric 4096 table 7702 proto 77",
    ]


def test_derived_keys_are_stable_and_clamped_as_wireguard_shows_them() -> None:
    import base64

    private = keys.generate_private()
    a, b = keys.derive_private(private, "exit relay"), keys.derive_private(private, "exit relay")
    raw = base64.b64decode(a)
    assert a == b != keys.derive_private(private, "exit via someone")
    assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40
