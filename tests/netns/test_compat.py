"""Compatibility across versions: a cell running the old code (main at 01e3ef2, the last commit
before issue 11's typed wire) links and syncs with a cell running this tree, in both pairing
directions. Each cell is driven with its own CLI, so the test holds whatever either CLI calls
its admin API.

The old code is checked out at test time (`git worktree add`, else `git archive`) into a
temporary directory and run with the same venv; a clone without that commit fails the test
(it never skips: a netns test that skips in CI counts as missing).

Topology (module scope):

      ┌──────────────────── switch ns: br-inet 198.51.100.0/24 ─────────────────────┐
      │                    │                    │                │                  │
  old ns .1            new ns .2            oldpad ns .11    newpad ns .12      dns ns .53
  picell at 01e3ef2    picell of this tree  old's device     new's device       upstream
  (temporary worktree) 10.62.0.1/24         wg-quick         wg-quick           Unbound
  10.61.0.1/24         new.test
  old.test             web: "new web" on 127.0.0.1:8000
  web: "old web" on 127.0.0.1:8000

(a) new imports old's invite; both share web each way, unshare; new disconnects.
(b) old imports new's invite; the same; old disconnects.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns.cells import Cell, cell_on_bridge, start_upstream_dns
from tests.netns.harness import Netns, Topology, run, wait_until

OLD_COMMIT = "01e3ef2d519827c18bacae59ebcd9e036ab6c4db"  # main before issue 11's typed wire
ROOT = Path(__file__).resolve().parents[2]  # the tree under test: its `picell` is the new one


@dataclass
class World:
    topo: Topology
    old_tree: Path
    old: Cell
    new: Cell
    oldpad: Netns
    newpad: Netns

    def device_of(self, cell: Cell) -> Netns:
        return self.oldpad if cell is self.old else self.newpad


def _git(*args: str) -> tuple[int, str]:
    proc = run(["git", "-C", str(ROOT), *args], check=False, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


@contextmanager
def old_source() -> Iterator[Path]:
    """The tree of OLD_COMMIT in a temporary directory, removed afterwards."""
    code, out = _git("cat-file", "-e", f"{OLD_COMMIT}^{{commit}}")
    if code != 0:
        pytest.fail(
            f"commit {OLD_COMMIT[:7]} (main before the typed wire) is not in the repository at "
            f"{ROOT}, so the old cell cannot run: this test needs the history (a shallow clone "
            f"lacks it; `git fetch --unshallow`). git said: {out.strip()}",
            pytrace=False,
        )
    parent = Path(tempfile.mkdtemp(prefix="picell-compat-"))
    tree = parent / f"picell-{OLD_COMMIT[:7]}"
    added, out = _git("worktree", "add", "--detach", str(tree), OLD_COMMIT)
    worktree = added == 0
    try:
        if not worktree:  # e.g. a git too old for worktrees: a plain export serves as well
            shutil.rmtree(tree, ignore_errors=True)
            tree.mkdir()
            tar = parent / "old.tar"
            code, archived = _git("archive", "--format=tar", "-o", str(tar), OLD_COMMIT)
            if code != 0:
                pytest.fail(f"cannot check out {OLD_COMMIT[:7]}: {out}{archived}", pytrace=False)
            run(["tar", "-xf", str(tar), "-C", str(tree)])
        yield tree
    finally:
        if worktree:
            _git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with old_source() as old_tree, Topology() as topo:
        inet = topo.bridge("inet")
        nss = {r: topo.add_ns(r) for r in ("oldpad", "newpad", "dns")}
        for role, ip in (("oldpad", "11"), ("newpad", "12"), ("dns", "53")):
            topo.attach(nss[role], inet, f"198.51.100.{ip}/24")
        start_upstream_dns(
            nss["dns"], "198.51.100.53", {"www.example.net": "192.0.2.80"}, topo.workdir
        )
        old = cell_on_bridge(topo, inet, "old", 1, resolver="198.51.100.53", source=old_tree)
        new = cell_on_bridge(topo, inet, "new", 2, resolver="198.51.100.53", source=ROOT)
        for cell in (old, new):
            cell.ns.serve_http("127.0.0.1", 8000, f"{cell.name} web")
            cell.cli("services", "add", "web", "--backend", "127.0.0.1:8000", "--port", "80")
        nss["oldpad"].device(old.add_device("oldpad"), hint="oldpad").up()
        nss["newpad"].device(new.add_device("newpad"), hint="newpad").up()
        yield World(topo, old_tree, old, new, nss["oldpad"], nss["newpad"])


def linked(cell: Cell, other: str) -> bool:
    link = cell.links().get(other)
    return link is not None and link["state"] == "linked"


def outbound(cell: Cell, other: str) -> list[str]:
    """What `other` shares with `cell`, as `cell` learned it from other's state documents."""
    return sorted(s["name"] for s in cell.links()[other]["outbound"])


