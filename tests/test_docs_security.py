"""docs/security.md stays true: every test it names as proof exists, and every module it
names as what holds a threat exists, so a refactor or a renamed test cannot silently leave
a threat without its proof."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "security.md"
TEXT = PAGE.read_text()


def named_tests(text: str) -> set[tuple[str, str]]:
    """(file, test) pairs the page names: ``tests/f.py::name``, a bare ``::name`` after a
    file on the same line (it belongs to that file), and every `` `test_x` `` after the
    word "campaign" (tests/test_hostile_vmm.py); (file, "") for a file named alone."""
    found: set[tuple[str, str]] = set()
    for line in text.splitlines():
        file = ""
        for match in re.finditer(r"tests/(test_\w+\.py)(?:::(\w+))?|`::(\w+)`", line):
            if match.group(1):
                file = match.group(1)
                found.add((file, match.group(2) or ""))
            elif file:
                found.add((file, match.group(3)))
        for part in line.split("campaign")[1:]:
            for name in re.findall(r"`(test_\w+)`", part.split("|")[0]):
                found.add(("test_hostile_vmm.py", name))
    return found


def test_every_test_named_as_proof_exists() -> None:
    named = named_tests(TEXT)
    assert len(named) > 40
    missing = []
    for file, name in sorted(named):
        path = ROOT / "tests" / file
        if not path.exists():
            missing.append(file)
        elif name and not re.search(rf"^(async )?def {name}\b", path.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"


def test_every_module_named_as_a_defence_exists() -> None:
    packages = "kvm|vmm|server|protocol|formats|commands|sequences|cli|client|snapshots"
    named = set(re.findall(rf"`((?:{packages})/[\w/]+\.py)`", TEXT))
    assert len(named) > 10
    missing = sorted(m for m in named if not (ROOT / "src" / "vmipc" / m).exists())
    assert not missing, f"docs/security.md names modules that do not exist: {missing}"
