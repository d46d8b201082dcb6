"""Schemathesis against the two listeners other cells talk to (issue 11): the pairing listener
(`accept-invite`) and the mesh API (`permissions`, `unlink`), in-process over ASGI with the fake
kernel.

They publish no OpenAPI (openapi_url=None, on purpose), so the document is built here from the
wire models' JSON schemas: a pairing request, and an envelope whose body is a state or an unlink
body. Valid messages need MACs, so acceptance is not expected; the checks are:
- `not_a_server_error`: no 5xx, whatever arrives;
- `negative_data_rejection`, held to 400/413/422: what the schema refuses, the listener refuses
  as bad input (naming the field), not with a 403 after reading a malformed message, nor a 429.

The pairing listener's rate limit (10 per 10 s per source, and every request here comes from one
test client) is lifted for the run, else every case after the tenth would only meet the limiter.
The long run is `PICELL_SCHEMATHESIS_EXAMPLES=5000 pytest tests/unit/test_schemathesis_peer.py`
(figures in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection

from picell.api import peer
from picell.constants import JSON_MAX_DEPTH as MAX_DEPTH
from picell.control import Control
from picell.mesh import wire
from picell.mesh.crypto import mac, pairing_key
from picell.mesh.links import Links
from picell.mesh.sync import Sync
from picell.wireguard import keys
from tests.unit import hostile

EXAMPLES = int(os.environ.get("PICELL_SCHEMATHESIS_EXAMPLES", "60"))  # per operation and mode
REJECTED_AS_BAD_INPUT = ["400", "413", "422"]
PAIRING = "/api/cells/peer-sync/accept-invite"
PERMISSIONS = "/api/cells/peer-sync/permissions"
UNLINK = "/api/cells/peer-sync/unlink"


def _components(*models: type[wire.Wire]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        schema = copy.deepcopy(model.model_json_schema(ref_template="#/components/schemas/{model}"))
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def _envelope(body: str) -> dict[str, Any]:
    mac = wire.Envelope.model_json_schema()["properties"]["mac"]
    ref = {"$ref": f"#/components/schemas/{body}"}
    return {"type": "object", "required": ["body", "mac"],
            "properties": {"body": ref, "mac": mac}}  # fmt: skip


def _post(schema: dict[str, Any]) -> dict[str, Any]:
    answers = {code: {"description": what} for code, what in
               [("200", "accepted"), ("403", "refused"), ("404", "no such link"),
                ("422", "bad input")]}  # fmt: skip
    return {"post": {"requestBody": {"required": True,
                                     "content": {"application/json": {"schema": schema}}},
                     "responses": answers}}  # fmt: skip


def openapi(paths: dict[str, dict[str, Any]], components: dict[str, Any]) -> dict[str, Any]:
    return {"openapi": "3.1.0", "info": {"title": "picell cell-to-cell", "version": "1"},
            "paths": {p: _post(s) for p, s in paths.items()},
            "components": {"schemas": components}}  # fmt: skip


def pairing_document() -> dict[str, Any]:
    return openapi({PAIRING: {"$ref": "#/components/schemas/PairingRequest"}},
                   _components(wire.PairingRequest))  # fmt: skip


def mesh_document() -> dict[str, Any]:
    components = {**_components(wire.StateBody, wire.UnlinkBody),
                  "StateEnvelope": _envelope("StateBody"),
                  "UnlinkEnvelope": _envelope("UnlinkBody")}  # fmt: skip
    paths = {PERMISSIONS: {"$ref": "#/components/schemas/StateEnvelope"},
             UNLINK: {"$ref": "#/components/schemas/UnlinkEnvelope"}}  # fmt: skip
    return openapi(paths, components)


def narrowed(document: dict[str, Any], beta_public: str, alpha_public: str) -> dict[str, Any]:
    """For positive cases only: values that also pass the checks a JSON schema cannot say
    (domain and endpoint syntax, dns_ip inside vpn_subnet, the keys of a real link), so that
    they reach the MAC and source checks instead of stopping at the model. Negative cases use
    the models' own schemas: data this narrows away is valid, not negative."""
    out = copy.deepcopy(document)
    schemas = out["components"]["schemas"]
    fixed = {"domain": {"enum": ["beta.test", "BETA.test."]},
             "endpoint": {"enum": ["198.51.100.2:51820", "[2001:DB8::2]:51820", "beta.example:1"]},
             "vpn_subnet": {"enum": ["10.62.0.0/24"]}, "dns_ip": {"enum": ["10.62.0.1"]},
             "seen_at": {"enum": ["198.51.100.1:51820", "[2001:DB8::1]:51820"]},
             "vip": {"enum": ["10.62.0.254"]}, "from_public_key": {"enum": [beta_public]},
             "to_public_key": {"enum": [alpha_public]}}  # fmt: skip
    fixed["endpoints"] = {"type": "array", "items": fixed["endpoint"], "maxItems": 4}
    for model in schemas.values():
        for name, prop in model.get("properties", {}).items():
            if name in fixed:
                nullable = "anyOf" in prop
                prop.clear()
                either = {"anyOf": [fixed[name], {"type": "null"}]}
                prop.update(either if nullable else fixed[name])
    return out


