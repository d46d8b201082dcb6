"""The web UI in a real browser (Debian's chromium driven by Playwright) against real cells:
login and its refusals, linking two cells by pasting one's invite into the other's page,
sharing a service and seeing it on the other cell's page, a device's QR code and config, the
CSRF refusals, disconnecting, and the slowed-down failed logins. Screenshots of every page go
to docs/screenshots/.

Topology (module scope):

      ┌──────────── switch ns: br-inet 198.51.100.0/24 ────────────┐
      │                                                            │
  alpha ns .1                                                  beta ns .2
  picell alpha 10.61.0.1/24 alpha.test                         picell beta 10.62.0.1/24
  web UI 127.0.0.1:8181 (--web-port, --admin-password-file)    web UI 127.0.0.1:8080 (default;
  chromium + Playwright in alpha ns                            password printed once in its log)
                                                               chromium + Playwright in beta ns

Each browser runs inside its cell's namespace, since the web UI listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.netns.browser import REPO, Browser
from tests.netns.cells import PICELL, Cell
from tests.netns.harness import Topology, wait_until

SHOTS = REPO / "docs" / "screenshots"
ALPHA_PASSWORD = "alpha owner's long password"
WAIT_MS = 30_000


@dataclass
class World:
    topo: Topology
    alpha: Cell
    beta: Cell
    beta_password: str

    def browser(self, cell: Cell, name: str | None = None, phone: bool = False) -> Browser:
        port = 8181 if cell is self.alpha else 8080
        return Browser(cell.ns, f"http://127.0.0.1:{port}", name or cell.name, phone=phone)


def _cell(topo: Topology, bridge: Any, role: str, number: int, *init_args: str) -> Cell:
    ns = topo.add_ns(role)
    topo.attach(ns, bridge, f"198.51.100.{number}/24")
    cell = Cell(topo, ns, role, f"{role}.test", f"10.{60 + number}.0.1/24",
                f"198.51.100.{number}:51820")  # fmt: skip
    cell.init()
    if init_args:
        cell.run("init", *init_args)  # settings change while the daemon is stopped
    cell.start()
    return cell


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with Topology() as topo:
        inet = topo.bridge("inet")
        secret = topo.workdir / "alpha-password"
        secret.write_text(ALPHA_PASSWORD + "\n")
        secret.chmod(0o600)
        alpha = _cell(topo, inet, "alpha", 1, "--web-port", "8181",
                      "--admin-password-file", str(secret))  # fmt: skip
        beta = _cell(topo, inet, "beta", 2)
        assert "shown only this once" not in alpha.log()
        found = re.search(r"shown only this once: (\S+)", beta.log())
        assert found, f"beta printed no password:\n{beta.log()}"
        yield World(topo, alpha, beta, found.group(1))


# -- browser steps: run inside a cell's namespace by tests.netns.browser ----------------------
def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _flash(page: Any, text: str) -> None:
    from playwright.sync_api import expect

    expect(page.locator(".flash")).to_contain_text(text, timeout=WAIT_MS)


def step_login(
    page: Any, password: str, wrong: str | None = None, shot: str = ""
) -> dict[str, Any]:
    from playwright.sync_api import expect

    page.goto("/devices")
    expect(page).to_have_url(re.compile(r"/login$"))  # nothing is served without login
    if shot:
        _shot(page, shot)
    if wrong is not None:
        page.fill("#password", wrong)
        page.click("button[type=submit]")
        expect(page.locator("#password-error")).to_have_text("Wrong password")
        expect(page).to_have_url(re.compile(r"/login$"))
        if shot:
            _shot(page, f"{shot}-refused")
    page.fill("#password", password)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Cell Network")
    cookie = next(c for c in page.context.cookies() if c["name"] == "picell_session")
    return {"httpOnly": cookie["httpOnly"], "sameSite": cookie["sameSite"]}


def step_invite(page: Any) -> str:
    from playwright.sync_api import expect

    page.goto("/cells")
    page.click("#make-invite")
    expect(page.locator("#invite-qr svg")).to_be_visible()
    expect(page.locator("#invite-json")).to_be_attached()
    page.click("#copy-invite")  # one click copies the string
    expect(page.locator("#copy-invite")).to_have_text("Copied")
    copied: str = page.evaluate("navigator.clipboard.readText()")
    assert copied == page.input_value("#invite-string")
    page.click("#invite-section summary")  # show the JSON too
    _shot(page, "cells-invite")
    return copied


def step_connect(page: Any, invite: str, bad_invite: str) -> str:
    from playwright.sync_api import expect

    page.goto("/cells")
    page.fill("#invite", bad_invite)  # refused: the message stands next to the field
    page.click("#connect")
    expect(page.locator("#invite-error")).to_be_visible()
    error: str = page.inner_text("#invite-error")
    page.fill("#invite", invite)
    page.click("#connect")
    _flash(page, "Linked with alpha")
    expect(page.locator("#status-alpha .dot.green")).to_be_visible(timeout=WAIT_MS)
    return error


def step_add_service_and_share(page: Any) -> dict[str, Any]:
    from playwright.sync_api import expect

    page.goto("/services")
    page.fill("#name", "web")
    page.fill("#backend", "localhost:80")
    page.fill("#port", "80")
    page.click("#add-service button[type=submit]")
    expect(page.locator("#backend-error")).to_be_visible()
    backend_error = page.inner_text("#backend-error")
    refused_count = page.locator("article.service").count()
    assert page.input_value("#name") == "web"  # what was typed stays for the correction
    page.fill("#backend", "127.0.0.1:8081")
    page.click("#add-service button[type=submit]")
    _flash(page, "Added service web")
    expect(page.locator("#service-web")).to_contain_text("web.alpha.test")
    page.goto("/cells")
    page.check("#share-beta input[value=web]")
    page.click("#share-beta button[type=submit]")
    _flash(page, "Sharing with beta: web")
    page.click("#exit-beta button[type=submit]")
    _flash(page, "Offering our internet exit to beta")
    page.click("#cell-beta details.journal summary")
    expect(page.locator("#cell-beta details.journal")).to_contain_text("shared web")
    _shot(page, "cells")
    page.goto("/services")
    expect(page.locator("#service-web")).to_contain_text("beta")  # shared with
    _shot(page, "services")
    return {"backend_error": backend_error, "refused_count": refused_count}


def step_see_theirs(page: Any) -> str:
    from playwright.sync_api import expect

    page.goto("/cells")
    # the page refreshes its live parts by itself: no reload needed
    expect(page.locator("#theirs-alpha")).to_contain_text("web.alpha.test", timeout=WAIT_MS)
    expect(page.locator("#their-exit-alpha")).to_contain_text("offers us its internet exit")
    _shot(page, "cells-beta")
    theirs: str = page.inner_text("#theirs-alpha")
    return theirs


def step_add_device(page: Any, shots: bool) -> dict[str, Any]:
    from playwright.sync_api import expect

    page.goto("/devices")
    page.fill("#name", "Bad Name")
    page.click("#add-device button[type=submit]")
    expect(page.locator("#name-error")).to_contain_text("not a valid name")
    page.fill("#name", "phone")
    page.click("#add-device button[type=submit]")
    expect(page).to_have_url(re.compile(r"/devices/phone$"))
    qr = page.locator("#device-qr")
    expect(qr).to_be_visible()
    loaded = "() => { const i = document.getElementById('device-qr'); return i.naturalWidth; }"
    width = page.wait_for_function(loaded).json_value()
    with page.expect_download() as info:
        page.click("#download-config")
    download = info.value
    config = Path(download.path()).read_text()
    if shots:
        _shot(page, "device")
        page.goto("/devices")
        expect(page.locator("#device-phone")).to_contain_text("10.61.0.2")
        _shot(page, "devices")
    return {"qr_width": width, "config": config, "filename": download.suggested_filename}


def step_route_refused(page: Any) -> dict[str, str]:
    from playwright.sync_api import expect

    page.goto("/devices")
    label = page.inner_text("#via_cell-phone option[value=beta]")
    page.select_option("#via_cell-phone", "beta")
    page.click("#exit-phone button[type=submit]")
    expect(page.locator("#via_cell-phone-error")).to_be_visible()
    return {"label": label, "error": page.inner_text("#via_cell-phone-error")}


def step_offer_exit(page: Any) -> None:
    page.goto("/cells")
    page.click("#exit-alpha button[type=submit]")
    _flash(page, "Offering our internet exit to alpha")


def step_route(page: Any) -> dict[str, str]:
    from playwright.sync_api import expect

    page.goto("/devices")
    label = page.inner_text("#via_cell-phone option[value=beta]")
    page.select_option("#via_cell-phone", "beta")
    page.click("#exit-phone button[type=submit]")
    expect(page).to_have_url(re.compile(r"/devices/phone$"))
    _flash(page, "full-tunnel config")
    expect(page.locator("#full-tunnel")).to_be_visible()
    with page.expect_download() as info:
        page.click("#download-config")
    config = Path(info.value.path()).read_text()
    _shot(page, "device-exit")
    page.goto("/devices")
    expect(page.locator("#device-phone")).to_contain_text("through beta")
    _shot(page, "devices-exit")
    page.select_option("#via_cell-phone", "")  # back to this cell's own uplink
    page.click("#exit-phone button[type=submit]")
    _flash(page, "this cell's own uplink")
    return {"label": label, "config": config}


def step_phone_screens(page: Any) -> None:
    for name, path in (("devices-phone", "/devices"), ("cells-phone", "/cells")):
        page.goto(path)
        _shot(page, name)


_POST = """async ([url, body, headers]) => {
  const r = await fetch(url, {method: 'POST', body, headers});
  return [r.status, await r.text()];
}"""


def step_csrf(page: Any) -> dict[str, Any]:
    from playwright.sync_api import expect

    page.goto("/devices")
    json_type = {"Content-Type": "application/json"}
    body = '{"name": "evil"}'
    none = page.evaluate(_POST, ["/api/peers", body, json_type])
    wrong = page.evaluate(_POST, ["/api/peers", body, {**json_type, "X-CSRF-Token": "forged"}])
    # a form whose hidden token was tampered with
    page.fill("#name", "evil")
    page.eval_on_selector("#add-device input[name=csrf_token]", "e => e.value = 'forged'")
    page.click("#add-device button[type=submit]")
    expect(page.locator("h1")).to_have_text("Refused")
    refusal = page.inner_text("#refusal")
    _shot(page, "refused-csrf")
    return {"none": none, "wrong": wrong, "form": refusal}


def step_cross_site(page: Any, target: str) -> str:
    """Another site's page posts a form to the UI, even with a valid token: the browser leaves
    the SameSite=Strict cookie out, so the UI sees no session."""
    from playwright.sync_api import expect

    page.goto("/devices")
    token = page.input_value("#add-device input[name=csrf_token]")
    page.goto("about:blank")
    page.set_content(
        f'<form method="post" action="{target}/devices"><input name="name" value="evil">'
        f'<input name="csrf_token" value="{token}"></form>'
    )
    page.eval_on_selector("form", "f => f.submit()")
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto("/devices")  # still logged in: only the foreign request went without the cookie
    expect(page.locator("h1")).to_have_text("Devices")
    return str(page.url)


def step_logged_out(page: Any) -> str:
    page.goto("/cells")
    return str(page.url)


def step_stranger(page: Any) -> dict[str, Any]:
    """A browser without a session: every page sends it to the login page, the API says 401."""
    urls = {}
    for path in ("/", "/cells", "/devices/phone", "/services", "/docs"):
        page.goto(path)
        urls[path] = page.url.rsplit(":", 1)[1].split("/", 1)[1]
    api = page.evaluate(_POST, ["/api/peers", '{"name": "evil"}',
                                {"Content-Type": "application/json"}])  # fmt: skip
    css = page.goto("/static/picell.css")
    return {"urls": urls, "api": api, "css": css.status if css else None}


def step_disconnect(page: Any) -> None:
    page.goto("/cells")
    page.click("#cell-alpha details.confirm summary")  # a confirmation first
    page.click("#cell-alpha details.confirm button[type=submit]")
    _flash(page, "Disconnected alpha")


def step_guess(page: Any, guesses: list[str], password: str) -> list[str]:
    from playwright.sync_api import expect

    page.goto("/login")
    said = []
    for guess in [*guesses, password]:
        page.fill("#password", guess)
        page.click("button[type=submit]")
        expect(page.locator("#password-error")).to_be_visible()
        said.append(page.inner_text("#password-error"))
    expect(page).to_have_url(re.compile(r"/login$"))
    _shot(page, "login-limited")
    return said


# -- the tests ---------------------------------------------------------------------------------
def test_login_refuses_a_wrong_password_then_logs_in(world: World) -> None:
    cookie = world.browser(world.alpha).step(
        step_login, password=ALPHA_PASSWORD, wrong="not the password", shot="login"
    )
    assert cookie == {"httpOnly": True, "sameSite": "Strict"}
    world.browser(world.beta).step(step_login, password=world.beta_password)


def test_nothing_without_login(world: World) -> None:
    seen = world.browser(world.alpha, "stranger").step(step_stranger)
    assert set(seen["urls"].values()) == {"login"}, seen
    status, body = seen["api"]
    assert status == 401 and '"login_required"' in body
    assert seen["css"] == 200


def test_link_by_pasting_one_cells_invite_into_the_others_page(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    invite = world.browser(alpha).step(step_invite)
    assert invite.startswith("picell-invite:")
    # an invite naming beta's own network is refused with the reason next to the field
    bad = beta.invite()["string"]
    error = world.browser(beta).step(step_connect, invite=invite, bad_invite=bad)
    assert "own" in error, error
    wait_until(lambda: alpha.links()["beta"]["state"] == "linked", 20, "alpha shows no link")
    assert beta.links()["alpha"]["state"] == "linked"


def test_shared_service_appears_on_the_other_cells_page(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    seen = world.browser(alpha).step(step_add_service_and_share)
    assert "IPv4" in seen["backend_error"] and seen["refused_count"] == 0, seen
    assert [s["name"] for s in alpha.cli("services", "list")] == ["web"]
    theirs = world.browser(beta).step(step_see_theirs)
    assert "web" in theirs and "10.61.0.254:80" in theirs
    assert [s["name"] for s in beta.links()["alpha"]["outbound"]] == ["web"]


def test_add_a_device_and_get_its_qr_and_config(world: World) -> None:
    alpha = world.alpha
    got = world.browser(alpha).step(step_add_device, shots=True)
    assert got["qr_width"] > 0  # the QR image loaded
    assert got["filename"] == "phone.conf"
    assert got["config"] == alpha.cli("peers", "config", "phone")["config"]
    assert "[Interface]" in got["config"] and "Address = 10.61.0.2" in got["config"]
    world.browser(alpha, phone=True).step(step_phone_screens)


def test_internet_exit_per_device(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    refused = world.browser(alpha).step(step_route_refused)
    assert "does not offer" in refused["label"]
    assert "does not offer its internet exit" in refused["error"], refused
    assert alpha.cli("peers", "list")[0]["route_via"] is None  # nothing changed
    world.browser(beta).step(step_offer_exit)
    wait_until(lambda: alpha.links()["beta"]["remote_exit_offered"], 20, "beta's offer unseen")
    routed = world.browser(alpha).step(step_route)
    assert "offers its exit" in routed["label"]
    assert "AllowedIPs = 0.0.0.0/0" in routed["config"], routed["config"]
    assert alpha.cli("peers", "list")[0]["route_via"] is None


def test_requests_without_the_csrf_token_are_refused_and_change_nothing(world: World) -> None:
    alpha = world.alpha
    before = [p["name"] for p in alpha.cli("peers", "list")]
    seen = world.browser(alpha).step(step_csrf)
    for status, body in (seen["none"], seen["wrong"]):
        assert status == 403 and '"csrf_refused"' in body, seen
    assert "CSRF token" in seen["form"]
    assert [p["name"] for p in alpha.cli("peers", "list")] == before == ["phone"]


def test_another_sites_form_gets_no_session(world: World) -> None:
    world.browser(world.alpha).step(step_cross_site, target="http://127.0.0.1:8181")
    assert [p["name"] for p in world.alpha.cli("peers", "list")] == ["phone"]


def test_admin_password_changes_from_the_cli_and_ends_sessions(world: World) -> None:
    alpha = world.alpha
    argv = ["--data-dir", str(alpha.data_dir), "admin", "password", "--json"]
    proc = alpha.ns.run([*PICELL, *argv], input="a brand new password\n")
    assert json.loads(proc.stdout) == {"changed": True}
    short = alpha.ns.run([*PICELL, *argv], input="short\n", check=False)
    assert short.returncode == 1 and json.loads(short.stdout)["field"] == "password"
    assert world.browser(alpha).step(step_logged_out).endswith("/login")
    world.browser(alpha).step(step_login, password="a brand new password")


def test_disconnect_after_a_confirmation(world: World) -> None:
    world.browser(world.beta).step(step_disconnect)
    wait_until(lambda: "beta" not in world.alpha.links(), 30, "alpha still lists beta")
    assert "alpha" not in world.beta.links()


def test_repeated_failed_logins_are_refused(world: World) -> None:
    said = world.browser(world.beta, "guesser").step(
        step_guess, guesses=[f"guess number {i}" for i in range(5)], password=world.beta_password
    )
    assert said[:5] == ["Wrong password"] * 5
    assert "Too many failed logins" in said[5]  # even the right password, for now
