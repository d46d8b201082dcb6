"""The web UI's pages over a fake kernel: forms call the same operations as the API, refusals
stand next to the field they name and change nothing."""

from __future__ import annotations

import json
import re
import time

import pytest
from fastapi.testclient import TestClient

from picell.api.auth import Auth
from picell.app import build_web_api
from picell.control import Control
from picell.wireguard import keys

PASSWORD = "a long enough password"


@pytest.fixture
def client(control: Control) -> TestClient:
    auth = Auth(control.store)
    auth.set_password(PASSWORD)
    c = TestClient(build_web_api(control, auth=auth), base_url="http://localhost:8080")
    token = re.search(r'name="login_token" value="([^"]+)"', c.get("/login").text)
    assert token
    assert c.post("/login", data={"password": PASSWORD, "login_token": token.group(1)}).is_success
    return c


def csrf(client: TestClient) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/devices").text)
    assert found
    return found.group(1)


def post(client: TestClient, path: str, **data: str | list[str]) -> object:
    return client.post(path, data={"csrf_token": csrf(client), **data})


def field_error(html: str, field: str) -> str | None:
    found = re.search(rf'id="{field}-error">([^<]*)<', html)
    return found.group(1) if found else None


def test_add_a_device_then_its_page_has_the_qr_and_download(
    client: TestClient, control: Control
) -> None:
    resp = post(client, "/devices", name="phone")
    assert resp.url.path == "/devices/phone"  # type: ignore[attr-defined]
    html = resp.text  # type: ignore[attr-defined]
    assert 'src="/api/peers/phone/config?format=svg"' in html
    assert 'href="/api/peers/phone/config?format=conf"' in html
    assert "Added phone" in html
    svg = client.get("/api/peers/phone/config?format=svg")
    assert svg.status_code == 200 and 'xmlns="http://www.w3.org/2000/svg"' in svg.text
    conf = client.get("/api/peers/phone/config?format=conf")
    assert conf.text == control.peer_config("phone")
    listing = client.get("/devices").text
    assert "10.61.0.2" in listing and "never" in listing


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"name": "Bad Name"}, "name", "not a valid name"),
        ({"name": "alpha"}, "name", "the cell&#39;s own name"),
        ({"name": "laptop", "public_key": "nope"}, "public_key", "key"),
    ],
)
def test_device_refusals_stand_next_to_the_field(
    client: TestClient, control: Control, data: dict[str, str], field: str, words: str
) -> None:
    resp = post(client, "/devices", **data)
    assert 400 <= resp.status_code < 500  # type: ignore[attr-defined]
    message = field_error(resp.text, field)  # type: ignore[attr-defined]
    assert message and words in message, resp.text  # type: ignore[attr-defined]
    assert control.list_peers() == []


def test_remove_a_device(client: TestClient, control: Control) -> None:
    post(client, "/devices", name="phone")
    resp = post(client, "/devices/phone/remove")
    assert resp.url.path == "/devices" and "Removed phone" in resp.text  # type: ignore[attr-defined]
    assert control.list_peers() == []


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "web", "backend": "localhost:80"}, "backend"),
        ({"name": "web", "backend": "127.0.0.1:80", "port": "99999"}, "port"),
        ({"name": "web", "backend": "127.0.0.1:80", "port": "eighty"}, "port"),
        ({"name": "web", "backend": "127.0.0.1:80", "protocol": "sctp"}, "protocol"),
        ({"name": "-", "backend": "127.0.0.1:80"}, "name"),
    ],
)
def test_service_refusals_keep_the_form_and_change_nothing(
    client: TestClient, control: Control, data: dict[str, str], field: str
) -> None:
    resp = post(client, "/services", **data)
    assert resp.status_code == 422  # type: ignore[attr-defined]
    assert field_error(resp.text, field), resp.text  # type: ignore[attr-defined]
    assert f'value="{data["backend"]}"' in resp.text  # type: ignore[attr-defined]
    assert control.list_services() == []


def test_add_and_remove_a_service(client: TestClient, control: Control) -> None:
    resp = post(client, "/services", name="web", backend="127.0.0.1:8080", port="80")
    html = resp.text  # type: ignore[attr-defined]
    assert "web.alpha.test" in html and "10.61.0.254:80/tcp" in html
    resp = post(client, "/services/web/remove")
    assert "Removed service web" in resp.text  # type: ignore[attr-defined]
    assert control.list_services() == []


