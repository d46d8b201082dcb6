"""A connection flood, run by tests and benchmarks inside an "internet" namespace:

    python flooder.py HOST PORT COUNT DURATION_S REOPEN_PER_S OUT.json

Opens COUNT TCP connections to HOST:PORT and holds them idle (never sends a byte) for
DURATION_S. Each connection the server closes is opened again, at most REOPEN_PER_S a second, so
the pressure lasts the whole run. Writes to OUT.json: `opened` (connect attempts), `established`
(handshakes completed: the server's kernel took them), `closed_by_server`, `first_closed` (of
the first COUNT), `open_at_end` (still open or still connecting). Standalone (standard library
only); raises its own open-files limit.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import sys
import time


def main() -> None:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    duration_s, reopen_per_s, out = float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    stats = dict.fromkeys(
        ("opened", "established", "closed_by_server", "first_closed", "open_at_end"), 0
    )

    def open_one(first: bool) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex((host, port))
        # writable once the handshake completes; readable once the server closes or resets it
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, first)
        stats["opened"] += 1

    for _ in range(count):
        open_one(True)
    end = time.monotonic() + duration_s
    owed = 0  # connections to open again
    budget, last = 0.0, time.monotonic()
    while (now := time.monotonic()) < end:
        budget = min(reopen_per_s, budget + (now - last) * reopen_per_s)
        last = now
        while owed and budget >= 1:
            open_one(False)
            owed -= 1
            budget -= 1
        for key, events in sel.select(timeout=0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if events & selectors.EVENT_WRITE:
                sel.modify(sock, selectors.EVENT_READ, key.data)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    stats["established"] += 1
                if not events & selectors.EVENT_READ:
                    continue
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:  # reset or refused: closed by the server
                data = b""
            if data:
                continue  # an answer (there should be none: we never asked)
            stats["closed_by_server"] += 1
            stats["first_closed"] += 1 if key.data else 0
            sel.unregister(sock)
            sock.close()
            owed += 1
    stats["open_at_end"] = len(sel.get_map())
    with open(out, "w") as f:
        json.dump(stats, f)


if __name__ == "__main__":
    main()
