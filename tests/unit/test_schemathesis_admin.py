"""Schemathesis against the admin API (the unix socket's app) over the fake kernel: the published
OpenAPI schema says exactly what the API accepts.

Checks, for every operation:
- `not_a_server_error`: no 5xx, ever;
- `positive_data_acceptance`: data the schema allows is accepted; a 404 (a well-formed name that
  does not exist) and a 409 (a real conflict: a name taken, a link missing, the network full) are
  answers to valid requests, so they count as acceptance;
- `negative_data_rejection`: data the schema forbids gets a 4xx.

`POST /api/cells` (an invite: a string or JSON whose checks need the other cell) and
`POST /api/cells/import` (a whole seed file) carry free text that no schema can describe, and
`PUT /api/cell/endpoint` endpoints whose checks (an IPv6 address's syntax, reserved ranges, a
host name's last label not numeric) no pattern states, so
they run only the other two checks. The short run here keeps CI under a minute; the long run's
command and figures are in docs/BENCHMARKS.md ("schemathesis, admin API").
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from picell.app import build_api
from picell.control import Control

# PICELL_SCHEMATHESIS_EXAMPLES raises the number of cases per operation for the long run.
EXAMPLES = int(os.environ.get("PICELL_SCHEMATHESIS_EXAMPLES", "12"))
ACCEPTED = ["200", "201", "204", "404", "409"]
FREE_TEXT = [("POST", "/api/cells"), ("POST", "/api/cells/import"), ("PUT", "/api/cell/endpoint")]


def config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "seed": 11,
            "generation": {"max-examples": EXAMPLES, "mode": "all"},
            "phases": {"stateful": {"enabled": False}},
            "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}},
        }
    )


class CurrentApp:
    """The ASGI app of the running test: each test gets a fresh cell (the `control` fixture);
    the schema is read once, from an app whose cell is never touched."""

    def __init__(self) -> None:
        self.app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


CURRENT = CurrentApp()
CURRENT.app = build_api(Control(None, None, None))  # type: ignore[arg-type]
schema = schemathesis.openapi.from_asgi("/openapi.json", CURRENT, config=config())


@pytest.fixture(autouse=True)
def fresh_cell(control: Control) -> None:
    CURRENT.app = build_api(control)


TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def tally() -> Iterator[None]:
    """With PICELL_SCHEMATHESIS_REPORT=FILE, write the cases and their statuses there (the long
    run's figures in docs/BENCHMARKS.md)."""
    yield
    report = os.environ.get("PICELL_SCHEMATHESIS_REPORT")
    if report:
        with open(report, "w") as fh:
            json.dump({"examples_per_operation": EXAMPLES, **TALLY}, fh, indent=1)


@schema.parametrize()
def test_admin_api_keeps_to_its_schema(case: schemathesis.Case) -> None:
    checks = [not_a_server_error, negative_data_rejection]
    if (case.method, case.path) not in FREE_TEXT:
        checks.append(positive_data_acceptance)
    TALLY["cases"] += 1
    try:
        response = case.call_and_validate(checks=checks)
    except BaseException:
        TALLY["failed cases"] += 1
        raise
    TALLY[f"status {response.status_code}"] += 1
    TALLY["5xx"] += response.status_code >= 500
