"""Login for the web listener: the admin password (argon2), sessions, CSRF, the login delay.

Owns `Auth` (password hash in the store's `admin` table, in-memory sessions, `LoginThrottle`
spacing out attempts after failures), the `guard` middleware of the web app (nothing but the
login page and static files without a session; a CSRF token on every state-changing request;
only local host names), and the unix-socket route that sets the password. A generated password
is also kept, root-only (0600), in `<data dir>/admin-password` (`GENERATED_PASSWORD_FILE`) until
the owner sets one. Must not render pages (`picell.api.web` does) nor touch the cell's state.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from picell.api.errors import error_response
from picell.api.models import PasswordChanged, PasswordSet
from picell.constants import (
    LOGIN_DELAY_BASE_S,
    LOGIN_DELAY_MAX_S,
    LOGIN_FAILURE_HALF_LIFE_S,
    PASSWORD_MIN_LEN,
    SESSION_IDLE_S,
    SESSION_TTL_S,
)
from picell.errors import (
    BadInput,
    CsrfRefused,
    LoginRefused,
    LoginRequired,
    PicellError,
)
from picell.store import admin as admin_table
from picell.store.db import Store

COOKIE = "picell_session"
LOGIN_COOKIE = "picell_login"  # binds the login form to the browser that loaded it
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = ("/login",)
PUBLIC_PREFIXES = ("/static/",)
# DNS rebinding: a foreign page whose name points at 127.0.0.1 must not reach the UI.
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
FORM_BODY_MAX = 65536
_hasher = PasswordHasher()


# -- the password ------------------------------------------------------------------------------
def check_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < PASSWORD_MIN_LEN:
        raise BadInput(
            f"password: at least {PASSWORD_MIN_LEN} characters are needed", field="password"
        )
    if len(password) > 1024 or any(c in password for c in "\r\n\0"):
        raise BadInput("password: one line of at most 1024 characters", field="password")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


def verify_password(password_hash: str | None, password: str) -> bool:
    if password_hash is None:
        return False
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def generate_password() -> str:
    return secrets.token_urlsafe(12)  # 96 bits, 16 characters


# -- failed logins -----------------------------------------------------------------------------
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Ticket:
    """One login attempt's place in line: when it may be checked, and how it was counted."""

    at: float  # the clock's time at which the password may be checked
    wait_s: float  # how long the attempt waits for that


def login_delay(failures: float) -> float:
    """Seconds between attempts after `failures` recent failures: doubling from
    `LOGIN_DELAY_BASE_S`, capped at `LOGIN_DELAY_MAX_S` (none before the first failure)."""
    if failures < 1:
        return 0.0
    return float(min(LOGIN_DELAY_MAX_S, LOGIN_DELAY_BASE_S * 2 ** (failures - 1)))