def invite_string(cell: Cell) -> str:
    """A fresh invite of `cell`'s own CLI (the old one GETs it, the new one may POST)."""
    string: str = cell.cli("invite")["string"]
    return string


def link(world: World, importer: Cell, inviter: Cell) -> None:
    """`importer` connects with `inviter`'s invite: both linked, one authentication string,
    each device resolves and reaches the other cell."""
    leftover = (inviter.name in importer.links(), importer.name in inviter.links())
    assert leftover == (False, False), "a link left over from an earlier test"
    importer.cli("connect", invite_string(inviter))
    wait_until(
        lambda: linked(importer, inviter.name) and linked(inviter, importer.name),
        30,
        f"{importer.name} and {inviter.name} are not both linked",
    )
    seen_by_importer = importer.links()[inviter.name]["auth_string"]
    assert seen_by_importer == inviter.links()[importer.name]["auth_string"]
    for cell, other in ((world.old, world.new), (world.new, world.old)):
        device = world.device_of(cell)
        wait_until(
            lambda d=device, o=other: d.dig(f"{o.name}.{o.domain}") == [o.ip],
            30,
            f"{cell.name}'s device cannot resolve {other.name}'s name",
        )
        wait_until(
            lambda d=device, o=other: d.ping(o.ip),
            30,
            f"{cell.name}'s device cannot reach {other.name}",
        )


def share_and_unshare(world: World, sharer: Cell, receiver: Cell) -> None:
    """`sharer` shares web with `receiver`, then unshares it: `receiver` accepts both state
    documents, and its device reaches web by name only in between."""
    device = world.device_of(receiver)
    name = f"web.{sharer.domain}"
    assert device.dig_status(name) == "NXDOMAIN"  # nothing shared yet
    sharer.cli("share", receiver.name, "web")
    wait_until(
        lambda: outbound(receiver, sharer.name) == ["web"],
        30,
        f"{receiver.name} did not accept {sharer.name}'s document sharing web",
    )
    wait_until(
        lambda: sharer.links()[receiver.name]["last_push_status"] == "ok",
        30,
        f"{sharer.name}'s push to {receiver.name} is not acknowledged",
    )
    wait_until(
        lambda: device.http_get(f"http://{name}/") == f"{sharer.name} web",
        30,
        f"{receiver.name}'s device cannot use {name}",
    )
    vip = device.dig(name)[0]

    sharer.cli("unshare", receiver.name, "web")
    wait_until(
        lambda: outbound(receiver, sharer.name) == [],
        30,
        f"{receiver.name} did not accept {sharer.name}'s document unsharing web",
    )
    wait_until(
        lambda: not device.tcp_connect(vip, 80, timeout_s=1),
        30,
        f"{receiver.name}'s device still reaches {name} after the unshare",
    )


def disconnect(world: World, leaver: Cell, other: Cell) -> None:
    """`leaver` disconnects: the link is gone on both sides, and so is the tunnel."""
    leaver.cli("disconnect", other.name)
    wait_until(
        lambda: other.name not in leaver.links() and leaver.name not in other.links(),
        45,
        f"the link between {leaver.name} and {other.name} is not gone on both sides",
    )
    for cell, gone in ((leaver, other), (other, leaver)):
        device = world.device_of(cell)
        assert not device.ping(gone.ip, timeout_s=1)
        assert device.dig_status(f"{gone.name}.{gone.domain}") != "NOERROR"


def test_each_cell_runs_its_own_source(world: World) -> None:
    old_file = world.old_tree.resolve() / "picell" / "__init__.py"
    new_file = ROOT / "picell" / "__init__.py"
    assert world.old.picell_file() == str(old_file)
    assert world.new.picell_file() == str(new_file)
    # the daemons themselves were started in those trees (python -m puts the cwd first)
    for cell, tree in ((world.old, world.old_tree.resolve()), (world.new, ROOT)):
        assert cell.proc is not None
        # (under a chroot the kernel shows the cwd from the real root: a prefix before it)
        cwd = os.readlink(f"/proc/{cell.proc.pid}/cwd")
        assert cwd == str(tree) or cwd.endswith(str(tree)), (cwd, tree)
    # and the old tree is the old commit's code
    code, text = _git("show", f"{OLD_COMMIT}:picell/mesh/invite.py")
    assert code == 0 and (old_file.parent / "mesh" / "invite.py").read_text() == text


def test_new_cell_imports_the_old_cells_invite_and_syncs(world: World) -> None:
    link(world, importer=world.new, inviter=world.old)
    share_and_unshare(world, sharer=world.old, receiver=world.new)
    share_and_unshare(world, sharer=world.new, receiver=world.old)
    disconnect(world, leaver=world.new, other=world.old)


def test_old_cell_imports_the_new_cells_invite_and_syncs(world: World) -> None:
    link(world, importer=world.old, inviter=world.new)
    share_and_unshare(world, sharer=world.new, receiver=world.old)
    share_and_unshare(world, sharer=world.old, receiver=world.new)
    disconnect(world, leaver=world.old, other=world.new)
