"""The web UI in a real browser (Debian's chromium driven by Playwright) against real cells:
login and its refusals, linking two cells by pasting one's invite into the other's page,
sharing a service and seeing it on the other cell's page, a device's QR code and config, the
CSRF refusals, disconnecting, and the slowed-down failed logins. Screenshots of every page go
to docs/screenshots/.

Topology (module scope):

      ┌──────────── switch ns: br-inet 198.51.100.0/24 ────────────┐
      │                                                            │
  alpha ns .1                                                  beta ns .2
  picell alpha 10.61.0.1/24 alpha.test                         picell beta 10.62.0.1/24
  web UI 127.0.0.1:8181 (--web-port, --admin-password-file)    web UI 127.0.0.1:8080 (default;
  chromium + Playwright in alpha ns                            password printed once in its log)
                                                               chromium + Playwright in beta ns

Each browser runs inside its cell's namespace, since the web UI listens on 127.0.0.1 only; what
it does on the pages is in `tests/netns/web_steps.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.netns.browser import Browser
from tests.netns.cells import PICELL, Cell
from tests.netns.harness import Topology, wait_until
from tests.netns.web_steps import (
    SHOTS,
    step_add_device,
    step_add_service_and_share,
    step_connect,
    step_cross_site,
    step_csrf,
    step_disconnect,
    step_guess,
    step_invite,
    step_logged_out,
    step_login,
    step_offer_exit,
    step_phone_screens,
    step_route,
    step_route_refused,
    step_see_theirs,
    step_stranger,
)

ALPHA_PASSWORD = "alpha owner's long password"


@dataclass
class World:
    topo: Topology
    alpha: Cell
    beta: Cell
    beta_password: str

    def browser(self, cell: Cell, name: str | None = None, phone: bool = False) -> Browser:
        port = 8181 if cell is self.alpha else 8080
        return Browser(cell.ns, f"http://127.0.0.1:{port}", name or cell.name, phone=phone)


def _cell(topo: Topology, bridge: Any, role: str, number: int, *init_args: str) -> Cell:
    ns = topo.add_ns(role)
    topo.attach(ns, bridge, f"198.51.100.{number}/24")
    cell = Cell(topo, ns, role, f"{role}.test", f"10.{60 + number}.0.1/24",
                f"198.51.100.{number}:51820")  # fmt: skip
    cell.init()
    if init_args:
        cell.run("init", *init_args)  # settings change while the daemon is stopped
    cell.start()
    return cell


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with Topology() as topo:
        inet = topo.bridge("inet")
        secret = topo.workdir / "alpha-password"
        secret.write_text(ALPHA_PASSWORD + "\n")
        secret.chmod(0o600)
        alpha = _cell(topo, inet, "alpha", 1, "--web-port", "8181",
                      "--admin-password-file", str(secret))  # fmt: skip
        beta = _cell(topo, inet, "beta", 2)
        assert "generated one" not in alpha.log()
        found = re.search(r"generated one: (\S+) \(also kept", beta.log())
        assert found, f"beta printed no password:\n{beta.log()}"
        kept = beta.data_dir / "admin-password"  # root-only, until the owner changes it
        assert kept.read_text().strip() == found.group(1) and kept.stat().st_mode & 0o777 == 0o600
        yield World(topo, alpha, beta, found.group(1))


# -- the tests ---------------------------------------------------------------------------------
def test_login_refuses_a_wrong_password_then_logs_in(world: World) -> None:
    cookie = world.browser(world.alpha).step(
        step_login, password=ALPHA_PASSWORD, wrong="not the password", shot="login"
    )
    assert cookie == {"httpOnly": True, "sameSite": "Strict"}
    world.browser(world.beta).step(step_login, password=world.beta_password)


def test_nothing_without_login(world: World) -> None:
    seen = world.browser(world.alpha, "stranger").step(step_stranger)
    assert set(seen["urls"].values()) == {"login"}, seen
    status, body = seen["api"]
    assert status == 401 and '"login_required"' in body
    assert seen["css"] == 200


def test_link_by_pasting_one_cells_invite_into_the_others_page(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    invite = world.browser(alpha).step(step_invite)
    assert invite.startswith("picell-invite:")
    # an invite naming beta's own network is refused with the reason next to the field
    bad = beta.invite()["string"]
    error = world.browser(beta).step(step_connect, invite=invite, bad_invite=bad)
    assert "own" in error, error
    wait_until(lambda: alpha.links()["beta"]["state"] == "linked", 20, "alpha shows no link")
    assert beta.links()["alpha"]["state"] == "linked"


def test_shared_service_appears_on_the_other_cells_page(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    seen = world.browser(alpha).step(step_add_service_and_share)
    assert "IPv4" in seen["backend_error"] and seen["refused_count"] == 0, seen
    assert [s["name"] for s in alpha.cli("services", "list")] == ["web"]
    theirs = world.browser(beta).step(step_see_theirs)
    assert "web" in theirs and "10.61.0.254:80" in theirs
    assert [s["name"] for s in beta.links()["alpha"]["outbound"]] == ["web"]


def test_add_a_device_and_get_its_qr_and_config(world: World) -> None:
    alpha = world.alpha
    got = world.browser(alpha).step(step_add_device, shots=True)
    assert got["qr_width"] > 0  # the QR image loaded
    assert got["filename"] == "phone.conf"
    assert got["config"] == alpha.cli("peers", "config", "phone")["config"]
    assert "[Interface]" in got["config"] and "Address = 10.61.0.2" in got["config"]
    world.browser(alpha, phone=True).step(step_phone_screens)


def test_internet_exit_per_device(world: World) -> None:
    alpha, beta = world.alpha, world.beta
    refused = world.browser(alpha).step(step_route_refused)
    assert "does not offer" in refused["label"]
    assert "does not offer its internet exit" in refused["error"], refused
    assert alpha.cli("peers", "list")[0]["route_via"] is None  # nothing changed
    world.browser(beta).step(step_offer_exit)
    wait_until(lambda: alpha.links()["beta"]["remote_exit_offered"], 20, "beta's offer unseen")
    routed = world.browser(alpha).step(step_route)
    assert "offers its exit" in routed["label"]
    assert "AllowedIPs = 0.0.0.0/0" in routed["config"], routed["config"]
    assert alpha.cli("peers", "list")[0]["route_via"] is None


def test_requests_without_the_csrf_token_are_refused_and_change_nothing(world: World) -> None:
    alpha = world.alpha
    before = [p["name"] for p in alpha.cli("peers", "list")]
    seen = world.browser(alpha).step(step_csrf)
    for status, body in (seen["none"], seen["wrong"]):
        assert status == 403 and '"csrf_refused"' in body, seen
    assert "CSRF token" in seen["form"]
    assert [p["name"] for p in alpha.cli("peers", "list")] == before == ["phone"]


def test_another_sites_form_gets_no_session(world: World) -> None:
    world.browser(world.alpha).step(step_cross_site, target="http://127.0.0.1:8181")
    assert [p["name"] for p in world.alpha.cli("peers", "list")] == ["phone"]


def test_admin_password_changes_from_the_cli_and_ends_sessions(world: World) -> None:
    alpha = world.alpha
    argv = ["--data-dir", str(alpha.data_dir), "admin", "password", "--json"]
    proc = alpha.ns.run([*PICELL, *argv], input="a brand new password\n")
    assert json.loads(proc.stdout) == {"changed": True}
    short = alpha.ns.run([*PICELL, *argv], input="short\n", check=False)
    assert short.returncode == 1 and json.loads(short.stdout)["field"] == "password"
    assert world.browser(alpha).step(step_logged_out).endswith("/login")
    world.browser(alpha).step(step_login, password="a brand new password")


def test_disconnect_after_a_confirmation(world: World) -> None:
    world.browser(world.beta).step(step_disconnect)
    wait_until(lambda: "beta" not in world.alpha.links(), 30, "alpha still lists beta")
    # beta forgets alpha when alpha's answer reaches its sender: just after alpha forgot beta
    wait_until(lambda: "alpha" not in world.beta.links(), 30, "beta still lists alpha")


def test_failed_logins_slow_down_but_never_lock_the_owner_out(world: World) -> None:
    """Six wrong passwords (the old limit refused the right one after five from one address):
    each is answered, later ones after a growing wait, and the right password still logs in."""
    said = world.browser(world.beta, "guesser").step(
        step_guess, guesses=[f"guess number {i}" for i in range(6)], password=world.beta_password
    )
    assert said == ["Wrong password"] * 6 + ["Cell Network"]