def test_invite_is_shown_as_string_json_and_qr(client: TestClient) -> None:
    html = post(client, "/cells/invite").text  # type: ignore[attr-defined]
    string = re.search(r'id="invite-string" readonly rows="4">([^<]+)<', html)
    assert string and string.group(1).startswith("picell-invite:")
    assert 'data-copy="invite-string"' in html
    assert "<svg" in html and "&#34;pairing&#34;" in html
    # the page's invite is the one stored; loading the page again makes none
    listed = client.get("/api/cells/invites").json()
    assert [r["state"] for r in listed] == ["open"]
    client.get("/cells")
    assert len(client.get("/api/cells/invites").json()) == 1


def test_an_open_invite_is_revoked_from_the_page(client: TestClient) -> None:
    post(client, "/cells/invite")
    made = client.get("/api/cells/invites").json()[0]
    page = client.get("/cells").text
    assert f'action="/cells/invites/{made["id"]}/revoke"' in page
    resp = post(client, f"/cells/invites/{made['id']}/revoke")
    assert f"Revoked invite {made['id']}" in resp.text  # type: ignore[attr-defined]
    assert client.get("/api/cells/invites").json() == []
    assert 'id="open-invites"' not in client.get("/cells").text
    again = post(client, f"/cells/invites/{made['id']}/revoke")
    assert again.status_code == 404  # type: ignore[attr-defined]
    assert post(client, "/cells/invites/x1/revoke").status_code == 422  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("invite", "words"),
    [("", "paste the other cell"), ("not an invite", "invite"), ("picell-invite:@@@", "damaged")],
)
def test_connect_refusals_stand_next_to_the_invite(
    client: TestClient, invite: str, words: str
) -> None:
    resp = post(client, "/cells/connect", invite=invite)
    assert resp.status_code == 422  # type: ignore[attr-defined]
    message = field_error(resp.text, "invite")  # type: ignore[attr-defined]
    assert message and words in message.lower()


def test_a_public_domain_needs_the_owners_word_on_the_page(client: TestClient) -> None:
    """A cell calling itself mybank.com is refused next to the invite; ticking the box is the
    owner's word, and the link waits for the other cell (its pairing port cannot be reached)."""
    key = keys.public_from_private(keys.generate_private())
    ident = {"cell_name": "bank", "domain": "mybank.com", "public_key": key,
             "endpoint": "198.51.100.9:51820", "vpn_subnet": "10.77.0.0/24",
             "dns_ip": "10.77.0.1", "mesh_port": 3000,
             "pairing": {"port": 51821, "token": "t" * 32,
                         "expires_at": time.time() + 600}}  # fmt: skip
    resp = post(client, "/cells/connect", invite=json.dumps(ident))
    assert resp.status_code == 422  # type: ignore[attr-defined]
    message = field_error(resp.text, "invite")  # type: ignore[attr-defined]
    assert message and "--trust-domain" in message
    assert client.get("/api/cells").json() == []
    resp = post(client, "/cells/connect", invite=json.dumps(ident), trust_domain="on")
    assert "Saved bank: waiting" in resp.text  # type: ignore[attr-defined]
    [bank] = client.get("/api/cells").json()
    assert bank["domain"] == "mybank.com" and bank["state"] == "waiting"


def test_our_own_invite_is_refused_with_words(client: TestClient) -> None:
    made = client.post("/api/cells/invites", json={}, headers={"X-CSRF-Token": csrf(client)})
    assert made.status_code == 201
    own = made.json()["string"]
    resp = post(client, "/cells/connect", invite=own)
    assert resp.status_code == 409  # type: ignore[attr-defined]
    assert field_error(resp.text, "invite") == "That is this cell&#39;s own invite"  # type: ignore[attr-defined]


