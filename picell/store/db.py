"""Opening the SQLite store and running its numbered migrations.

Owns the connection, its pragmas and transactions. Must not know about WireGuard, nft or HTTP.
Each migration is one entry of `MIGRATIONS`; `PRAGMA user_version` records how many have run.
Records written by an older version load with column defaults, never by a manual step.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MIGRATIONS: tuple[str, ...] = (
    # 1: the single-cell schema
    """
    CREATE TABLE cell (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        name TEXT NOT NULL,
        domain TEXT NOT NULL,
        address TEXT NOT NULL,
        listen_port INTEGER NOT NULL,
        endpoint TEXT NOT NULL,
        private_key TEXT NOT NULL,
        interface TEXT NOT NULL,
        pair_port INTEGER NOT NULL,
        mesh_port INTEGER NOT NULL,
        uplink TEXT,
        mesh_range TEXT NOT NULL DEFAULT '10.0.0.0/8',
        upstreams TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL
    );
    CREATE TABLE peers (
        name TEXT PRIMARY KEY,
        public_key TEXT NOT NULL UNIQUE,
        private_key TEXT,
        host_index INTEGER NOT NULL UNIQUE,
        route_via TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE services (
        name TEXT PRIMARY KEY,
        vip_index INTEGER NOT NULL UNIQUE,
        backend_host TEXT NOT NULL,
        backend_port INTEGER NOT NULL,
        protocol TEXT NOT NULL DEFAULT 'tcp',
        port INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 2: links to other cells, invites, the link journal, the outbox of cross-cell messages
    """
    CREATE TABLE links (
        name TEXT PRIMARY KEY,
        public_key TEXT NOT NULL UNIQUE,
        endpoint TEXT NOT NULL,
        vpn_subnet TEXT NOT NULL,
        dns_ip TEXT NOT NULL,
        domain TEXT NOT NULL,
        mesh_port INTEGER NOT NULL DEFAULT 3000,
        remote_api_url TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'waiting',
        inbound TEXT NOT NULL DEFAULT '[]',
        outbound TEXT NOT NULL DEFAULT '[]',
        exit_offered INTEGER NOT NULL DEFAULT 0,
        remote_exit_offered INTEGER NOT NULL DEFAULT 0,
        exit_relay_active INTEGER NOT NULL DEFAULT 0,
        remote_exit_relay_active INTEGER NOT NULL DEFAULT 0,
        pending_push INTEGER NOT NULL DEFAULT 0,
        last_push_status TEXT,
        last_push_at REAL,
        last_push_error TEXT,
        last_remote_update_at REAL,
        local_seq INTEGER NOT NULL DEFAULT 0,
        remote_seq INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        linked_at REAL
    );
    CREATE TABLE invites (
        id INTEGER PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        mac_key TEXT NOT NULL UNIQUE,
        expires_at REAL NOT NULL,
        used_at REAL,
        used_by TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE journal (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        link TEXT NOT NULL,
        event TEXT NOT NULL,
        actor TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        link_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL DEFAULT 0
    );
    """,
    # 3: the exit relay (DESIGN §8): which exit slot (interface, mark, table) each exit cell our
    # devices leave through holds, and the other cell's ends of the exit tunnels
    """
    CREATE TABLE exits (
        cell TEXT PRIMARY KEY,
        slot INTEGER NOT NULL UNIQUE
    );
    ALTER TABLE links ADD COLUMN remote_exit_relay_key TEXT;
    ALTER TABLE links ADD COLUMN remote_exit_relay_port INTEGER;
    ALTER TABLE links ADD COLUMN remote_exit_client_key TEXT;
    ALTER TABLE links ADD COLUMN remote_exit_client_port INTEGER;
    """,
    # 4: the web UI's settings: its port and the admin password's argon2 hash (web issue)
    """
    CREATE TABLE admin (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        web_port INTEGER NOT NULL DEFAULT 8080,
        password_hash TEXT,
        password_set_at REAL
    );
    """,
    # 5: the typed wire (trust-boundary issue): the protocol versions the other cell speaks, and
    # our proof that we imported its invite (it spends the invite when pairing never happened)
    """
    ALTER TABLE links ADD COLUMN remote_versions TEXT NOT NULL DEFAULT '[1]';
    ALTER TABLE links ADD COLUMN invite_proof TEXT;
    CREATE INDEX journal_by_link ON journal (link, id);
    """,
    # 6: reachability (NAT issue): the endpoints a cell announces (ours: whether the owner set
    # them, the router-mapped one), where the other cell sees us, relay offers and the relay a
    # link travels through, the last introduction a mutually linked cell gave us
    """
    ALTER TABLE cell ADD COLUMN endpoints TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE cell ADD COLUMN endpoint_source TEXT NOT NULL DEFAULT 'owner';
    ALTER TABLE cell ADD COLUMN mapped_endpoint TEXT;
    ALTER TABLE links ADD COLUMN endpoints TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE links ADD COLUMN remote_seen_at TEXT;
    ALTER TABLE links ADD COLUMN relay_offered INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE links ADD COLUMN remote_relay_offered INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE links ADD COLUMN via TEXT;
    ALTER TABLE links ADD COLUMN via_port INTEGER;
    ALTER TABLE links ADD COLUMN introduced TEXT;
    ALTER TABLE links ADD COLUMN listen_port INTEGER;
    """,
    # 7: the home router's port mapping (picell/system/portmap.py), kept so that a restarted
    # daemon renews the same external ports, and releases them when they are no longer wanted
    """
    CREATE TABLE port_mapping (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        protocol TEXT NOT NULL,
        gateway TEXT NOT NULL,
        internal_address TEXT NOT NULL,
        external_address TEXT NOT NULL,
        listen_port INTEGER NOT NULL,
        external_port INTEGER NOT NULL,
        pair_port INTEGER NOT NULL,
        pair_external_port INTEGER,
        nonce TEXT NOT NULL DEFAULT '',
        lifetime_s INTEGER NOT NULL,
        obtained_at REAL NOT NULL
    );
    """,
    # 8: backups, restores and key rotation (`picell/store/backup.py`, `picell/mesh/rekey.py`):
    # this cell's incarnation (`epoch`, drawn at init and by every restore) and when a backup
    # was made of it or restored into it; the key a rotation moves to; per link, the other
    # cell's current epoch and the epochs it retired (replays of those are refused), an orphan
    # reason (a link one side holds and the other does not), and the rotations in flight
    """
    ALTER TABLE cell ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
    UPDATE cell SET epoch = lower(hex(randomblob(16)));
    ALTER TABLE cell ADD COLUMN backup_made_at REAL;
    ALTER TABLE cell ADD COLUMN restored_at REAL;
    ALTER TABLE cell ADD COLUMN next_private_key TEXT;
    ALTER TABLE cell ADD COLUMN rotated_at REAL;
    ALTER TABLE links ADD COLUMN remote_epoch TEXT NOT NULL DEFAULT '';
    ALTER TABLE links ADD COLUMN retired_epochs TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE links ADD COLUMN orphan TEXT;
    ALTER TABLE links ADD COLUMN remote_next_key TEXT;
    ALTER TABLE links ADD COLUMN rekey_state TEXT;
    """,
    # 9: per-link translation (`picell/mesh/mapping.py`): where we present the other cell's
    # network (our choice) and where it presents ours (its word); NULL: as it is
    """
    ALTER TABLE links ADD COLUMN mapped_subnet TEXT;
    ALTER TABLE links ADD COLUMN remote_mapped_subnet TEXT;
    """,
    # 10: device shares and dates (overlap issue, part 2): whether our documents publish our
    # devices to the link, the devices it publishes to us, when our exit offer ends. A share
    # with a device or an end date is kept in `inbound` as an object (a plain one as before)
    """
    ALTER TABLE links ADD COLUMN publish_devices INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE links ADD COLUMN remote_devices TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE links ADD COLUMN exit_until REAL;
    """,
)


class Store:
    """The SQLite store. One write connection, serialised by `lock`: writers use
    `transaction()` (BEGIN IMMEDIATE). Readers use `read()`: a pooled connection of their own in
    one read transaction, a consistent snapshot of the last commit (WAL), so a reader never
    waits for a writer or for an apply that holds the write transaction open.

    Group commit (`picell.batch`) lends the open write transaction to the threads whose changes
    it batches, one at a time (`lend`): on the borrowing thread, `transaction()` nests as a
    savepoint and `read()` sees the uncommitted writes, as on the writer's own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not path.exists()
        self.conn = self._connect()
        if fresh:
            os.chmod(path, 0o600)  # holds private keys: root only
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.lock = threading.RLock()
        self._writer: int | None = None  # the thread inside `transaction()` or lent it
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._opened: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self.migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    @property
    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        with self.lock:
            for number in range(self.version, len(MIGRATIONS)):
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _split(MIGRATIONS[number]):
                        self.conn.execute(statement)
                    self.conn.execute(f"PRAGMA user_version = {number + 1}")
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise

    def writing(self) -> bool:
        """True on the thread that holds the write transaction (or borrows it)."""
        return self._writer == threading.get_ident()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back if the block raises. Inside the write
        transaction (a borrowed one included) it nests as a savepoint."""
        if self.writing():
            with self._savepoint() as conn:
                yield conn
            return
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self._writer = threading.get_ident()
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            finally:
                self._writer = None
            self.conn.execute("COMMIT")

    @contextmanager
    def _savepoint(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("SAVEPOINT nested")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK TO nested")
            self.conn.execute("RELEASE nested")
            raise
        self.conn.execute("RELEASE nested")

    @contextmanager
    def lend(self) -> Iterator[sqlite3.Connection]:
        """Runs the calling thread's block inside the write transaction another thread holds
        open (group commit, which lets one block at a time borrow it), as a savepoint that is
        rolled back alone if the block raises."""
        owner, self._writer = self._writer, threading.get_ident()
        try:
            with self._savepoint() as conn:
                yield conn
        finally:
            self._writer = owner

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot of the last commit, without waiting for any writer."""
        if self.writing():
            yield self.conn
            return
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
            with self._pool_lock:  # never the write lock: a reader does not wait for writers
                self._opened.append(conn)
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")
            self._readers.put(conn)

    def close(self) -> None:
        with self._pool_lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()
        self.conn.close()


def _split(script: str) -> Iterator[str]:
    for part in script.split(";"):
        if part.strip():
            yield part
