"""Login on the web listener: argon2 password, session cookie flags, CSRF, the login delay
(never a lockout), and nothing served without a session but the login page and static files."""

from __future__ import annotations

import asyncio
import re

import pytest
from fastapi.testclient import TestClient

from picell.api.auth import Auth, LoginThrottle, hash_password, login_delay, verify_password
from picell.app import build_api, build_web_api
from picell.constants import LOGIN_DELAY_MAX_S
from picell.control import Control
from picell.errors import LoginRefused
from picell.store import admin as admin_table

PASSWORD = "a long enough password"
BASE = "http://127.0.0.1:8080"


class FakeClock:
    """The throttle's clock seam: sleeping advances time and is recorded, nothing really waits."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def auth(control: Control, clock: FakeClock) -> Auth:
    a = Auth(control.store, LoginThrottle(clock=clock, sleep=clock.sleep))
    a.set_password(PASSWORD)
    return a


@pytest.fixture
def client(control: Control, auth: Auth) -> TestClient:
    return TestClient(build_web_api(control, auth=auth), base_url=BASE)


def login_token(client: TestClient) -> str:
    page = client.get("/login")
    assert page.status_code == 200
    found = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert found
    return found.group(1)


def log_in(client: TestClient, password: str = PASSWORD) -> object:
    return client.post(
        "/login",
        data={"password": password, "login_token": login_token(client)},
        follow_redirects=False,
    )


def csrf_of(client: TestClient) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/devices").text)
    assert found
    return found.group(1)


def test_password_is_stored_as_an_argon2_hash(control: Control, auth: Auth) -> None:
    with control.store.read() as conn:
        stored = admin_table.load(conn).password_hash
    assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored
    assert verify_password(stored, PASSWORD) and not verify_password(stored, PASSWORD + "x")
    assert hash_password(PASSWORD) != stored  # salted


def test_wrong_password_is_refused_next_to_the_field(client: TestClient) -> None:
    resp = log_in(client, "not the password")
    assert resp.status_code == 401  # type: ignore[attr-defined]
    assert 'id="password-error">Wrong password<' in resp.text  # type: ignore[attr-defined]
    assert "picell_session" not in client.cookies
    assert client.get("/cells", follow_redirects=False).status_code == 303


def test_session_cookie_is_httponly_and_samesite_strict(client: TestClient) -> None:
    resp = log_in(client)
    assert resp.status_code == 303 and resp.headers["location"] == "/cells"  # type: ignore[attr-defined]
    cookie = next(
        c
        for c in resp.headers.get_list("set-cookie")  # type: ignore[attr-defined]
        if c.startswith("picell_session=")
    )
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags
    assert client.get("/cells").status_code == 200


def test_login_form_needs_its_own_token(client: TestClient) -> None:
    resp = client.post("/login", data={"password": PASSWORD, "login_token": "forged"})
    assert resp.status_code == 403 and "login form expired" in resp.text
    assert "picell_session" not in client.cookies


@pytest.mark.parametrize(
    "path", ["/", "/cells", "/devices", "/devices/phone", "/services", "/docs", "/openapi.json"]
)
def test_pages_need_a_login(client: TestClient, path: str) -> None:
    resp = client.get(path, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/login"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/status"), ("GET", "/api/peers"), ("POST", "/api/peers"),
     ("POST", "/api/cells/invites"), ("GET", "/api/cells/invites"),
     ("DELETE", "/api/services/web")],
)  # fmt: skip
def test_api_needs_a_login(client: TestClient, method: str, path: str) -> None:
    resp = client.request(method, path, json={"name": "evil"})
    assert resp.status_code == 401
    assert resp.json()["code"] == "login_required"


def test_login_page_and_static_files_are_public(client: TestClient) -> None:
    assert client.get("/login").status_code == 200
    assert client.get("/static/picell.css").status_code == 200
    assert client.get("/static/picell.js").status_code == 200


def test_state_changes_without_the_csrf_token_are_refused(
    client: TestClient, control: Control
) -> None:
    log_in(client)
    token = csrf_of(client)
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        resp = client.post("/api/peers", json={"name": "evil"}, headers=headers)
        assert resp.status_code == 403
        body = resp.json()
        assert body["code"] == "csrf_refused" and "CSRF token" in body["message"]
    resp = client.post("/devices", data={"name": "evil", "csrf_token": "forged"})
    assert resp.status_code == 403 and "CSRF token" in resp.text
    resp = client.post("/devices", data={"name": "evil"})
    assert resp.status_code == 403
    assert control.list_peers() == []  # nothing changed
    ok = client.post("/api/peers", json={"name": "good"}, headers={"X-CSRF-Token": token})
    assert ok.status_code == 201


def test_a_foreign_origin_is_refused_even_with_the_token(client: TestClient) -> None:
    log_in(client)
    resp = client.post(
        "/devices",
        data={"name": "evil", "csrf_token": csrf_of(client)},
        headers={"Origin": "http://evil.example"},
    )
    assert resp.status_code == 403 and "another site" in resp.text


def test_other_host_names_are_refused(control: Control, auth: Auth) -> None:
    """DNS rebinding: a page of another site whose name resolves to 127.0.0.1."""
    client = TestClient(build_web_api(control, auth=auth), base_url="http://evil.example:8080")
    resp = client.get("/login")
    assert resp.status_code == 422 and "127.0.0.1" in resp.text


def test_failed_logins_slow_the_next_ones_but_never_lock_the_owner_out(
    client: TestClient, clock: FakeClock
) -> None:
    """25 wrong passwords (the old code refused the right one after 20): each next attempt
    waits longer, doubling up to about 10 s; the right password then waits and gets in."""
    for _ in range(25):
        assert log_in(client, "wrong password!").status_code == 401  # type: ignore[attr-defined]
    waits = clock.waits
    assert len(waits) == 24  # the first attempt did not wait
    assert waits[0] == pytest.approx(0.5, rel=0.01) and waits[1] == pytest.approx(1.0, rel=0.01)
    assert all(b >= a * 0.99 for a, b in zip(waits, waits[1:], strict=False))  # growing
    assert max(waits) == pytest.approx(LOGIN_DELAY_MAX_S, rel=0.01)
    resp = log_in(client)
    assert resp.status_code == 303  # type: ignore[attr-defined]
    assert clock.waits[-1] == pytest.approx(LOGIN_DELAY_MAX_S, rel=0.01)  # delayed, not refused
    assert client.get("/cells").status_code == 200
    # the owner is in: the failures are forgotten, the next login does not wait
    before = len(clock.waits)
    client.cookies.clear()
    assert log_in(client).status_code == 303  # type: ignore[attr-defined]
    assert len(clock.waits) == before


def test_delays_double_up_to_the_cap() -> None:
    assert login_delay(0) == 0.0
    assert [login_delay(n) for n in (1, 2, 3, 4, 5, 6, 50)] == [0.5, 1, 2, 4, 8, 10, 10]


def test_concurrent_guesses_queue_instead_of_slipping_past() -> None:
    """Ten attempts at the same instant: each counts as failed from its start, so they get
    turns one after another, spaced by the growing delay (not ten checks at once)."""
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock, sleep=clock.sleep)
    turns = [throttle.begin().at - clock.now for _ in range(10)]
    gaps = [b - a for a, b in zip(turns, turns[1:], strict=False)]
    assert turns[0] == 0
    assert gaps == pytest.approx([login_delay(n) for n in range(1, 10)])
    assert turns[-1] > 40  # ten guesses take most of a minute, however they are sent


def test_failures_are_forgotten_over_time() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock, sleep=clock.sleep)
    for _ in range(8):
        throttle.begin()
    assert throttle.failures() == pytest.approx(8)
    clock.now += 3 * 3600  # three quiet hours
    assert throttle.failures() < 1
    assert throttle.begin().wait_s == 0


def test_the_wait_is_awaited_without_blocking_the_event_loop(control: Control) -> None:
    """While an attempt waits its turn, the event loop serves other requests."""
    gate = asyncio.Event()
    waited: list[float] = []

    async def sleep(seconds: float) -> None:
        waited.append(seconds)
        await gate.wait()

    clock = FakeClock()
    auth = Auth(control.store, LoginThrottle(clock=clock, sleep=sleep))
    auth.set_password(PASSWORD)

    async def scenario() -> list[str]:
        first = asyncio.create_task(auth.login("wrong password!"))
        second = asyncio.create_task(auth.login(PASSWORD))
        done: list[str] = []
        with pytest.raises(LoginRefused):
            await first
        done.append("first refused")
        for _ in range(5):  # the loop keeps running while the second attempt waits
            await asyncio.sleep(0)
        assert not second.done() and waited == [pytest.approx(0.5)]
        done.append("loop ran while it waited")
        gate.set()
        token, _session = await second
        assert auth.session(token) is not None
        done.append("second logged in")
        return done

    assert asyncio.run(scenario()) == [
        "first refused", "loop ran while it waited", "second logged in"
    ]  # fmt: skip


def test_logout_ends_the_session(client: TestClient) -> None:
    log_in(client)
    token = csrf_of(client)
    resp = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert resp.status_code == 303
    assert client.get("/cells", follow_redirects=False).status_code == 303


def test_password_set_on_the_admin_socket_ends_web_sessions(
    control: Control, auth: Auth, client: TestClient
) -> None:
    log_in(client)
    admin = TestClient(build_api(control, auth=auth))
    short = admin.put("/api/admin/password", json={"password": "short"})
    assert short.status_code == 422 and short.json()["field"] == "password"
    assert admin.put("/api/admin/password", json={"password": "the new password"}).json() == {
        "changed": True
    }
    assert client.get("/cells", follow_redirects=False).status_code == 303
    assert log_in(client).status_code == 401  # type: ignore[attr-defined]
    assert log_in(client, "the new password").status_code == 303  # type: ignore[attr-defined]


def test_the_web_listener_cannot_set_the_password(client: TestClient) -> None:
    log_in(client)
    token = csrf_of(client)
    resp = client.put(
        "/api/admin/password", json={"password": "x" * 20}, headers={"X-CSRF-Token": token}
    )
    assert resp.status_code in (404, 405)


def test_a_missing_password_is_generated_once(control: Control) -> None:
    auth = Auth(control.store)
    first = auth.ensure_password()
    assert first is not None and len(first) >= 16
    assert auth.ensure_password() is None
    assert verify_password(auth.password_hash(), first)


def test_pages_carry_security_headers(client: TestClient) -> None:
    resp = client.get("/login")
    assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["cache-control"] == "no-store"


def test_web_listener_serves_the_same_admin_routes_but_the_password(
    control: Control, auth: Auth
) -> None:
    socket_app, web_app = build_api(control, auth=auth), build_web_api(control)
    socket_api, web_api = set(socket_app.openapi()["paths"]), set(web_app.openapi()["paths"])
    assert socket_api - web_api == {"/api/admin/password"}

    def paths(app: object) -> set[str]:
        return {getattr(r, "path", "") for r in getattr(app, "routes", [])}

    assert "/docs" in paths(socket_app) and "/docs" not in paths(web_app)
    assert {"/login", "/cells", "/devices", "/services"} <= paths(web_app)
