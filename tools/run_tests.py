"""Run every test tier in order, timing each; `make test` calls this.

Tiers: lint (ruff, mypy strict on src/), then pytest's in-process and real-server tests
(SQLite and PostgreSQL), then the fuzzing tier (tests/test_fuzz.py: schemathesis's
generated cases against a real gateway in front of the fake vLLM; it prints how many it
sent and fails below 5,000), then the end-to-end tier against real vLLM (which installs
vLLM's CPU build into its own cached venv on first use), then the benchmark in its smoke
mode (every step for about a second, no thresholds: it only proves the benchmark still
runs), and bench/control_plane.py's and bench/usage.py's smoke modes likewise. `--fast`
skips the real-vLLM tier and the benchmarks.

Every log line the pytest tiers produce lands in one directory, ``PARAGATE_TEST_LOG_DIR``
(tests/logcapture.py); after them, the tier "logs" scans it all and fails on any key
secret, upstream API key or canary prompt found there. The directory is removed when
every tier passed, and kept (its path printed) otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _have_wrk() -> bool:
    """The benchmark drives load with wrk (Debian's package): install it if we can."""
    if not shutil.which("wrk") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("== installing wrk (Debian package) for the benchmark smoke run", flush=True)
        subprocess.call(["sh", "-c", "apt-get install -y -qq wrk || "
                         "(apt-get update -qq && apt-get install -y -qq wrk)"],
                        stdout=subprocess.DEVNULL)
    if shutil.which("wrk"):
        return True
    print("!! wrk is not installed and cannot be (not root): skipping the benchmark smoke run")
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fast", action="store_true", help="skip the real-vLLM tier")
    args = parser.parse_args()
    logs = tempfile.mkdtemp(prefix="paragate-test-logs-")
    tiers: list[tuple[str, list[str]]] = [
        ("lint: ruff", [str(BIN / "ruff"), "check", "."]),
        ("lint: mypy --strict src/", [str(BIN / "mypy")]),
        ("tests: unit, in-process, real servers, PostgreSQL",
         [sys.executable, "-m", "pytest", "-q", "-m", "not e2e and not fuzz"]),
        ("fuzz: schemathesis and hypothesis against a real gateway (fake vLLM)",
         [sys.executable, "-m", "pytest", "-q", "-s", "-m", "fuzz"]),
    ]
    if not args.fast:
        tiers.append(("tests: end to end against real vLLM",
                      [sys.executable, "-m", "pytest", "-q", "-m", "e2e"]))
    tiers.append(("logs: no key, upstream API key or prompt in any log line of the tests",
                  [sys.executable, "-m", "tests.logcapture", logs]))
    if not args.fast:
        if _have_wrk():
            tiers.append(("benchmark: smoke run (bench/run.py --smoke)",
                          [sys.executable, "bench/run.py", "--smoke"]))
            tiers.append(("benchmark: control plane at scale, smoke run "
                          "(bench/control_plane.py --smoke)",
                          [sys.executable, "bench/control_plane.py", "--smoke"]))
        tiers.append(("benchmark: usage accounting at scale, smoke run "
                      "(bench/usage.py --smoke)",
                      [sys.executable, "bench/usage.py", "--smoke"]))
    timings = []
    failed = []
    for name, command in tiers:
        print(f"\n== {name}", flush=True)
        started = time.monotonic()
        env = {**os.environ, "PARAGATE_TEST_LOG_DIR": logs} if "pytest" in command else None
        code = subprocess.call(command, cwd=ROOT, env=env)
        timings.append((name, time.monotonic() - started, code))
        if code != 0:
            failed.append(name)
    print("\n== timings")
    for name, seconds, code in timings:
        print(f"{seconds:8.1f} s  {'ok  ' if code == 0 else 'FAIL'}  {name}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    print(f"tiers: {len(timings) - len(failed)} passed, {len(failed)} failed")
    if failed:
        print(f"every log line of the tests: {logs}")
    else:
        shutil.rmtree(logs, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