def test_per_cell_forms_name_unknown_cells(client: TestClient) -> None:
    for path, data in (
        ("/cells/nope/sharing", {"services": ["web"]}),
        ("/cells/nope/exit-offer", {"offered": "1"}),
        ("/cells/nope/relay-offer", {"offered": "1"}),
        ("/cells/nope/disconnect", {}),
    ):
        resp = post(client, path, **data)
        assert resp.status_code == 404, (path, resp.status_code)  # type: ignore[attr-defined]
        assert "nope" in (re.search(r'id="form-error">([^<]*)<', resp.text) or [""])[0]  # type: ignore[attr-defined]


def test_pages_render(client: TestClient) -> None:
    for path in ("/cells", "/devices", "/services"):
        resp = client.get(path)
        assert resp.status_code == 200
        assert 'name="csrf_token"' in resp.text
        assert 'name="viewport"' in resp.text


def test_internet_exit_choice_names_the_field(client: TestClient, control: Control) -> None:
    post(client, "/devices", name="phone")
    html = client.get("/devices").text
    assert 'id="via_cell-phone"' in html and "This cell (alpha)" in html
    resp = post(client, "/devices/phone/route-via", via_cell="nope")
    assert resp.status_code == 404  # type: ignore[attr-defined]
    assert "nope" in (field_error(resp.text, "via_cell-phone") or "")  # type: ignore[attr-defined]
    assert control.list_peers()[0]["route_via"] is None
    resp = post(client, "/devices/phone/route-via", via_cell="")
    assert resp.url.path == "/devices/phone"  # type: ignore[attr-defined]
    assert "this cell&#39;s own uplink" in resp.text  # type: ignore[attr-defined]


def test_exit_choice_marks_offers_and_warns_when_one_is_withdrawn(
    client: TestClient, control: Control
) -> None:
    from picell.mesh.sync import Sync
    from tests.unit.test_exits import RELAY_END
    from tests.unit.test_mesh import _linked_pair, _state_from_beta

    links, beta_private, _ = _linked_pair(control)
    sync = Sync(links)
    post(client, "/devices", name="phone")
    assert "beta (does not offer its exit)" in client.get("/devices").text
    resp = post(client, "/devices/phone/route-via", via_cell="beta")
    assert resp.status_code == 409  # type: ignore[attr-defined]
    assert "does not offer" in (field_error(resp.text, "via_cell-phone") or "")  # type: ignore[attr-defined]

    sync.receive_state(_state_from_beta(control, beta_private, 1, exit_offered=True,
                                        exit_relay=RELAY_END), "10.62.0.1")  # fmt: skip
    assert "beta ✓ offers its exit" in client.get("/devices").text
    html = post(client, "/devices/phone/route-via", via_cell="beta").text  # type: ignore[attr-defined]
    assert 'id="full-tunnel"' in html and "full-tunnel config" in html
    full = client.get("/api/peers/phone/config?format=text").text
    assert "AllowedIPs = 0.0.0.0/0" in full

    sync.receive_state(_state_from_beta(control, beta_private, 2, exit_offered=False),
                       "10.62.0.1")  # fmt: skip
    assert 'id="exit-warning-phone"' in client.get("/devices").text


def test_the_endpoint_is_shown_changed_and_refused_on_the_cell_network_page(
    client: TestClient, control: Control
) -> None:
    page = client.get("/cells").text
    assert 'id="our-endpoints">198.51.100.1:51820<' in page
    assert "every device must import its config again" in client.get("/devices").text
    resp = post(client, "/cells/endpoint", endpoints="198.51.100.1:51820 192.168.1.9:x")
    assert resp.status_code == 422  # type: ignore[attr-defined]
    assert field_error(resp.text, "endpoints"), resp.text  # type: ignore[attr-defined]
    assert control.cell().endpoints == ("198.51.100.1:51820",)  # nothing half-applied
    resp = post(client, "/cells/endpoint", endpoints="home.example.test:51820 192.168.1.9:51820")
    html = resp.text  # type: ignore[attr-defined]
    assert 'id="our-endpoints">home.example.test:51820, 192.168.1.9:51820<' in html
    assert "192.168.1.9:51820 is a private address" in html
    assert "device-endpoint-note" not in client.get("/devices").text  # a name: no re-import


