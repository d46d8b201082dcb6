"""Devices upward from the cell, services downward from the top, a random default network."""

from __future__ import annotations

import ipaddress

import pytest

from picell.addressing import draw_network, next_peer_index, next_vip_index, vip_address
from picell.constants import CROWDED_RANGES, MESH_RANGE
from picell.errors import Conflict

CELL = ipaddress.IPv4Interface("10.61.0.1/24")


def test_devices_start_after_the_cell_and_fill_gaps() -> None:
    assert next_peer_index(CELL, [], []) == 2
    assert next_peer_index(CELL, [2, 3, 5], []) == 4


def test_cell_not_on_first_host_still_allocates_above_itself() -> None:
    cell = ipaddress.IPv4Interface("10.61.0.10/24")
    assert next_peer_index(cell, [], []) == 11


def test_services_take_the_top_downward() -> None:
    assert vip_address(CELL.network, next_vip_index(CELL, [], [])) == ipaddress.IPv4Address(
        "10.61.0.254"
    )
    assert next_vip_index(CELL, [], [1, 2]) == 3


def test_pools_meeting_is_a_conflict() -> None:
    small = ipaddress.IPv4Interface("10.61.0.1/29")  # hosts .1-.6
    with pytest.raises(Conflict):
        next_peer_index(small, [2, 3, 4], [1, 2])  # .5 and .6 are VIPs
    with pytest.raises(Conflict):
        next_vip_index(small, [2, 3, 4, 5], [1])


def test_drawn_network_avoids_host_routes_and_crowded_ranges() -> None:
    host = [ipaddress.IPv4Network("10.0.0.0/9")]  # half the pool is taken by the host
    for _ in range(200):
        net = draw_network(host)
        assert net.subnet_of(MESH_RANGE)
        assert net.prefixlen == 24
        assert not any(net.overlaps(r) for r in (*CROWDED_RANGES, *host))


def test_two_strangers_rarely_collide() -> None:
    drawn = {draw_network([]) for _ in range(50)}
    assert len(drawn) >= 49


def test_no_room_is_a_conflict() -> None:
    with pytest.raises(Conflict):
        draw_network([MESH_RANGE], tries=50)
