"""Start-up of `picell status` against a running cell: the fast path (`picell.cli.fast`, the
standard library only) against the full Typer CLI (Typer, httpx, pydantic) and against Python's
own start-up, in one run.

A real cell runs in a namespace (tests/netns harness, `cell_on_bridge`). Its admin socket is a
file, so the commands run from here. Each round times, in turn (alternated, so that load on the
shared cores falls on every case alike), the wall time of:
- `python3 -c pass`, the interpreter the venv is made from (its real path, not a `python3` found
  on PATH, which may be a pyenv shim script), and `<venv python> -c pass` (its site also runs
  the editable install's finder, which every `picell` of this checkout pays too);
- `python -m picell --data-dir D status`: `picell`'s entry point, which takes the fast path;
- the Typer CLI on the same command (`picell.cli.commands.app`, what every command ran before);
- the same two with `--json`.
Besides wall time, the CPU time (user + system) each command spent itself, which the load of
other work on the shared cores changes much less than the wall time (the daemon's few
milliseconds for the answer are not in it).
Each command's output is checked once: both paths print the same. The commands run with
bytecode caching on (PYTHONDONTWRITEBYTECODE removed from their environment, the first run
writes `__pycache__`), as an installed picell runs: pip compiles a package when it installs it.

Run as root from the repo root:  .venv/bin/python bench/cli.py [--rounds 40] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._stats import quantiles  # noqa: E402
from tests.netns.cells import cell_on_bridge  # noqa: E402
from tests.netns.harness import Topology  # noqa: E402

TYPER = "import sys; sys.argv[0] = 'picell'; from picell.cli.commands import app; app()"


def cases(data_dir: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "python3 -c pass": [os.path.realpath(py), "-c", "pass"],
        "venv python -c pass": [py, "-c", "pass"],
        "picell status (fast path)": [py, "-m", "picell", "--data-dir", str(data_dir), "status"],
        "picell status (Typer CLI)": [py, "-c", TYPER, "--data-dir", str(data_dir), "status"],
        "status --json (fast path)": [py, "-m", "picell", "--data-dir", str(data_dir), "status",
                                      "--json"],
        "status --json (Typer CLI)": [py, "-c", TYPER, "--data-dir", str(data_dir), "status",
                                      "--json"],
    }  # fmt: skip


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(argv: list[str]) -> tuple[float, float, str]:
    """Wall time, CPU time (user + system of the command alone) and output of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60, env=ENV)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return elapsed, cpu, proc.stdout


def run(rounds: int) -> dict[str, Any]:
    with Topology() as topo:
        inet = topo.bridge("inet")
        alpha = cell_on_bridge(topo, inet, "alpha", 1)
        alpha.add_device("phone")
        todo = cases(alpha.data_dir)
        outputs: dict[str, str] = {}
        for name, argv in todo.items():  # warm the page cache and the bytecode
            outputs[name] = timed(argv)[2]
        # the port mapping line counts seconds down; the rest must be the same text
        fast, full = (
            outputs[f"picell status ({p})"].splitlines() for p in ("fast path", "Typer CLI")
        )
        assert [ln for ln in fast if "s left" not in ln] == [
            ln for ln in full if "s left" not in ln
        ]
        assert json.loads(outputs["status --json (fast path)"])["name"] == "alpha"
        samples: dict[str, list[float]] = {name: [] for name in todo}
        cpu: dict[str, list[float]] = {name: [] for name in todo}
        for _ in range(rounds):
            for name, argv in todo.items():
                wall_s, cpu_s, _ = timed(argv)
                samples[name].append(wall_s)
                cpu[name].append(cpu_s)
    result: dict[str, Any] = {name: quantiles(s) for name, s in samples.items()}
    result["cpu_s"] = {name: quantiles(s) for name, s in cpu.items()}
    med = {name: statistics.median(s) for name, s in samples.items()}
    result["fast_over_python3_pass_ms"] = (
        med["picell status (fast path)"] - med["python3 -c pass"]
    ) * 1000
    result["fast_over_venv_pass_ms"] = (
        med["picell status (fast path)"] - med["venv python -c pass"]
    ) * 1000
    result["typer_over_fast"] = med["picell status (Typer CLI)"] / med["picell status (fast path)"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'command':<28} {'median ms':>10} {'p95 ms':>8} {'CPU median ms':>14}   (n)")
    for key, q in result.items():
        if isinstance(q, dict) and key != "cpu_s":
            c = result["cpu_s"][key]["median"] * 1000
            print(f"{key:<28} {q['median'] * 1000:>10.1f} {q['p95'] * 1000:>8.1f} {c:>14.1f}"
                  f"   ({q['n']})")  # fmt: skip
    print(f"fast path over python3 -c pass: {result['fast_over_python3_pass_ms']:.1f} ms (median)")
    print(f"fast path over venv python -c pass: {result['fast_over_venv_pass_ms']:.1f} ms (median)")
    print(f"Typer CLI / fast path: {result['typer_over_fast']:.2f}x (median)")


if __name__ == "__main__":
    main()
