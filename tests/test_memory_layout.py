"""The guest-physical layout is a pure function of the RAM size (table-driven), and the
VMM and the snapshot format speak of it with the same type."""

from __future__ import annotations

import pytest

from vmipc.memory_layout import GIB, MIB, MemoryConfigError, MemoryRegion, layout_for
from vmipc.vmm.memory import GuestMemory, parse_size


@pytest.mark.parametrize(
    ("size", "regions"),
    [
        (16 * MIB, [MemoryRegion(0, 16 * MIB, 0)]),
        (3 * GIB, [MemoryRegion(0, 3 * GIB, 0)]),
        (
            4 * GIB,
            [MemoryRegion(0, 3 * GIB, 0), MemoryRegion(4 * GIB, 1 * GIB, 3 * GIB)],
        ),
        (
            8 * GIB,
            [MemoryRegion(0, 3 * GIB, 0), MemoryRegion(4 * GIB, 5 * GIB, 3 * GIB)],
        ),
    ],
)
def test_layout(size: int, regions: list[MemoryRegion]) -> None:
    assert list(layout_for(size)) == regions


@pytest.mark.parametrize("size", [0, 8 * MIB, 16 * MIB + 1, 65 * GIB])
def test_unusable_sizes_are_refused(size: int) -> None:
    with pytest.raises(MemoryConfigError):
        layout_for(size)


@pytest.mark.parametrize(
    ("text", "value"), [("64M", 64 * MIB), ("1G", GIB), ("512K", 512 * 1024), ("4096", 4096)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_parse_size_refuses_nonsense() -> None:
    with pytest.raises(MemoryConfigError):
        parse_size("lots")


def test_eight_gib_guest_maps_without_touching_ram() -> None:
    memory = GuestMemory(8 * GIB)
    try:
        memory.write(5 * GIB, b"above the hole")
        assert memory.read(5 * GIB, 14) == b"above the hole"
        assert memory.offset_of(5 * GIB) == 4 * GIB
        with pytest.raises(ValueError, match="not RAM"):
            memory.offset_of(3 * GIB + 5)
    finally:
        memory.close()


def test_the_vmm_and_the_snapshot_format_share_one_region_type() -> None:
    """A snapshot's memory descriptor and a VMM's RAM hold the same MemoryRegion values:
    a layout check is a comparison, with no conversion between two vocabularies."""
    from vmipc.formats import MemoryDescriptor
    from vmipc.formats import MemoryRegion as FormatsRegion
    from vmipc.formats.snapshot import MEMORY_ENCODING_IMAGE

    assert FormatsRegion is MemoryRegion
    memory = GuestMemory(4 * GIB)
    try:
        raw = MemoryDescriptor(4096, MEMORY_ENCODING_IMAGE, memory.regions).encode()
        decoded = MemoryDescriptor.decode(raw)
        assert not isinstance(decoded, str)
        assert decoded.regions == memory.regions == layout_for(4 * GIB)
        assert [r.end for r in memory.regions] == [3 * GIB, 5 * GIB]
    finally:
        memory.close()
