#!/usr/bin/env python3
"""What ``json_body`` costs per call, in instructions: exact, and the same whatever the
machine is doing (bench/bodies.py's microseconds vary by half on a busy 2-core VM).

    .venv/bin/python bench/bodies_instructions.py [--src OTHER_CHECKOUT/src]

Each body of bench/bodies.py is run under ``valgrind --tool=callgrind`` twice, once
with no call and once with N calls, in a fresh interpreter; the difference over N is
one call. --src measures another checkout's code (the code before a change) with this
bench's bodies. Needs Debian's valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = """
import sys
sys.path.insert(0, {bench!r})
from bodies import BODIES
from paragate.protocol.bodies import json_body
raw = BODIES[{name!r}]
for _ in range({n}):
    json_body(raw)
"""


def instructions(name: str, n: int, env: dict[str, str]) -> int:
    code = CHILD.format(bench=str(HERE), name=name, n=n)
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    assert found, out.stderr[-500:]
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", help="a checkout's src/ to import paragate from")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is missing: apt-get install valgrind")
    sys.path.insert(0, str(HERE))
    from bodies import BODIES

    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    print(f"paragate from {args.src or 'this checkout'}\n")
    print("| body | bytes | instructions per json_body |")
    print("|---|---|---|")
    for name, raw in BODIES.items():
        n = 400 if len(raw) < 10_000 else 20
        per = (instructions(name, n, env) - instructions(name, 0, env)) // n
        print(f"| {name} | {len(raw):,} | {per:,} |")


if __name__ == "__main__":
    main()
