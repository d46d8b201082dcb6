"""`picell doctor [--from DEVICE|CELL|CELL/DEVICE] [--to SERVICE|CELL/SERVICE]`: the daemon
walks the path (`picell.doctor`); this prints its steps. Exit 0 when every step passes, 1
naming the first failure and its fix; `--json` prints every step."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from picell.cli.base import JsonOpt, app, call

MARKS = {"pass": "ok  ", "fail": "FAIL", "skip": "skip"}


@app.command()
def doctor(
    from_: Annotated[str | None, typer.Option("--from", help="DEVICE, CELL or CELL/DEVICE")] = None,
    to: Annotated[str | None, typer.Option("--to", help="SERVICE or CELL/SERVICE")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Walk the path from a device to a service and name the first broken step."""
    body = {k: v for k, v in (("from", from_), ("to", to)) if v is not None}
    data = call("POST", "/api/doctor", as_json, json=body, timeout=120).json()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        for step in data["steps"]:
            print(f"{MARKS.get(step['status'], '?   ')} {step['name']}: {step['finding']}")
        failed = data["first_failure"]
        if failed:
            print(f"\nfirst failure: {failed['name']}: {failed['finding']}")
            print(f"fix: {failed['fix']}")
    if not data["ok"]:
        raise typer.Exit(1)
