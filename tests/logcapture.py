"""Every log line the test run produces, in one directory, and the scan that fails the
run when any of them holds a key secret, an upstream API key or a canary prompt.

The directory: ``$PARAGATE_TEST_LOG_DIR`` when set (``tools/run_tests.py`` makes one per
``make test``, shared by its pytest tiers), else a temporary directory of the pytest run
(removed when the scan finds nothing). Each pytest process writes under a subdirectory
of its own, ``session-<pid>``, and scans it when it ends (tests/conftest.py); ``python -m
tests.logcapture DIR`` scans the whole run's (``make test``'s last tier).

What lands there (tests/conftest.py and tests/servers.py put it there):

- ``gateway-*.log``: the stdout and stderr of every ``paragate serve`` the tests start;
- ``in-process.log``: every record of the ``paragate`` loggers of the in-process
  gateways (debug level, paragate's JSON format); ``in-process-access.log``: their
  per-request lines (a copy: they still go to stderr too);
- ``cli.log``: the stderr of every ``paragate`` command the tests run with
  ``subprocess.run`` (not stdout: ``keys create`` prints a key there, by design);
- ``captured-output.log``: whatever each test wrote to stdout and stderr (pytest's
  capture);
- ``swept/``: every ``*.log`` file under pytest's temporary directories at the end (vLLM's
  log, a ``paragate db upgrade``'s output, ...).

What the scan looks for, in every line of every file:

- any full key, ``pg-<12 hex>-<secret>``, known or not;
- any upstream API key: tests give theirs the ``sk-`` prefix (OpenAI's; a test in
  tests/test_log_leaks.py holds every test to it);
- any canary, ``pgcanary-<kind>-<16 hex>`` (``canary()``), and every value registered with
  ``register()`` (a database password, a metrics token, ...);

except the values registered with ``register(value, exempt=True)``: the prompts of a model
whose ``log_payloads`` is on, which are meant to be there.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Leak", "canary", "close", "new_log", "register", "scan", "session_dir"]

ENV = "PARAGATE_TEST_LOG_DIR"
REGISTRY = "registered.jsonl"  # not scanned: the values to look for

KEY = re.compile(r"pg-[0-9a-f]{12}-[A-Za-z0-9_-]{20,}")
UPSTREAM_KEY = re.compile(r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{2,}")
CANARY = re.compile(r"pgcanary-[a-z]+-[0-9a-f]{16}")
PATTERNS = (("an API key", KEY), ("an upstream API key", UPSTREAM_KEY),
            ("a canary", CANARY))

_state: dict[str, Any] = {}


def session_dir() -> Path:
    """This process's directory for log files (made on first use)."""
    if "dir" not in _state:
        base = os.environ.get(ENV)
        if base:
            root, owned = Path(base), False
            root.mkdir(parents=True, exist_ok=True)
        else:
            root, owned = Path(tempfile.mkdtemp(prefix="paragate-test-logs-")), True
        path = root / f"session-{os.getpid()}"
        path.mkdir(exist_ok=True)
        _state.update(dir=path, root=root, owned=owned, n=0)
    path: Path = _state["dir"]
    return path


def root_dir() -> tuple[Path, bool]:
    """The run's directory, and whether this process made it (and may remove it)."""
    session_dir()
    return _state["root"], _state["owned"]


def new_log(name: str) -> Path:
    """A path for one more log file, unique in the run."""
    directory = session_dir()
    _state["n"] += 1
    return directory / f"{name}-{_state['n']}.log"


def canary(kind: str) -> str:
    """A unique string the scan finds wherever it lands (``kind``: lower-case letters)."""
    assert kind.isalpha() and kind.islower(), kind
    return f"pgcanary-{kind}-{secrets.token_hex(8)}"


def register(value: str, what: str, *, exempt: bool = False) -> None:
    """Look for ``value`` in every log line of the run (``exempt``: allow it: a prompt
    of a model that logs its payloads)."""
    with (session_dir() / REGISTRY).open("a") as out:
        out.write(json.dumps({"value": value, "what": what, "exempt": exempt}) + "\n")


def append(name: str, text: str) -> None:
    """Add ``text`` to the log file ``name`` of this session (nothing once it is
    scanned)."""
    if text and not _state.get("closed"):
        with (session_dir() / name).open("a", errors="replace") as out:
            out.write(text if text.endswith("\n") else text + "\n")


def sweep(directory: Path) -> None:
    """Copy every ``*.log`` under ``directory`` into ``swept/`` of this session."""
    if not directory.is_dir():
        return
    target = session_dir() / "swept"
    for path in sorted(directory.rglob("*.log")):
        if path.is_file() and not path.is_symlink():
            copy = target / path.relative_to(directory)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)


