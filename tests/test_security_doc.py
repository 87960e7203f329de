"""SECURITY.md names, for each threat, the tests that prove its control: every test it
names exists, in the file it says, so that the map cannot drift from the tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOC = ROOT / "SECURITY.md"


def _references() -> list[tuple[str, str]]:
    """(file, test) for each test the tables name: ``test_x.py::test_y``, and the bare
    ``test_z`` names that follow it in the same cell (they are in the same file)."""
    found = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            continue
        cell = line.rstrip("|").rsplit("|", 1)[-1]
        current = None
        for token in re.findall(r"`([^`]+)`", cell):
            head = re.match(r"((?:e2e/)?test_\w+\.py)(?:::(\w+))?", token)
            if head:
                current = head.group(1)
                if head.group(2):
                    found.append((current, head.group(2)))
            elif current and re.fullmatch(r"test_\w+", token):
                found.append((current, token))
        for match in re.finditer(r"((?:e2e/)?test_\w+\.py) \(([^)]*)\)", cell):
            for name in re.findall(r"`(test_\w+)`", match.group(2)):
                found.append((match.group(1), name))
    return found


def test_every_test_security_md_names_exists() -> None:
    refs = _references()
    assert len(refs) >= 40, refs  # the tables are read at all
    missing = []
    for file, name in refs:
        path = ROOT / "tests" / file
        if not path.exists():
            missing.append(f"{file} (no such file)")
            continue
        pattern = name.removesuffix("*")
        if not re.search(rf"^(async )?def {re.escape(pattern)}", path.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, "SECURITY.md names tests that do not exist:\n" + "\n".join(missing)


def test_every_file_security_md_names_exists() -> None:
    text = DOC.read_text()
    for file in set(re.findall(r"`((?:e2e/)?test_\w+\.py)", text)):
        assert (ROOT / "tests" / file).exists(), file
    for path in set(re.findall(r"`((?:bench|docs)/[\w./]+)`", text)):
        assert (ROOT / path).exists(), path
