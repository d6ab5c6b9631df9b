from __future__ import annotations

import os
from pathlib import Path

import pytest

GUESTS = Path(__file__).parent / "guests"


def kvm_usable() -> tuple[bool, str]:
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm is absent on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user"
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    usable, why = kvm_usable()
    if usable:
        return
    skip = pytest.mark.skip(reason=f"needs KVM: {why}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def guests() -> Path:
    return GUESTS
