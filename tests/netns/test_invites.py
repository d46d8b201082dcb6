"""Invites driven through the CLI between two real cells: `invite --json` output is what
`connect @FILE` (and `connect -`) takes, `invites` shows who used one, and a revoked invite is
refused when redeemed, changing nothing on either side.

Topology:

      ┌────────── switch ns: br-inet 198.51.100.0/24 ──────────┐
      │                                                          │
  alpha ns 198.51.100.1                              beta ns 198.51.100.2
  picell alpha 10.61.0.1/24 alpha.test               picell beta 10.62.0.1/24 beta.test
  pairing port 51821 <──── beta redeems alpha's invites ────
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.netns.cells import PICELL, Cell, cell_on_bridge
from tests.netns.harness import Topology, wait_until


@dataclass
class Pair:
    topo: Topology
    alpha: Cell
    beta: Cell


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        alpha = cell_on_bridge(topo, inet, "alpha", 1)
        beta = cell_on_bridge(topo, inet, "beta", 2)
        yield Pair(topo, alpha, beta)


def invites_of(cell: Cell) -> dict[int, dict[str, object]]:
    return {row["id"]: row for row in cell.cli("invites")}


def test_a_revoked_invite_is_refused_and_changes_nothing(pair: Pair) -> None:
    alpha, beta = pair.alpha, pair.beta
    made = alpha.cli("invite", "--expires", "1h")
    assert invites_of(alpha)[made["id"]]["state"] == "open"
    assert alpha.cli("invites", "revoke", str(made["id"])) == {"revoked": made["id"]}
    assert made["id"] not in invites_of(alpha)
    # beta redeems it on alpha's pairing port through stdin (`connect -`): alpha refuses
    proc = beta.ns.run(
        [*PICELL, "--data-dir", str(beta.data_dir), "connect", "-", "--json"],
        input=made["string"], check=False, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "refused" in json.loads(proc.stdout)["message"]
    assert beta.links() == {} and alpha.links() == {}
    # revoking it again, or an unknown one, names the id
    assert alpha.refused("invites", "revoke", str(made["id"]))["field"] == "id"


def test_invite_json_output_links_through_connect_at_file(pair: Pair) -> None:
    """`picell invite --json > f` on alpha, `picell connect @f` on beta: linked on both sides,
    and alpha's `invites` shows the invite used by beta."""
    alpha, beta = pair.alpha, pair.beta
    out = alpha.run("invite", "--json").stdout
    made = json.loads(out)
    invite_file = pair.topo.workdir / "alpha-invite.json"
    invite_file.write_text(out)
    linked = beta.cli("connect", f"@{invite_file}")
    assert linked["name"] == "alpha" and linked["state"] == "linked"
    wait_until(
        lambda: alpha.links().get("beta", {}).get("state") == "linked", 20,
        "alpha does not show the link with beta",
    )  # fmt: skip
    row = invites_of(alpha)[made["id"]]
    assert row["state"] == "used" and row["used_by"] == "beta"
    # a used invite is the record of its link: it cannot be revoked
    assert "beta" in alpha.refused("invites", "revoke", str(made["id"]))["message"]
    wait_until(lambda: beta.links()["alpha"]["online"], 30, "the tunnel to alpha does not come up")


@pytest.mark.parametrize("form", ["raw JSON @file", "string @file", "string argument",
                                  "string on stdin (-)", "invite --json on stdin (-)"])  # fmt: skip
def test_connect_takes_every_form_a_cell_exports(pair: Pair, form: str) -> None:
    """Whatever alpha exports (the raw invite JSON of `GET /api/cells/invites`' answer, the
    copy-paste string, `invite --json`), beta's `connect` links with it: as an argument, as
    @FILE, or on standard input."""
    alpha, beta = pair.alpha, pair.beta
    if "alpha" in beta.links():
        beta.cli("disconnect", "alpha")
        wait_until(lambda: "alpha" not in beta.links() and "beta" not in alpha.links(), 40,
                   "the previous link did not go")  # fmt: skip
    made = alpha.cli("invite")
    raw_file = pair.topo.workdir / "raw-invite.json"
    raw_file.write_text(json.dumps(made["invite"]))
    string_file = pair.topo.workdir / "invite.txt"
    string_file.write_text(made["string"] + "\n")
    argv = [*PICELL, "--data-dir", str(beta.data_dir), "connect"]
    if form == "raw JSON @file":
        proc = beta.ns.run([*argv, f"@{raw_file}", "--json"], check=False, timeout=60)
    elif form == "string @file":
        proc = beta.ns.run([*argv, f"@{string_file}", "--json"], check=False, timeout=60)
    elif form == "string argument":
        proc = beta.ns.run([*argv, made["string"], "--json"], check=False, timeout=60)
    elif form == "string on stdin (-)":
        proc = beta.ns.run([*argv, "-", "--json"], input=made["string"], check=False, timeout=60)
    else:
        proc = beta.ns.run([*argv, "-", "--json"], input=json.dumps(made), check=False,
                           timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["state"] == "linked"
    wait_until(lambda: alpha.links().get("beta", {}).get("state") == "linked", 20,
               "alpha does not show the link")  # fmt: skip
