"""Login on the web listener: argon2 password, session cookie flags, CSRF, rate limit, and
nothing served without a session but the login page and static files."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from picell.api.auth import Auth, FailureLimiter, hash_password, verify_password
from picell.app import build_api, build_web_api
from picell.control import Control
from picell.errors import RateLimited
from picell.store import admin as admin_table

PASSWORD = "a long enough password"
BASE = "http://127.0.0.1:8080"


@pytest.fixture
def auth(control: Control) -> Auth:
    a = Auth(control.store, FailureLimiter(per_source=(3, 900.0), overall=(5, 900.0)))
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


def test_repeated_failed_logins_are_refused_with_429(client: TestClient) -> None:
    for _ in range(3):
        assert log_in(client, "wrong password!").status_code == 401  # type: ignore[attr-defined]
    resp = log_in(client)  # even the right password, for now
    assert resp.status_code == 429  # type: ignore[attr-defined]
    assert "too many failed logins" in resp.text.lower()  # type: ignore[attr-defined]
    assert "picell_session" not in client.cookies


def test_failures_from_all_addresses_count_together() -> None:
    limiter = FailureLimiter(per_source=(3, 900.0), overall=(4, 900.0))
    for source in ("a", "b", "c", "d"):
        limiter.begin(source)
    with pytest.raises(RateLimited, match="too many failed logins"):
        limiter.begin("e")


def test_a_success_does_not_count_and_clears_its_address() -> None:
    limiter = FailureLimiter(per_source=(2, 900.0), overall=(4, 900.0))
    limiter.begin("a")
    limiter.succeeded("a", limiter.begin("a"))
    for _ in range(2):
        limiter.begin("a")
    with pytest.raises(RateLimited):
        limiter.begin("a")  # two failures since the success
    limiter.begin("b")  # overall: 4 failures (the success does not count)
    with pytest.raises(RateLimited):
        limiter.begin("c")


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
