"""Invites through the admin API and the CLI: made by a POST only (JSON, string and QR in one
answer), listed without creating anything, revoked so that a redemption is refused."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from picell.app import build_api
from picell.cli import base as cli_base
from picell.cli.commands import app as cli_app
from picell.control import Control
from picell.errors import Forbidden
from picell.mesh.crypto import mac, pairing_key
from picell.mesh.invite import parse_invite
from picell.mesh.links import Links
from picell.wireguard import keys


@pytest.fixture
def client(control: Control) -> TestClient:
    return TestClient(build_api(control))


def count_invites(control: Control) -> int:
    with control.store.read() as conn:
        return int(conn.execute("SELECT count(*) FROM invites").fetchone()[0])


def redemption(token: str, name: str = "beta", subnet: str = "10.62.0") -> dict[str, Any]:
    identity = {"version": 1, "cell_name": name, "domain": f"{name}.test",
                "public_key": keys.public_from_private(keys.generate_private()),
                "endpoint": "198.51.100.2:51820", "vpn_subnet": f"{subnet}.0/24",
                "dns_ip": f"{subnet}.1", "mesh_port": 3000}  # fmt: skip
    request = {"identity": identity, "nonce": secrets.token_hex(16)}
    return {**request, "mac": mac(pairing_key(token), request)}


def test_one_post_answers_with_json_string_and_qr(client: TestClient, control: Control) -> None:
    resp = client.post("/api/cells/invites", json={"expires_s": 3600})
    assert resp.status_code == 201, resp.text
    data = resp.json()
    assert set(data) == {"id", "expires_at", "invite", "string", "svg"}
    # the string and the JSON are the same invite, and the SVG is a standalone image
    assert parse_invite(data["string"]) == parse_invite(json.dumps(data["invite"]))
    assert data["invite"]["cell_name"] == "alpha" and data["invite"]["pairing"]["token"]
    assert data["svg"].startswith("<svg") and 'xmlns="http://www.w3.org/2000/svg"' in data["svg"]
    assert data["expires_at"] == data["invite"]["pairing"]["expires_at"]
    assert count_invites(control) == 1


def test_no_get_makes_an_invite(client: TestClient, control: Control) -> None:
    assert client.get("/api/cells/invite").status_code in (404, 405)
    for _ in range(3):
        assert client.get("/api/cells/invites").json() == []
    assert count_invites(control) == 0
    made = client.post("/api/cells/invites", json={}).json()
    listed = client.get("/api/cells/invites").json()
    assert [(r["id"], r["state"], r["used_by"]) for r in listed] == [(made["id"], "open", None)]
    assert listed[0]["expires_at"] == made["expires_at"]
    assert count_invites(control) == 1


@pytest.mark.parametrize(
    "body",
    [{"expires_s": 10}, {"expires_s": "3600"}, {"expires_s": 1e9}, {"expires": 3600}],
)
def test_bad_lifetimes_are_refused_naming_the_field(client: TestClient, body: object) -> None:
    resp = client.post("/api/cells/invites", json=body)
    assert resp.status_code == 422
    assert resp.json()["field"] in ("expires_s", "expires")


def test_a_revoked_invite_cannot_be_redeemed(client: TestClient, control: Control) -> None:
    made = client.post("/api/cells/invites", json={}).json()
    token = made["invite"]["pairing"]["token"]
    assert client.delete(f"/api/cells/invites/{made['id']}").status_code == 204
    assert client.get("/api/cells/invites").json() == []
    with pytest.raises(Forbidden):
        Links(control).accept(redemption(token))
    assert client.get("/api/cells").json() == []
    assert client.delete(f"/api/cells/invites/{made['id']}").json()["field"] == "id"


def test_a_used_invite_is_listed_with_its_user_and_kept(
    client: TestClient, control: Control
) -> None:
    made = client.post("/api/cells/invites", json={}).json()
    other = client.post("/api/cells/invites", json={}).json()
    Links(control).accept(redemption(made["invite"]["pairing"]["token"]))
    rows = {r["id"]: r for r in client.get("/api/cells/invites").json()}
    assert rows[made["id"]]["state"] == "used" and rows[made["id"]]["used_by"] == "beta"
    assert rows[other["id"]]["state"] == "open"
    resp = client.delete(f"/api/cells/invites/{made['id']}")
    assert resp.status_code == 409 and "beta" in resp.json()["message"]
    assert made["id"] in {r["id"] for r in client.get("/api/cells/invites").json()}


@pytest.mark.parametrize("path", ["/api/cells/invites/0", "/api/cells/invites/abc"])
def test_bad_invite_ids_are_422(client: TestClient, path: str) -> None:
    assert client.delete(path).status_code == 422


# -- the CLI, against the same API in process --------------------------------------------------
@pytest.fixture
def cli(control: Control, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    api = build_api(control)
    monkeypatch.setattr(cli_base, "admin_client", lambda: TestClient(api, base_url="http://picell"))
    yield CliRunner()


def run(cli: CliRunner, *args: str, stdin: str | None = None) -> Any:
    result = cli.invoke(cli_app, [*args, "--json"], input=stdin)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_invite_invites_and_revoke(cli: CliRunner, control: Control) -> None:
    made = run(cli, "invite", "--expires", "2h")
    assert made["string"].startswith("picell-invite:") and "<svg" in made["svg"]
    listed = run(cli, "invites")
    assert [r["id"] for r in listed] == [made["id"]] and listed[0]["state"] == "open"
    assert run(cli, "invites", "revoke", str(made["id"])) == {"revoked": made["id"]}
    assert run(cli, "invites") == []
    refused = cli.invoke(cli_app, ["invites", "revoke", str(made["id"]), "--json"])
    assert refused.exit_code == 1 and json.loads(refused.stdout)["field"] == "id"
    assert cli.invoke(cli_app, ["invites", "drop", "1"]).exit_code == 2
    human = cli.invoke(cli_app, ["invite"])
    assert human.exit_code == 0 and "picell invites revoke" in human.stdout


@pytest.mark.parametrize("how", ["@file", "-"])
def test_cli_connect_passes_the_invite_text_unchanged(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str
) -> None:
    seen: list[tuple[str, bool]] = []

    def connect(
        self: Links, text: str, trust_domain: bool = False, via: str | None = None
    ) -> dict[str, Any]:
        seen.append((text, trust_domain))
        raise Forbidden("invite: refused in this test", field="invite")

    monkeypatch.setattr(Links, "connect", connect)
    text = '{"invite": {"cell_name": "beta"},\n "string": "picell-invite:xyz"}\n'
    file = tmp_path / "invite.json"
    file.write_text(text)
    arg = f"@{file}" if how == "@file" else "-"
    result = cli.invoke(cli_app, ["connect", arg, "--trust-domain", "--json"], input=text)
    assert result.exit_code == 1 and json.loads(result.stdout)["field"] == "invite"
    assert seen == [(text, True)]
