"""Fixtures of the unit tests: a fake kernel wired into the reconciler, a fresh store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from picell import reconcile
from picell.cellinit import InitRequest
from picell.control import Control
from picell.mesh import client
from picell.mesh.client import MeshClient
from picell.paths import Paths
from picell.reconcile import Reconciler
from picell.store.db import Store
from tests.unit.fakes import FakeChild, FakeKernel


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests never send a packet: the mesh client's default transport refuses to connect
    (a test that wants an answer installs its own `httpx.MockTransport`)."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("unit tests reach no network", request=request)

    monkeypatch.setattr(client, "default", MeshClient(httpx.MockTransport(refuse)))


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    k = FakeKernel()
    sysctls: dict[str, str] = {}

    def fake_sysctl(key: str, value: str) -> bool:
        changed = sysctls.get(key) != value
        sysctls[key] = value
        return changed

    def fake_start(ifname: str, make_child: Any) -> Any:
        k.create_interface(ifname)
        child = make_child("wireguard-go", ["wireguard-go", "-f", ifname])
        child.start()
        return child

    monkeypatch.setattr(reconcile, "interface_exists", lambda name: name in k.interfaces)
    monkeypatch.setattr(reconcile, "start_userspace", fake_start)
    monkeypatch.setattr(reconcile, "write_sysctl", fake_sysctl)
    return k


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths(tmp_path)
    p.run_dir.mkdir()
    p.unbound_dir.mkdir()
    return p


@pytest.fixture
def reconciler(kernel: FakeKernel, paths: Paths) -> Reconciler:
    children: dict[str, FakeChild] = {}

    def make_child(name: str, argv: list[str]) -> Any:
        children[name] = FakeChild(name, argv)
        return children[name]

    return Reconciler(kernel, paths, make_child)


@pytest.fixture
def store(paths: Paths) -> Iterator[Store]:
    s = Store(paths.db)
    yield s
    s.close()


@pytest.fixture
def control(store: Store, kernel: FakeKernel, reconciler: Reconciler) -> Control:
    ctl = Control(store, kernel, reconciler)
    ctl.init_cell(
        InitRequest(
            name="alpha",
            domain="alpha.test",
            address="10.61.0.1/24",
            endpoint="198.51.100.1:51820",
            interface="pctest0",
        )
    )
    return ctl