@pytest.fixture
def apps(control: Control, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    monkeypatch.setattr(peer, "PAIRING_RATE", (10**9, 1.0))
    links = Links(control)
    inv = links.invite(3600)
    assert inv.pairing is not None
    beta = keys.public_from_private(keys.generate_private())
    request = {"identity": {"cell_name": "beta", "domain": "beta.test", "public_key": beta,
                            "endpoint": "198.51.100.2:51820", "vpn_subnet": "10.62.0.0/24",
                            "dns_ip": "10.62.0.1"}, "nonce": "ab" * 16}  # fmt: skip
    links.accept({**request, "mac": mac(pairing_key(inv.pairing.token), request)})
    links.invite(3600)  # an outstanding invite: the redemption path runs its MAC check
    alpha = keys.public_from_private(control.cell().private_key)
    yield {"pairing": peer.build_pairing_api(links),
           "mesh": peer.build_mesh_api(links, Sync(links)), "keys": (beta, alpha)}  # fmt: skip


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def _integers_as_integers(case: Any) -> Any:
    """JSON Schema's `integer` admits 315.0, which the models refuse by design (no silent
    coercion): positive cases send integers as integers. (A float where a float belongs,
    `sent_at`, takes an integer too.)"""
    case.body = _ints(case.body)
    return case


def _run(app: FastAPI, document: dict[str, Any], path: str, mode: GenerationMode) -> Counter[int]:
    config = SchemathesisConfig()
    schema = schemathesis.openapi.from_dict(document, config=config)
    schema.app = app
    schema.config.checks.negative_data_rejection.expected_statuses = REJECTED_AS_BAD_INPUT
    statuses: Counter[int] = Counter()

    strategy = schema[path]["POST"].as_strategy(generation_mode=mode)
    if mode == GenerationMode.POSITIVE:
        strategy = strategy.map(_integers_as_integers)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        response = case.call_and_validate(checks=[not_a_server_error, negative_data_rejection])
        statuses[response.status_code] += 1

    fuzz()
    return statuses


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(
    ("app", "path"), [("pairing", PAIRING), ("mesh", PERMISSIONS), ("mesh", UNLINK)]
)
def test_the_cell_to_cell_listeners_never_answer_5xx(
    apps: dict[str, Any], app: str, path: str, mode: GenerationMode
) -> None:
    """Positive cases (narrowed to reach the MAC and source checks) are refused as forged or
    from the wrong address; negative ones as bad input; none with a 5xx."""
    document = pairing_document() if app == "pairing" else mesh_document()
    if mode == GenerationMode.POSITIVE:
        document = narrowed(document, *apps["keys"])
    statuses = _run(apps[app], document, path, mode)
    figures = dict(sorted(statuses.items()))
    print(f"\n{path} {mode.value}: {sum(statuses.values())} cases, {figures}")
    assert sum(statuses.values()) >= EXAMPLES // 2, statuses
    assert not [s for s in statuses if s >= 500], statuses
    if mode == GenerationMode.NEGATIVE:
        assert set(statuses) <= {400, 413, 422}, statuses
    else:  # most reach the authentication: refused there, not by the model
        assert statuses[403] > sum(statuses.values()) // 2, statuses


# -- malformed JSON that no schema describes ------------------------------------------------------
MALFORMED = {
    "nan": b'{"identity": NaN, "nonce": "00", "mac": "00"}',
    "infinity": b'{"body": {"seq": Infinity}, "mac": "00"}',
    "minus infinity": b'{"body": -Infinity, "mac": "00"}',
    "bare nan": b"NaN",
    "nested 4k (fits the pairing limit)": b"[" * 4000 + b"]" * 4000,
    "nested 10k": b"[" * 10_000 + b"]" * 10_000,
    "nested 100k unclosed": b"[" * 100_000,
    "nested objects": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "nested past the limit in a known field": json.dumps(
        {"body": hostile.nested(MAX_DEPTH + 5), "mac": "0" * 64}
    ).encode(),
    "duplicate keys": b'{"mac": "' + b"0" * 64 + b'", "mac": "' + b"1" * 64 + b'", "body": {}}',
    "not utf-8": b'{"body": "\xff\xfe", "mac": "00"}',
    "empty": b"",
    "a number": b"1" * 5000,
    "huge integer": b'{"body": {"seq": 1' + b"0" * 4400 + b'}, "mac": "00"}',
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
@pytest.mark.parametrize("path", [PAIRING, PERMISSIONS, UNLINK])
def test_malformed_json_gets_a_4xx_on_every_cell_to_cell_route(
    apps: dict[str, Any], path: str, name: str
) -> None:
    """NaN, Infinity, deep nesting and the like (issue 11 item 10): a 4xx naming the body,
    never a 500."""
    app = apps["pairing" if path == PAIRING else "mesh"]
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post(path, content=MALFORMED[name],
                           headers={"content-type": "application/json"})  # fmt: skip
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    assert resp.json()["field"], resp.text[:300]
