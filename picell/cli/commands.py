"""The full Typer CLI: importing this module registers every subcommand on `base.app`.

`picell.cli.main` imports it only when the fast path (`picell.cli.fast`) does not take the
command, because Typer, httpx and pydantic cost more start-up time than most commands.
"""

from __future__ import annotations

from picell.cli import admin, backup, cell, doctor, links, metrics  # noqa: F401 - registers them
from picell.cli.base import app

__all__ = ["app"]
