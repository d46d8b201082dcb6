"""Shares with one device of a linked cell, until a date (`picell.mesh.shares`, `picell.mesh.
expiry`): dates as owners type them, devices as a linked cell publishes them (hostile input:
only addresses of its own network), the /32 grants as the fake kernel's nft sets hold them,
the timer that ends what is due in one change, and the explain answer for a device. The same
runs against real cells in tests/netns/test_devshare.py."""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from typing import Any

import pytest

from picell.control import Control
from picell.errors import BadInput, Conflict, NotFound
from picell.mesh.document import shared_services
from picell.mesh.expiry import Expiry, next_end
from picell.mesh.explain import decide
from picell.mesh.shares import parse_until
from picell.mesh.sync import Sync
from picell.state import Grant
from picell.store import links as link_table
from picell.store import services as service_table
from picell.store.links import Share
from tests.unit.fakes import FakeKernel
from tests.unit.test_mesh import _linked_pair, _state_from_beta

DEVICES = [{"name": "phone", "address": "10.62.0.2"}, {"name": "laptop", "address": "10.62.0.3"}]


def _beta(control: Control, devices: list[dict[str, str]] | None = DEVICES) -> tuple[Sync, Any]:
    """alpha linked with beta, which publishes `devices`; alpha serves web and wiki."""
    control.add_service("web", "127.0.0.1:8080", 80)
    control.add_service("wiki", "127.0.0.1:8081", 80)
    links, beta_private, _ = _linked_pair(control)
    sync = Sync(links)
    extra = {"devices": devices} if devices is not None else {}
    sync.receive_state(_state_from_beta(control, beta_private, 1, **extra), "10.62.0.1")
    seq = iter(range(2, 1000))

    def tell(**body: Any) -> None:
        sync.receive_state(_state_from_beta(control, beta_private, next(seq), **body), "10.62.0.1")

    return sync, tell


def _grants(kernel: FakeKernel) -> set[str]:
    return kernel.grants.get("grants_tcp", set())


def _vip(control: Control, name: str) -> str:
    return next(s["vip"] for s in control.list_services() if s["name"] == name)


# -- dates ---------------------------------------------------------------------------------------
def test_dates_are_read_as_owners_type_them() -> None:
    now = dt.datetime(2026, 12, 1, 12, 0).astimezone().timestamp()
    local = dt.datetime(2026, 12, 24, 18, 0).astimezone().timestamp()
    assert parse_until("2026-12-24T18:00", now=now) == local
    assert parse_until("2026-12-24T18:00:30", now=now) == local + 30
    utc = dt.datetime(2026, 12, 24, 18, 0, tzinfo=dt.UTC).timestamp()
    assert parse_until("2026-12-24T18:00Z", now=now) == utc
    assert parse_until("2026-12-24T18:00+01:00", now=now) == utc - 3600
    for bad, words in [
        ("2026-12-24", "not an ISO 8601"),
        ("tomorrow", "not an ISO 8601"),
        ("2026-12-24 18:00", "not an ISO 8601"),
        ("2026-02-30T10:00", "day is out of range"),
        ("2026-11-30T10:00", "in the past"),
    ]:
        with pytest.raises(BadInput) as err:
            parse_until(bad, now=now)
        assert err.value.field == "until" and words in err.value.message, bad


# -- devices a cell publishes --------------------------------------------------------------------
def test_a_device_share_is_refused_until_the_cell_publishes_that_device(control: Control) -> None:
    sync, _tell = _beta(control, devices=None)
    with pytest.raises(Conflict) as err:
        sync.share("beta", ["web"], device="phone")
    assert err.value.field == "device" and "publishes no devices" in err.value.message
    _tell(devices=DEVICES)
    with pytest.raises(NotFound) as not_found:
        sync.share("beta", ["web"], device="tablet")
    assert not_found.value.field == "device"
    with pytest.raises(NotFound):
        sync.share("beta", ["nope"], device="phone")
    assert sync.links.describe("beta")["inbound"] == []  # nothing half-applied


