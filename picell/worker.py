"""A daemon thread that sleeps until it is woken or stopped: the base of the coalescer
(`control.Coalescer`), the sender (`mesh.sender.Sender`), the port mapper
(`system.portmap.PortMapper`) and the expiry timer (`mesh.expiry.Expiry`).

Owns the thread and its two events (`_wake`, `_stop`); what a round does is the subclass's
`_run`. Must not hold logic of its own.
"""

from __future__ import annotations

import threading


class Worker:
    thread_name = "worker"
    join_s = 5.0  # how long `stop` waits for a round under way

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.join_s)

    def _run(self) -> None:
        raise NotImplementedError
