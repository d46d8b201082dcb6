"""What a user does in the web UI, step by step, for `tests/netns/test_web.py`.

Each `step_*` runs inside a cell's namespace in a real chromium (`tests.netns.browser`), gets
the Playwright page (logged in from the previous step of the same browser) and returns what it
saw for the test to judge. Screenshots of every page go to docs/screenshots/. No sleeps: every
wait is a Playwright expectation with a deadline.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.netns.browser import REPO

SHOTS = REPO / "docs" / "screenshots"
WAIT_MS = 30_000


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
    """Wrong passwords, then the right one: each answer is awaited (after failures the login
    waits its turn, up to about 10 s), and the right password lands on the Cell Network."""
    from playwright.sync_api import expect

    page.set_default_timeout(60_000)  # the throttle's waits, on a loaded machine
    page.goto("/login")
    said = []
    for guess in guesses:
        page.fill("#password", guess)
        page.click("button[type=submit]")
        expect(page.locator("#password-error")).to_be_visible(timeout=60_000)
        said.append(page.inner_text("#password-error"))
    _shot(page, "login-slowed")
    page.fill("#password", password)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/cells$"), timeout=60_000)
    said.append(page.inner_text("h1"))
    return said
