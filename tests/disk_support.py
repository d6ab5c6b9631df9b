"""What the block-device tests share: a sparse image, a DiskImage opened for a test, and
the disk workload's progress read off a console."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmipc.memory_layout import MIB
from vmipc.vmm.devices import DiskImage

#: the disk workload's blocks and the image the tests give it
BLOCKS = 16
DISK_SIZE = 1 * MIB


def make_image(path: Path, size: int = DISK_SIZE) -> Path:
    """A new sparse image of ``size`` bytes (all holes) at ``path``."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


@contextmanager
def opened(path: Path, readonly: bool = False) -> Iterator[DiskImage]:
    disk = DiskImage.open(str(path), readonly=readonly)
    try:
        yield disk
    finally:
        disk.close()


def last_pass(text: str) -> int:
    """The last disk pass vCPU 0 printed in full (0: none yet)."""
    passes = [
        int(line.split("pass=")[1].split()[0])
        for line in text.split("\n")[:-1]
        if line.startswith("vcpu=0 disk pass=")
    ]
    return max(passes, default=0)