def test_published_devices_are_addresses_of_the_cells_own_network(control: Control) -> None:
    sync, tell = _beta(control)
    before = sync.links.describe("beta")["devices"]
    for bad in ("10.61.0.5", "10.62.0.0", "10.62.0.255", "192.168.1.2"):
        with pytest.raises(BadInput) as err:
            tell(devices=[{"name": "phone", "address": bad}])
        assert err.value.field == "body.devices[0].address", bad
    assert sync.links.describe("beta")["devices"] == before


def test_a_device_share_grants_that_devices_address_only(
    control: Control, kernel: FakeKernel
) -> None:
    sync, _tell = _beta(control)
    web = _vip(control, "web")
    sync.share("beta", ["web"], device="phone")
    assert f"10.62.0.2/32 . {web} . 80" in _grants(kernel)
    assert not any(e.startswith("10.62.0.3") or "/24" in e for e in _grants(kernel))
    # the whole cell's share covers the device's: one element, and no cut of the phone's flows
    kernel.flows = [f"tcp 6 431999 ESTABLISHED src=10.62.0.2 dst={web} sport=40000 dport=80"]
    sync.share("beta", ["web"])
    assert _grants(kernel) == {f"10.62.0.0/24 . {web} . 80"}
    assert kernel.flows_cut == []
    sync.unshare("beta", "web")
    assert _grants(kernel) == {f"10.62.0.2/32 . {web} . 80"}
    assert len(kernel.flows_cut) == 1  # the laptop may have had flows through the /24: cut
    with pytest.raises(NotFound):
        sync.unshare("beta", "web", device="laptop")
    sync.unshare("beta", "web", device="phone")
    assert _grants(kernel) == set()


def test_the_grant_follows_the_device_and_the_share_ends_with_publishing(
    control: Control, kernel: FakeKernel
) -> None:
    sync, tell = _beta(control)
    web = _vip(control, "web")
    sync.share("beta", ["web"], device="phone")
    tell(devices=[{"name": "phone", "address": "10.62.0.9"}])
    control.converge()
    assert _grants(kernel) == {f"10.62.0.9/32 . {web} . 80"}
    tell(devices=[{"name": "laptop", "address": "10.62.0.3"}])  # the phone is not listed now
    control.converge()
    assert _grants(kernel) == set()
    [row] = sync.links.describe("beta")["inbound"]
    assert row["device"] == "phone" and row["published"] is False
    tell()  # no devices at all: it stopped publishing, and the share ends
    assert sync.links.describe("beta")["inbound"] == []
    events = [e["detail"] for e in sync.links.journal_entries("beta")]
    assert any("no longer publishes its devices" in d for d in events)


def test_the_document_tells_which_devices_and_until_when(control: Control) -> None:
    until = time.time() + 3600
    shares = (Share("web", "phone", until), Share("web", "laptop"), Share("wiki", "", until))
    control.add_service("web", "127.0.0.1:8080", 80)
    control.add_service("wiki", "127.0.0.1:8081", 80)
    with control.store.read() as conn:
        services = service_table.all_services(conn)
    told = {s["name"]: s for s in shared_services(control.cell(), services, shares)}
    assert told["web"]["devices"] == ["laptop", "phone"] and "until" not in told["web"]
    assert told["wiki"]["until"] == until and "devices" not in told["wiki"]