def close() -> None:
    """The session is scanned: nothing more is written."""
    _state["closed"] = True


# -- the scan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    path: Path
    line: int
    what: str
    value: str  # masked
    excerpt: str  # the line around it, the value masked

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what} {self.value}: {self.excerpt}"


@dataclass
class Scanned:
    files: int = 0
    lines: int = 0
    access_lines: int = 0  # lines of paragate.access, in either format
    registered: int = 0
    exempt: int = 0


def mask(value: str) -> str:
    """What a report shows of a secret: never enough to match the scan again (a report
    that lands in a log must not fail the next scan)."""
    if KEY.fullmatch(value):
        return value[:18] + "***"
    if CANARY.fullmatch(value):
        return value.rsplit("-", 1)[0] + "-***"
    if UPSTREAM_KEY.fullmatch(value):
        return "sk-***"
    return value[:3] + f"*** ({len(value)} characters)"


def registrations(directory: Path) -> tuple[dict[str, str], set[str]]:
    """(value: what, for the values to look for; the exempt values) of every session
    under ``directory``."""
    wanted: dict[str, str] = {}
    exempt: set[str] = set()
    for path in sorted(directory.rglob(REGISTRY)):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["exempt"]:
                exempt.add(entry["value"])
            elif entry["value"]:
                wanted[entry["value"]] = entry["what"]
    return wanted, exempt


def _files(directory: Path) -> Iterable[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != REGISTRY:
            yield path


def scan(directory: Path, stats: Scanned | None = None) -> list[Leak]:
    """Every secret in every line of every file under ``directory``."""
    stats = stats if stats is not None else Scanned()
    wanted, exempt = registrations(directory)
    stats.registered, stats.exempt = len(wanted), len(exempt)
    # registered values first (longest first), then the shapes: one pass a line
    alternatives = [(f"registered {what}", re.escape(value)) for value, what in sorted(
        wanted.items(), key=lambda item: -len(item[0]))]
    alternatives += [(what, pattern.pattern) for what, pattern in PATTERNS]
    combined = re.compile("|".join(f"(?P<g{i}>{p})" for i, (_, p) in enumerate(alternatives)))
    exempt_sorted = sorted(exempt, key=len, reverse=True)
    leaks: list[Leak] = []
    for path in _files(directory):
        stats.files += 1
        with path.open("rb") as raw:
            for number, data in enumerate(raw, 1):
                stats.lines += 1
                line = data.decode("utf-8", "replace").rstrip("\n")
                if "paragate.access" in line:
                    stats.access_lines += 1
                for value in exempt_sorted:
                    if value in line:
                        line = line.replace(value, "[exempt payload]")
                for found in combined.finditer(line):
                    assert found.lastgroup is not None
                    what = alternatives[int(found.lastgroup[1:])][0]
                    value = found.group()
                    start = max(found.start() - 120, 0)
                    excerpt = line[start:found.end() + 120].replace(value, mask(value))
                    leaks.append(Leak(path, number, what, mask(value), excerpt))
    return leaks


def report(leaks: list[Leak], limit: int = 20) -> str:
    shown = "\n".join(f"  {leak}" for leak in leaks[:limit])
    more = f"\n  ... and {len(leaks) - limit} more" if len(leaks) > limit else ""
    return f"{len(leaks)} secret(s) in the test run's logs:\n{shown}{more}"


def main(argv: list[str]) -> int:
    """``python -m tests.logcapture DIR``: scan a whole run's logs (``make test``'s last
    tier); 1 on any leak, or when there was nothing to scan."""
    if len(argv) != 1:
        print("usage: python -m tests.logcapture DIR", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    stats = Scanned()
    leaks = scan(directory, stats) if directory.is_dir() else []
    sessions = len(list(directory.glob("session-*"))) if directory.is_dir() else 0
    print(f"scanned {stats.lines} lines in {stats.files} files of {sessions} pytest "
          f"session(s) under {directory}: {stats.access_lines} access lines, "
          f"{stats.registered} registered secrets and canaries, {stats.exempt} exempt "
          "payload canaries")
    if leaks:
        print(report(leaks))
        return 1
    # a scan of nothing proves nothing: tests/test_log_leaks.py always registers its
    # canaries, and its gateways always write access lines
    if not stats.access_lines or not stats.registered or not stats.exempt:
        print("nothing to scan: the tests' log capture is broken (no access line, or no "
              "canary registered by tests/test_log_leaks.py)")
        return 1
    print("no key, upstream API key or canary in any log line")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
