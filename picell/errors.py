"""The picell exception tree; every error the code raises on purpose is one of these.

    PicellError                 root; never raised itself
    ├── BadInput                a field of a request is malformed (HTTP 422, names the field)
    ├── NotFound                a named thing does not exist (HTTP 404)
    ├── Conflict                the request collides with what exists (HTTP 409, names it)
    │   └── ExitNotOffered      a device routed via a cell that does not offer its exit
    ├── NotInitialised          no cell in the store yet (HTTP 409)
    ├── Forbidden               a cross-cell message failed authentication (HTTP 403)
    │   └── CsrfRefused         a state-changing web request without its session's token (403)
    ├── LoginRequired           the web listener needs a logged-in session (HTTP 401)
    │   └── LoginRefused        a wrong admin password at the login page (HTTP 401)
    ├── RateLimited             too many requests from one source (HTTP 429)
    ├── CommandFailed           a system command exited badly (raised by system.run)
    └── ApplyFailed             the reconciler could not converge (HTTP 409, nothing kept)

Foreign exceptions (sqlite3, subprocess, pydantic) are translated once where they enter picell.
The HTTP mapping lives in one table: `picell.api.errors.STATUS`.
"""

from __future__ import annotations

from collections.abc import Sequence


class PicellError(Exception):
    """Root of picell's errors. `code` is stable; `message` is for humans."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadInput(PicellError):
    code = "bad_input"


class NotFound(PicellError):
    code = "not_found"


class Conflict(PicellError):
    code = "conflict"


class ExitNotOffered(Conflict):
    code = "exit_not_offered"


class NotInitialised(PicellError):
    code = "not_initialised"


class Forbidden(PicellError):
    code = "forbidden"


class CsrfRefused(Forbidden):
    code = "csrf_refused"


class LoginRequired(PicellError):
    code = "login_required"


class LoginRefused(LoginRequired):
    code = "login_refused"


class RateLimited(PicellError):
    code = "rate_limited"


class ApplyFailed(PicellError):
    code = "apply_failed"


class CommandFailed(PicellError):
    code = "command_failed"

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()[:500]}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
