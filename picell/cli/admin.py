"""`picell admin password`: set the web UI's admin password through the admin socket.

The new password comes from stdin (first line) when stdin is not a terminal, else from a hidden
prompt asked twice. Only its argon2 hash is stored; every web session ends.
"""

from __future__ import annotations

import sys

import typer

from picell.api.models import PasswordChanged
from picell.cli.base import JsonOpt, app, call, out, read

admin_app = typer.Typer(no_args_is_help=True, help="The web UI's administrator")
app.add_typer(admin_app, name="admin")


def read_password() -> str:
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line.strip():
            raise typer.BadParameter("give the new password on stdin (one line)")
        return line.rstrip("\r\n")
    password: str = typer.prompt("New admin password", hide_input=True,
                                 confirmation_prompt=True)  # fmt: skip
    return password


@admin_app.command("password")
def password(as_json: JsonOpt = False) -> None:
    """Set the web UI's admin password (from stdin, or asked twice); logs every browser out."""
    resp = call("PUT", "/api/admin/password", as_json, json={"password": read_password()})
    out(read(resp, PasswordChanged, as_json), as_json, "admin password changed; web sessions ended")
