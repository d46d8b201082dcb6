"""The admin API over a fake kernel: 4xx naming the field, 409 on conflicts, no half-apply."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from picell.app import build_api
from picell.control import Control
from picell.wireguard import keys
from tests.unit.fakes import FakeKernel


@pytest.fixture
def client(control: Control) -> TestClient:
    return TestClient(build_api(control))


def error(resp: object, status: int) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    body: dict[str, str] = resp.json()
    assert set(body) == {"code", "message", "field"}
    return body


def test_add_device_gives_a_config(client: TestClient, kernel: FakeKernel) -> None:
    resp = client.post("/api/peers", json={"name": "phone"})
    assert resp.status_code == 201
    data = resp.json()
    assert data["address"] == "10.61.0.2"
    assert "PrivateKey = " in data["config"] and "DNS = 10.61.0.1" in data["config"]
    assert data["public_key"] in kernel.wg["pctest0"]["peers"]  # type: ignore[operator]


def test_device_with_its_own_key_never_gets_a_private_key(client: TestClient) -> None:
    public = keys.public_from_private(keys.generate_private())
    data = client.post("/api/peers", json={"name": "laptop", "public_key": public}).json()
    assert data["own_key"] is True
    assert "\nPrivateKey" not in data["config"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "Bad Name"}, "name"),
        ({}, "name"),
        ({"name": 5}, "name"),
        ({"name": "ok", "public_key": "nope"}, "public_key"),
    ],
)
def test_bad_device_input_names_the_field(
    client: TestClient, body: dict[str, object], field: str
) -> None:
    assert error(client.post("/api/peers", json=body), 422)["field"] == field


def test_duplicates_are_conflicts(client: TestClient) -> None:
    client.post("/api/peers", json={"name": "phone"})
    assert "phone" in error(client.post("/api/peers", json={"name": "phone"}), 409)["message"]
    body = {"name": "phone", "backend": "127.0.0.1:80"}
    assert error(client.post("/api/services", json=body), 409)["field"] == "name"
    assert error(client.post("/api/peers", json={"name": "alpha"}), 409)["field"] == "name"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "web", "backend": "localhost:80"}, "backend"),
        ({"name": "web", "backend": "127.0.0.1:80", "port": 0}, "port"),
        ({"name": "web", "backend": "127.0.0.1:80", "protocol": "sctp"}, "protocol"),
        ({"name": "web", "backend": "10.61.0.7:80"}, "backend"),
    ],
)
def test_bad_service_input_names_the_field(
    client: TestClient, body: dict[str, object], field: str
) -> None:
    assert error(client.post("/api/services", json=body), 422)["field"] == field


def test_service_gets_the_top_address(client: TestClient) -> None:
    data = client.post(
        "/api/services", json={"name": "web", "backend": "127.0.0.1:8080", "port": 80}
    ).json()
    assert data == {
        "name": "web",
        "fqdn": "web.alpha.test",
        "vip": "10.61.0.254",
        "port": 80,
        "protocol": "tcp",
        "backend": "127.0.0.1:8080",
    }


def test_unknown_things_are_404(client: TestClient) -> None:
    assert error(client.delete("/api/peers/ghost"), 404)["field"] == "name"
    assert error(client.get("/api/peers/ghost/config"), 404)["field"] == "name"
    assert error(client.delete("/api/services/ghost"), 404)["field"] == "name"


def test_failed_apply_commits_nothing(client: TestClient, kernel: FakeKernel) -> None:
    client.post("/api/peers", json={"name": "phone"})
    before = dict(kernel.wg["pctest0"]["peers"])  # type: ignore[call-overload]
    kernel.fail_on = "wg"  # wg syncconf refuses
    body = error(client.post("/api/peers", json={"name": "tablet"}), 409)
    assert body["code"] == "apply_failed"
    kernel.fail_on = None
    assert [p["name"] for p in client.get("/api/peers").json()] == ["phone"]
    assert set(kernel.wg["pctest0"]["peers"]) == set(before)  # type: ignore[call-overload]
    # the address it would have taken is still free
    assert client.post("/api/peers", json={"name": "tablet"}).json()["address"] == "10.61.0.3"


def test_config_downloads(client: TestClient) -> None:
    client.post("/api/peers", json={"name": "phone"})
    conf = client.get("/api/peers/phone/config")
    assert conf.headers["content-disposition"] == 'attachment; filename="phone.conf"'
    svg = client.get("/api/peers/phone/config", params={"format": "svg"})
    assert svg.headers["content-type"].startswith("image/svg+xml") and "<svg" in svg.text
    png = client.get("/api/peers/phone/config", params={"format": "png"})
    assert png.content.startswith(b"\x89PNG")
    assert (
        error(client.get("/api/peers/phone/config", params={"format": "gif"}), 422)["field"]
        == "format"
    )


def test_removed_device_leaves_wireguard(client: TestClient, kernel: FakeKernel) -> None:
    key = client.post("/api/peers", json={"name": "phone"}).json()["public_key"]
    assert client.delete("/api/peers/phone").status_code == 204
    assert key not in kernel.wg["pctest0"]["peers"]  # type: ignore[operator]


def test_status_and_reconcile(client: TestClient) -> None:
    assert client.get("/api/status").json()["name"] == "alpha"
    client.post("/api/reconcile")
    again = client.post("/api/reconcile").json()
    assert again["changed"] is False and again["write_commands"] == 0