def test_the_relay_offer_and_the_path_are_shown_and_controlled(
    client: TestClient, control: Control
) -> None:
    from picell.mesh.links import Links
    from tests.unit.test_mesh import identity, keypair, redeem

    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    links.accept(
        redeem(inv.pairing.token, identity("beta", "10.62.0.0/24", "beta.test", keypair()[1]))
    )
    html = client.get("/cells").text
    assert 'id="path-beta">direct' in html and "We do not relay for beta" in html
    assert 'id="via"' not in html  # nobody offers us a relay: no choice to make
    resp = post(client, "/cells/beta/relay-offer", offered="1")
    assert "Offering to relay for beta" in resp.text  # type: ignore[attr-defined]
    assert control.store and links.describe("beta")["relay_offered"] is True
    resp = post(client, "/cells/beta/relay-offer", offered="0")
    assert links.describe("beta")["relay_offered"] is False


def test_a_translated_link_says_where_each_side_presents_the_other(
    client: TestClient, control: Control
) -> None:
    from picell.mesh.links import Links
    from tests.unit.test_mesh import identity, keypair, redeem

    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    ident = identity("beta", "10.61.0.0/24", "beta.test", keypair()[1])  # our own network
    links.accept(redeem(inv.pairing.token, ident, mapped="10.201.9.0/24"))
    mapped = links.describe("beta")["mapped_subnet"]
    html = client.get("/cells").text
    assert (f"beta's network 10.61.0.0/24 is presented here at {mapped}; beta presents ours at "
            "10.201.9.0/24") in html  # fmt: skip


def test_connecting_through_a_cell_that_offers_no_relay_names_it(client: TestClient) -> None:
    key = keys.public_from_private(keys.generate_private())
    ident = {"cell_name": "gamma", "domain": "gamma.test", "public_key": key,
             "endpoint": "198.51.100.9:51820", "vpn_subnet": "10.77.0.0/24",
             "dns_ip": "10.77.0.1", "mesh_port": 3000,
             "pairing": {"port": 51821, "token": "t" * 32,
                         "expires_at": time.time() + 600}}  # fmt: skip
    resp = post(client, "/cells/connect", invite=json.dumps(ident), via="beta")
    assert resp.status_code in (404, 409)  # type: ignore[attr-defined]
    assert "beta" in (field_error(resp.text, "via") or "")  # type: ignore[attr-defined]
    assert client.get("/api/cells").json() == []


def test_a_device_share_is_made_shown_and_ended_from_the_page(
    client: TestClient, control: Control, kernel: object
) -> None:
    from tests.unit.test_shares import DEVICES, _beta

    sync, _tell = _beta(control, devices=None)
    html = client.get("/cells").text
    assert "beta publishes no devices." in html and 'id="device-share-beta"' not in html
    resp = post(client, "/cells/beta/publish-devices", published="1")
    assert "Publishing our devices to beta" in resp.text  # type: ignore[attr-defined]
    assert sync.links.describe("beta")["publish_devices"] is True
    _tell(devices=DEVICES)
    html = client.get("/cells").text
    assert 'id="device-share-beta"' in html and "phone (10.62.0.2)" in html
    resp = post(client, "/cells/beta/device-share", service="web", device="phone",
                until="2020-01-01T00:00")  # fmt: skip
    assert resp.status_code == 422  # type: ignore[attr-defined]
    assert "in the past" in (field_error(resp.text, "until-beta") or "")  # type: ignore[attr-defined]
    assert sync.links.describe("beta")["inbound"] == []
    resp = post(client, "/cells/beta/device-share", service="web", device="phone",
                until="2099-12-24T18:00")  # fmt: skip
    assert "phone until 2099-12-24T18:00" in resp.text  # type: ignore[attr-defined]
    [row] = sync.links.describe("beta")["inbound"]
    assert (row["name"], row["device"]) == ("web", "phone") and row["until"].startswith("2099")
    html = client.get("/cells").text
    assert "web with phone until 2099-12-24T18:00:00" in html
    # the whole network's toggles leave the device share alone
    post(client, "/cells/beta/sharing", services=["wiki"])
    names = [(r["name"], r.get("device")) for r in sync.links.describe("beta")["inbound"]]
    assert names == [("web", "phone"), ("wiki", None)]
    post(client, "/cells/beta/unshare", service="web", device="phone")
    assert [r["name"] for r in sync.links.describe("beta")["inbound"]] == ["wiki"]
