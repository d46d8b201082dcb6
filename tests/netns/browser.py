"""A real browser inside a test namespace: Debian's chromium, headless, driven by Playwright.

A cell's web UI listens on 127.0.0.1 inside the cell's namespace, so the browser runs there too.
`Browser.step(FUNCTION, **params)` runs `python -m tests.netns.browser MODULE:FUNCTION` in the
namespace: it launches chromium (Playwright gives it a fresh temporary profile), restores the
cookies left by the browser's previous step (Playwright's storage state, a file in the
topology's work dir, so a login lasts across steps), calls `FUNCTION(page, **params)` and
prints its JSON-able result, which `step` returns. A failing step raises with the traceback
and leaves a screenshot of the page in the work dir.

Never `playwright install`: the browser is the apt package's /usr/bin/chromium.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.netns.harness import PYTHON, Netns

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]
RESULT = "BROWSER-RESULT "
STEP_TIMEOUT_S = 180


class Browser:
    """One browser user of the web UI at `base_url`, seen from namespace `ns`."""

    def __init__(self, ns: Netns, base_url: str, name: str, phone: bool = False) -> None:
        self.ns = ns
        self.base_url = base_url
        self.name = name
        self.phone = phone
        self.state = ns.topology.workdir / f"browser-{name}.json"

    def step(self, func: Callable[..., Any], **params: Any) -> Any:
        target = f"{func.__module__}:{func.__name__}"
        failure = self.ns.topology.workdir / f"browser-{self.name}-{func.__name__}-failed.png"
        argv = [PYTHON, "-m", "tests.netns.browser", target, json.dumps(params), str(self.state),
                self.base_url, str(failure), "phone" if self.phone else "desktop"]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = self.ns.run(argv, check=False, timeout=STEP_TIMEOUT_S, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
        if proc.returncode != 0 or not lines:
            raise AssertionError(
                f"browser step {func.__name__} in {self.ns.name} failed (screenshot {failure}):\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return json.loads(lines[-1][len(RESULT) :])


def _main() -> None:
    from playwright.sync_api import expect, sync_playwright

    target, params, state, base_url, failure, kind = sys.argv[1:7]
    module, _, name = target.partition(":")
    func = getattr(importlib.import_module(module), name)
    viewport = {"width": 390, "height": 844} if kind == "phone" else {"width": 1200, "height": 900}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            context = browser.new_context(
                base_url=base_url,
                viewport=viewport,  # type: ignore[arg-type]
                storage_state=state if Path(state).exists() else None,
                permissions=["clipboard-read", "clipboard-write"],
                accept_downloads=True,
            )
            context.set_default_timeout(30_000)  # loaded CI hosts: generous, never a sleep
            expect.set_options(timeout=30_000)
            page = context.new_page()
            try:
                result = func(page, **json.loads(params))
            except BaseException:
                traceback.print_exc()
                page.screenshot(path=failure, full_page=True)
                raise
            context.storage_state(path=state)
        finally:
            browser.close()
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    _main()
