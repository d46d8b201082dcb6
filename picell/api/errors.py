"""The one table from picell errors to HTTP status, and the handlers that apply it.

Every error response is JSON `{code, message, field}`. Routes never build error responses by hand.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from picell.errors import (
    ApplyFailed,
    BadInput,
    CommandFailed,
    Conflict,
    Forbidden,
    LoginRequired,
    NotFound,
    NotInitialised,
    PicellError,
    RateLimited,
)

STATUS: dict[type[PicellError], int] = {
    BadInput: 422,
    NotFound: 404,
    Conflict: 409,
    NotInitialised: 409,
    Forbidden: 403,
    LoginRequired: 401,
    RateLimited: 429,
    # The host refused the change: nothing was committed and the previous state was restored.
    ApplyFailed: 409,
    CommandFailed: 409,
}


def error_body(code: str, message: str, field: str | None) -> dict[str, str | None]:
    return {"code": code, "message": message, "field": field}


def status_of(exc: PicellError) -> int:
    return next((s for t, s in STATUS.items() if isinstance(exc, t)), 409)


def error_response(exc: PicellError) -> JSONResponse:
    """The JSON answer for `exc`; also used by middleware, which runs outside the handlers."""
    return JSONResponse(error_body(exc.code, exc.message, exc.field), status_code=status_of(exc))


async def _picell_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PicellError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field = ".".join(loc) or None
    message = f"{field}: {first.get('msg', 'invalid')}" if field else "invalid request"
    return JSONResponse(error_body("bad_input", message, field), status_code=422)


def install(app: FastAPI) -> None:
    app.add_exception_handler(PicellError, _picell_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
