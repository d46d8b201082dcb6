"""The `picell` command: every subcommand module registers itself on `base.app`."""

from __future__ import annotations

from picell.cli import admin, backup, cell, doctor, links, metrics  # noqa: F401 - registers them
from picell.cli.base import app


def main() -> None:
    app()
