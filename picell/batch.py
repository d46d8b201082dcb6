"""Group commit: concurrent changes share one write transaction, one apply and one commit.

A burst of owner requests (100 shares from a script, a page that saves many toggles) would
otherwise cost one reconcile each: one nft transaction, one `wg syncconf`, one push. Here each
change still runs its own block, validated and written as before, but inside a savepoint of a
write transaction that an applier thread holds open for the whole batch; once every waiting
block has run, the batch is applied to the kernel once and committed once. Each request is
answered only after that commit (acknowledged means applied).

- A block that raises (bad input, a conflict) rolls back its savepoint alone; its caller gets
  its own error and the rest of the batch goes on.
- An apply that fails rolls back the whole batch, the previous state is re-applied, and every
  caller in the batch gets the failure: nothing half-applied.
- Blocks run one at a time, in arrival order, on their callers' threads (the transaction is
  lent to them: `Store.lend`), so they keep their thread's context and their exceptions.

Must not run system commands itself: `apply` and `restore` are the caller's (`Control`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from picell.store.db import Store

log = logging.getLogger(__name__)

# After the first change arrives, wait for the burst to settle: until no other change arrived
# for QUIET_S, at most GATHER_S. A lone change pays QUIET_S once.
QUIET_S = 0.004
GATHER_S = 0.05
MAX_BATCH = 256  # blocks per batch: a steady stream still gets applied


class _Ticket:
    __slots__ = ("turn", "done", "outcome", "ok", "error")

    def __init__(self) -> None:
        self.turn = threading.Event()  # the batch's transaction is open: run the block
        self.done = threading.Event()  # the block has run (ok or not)
        self.outcome = threading.Event()  # the batch was applied and committed, or failed
        self.ok = False
        self.error: BaseException | None = None


class GroupCommit:
    """`change()` runs a block inside the next batch and returns once the batch is applied.
    `apply(conn)` converges the kernel to the state in `conn` (uncommitted); it is called with
    the write transaction open and may raise; `restore()` re-applies the committed state after
    a failed apply."""

    def __init__(
        self,
        store: Store,
        apply: Callable[[sqlite3.Connection], None],
        restore: Callable[[], None],
        apply_lock: threading.RLock,
    ) -> None:
        self.store = store
        self.apply = apply
        self.restore = restore
        self.apply_lock = apply_lock
        self.batches = 0  # batches applied since start (figures, tests)
        self._queue: list[_Ticket] = []
        self._cond = threading.Condition()
        self._last_arrival = 0.0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    @contextmanager
    def change(self) -> Iterator[sqlite3.Connection]:
        ticket = _Ticket()
        with self._cond:
            if self._stop:
                raise RuntimeError("the daemon is stopping")
            self._queue.append(ticket)
            self._last_arrival = time.monotonic()
            self._cond.notify_all()
        ticket.turn.wait()
        if ticket.error is not None:  # the batch failed before this block's turn
            raise ticket.error
        try:
            with self.store.lend() as conn:
                yield conn
            ticket.ok = True
        finally:
            ticket.done.set()
        ticket.outcome.wait()
        if ticket.error is not None:
            raise ticket.error

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _take(self) -> list[_Ticket] | None:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if not self._queue:
                return None
            first = time.monotonic()
            while True:  # let the burst settle
                now = time.monotonic()
                quiet_until = self._last_arrival + QUIET_S
                if now >= quiet_until or now >= first + GATHER_S or len(self._queue) >= MAX_BATCH:
                    break
                self._cond.wait(min(quiet_until, first + GATHER_S) - now)
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._one(batch)
            except BaseException as exc:  # noqa: BLE001 - answered to every caller, never lost
                log.exception("group commit failed")
                for ticket in batch:
                    if ticket.error is None and (ticket.ok or not ticket.done.is_set()):
                        ticket.error = exc
            finally:
                for ticket in batch:  # nobody waits for ever, whatever happened
                    if not ticket.turn.is_set():
                        ticket.turn.set()  # its error is set: it raises without running
                    else:
                        ticket.done.wait()
                    ticket.outcome.set()

    def _run_blocks(self, batch: list[_Ticket]) -> None:
        for ticket in batch:
            ticket.turn.set()
            ticket.done.wait()

    def _one(self, batch: list[_Ticket]) -> None:
        # The apply lock is taken first and held through the commit: a converge (which reads
        # a snapshot under the same lock) never applies a state older than this batch's.
        with self.apply_lock:
            try:
                with self.store.transaction() as conn:
                    self._run_blocks(batch)
                    with self._cond:  # changes that came while the blocks ran join this batch
                        room = MAX_BATCH - len(batch)
                        more, self._queue = self._queue[:room], self._queue[room:]
                    batch.extend(more)  # first: whatever happens, `_run` answers them too
                    self._run_blocks(more)
                    if not any(t.ok for t in batch):
                        return  # every block refused: nothing to apply, an empty commit
                    self.apply(conn)  # raises: the whole batch rolls back
            except BaseException as exc:
                for ticket in batch:
                    if ticket.ok or not ticket.done.is_set():
                        ticket.error = exc
                if any(t.ok for t in batch):
                    self.restore()
                return
            self.batches += 1
