"""The daemon's first start: a cell that does not exist yet is initialised with defaults."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from picell.app import Daemon
from picell.constants import CROWDED_RANGES, DEFAULT_INTERFACE, MESH_RANGE


def test_first_start_initialises_a_cell_with_defaults(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "data")
    try:
        daemon.ensure_cell()
        cell = daemon.control.cell()
        assert cell.domain == f"{cell.name}.internal"
        assert cell.interface == DEFAULT_INTERFACE
        assert cell.network.prefixlen == 24 and cell.network.subnet_of(MESH_RANGE)
        assert not any(cell.network.overlaps(r) for r in CROWDED_RANGES)
        assert cell.ip == cell.network[1]
        assert cell.endpoint.endswith(":51820")
        ipaddress.ip_address(cell.endpoint.rsplit(":", 1)[0])
        daemon.ensure_cell()  # a second start keeps the cell as it is
        assert daemon.control.cell() == cell
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    finally:
        daemon.store.close()
