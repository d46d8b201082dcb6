"""The `picell` command: every subcommand module registers itself on `base.app`."""

from __future__ import annotations

from picell.cli import admin, backup, cell, doctor, links  # noqa: F401 - registers the commands
from picell.cli.base import app


def main() -> None:
    app()