# -- dates end by a timer of their own -----------------------------------------------------------
def test_the_timer_ends_what_is_due_in_one_change(control: Control, kernel: FakeKernel) -> None:
    sync, _tell = _beta(control)
    soon = (dt.datetime.now() + dt.timedelta(hours=1)).isoformat(timespec="seconds")
    later = (dt.datetime.now() + dt.timedelta(hours=2)).isoformat(timespec="seconds")
    sync.share("beta", ["web"], device="phone", until=soon)
    sync.share("beta", ["wiki"], until=later)
    sync.set_exit_offer("beta", True, until=soon)
    with control.store.read() as conn:
        first = next_end(link_table.all_links(conn))
    assert first is not None and abs(first - parse_until(soon, now=0)) < 1
    clock = [time.time()]
    expiry = Expiry(control, lambda: None, clock=lambda: clock[0])
    assert expiry.run_once() == first  # nothing due yet: the next date
    assert expiry.expired == 0
    kernel.flows = [f"tcp 6 300 ESTABLISHED src=10.62.0.2 dst={_vip(control, 'web')} "
                    "sport=40000 dport=80"]  # fmt: skip
    clock[0] = first + 0.1
    assert expiry.run_once() == parse_until(later, now=0)
    assert expiry.expired == 2
    beta = sync.links.describe("beta")
    assert [(r["name"], r.get("device")) for r in beta["inbound"]] == [("wiki", None)]
    assert beta["exit_offered"] is False
    assert any(a[:2] == ("conntrack", "-D") for a in kernel.flows_cut)  # the flow stopped too
    events = [(e["event"], e["actor"]) for e in sync.links.journal_entries("beta")]
    assert sum(1 for e, actor in events if "expired" in e and actor == "timer") == 2


def test_a_share_again_takes_the_new_date(control: Control) -> None:
    sync, _tell = _beta(control)
    soon = (dt.datetime.now() + dt.timedelta(hours=1)).isoformat(timespec="seconds")
    sync.share("beta", ["web"], until=soon)
    sync.share("beta", ["web"])  # for good now
    [row] = sync.links.describe("beta")["inbound"]
    assert row["until"] is None
    with control.store.read() as conn:
        assert next_end(link_table.all_links(conn)) is None


def test_the_whole_list_is_one_change_with_its_fields_named(control: Control) -> None:
    sync, _tell = _beta(control)
    soon = (dt.datetime.now() + dt.timedelta(hours=1)).isoformat(timespec="seconds")
    sync.set_permissions("beta", [("web", "phone", soon), ("wiki", "", None)])
    rows = sync.links.describe("beta")["inbound"]
    assert [(r["name"], r.get("device"), bool(r["until"])) for r in rows] == [
        ("web", "phone", True), ("wiki", None, False)
    ]  # fmt: skip
    with pytest.raises(BadInput) as err:
        sync.set_permissions("beta", [("web", "", None), ("wiki", "", "2020-01-01T00:00")])
    assert err.value.field == "services[1].until"
    with pytest.raises(BadInput):
        sync.set_permissions("beta", [("web", "", None), ("web", "", None)])
    assert sync.links.describe("beta")["inbound"] == rows  # unchanged


# -- the serving side's answer for a device -------------------------------------------------------
def test_explain_answers_for_the_device_a_share_names(control: Control) -> None:
    sync, _tell = _beta(control)
    sync.share("beta", ["web"], device="phone")
    with control.store.read() as conn:
        link = link_table.get(conn, "beta")
        assert decide(conn, link, "web", "phone").allowed
        assert not decide(conn, link, "web", "laptop").allowed
        assert not decide(conn, link, "web").allowed  # the cell as a whole: not shared


def test_a_grant_covers_another_only_for_the_same_service() -> None:
    ip, net = ipaddress.IPv4Address, ipaddress.IPv4Network
    phone = Grant("tcp", net("10.62.0.2/32"), ip("10.61.0.254"), 80)
    assert phone.covered_by(Grant("tcp", net("10.62.0.0/24"), ip("10.61.0.254"), 80))
    assert not phone.covered_by(Grant("tcp", net("10.62.0.0/24"), ip("10.61.0.253"), 80))
    assert not phone.covered_by(Grant("udp", net("10.62.0.0/24"), ip("10.61.0.254"), 80))
    assert not phone.covered_by(Grant("tcp", net("10.63.0.0/24"), ip("10.61.0.254"), 80))
