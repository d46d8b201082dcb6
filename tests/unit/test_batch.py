"""Group commit (`picell.batch`) and snapshot reads (`Store.read`): concurrent changes share one
apply and one commit, each is answered only once applied, a refused one is rolled back alone,
a failed apply rolls back the batch, and readers never wait for an apply."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from picell.batch import GroupCommit
from picell.control import Control
from picell.errors import ApplyFailed, BadInput
from picell.reconcile import Report
from picell.state import State
from picell.store.db import Store
from tests.unit.test_mesh import _linked_pair


class Applier:
    """A stand-in for the kernel: records what each apply saw; can hold an apply open and
    fail one."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seen: list[set[int]] = []  # the rows each apply saw
        self.applied: set[int] = set()  # rows in the kernel: those of the last good apply
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()
        self.fail_next = False
        self.restores = 0

    def apply(self, conn: sqlite3.Connection) -> None:
        self.holding.set()
        self.hold.wait()
        rows = {r[0] for r in conn.execute("SELECT x FROM t")}
        self.seen.append(rows)
        if self.fail_next:
            self.fail_next = False
            raise ApplyFailed("the kernel said no")
        self.applied = rows

    def restore(self) -> None:
        self.restores += 1
        with sqlite3.connect(self.store.path) as ro:
            self.applied = {r[0] for r in ro.execute("SELECT x FROM t")}


@pytest.fixture
def group(tmp_path: Path) -> Iterator[tuple[GroupCommit, Applier, Store]]:
    store = Store(tmp_path / "picell.db")
    with store.transaction() as conn:
        conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    applier = Applier(store)
    grp = GroupCommit(store, applier.apply, applier.restore, threading.RLock())
    yield grp, applier, store
    grp.stop()
    store.close()


def _rows(store: Store) -> set[int]:
    with store.read() as conn:
        return {r[0] for r in conn.execute("SELECT x FROM t")}


def _insert(grp: GroupCommit, applier: Applier, x: int) -> bool:
    with grp.change() as conn:
        conn.execute("INSERT INTO t VALUES (?)", (x,))
    return x in applier.applied  # answered only once applied


def _concurrently(grp: GroupCommit, applier: Applier, fns: list[Callable[[], object]]) -> list:
    """Hold the first batch's apply until every other change waits, then let go: the waiting
    ones must form one batch."""
    applier.hold.clear()
    with ThreadPoolExecutor(max_workers=len(fns)) as pool:
        futures = [pool.submit(fns[0])]
        assert applier.holding.wait(10)
        futures += [pool.submit(fn) for fn in fns[1:]]
        _wait_for(lambda: len(grp._queue) == len(fns) - 1)
        applier.hold.set()
        return [f.exception() or f.result() for f in futures]


def _wait_for(cond: Callable[[], bool]) -> None:
    done = threading.Event()
    for _ in range(1000):
        if cond():
            return
        done.wait(0.01)
    raise AssertionError("condition not met")


def test_a_burst_is_one_apply_and_each_is_answered_once_applied(group) -> None:
    grp, applier, store = group
    results = _concurrently(grp, applier, [lambda i=i: _insert(grp, applier, i) for i in range(50)])
    assert results == [True] * 50
    assert grp.batches == 2  # the first alone, the 49 that came while it applied together
    assert len(applier.seen) == 2 and applier.seen[1] == set(range(50))
    assert _rows(store) == set(range(50))


def test_a_refused_change_is_rolled_back_alone(group) -> None:
    grp, applier, store = group

    def refused() -> bool:
        with grp.change() as conn:
            conn.execute("INSERT INTO t VALUES (100)")
            raise BadInput("name: refused", field="name")

    fns = [lambda: _insert(grp, applier, 1), lambda: _insert(grp, applier, 2), refused,
           lambda: _insert(grp, applier, 3)]  # fmt: skip
    results = _concurrently(grp, applier, fns)
    assert results[:2] == [True, True] and results[3] is True
    assert isinstance(results[2], BadInput) and results[2].field == "name"
    assert _rows(store) == {1, 2, 3} == applier.applied


def test_a_failed_apply_rolls_back_the_whole_batch_and_restores(group) -> None:
    grp, applier, store = group
    assert _insert(grp, applier, 1)
    applier.fail_next = True
    with ThreadPoolExecutor(max_workers=5) as pool:
        applier.hold.clear()
        futures = [pool.submit(_insert, grp, applier, x) for x in range(10, 15)]
        _wait_for(lambda: len(grp._queue) == 0 and applier.holding.is_set())
        applier.hold.set()
        errors = [f.exception() for f in futures]
    # every change in the failed batch gets the failure; a change in a later batch may pass
    failed = [e for e in errors if e is not None]
    assert failed and all(isinstance(e, ApplyFailed) for e in failed)
    assert applier.restores == 1
    assert _rows(store) == applier.applied
    assert len(_rows(store)) == 1 + errors.count(None)


def test_readers_never_wait_for_an_apply_and_see_the_last_commit(group) -> None:
    grp, applier, store = group
    assert _insert(grp, applier, 1)
    applier.hold.clear()
    applier.holding.clear()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_insert, grp, applier, 2)
        assert applier.holding.wait(10)  # the write transaction is open, the apply held
        assert _rows(store) == {1}  # answered at once, from the last commit
        assert not pending.done()
        applier.hold.set()
        assert pending.result(timeout=10) is True
    assert _rows(store) == {1, 2}


def test_inside_a_change_reads_see_it_and_transactions_nest(group) -> None:
    grp, applier, store = group
    with grp.change() as conn:
        conn.execute("INSERT INTO t VALUES (7)")
        assert 7 in _rows(store)  # this thread borrows the write transaction
        with pytest.raises(BadInput), store.transaction() as inner:
            inner.execute("INSERT INTO t VALUES (8)")
            raise BadInput("x: no", field="x")
        with store.transaction() as inner:
            inner.execute("INSERT INTO t VALUES (9)")
    assert _rows(store) == {7, 9} == applier.applied


def test_concurrent_shares_to_one_cell_all_count_in_few_reconciles(control: Control) -> None:
    from picell.mesh.sync import Sync

    names = [f"svc{i}" for i in range(20)]
    for i, name in enumerate(names):
        control.add_service(name, f"127.0.0.1:{8000 + i}", 80)
    links, _, _ = _linked_pair(control)
    sync = Sync(links)
    assert control.reconciler is not None
    calls: list[int] = []
    real_set: Callable[[State], Report] = control.reconciler.set

    def counting(state: State) -> Report:
        calls.append(len(state.grants))
        return real_set(state)

    control.reconciler.set = counting  # type: ignore[method-assign]
    group = control.batch_changes()
    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            outs = list(pool.map(lambda n: sync.share("beta", [n]), names))
        for name, out in zip(names, outs, strict=True):  # each answered once its share applied
            assert name in {s["name"] for s in out["inbound"]}
        assert [s["name"] for s in links.overview()[0]["inbound"]] == sorted(names)
        assert group.batches == len(calls) < 20 and calls[-1] == 20
        out = sync.share("beta", ["svc0", "svc1"])  # already shared: a no-op, still one change
        assert len(out["inbound"]) == 20
        with pytest.raises(BadInput):
            sync.share("beta", ["svc0", "nope!"], field="services")
    finally:
        group.stop()