class LoginThrottle:
    """Spaces password checks out after failures; never refuses one.

    Through an SSH tunnel every browser comes from 127.0.0.1, so a per-source rule protects
    nothing, and a global limit that refuses lets any local process lock the owner out. Instead
    every attempt gets a turn (`begin`): the first waits for nothing, and after failures the
    turns are spaced by `login_delay` of the recent failures (doubling up to about 10 s), a count
    that halves every `LOGIN_FAILURE_HALF_LIFE_S` of quiet. The right password waits its turn,
    then gets in, and clears the count.

    An attempt counts as a failure from its start until it succeeds (`succeeded`), and turns are
    handed out one after another, so concurrent guesses queue instead of slipping past the delay
    while argon2 works. The wait is awaited (`wait`, `asyncio.sleep` by default): a waiting
    attempt holds no thread. `clock` and `sleep` are seams for the tests."""

    def __init__(self, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.clock, self.sleep = clock, sleep
        self._failures = 0.0  # recent failures, decayed to `_at`
        self._at = clock()
        self._next = self._at  # the earliest time the next attempt may be checked
        self._lock = threading.Lock()

    def _decay(self, now: float) -> None:
        if now > self._at:
            self._failures *= 0.5 ** ((now - self._at) / LOGIN_FAILURE_HALF_LIFE_S)
            self._at = now

    def failures(self) -> float:
        with self._lock:
            self._decay(self.clock())
            return self._failures

    def begin(self) -> Ticket:
        """Count an attempt as failed (until it succeeds) and give it the next turn."""
        with self._lock:
            now = self.clock()
            self._decay(now)
            at = max(now, self._next)
            self._failures += 1
            self._next = at + login_delay(self._failures)
            return Ticket(at=at, wait_s=at - now)

    async def wait(self, ticket: Ticket) -> None:
        if ticket.wait_s > 0:
            await self.sleep(ticket.wait_s)

    def succeeded(self, ticket: Ticket) -> None:
        """The attempt was right: the owner is in, so the recent failures are forgotten."""
        with self._lock:
            self._decay(self.clock())
            self._failures = 0.0
            self._next = min(self._next, max(ticket.at, self.clock()))


# -- sessions ----------------------------------------------------------------------------------
@dataclass
class Session:
    csrf: str
    created: float
    seen: float
    flash: list[str] = field(default_factory=list)


def _key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Auth:
    """The admin password and the web sessions of one daemon (shared by its two listeners, so
    a password set on the unix socket ends every web session at once)."""

    def __init__(
        self,
        store: Store,
        throttle: LoginThrottle | None = None,
        password_file: Path | None = None,
    ) -> None:
        self.store = store
        self.password_file = password_file  # where a generated password is kept (0600)
        self.throttle = throttle or LoginThrottle()
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def password_hash(self) -> str | None:
        with self.store.read() as conn:
            return admin_table.load(conn).password_hash

    def set_password(self, password: str) -> None:
        """The owner's password: the generated one's file is deleted."""
        self._store_password(password)
        if self.password_file is not None:
            self.password_file.unlink(missing_ok=True)

    def _store_password(self, password: str) -> None:
        hashed = hash_password(password)
        with self.store.transaction() as conn:
            admin_table.set_password_hash(conn, hashed)
        with self._lock:
            self._sessions.clear()

    def ensure_password(self) -> str | None:
        """Generate a password if none is set; return it (to be shown once) or None. It is
        also written, root-only, to `password_file` (kept until the owner sets one)."""
        if self.password_hash() is not None:
            return None
        password = generate_password()
        if self.password_file is not None:
            write_private(self.password_file, password + "\n")
        self._store_password(password)
        return password

    def check(self, password: str) -> bool:
        """Whether `password` is the admin password (argon2: run it in a thread)."""
        return verify_password(self.password_hash(), password)

    async def login(self, password: str) -> tuple[str, Session]:
        """A new session for the right password, after the attempt's turn (`LoginThrottle`);
        LoginRefused otherwise. Never refused for the number of attempts."""
        ticket = self.throttle.begin()
        await self.throttle.wait(ticket)
        if not await run_in_threadpool(self.check, password):
            raise LoginRefused("password: wrong password", field="password")
        self.throttle.succeeded(ticket)
        return self.new_session()

    def new_session(self) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        session = Session(csrf=secrets.token_urlsafe(32), created=now, seen=now)
        with self._lock:
            self._sessions = {k: s for k, s in self._sessions.items() if not self._expired(s, now)}
            self._sessions[_key(token)] = session
        return token, session

    @staticmethod
    def _expired(session: Session, now: float) -> bool:
        return now - session.created > SESSION_TTL_S or now - session.seen > SESSION_IDLE_S

    def session(self, token: str | None) -> Session | None:
        if not token:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(_key(token))
            if session is None:
                return None
            if self._expired(session, now):
                del self._sessions[_key(token)]
                return None
            session.seen = now
            return session

    def logout(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._sessions.pop(_key(token), None)


def set_session_cookie(response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name, value, max_age=max_age, httponly=True, samesite="strict", path="/", secure=False
    )


# -- the guard ---------------------------------------------------------------------------------
def _host_ok(request: Request) -> bool:
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.lower() in LOCAL_HOSTS


def _origin_ok(request: Request) -> bool:
    """A browser names the site a request comes from; it must be this UI itself. ("null", sent
    by some privacy settings, says nothing: the CSRF token decides then.)"""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    return urlsplit(origin).netloc == request.headers.get("host")


async def csrf_token_of(request: Request) -> str:
    header = request.headers.get(CSRF_HEADER)
    if header is not None:
        return header
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype != "application/x-www-form-urlencoded":
        return ""
    body = await request.body()  # replayed to the handler by Starlette's middleware
    if len(body) > FORM_BODY_MAX:
        raise BadInput(f"body: larger than {FORM_BODY_MAX} bytes", field="body")
    values = parse_qs(body.decode(errors="replace")).get(CSRF_FIELD, [""])
    return values[0]


PageError = Callable[[Request, PicellError], Awaitable[Response]]


def install(app: FastAPI, auth: Auth, page_error: PageError) -> None:
    """Put the whole app behind login; `page_error` renders a refusal for a browser page."""
    app.state.auth = auth

    async def refuse(request: Request, exc: PicellError) -> Response:
        if request.url.path.startswith("/api/"):
            return error_response(exc)
        if isinstance(exc, LoginRequired):
            return RedirectResponse("/login", status_code=303)
        return await page_error(request, exc)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Any:
        path = request.url.path
        try:
            if not _host_ok(request):
                raise BadInput(
                    "host: open the web UI as http://127.0.0.1:PORT or http://localhost:PORT "
                    "(through an SSH tunnel from elsewhere)",
                    field="host",
                )
            public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
            if not public:
                token = request.cookies.get(COOKIE)
                session = await run_in_threadpool(auth.session, token)
                if session is None:
                    raise LoginRequired("log in first: this page needs the admin password")
                request.state.session = session
                request.state.session_token = token
                if request.method not in SAFE_METHODS:
                    if not _origin_ok(request):
                        raise CsrfRefused(
                            "csrf_token: the request comes from another site's page",
                            field="csrf_token",
                        )
                    given = await csrf_token_of(request)
                    if not given or not hmac.compare_digest(given, session.csrf):
                        raise CsrfRefused(
                            "csrf_token: missing or wrong CSRF token; reload the page and try "
                            "again",
                            field="csrf_token",
                        )
        except PicellError as exc:
            response = await refuse(request, exc)
        else:
            response = await call_next(request)
        _harden(response, path)
        return response


def _harden(response: Response, path: str) -> None:
    headers = response.headers
    headers.setdefault(
        "content-security-policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    )
    headers.setdefault("x-content-type-options", "nosniff")
    headers.setdefault("x-frame-options", "DENY")
    # same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on form posts
    headers.setdefault("referrer-policy", "same-origin")
    if not path.startswith("/static/"):
        headers.setdefault("cache-control", "no-store")


# -- setting the password (unix socket only) ---------------------------------------------------
GENERATED_PASSWORD_FILE = "admin-password"  # in the data dir


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, 0600 from its creation on (never readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


password_router = APIRouter(prefix="/api/admin")


@password_router.put("/password", response_model=PasswordChanged)
def set_password(body: PasswordSet, request: Request) -> dict[str, Any]:
    """Set the web UI's admin password (stored as an argon2 hash); ends every web session."""
    auth: Auth = request.app.state.auth
    auth.set_password(body.password)
    return {"changed": True}
