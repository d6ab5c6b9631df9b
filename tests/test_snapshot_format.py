"""The snapshot file format: layout, cooperative writing, corruption, truncation, versions."""

from __future__ import annotations

import contextlib
import functools
import io
import mmap
import os
import random
import re
import struct
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from vmipc.formats import (
    MemorySectionWriter,
    MissingSection,
    SectionEntry,
    SnapshotError,
    SnapshotHeader,
    SnapshotReader,
    encode_table,
    section_entry,
    section_offset,
    split_zero_runs,
)
from vmipc.formats import snapshot as sn

SPEC = Path(__file__).resolve().parent.parent / "protocol" / "snapshot-file.md"

PAGE = 4096
SNAPSHOT_ID = bytes(range(1, 17))
PARENT_ID = bytes(range(100, 116))
REGIONS = ((0, 8 * PAGE, 0), (1 << 32, 8 * PAGE, 8 * PAGE))


def guest_ram() -> bytearray:
    ram = bytearray(16 * PAGE)
    ram[0:5] = b"hello"
    ram[3 * PAGE : 4 * PAGE] = bytes(range(256)) * 16
    ram[9 * PAGE + 17] = 0x42
    ram[16 * PAGE - 1] = 0x99
    return ram


HEADER = SnapshotHeader(SNAPSHOT_ID, "vmipc 0.1.0 test", created_ns=1_700_000_000_000_000_000)
SMALL = (
    ("config", 1, b'{"memory": "64K", "vcpus": 2}' * 3),
    ("vcpus", 3, bytes(range(200))),
    ("devices", 2, b"uart-state"),
)


def sample_file(header: SnapshotHeader = HEADER) -> bytes:
    memory = sn.encode_memory_section(REGIONS, guest_ram())
    return sn.build_snapshot(header, [*SMALL, ("memory", 1, memory)])


def read(data: bytes, **kwargs: object) -> SnapshotReader:
    return SnapshotReader.from_file(io.BytesIO(data), **kwargs)


def open_and_verify(data: bytes) -> None:
    reader = read(data)
    reader.verify()
    reader.check_complete()


# -- layout and round trip ----------------------------------------------------------------


def test_layout_of_the_sample_file() -> None:
    data = sample_file()
    reader = read(data)
    assert reader.header == HEADER
    assert reader.names == ("config", "vcpus", "devices", "memory")
    offsets = [entry.offset for entry in reader.entries]
    assert offsets == [4096, 8192, 12288, 16384]
    memory = reader.entry("memory")
    assert memory.length == 4096 + 16 * PAGE
    assert reader.table_offset == memory.end
    assert len(data) == reader.table_offset + 4 * 64 + 64
    assert data[:8] == b"VMIPCSNP" and data[-64:-56] == b"VMIPCEND"
    assert reader.table_checksum == xxhash.xxh3_64_intdigest(data[reader.table_offset : -64])
    reader.verify()
    reader.check_complete()
    for name, version, payload in SMALL:
        assert reader.read_section(name) == payload
        assert reader.entry(name).version == version


def test_memory_section_maps_guest_ram() -> None:
    reader = read(sample_file())
    memory = reader.memory()
    assert memory.descriptor.page_size == PAGE
    assert memory.descriptor.encoding_name == "image"
    assert [(r.gpa, r.size, r.offset) for r in memory.descriptor.regions] == list(REGIONS)
    assert memory.data_offset == 16384 + 4096
    assert memory.data_offset % PAGE == 0
    ram = guest_ram()
    data = sample_file()
    image = data[memory.data_offset : memory.data_offset + memory.data_size]
    assert image == ram
    assert memory.file_offset((1 << 32) + PAGE + 17) == memory.data_offset + 9 * PAGE + 17
    with pytest.raises(ValueError):
        memory.file_offset(16 * PAGE)


def test_memory_layout_problem() -> None:
    memory = read(sample_file()).memory()
    assert memory.layout_problem(REGIONS) is None
    assert memory.layout_problem([sn.MemoryRegion(*r) for r in REGIONS]) is None
    problem = memory.layout_problem([(0, 16 * PAGE, 0)])
    assert problem is not None
    assert problem.startswith("section 'memory': memory layout 0x0+0x8000@0x0, ")
    assert "differs from this VM's 0x0+0x10000@0x0" in problem
    assert "page size 4096" in (memory.layout_problem(REGIONS, page_size=2 * PAGE) or "")
    stream = sn.encode_memory_section(REGIONS, b"stream", encoding=sn.MEMORY_ENCODING_PAGE_STREAM)
    incremental = read(sn.build_snapshot(HEADER, [("memory", 1, stream)])).memory()
    assert "page-stream" in (incremental.layout_problem(REGIONS) or "")


def test_header_fields_round_trip_with_a_parent() -> None:
    header = SnapshotHeader(
        SNAPSHOT_ID,
        "some other producer ✓",
        flags=sn.FLAG_INCREMENTAL,
        parent_id=PARENT_ID,
        parent_checksum=0x1234_5678_9ABC_DEF0,
        created_ns=5,
    )
    reader = read(sample_file(header))
    assert reader.header == header
    assert reader.header.incremental and reader.header.has_parent


@pytest.mark.parametrize(
    "header",
    [
        SnapshotHeader(bytes(16), "x"),
        SnapshotHeader(b"short", "x"),
        SnapshotHeader(SNAPSHOT_ID, "x" * 65),
        SnapshotHeader(SNAPSHOT_ID, "nul\0"),
        SnapshotHeader(SNAPSHOT_ID, "x", flags=2),
        SnapshotHeader(SNAPSHOT_ID, "x", flags=sn.FLAG_INCREMENTAL),
        SnapshotHeader(SNAPSHOT_ID, "x", parent_checksum=1),
        SnapshotHeader(SNAPSHOT_ID, "\udc80"),
    ],
)
def test_invalid_headers_are_not_written(header: SnapshotHeader) -> None:
    with pytest.raises(ValueError):
        header.encode()


section_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,15}", fullmatch=True)


@settings(max_examples=50, deadline=None)
@given(
    sections=st.lists(
        st.tuples(section_names, st.integers(0, 2**32 - 1), st.binary(max_size=5000)),
        max_size=6,
        unique_by=lambda s: s[0],
    ),
    producer=st.text(max_size=20).filter(lambda t: "\0" not in t),
    created=st.integers(0, 2**64 - 1),
)
def test_round_trip(sections: list[tuple[str, int, bytes]], producer: str, created: int) -> None:
    header = SnapshotHeader(SNAPSHOT_ID, producer, created_ns=created)
    data = sn.build_snapshot(header, sections)
    reader = read(data)
    assert reader.header == header
    assert [(e.name, e.version) for e in reader.entries] == [(n, v) for n, v, _ in sections]
    for name, _, payload in sections:
        assert reader.read_section(name) == payload
    reader.verify()


def test_section_entry_wire_form() -> None:
    entry = SectionEntry("memory", 1, 16384, 69632, 2**64 - 1)
    assert SectionEntry.from_dict(entry.to_dict()) == entry
    for bad in ({}, {**entry.to_dict(), "name": "Bad Name"}, {**entry.to_dict(), "offset": "x"}):
        with pytest.raises(ValueError):
            SectionEntry.from_dict(bad)


# -- cooperative writing into one plain file ----------------------------------------------


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def dump_state(fd: int) -> list[SectionEntry]:
    """What a dump-state building block does: append small sections, return entries."""
    entries = []
    for name, version, payload in SMALL:
        offset = section_offset(os.fstat(fd).st_size)
        write_all(fd, payload, offset)
        entries.append(section_entry(name, version, offset, payload))
    return entries


def dump_memory(fd: int, ram: memoryview) -> SectionEntry:
    """What a dump-memory building block does: descriptor, non-zero pages, holes."""
    writer = MemorySectionWriter(section_offset(os.fstat(fd).st_size), REGIONS)
    write_all(fd, writer.descriptor, writer.offset)
    for run in split_zero_runs(ram, [(0, len(ram) // PAGE)]):
        if run.zero:
            continue
        chunk = ram[run.first_page * PAGE : (run.first_page + run.npages) * PAGE]
        write_all(fd, chunk, writer.data(run.first_page * PAGE, chunk))
    if os.fstat(fd).st_size < writer.end:
        os.ftruncate(fd, writer.end)
    return writer.finish()


def test_building_blocks_write_one_plain_file_in_turn(tmp_path: Path) -> None:
    path = tmp_path / "vm.snap"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        entries = dump_state(fd)  # before the header: sections never use its page
        write_all(fd, HEADER.encode(), 0)  # the client writes the small header ...
        ram = guest_ram()
        entries.append(dump_memory(fd, memoryview(ram)))
        block = encode_table(entries, SNAPSHOT_ID, os.fstat(fd).st_size)  # ... and the table
        write_all(fd, block.data, block.offset)

        assert path.read_bytes() == sample_file()
        reader = SnapshotReader(functools.partial(os.pread, fd), os.fstat(fd).st_size)
        reader.verify()
        assert reader.table_checksum == block.table_checksum
        memory = reader.memory()
        with mmap.mmap(fd, memory.data_size, mmap.MAP_PRIVATE, offset=memory.data_offset) as mapped:
            assert mapped[:] == ram
            mapped[0:5] = b"HELLO"  # private: the file does not change
        assert os.pread(fd, 5, memory.data_offset) == b"hello"
    finally:
        os.close(fd)


def test_encode_table_refuses_a_file_the_reader_would_refuse() -> None:
    a = SectionEntry("a", 1, 4096, 10, 0)
    b = SectionEntry("b", 1, 8192, 10, 0)
    encode_table([a, b], SNAPSHOT_ID, 8202)
    with pytest.raises(ValueError, match="appears twice"):
        encode_table([a, SectionEntry("a", 1, 8192, 10, 0)], SNAPSHOT_ID, 8202)
    with pytest.raises(ValueError, match="expected 0x2000"):
        encode_table([a, SectionEntry("b", 1, 12288, 10, 0)], SNAPSHOT_ID, 12298)
    with pytest.raises(ValueError, match="short of"):
        encode_table([a, b], SNAPSHOT_ID, 8000)
    with pytest.raises(ValueError, match="section table"):
        encode_table([a, b], SNAPSHOT_ID, 9000)  # junk after the last section
    with pytest.raises(ValueError, match="snapshot id"):
        encode_table([a], bytes(16), 4106)


def test_memory_writer_refuses_misuse() -> None:
    writer = MemorySectionWriter(4096, REGIONS)
    writer.data(PAGE, bytes(PAGE))
    with pytest.raises(ValueError, match="out of order"):
        writer.data(0, bytes(10))
    with pytest.raises(ValueError, match="outside"):
        writer.data(16 * PAGE - 1, bytes(2))
    with pytest.raises(ValueError, match="section boundary"):
        MemorySectionWriter(100, REGIONS)
    with pytest.raises(ValueError, match="overlaps"):
        MemorySectionWriter(4096, [(0, 2 * PAGE, 0), (PAGE, PAGE, 2 * PAGE)])
    with pytest.raises(ValueError, match="does not hold"):
        MemorySectionWriter(4096, REGIONS, image_size=PAGE)


# -- every single-byte corruption, per part of the file -----------------------------------


def parts_of(data: bytes) -> list[tuple[str, int, int]]:
    """(where, start, end) for every byte range of the sample file."""
    reader = read(data)
    parts = [("header", 0, 4096)]
    previous = "header"
    position = 4096
    for entry in reader.entries:
        if entry.offset > position:
            parts.append((f"padding after {previous}", position, entry.offset))
        parts.append((f"section '{entry.name}'", entry.offset, entry.end))
        previous, position = f"section '{entry.name}'", entry.end
    if reader.table_offset > position:
        parts.append((f"padding after {previous}", position, reader.table_offset))
    parts.append(("section table", reader.table_offset, len(data) - 64))
    parts.append(("trailer", len(data) - 64, len(data)))
    assert sum(end - start for _, start, end in parts) == len(data)
    return parts


def corruption_where(data: bytes) -> str:
    with pytest.raises(SnapshotError) as info:
        open_and_verify(data)
    message = str(info.value)
    assert "\n" not in message
    return info.value.where


def test_every_single_byte_corruption_is_detected_and_located() -> None:
    data = bytearray(sample_file())
    rng = random.Random(1)
    for where, start, end in parts_of(bytes(data)):
        positions: range | list[int] = range(start, end)
        if where == "section 'memory'":  # the descriptor fully, the image sampled
            positions = [*range(start, start + 4096), *rng.sample(range(start + 4096, end), 400)]
            positions += [start + 4096, end - 1]
        for position in positions:
            data[position] ^= 0x5A
            found = corruption_where(bytes(data))
            data[position] ^= 0x5A
            if where.startswith("padding") or where == "header":
                assert found == where, (position, found)
            else:
                assert found == where or found.startswith(where), (where, position, found)


def test_corruption_messages() -> None:
    data = bytearray(sample_file())
    memory = read(bytes(data)).entry("memory")
    data[memory.offset + 4096 + 3 * PAGE] ^= 1
    with pytest.raises(SnapshotError) as info:
        open_and_verify(bytes(data))
    assert str(info.value).startswith("section 'memory': checksum mismatch (stored 0x")
    reader = read(bytes(data))
    reader.verify("config")  # the others are fine
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        reader.verify("memory")
    data = bytearray(sample_file())
    data[100] ^= 1
    with pytest.raises(SnapshotError, match=r"^header: checksum mismatch"):
        read(bytes(data))


# -- truncation ---------------------------------------------------------------------------


def test_truncation_at_every_boundary_and_at_random_points() -> None:
    data = sample_file()
    cuts = {0, 1, 7, 8, 15, 16, len(data) - 1}
    for _, start, end in parts_of(data):
        cuts |= {start - 1, start, start + 1, end - 1, end + 1}
    rng = random.Random(2)
    cuts |= {rng.randrange(len(data)) for _ in range(300)}
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        with pytest.raises(SnapshotError, match=r"file is only|truncated|file ends at") as info:
            open_and_verify(data[:cut])
        assert info.value.where in ("header", "trailer"), (cut, str(info.value))
        # cut and then extended again (sparse file re-grown): still refused
        regrown = data[:cut] + bytes(len(data) - cut)
        if regrown != data:
            with pytest.raises(SnapshotError):
                open_and_verify(regrown)


def test_appended_bytes_are_refused() -> None:
    data = sample_file()
    with pytest.raises(SnapshotError, match="extended"):
        read(data + data[-64:])
    with pytest.raises(SnapshotError, match="trailer: missing"):
        read(data + b"\0")


def test_unfinished_file_without_table() -> None:
    data = sample_file()
    unfinished = data[: read(data).table_offset]
    with pytest.raises(SnapshotError, match="not finished"):
        read(unfinished)


# -- versions -----------------------------------------------------------------------------


def test_future_major_is_refused() -> None:
    with pytest.raises(SnapshotError) as info:
        read(sample_file(SnapshotHeader(SNAPSHOT_ID, "future", major=2)))
    assert str(info.value) == (
        "header: format version 2.0 is not supported (this reader reads 1.0 to 1.0)"
    )


def test_future_major_with_another_header_shape_is_refused_as_a_version() -> None:
    body = struct.pack("<8sHHI", b"VMIPCSNP", 3, 1, 8192).ljust(8192 - 8, b"\xee")
    data = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + bytes(1000)
    with pytest.raises(SnapshotError, match=r"3\.1 is not supported"):
        read(data)


def test_newer_minor_is_refused_and_older_minor_read() -> None:
    newer = sample_file(SnapshotHeader(SNAPSHOT_ID, "newer", minor=1))
    with pytest.raises(SnapshotError, match=r"1\.1 is newer than this reader's 1\.0"):
        read(newer)
    reader = read(sample_file(), supported=(1, 1))  # a 1.1 reader reads 1.0 files
    reader.verify()
    assert (reader.header.major, reader.header.minor) == (1, 0)


def test_unknown_memory_section_version_is_refused() -> None:
    memory = sn.encode_memory_section(REGIONS, guest_ram())
    data = sn.build_snapshot(HEADER, [*SMALL, ("memory", 2, memory)])
    with pytest.raises(SnapshotError, match="section 'memory': version 2"):
        read(data).memory()
    assert read(data).memory(versions=(1, 2)).descriptor.page_size == PAGE


# -- structure ----------------------------------------------------------------------------


def test_missing_sections() -> None:
    data = sn.build_snapshot(HEADER, list(SMALL))
    reader = read(data)
    reader.verify()
    with pytest.raises(MissingSection, match=r"^section 'memory': missing"):
        reader.check_complete()
    with pytest.raises(MissingSection):
        reader.memory()


def test_empty_snapshot_is_readable() -> None:
    reader = read(sn.build_snapshot(HEADER, []))
    assert reader.entries == ()
    reader.verify()


def test_page_stream_memory_encoding_is_described() -> None:
    memory = sn.encode_memory_section(
        REGIONS, b"page stream bytes", encoding=sn.MEMORY_ENCODING_PAGE_STREAM
    )
    header = SnapshotHeader(
        SNAPSHOT_ID, "x", flags=sn.FLAG_INCREMENTAL, parent_id=PARENT_ID, parent_checksum=7
    )
    reader = read(sn.build_snapshot(header, [*SMALL, ("memory", 1, memory)]))
    assert reader.memory().descriptor.encoding_name == "page-stream"
    assert reader.memory().data_size == len(b"page stream bytes")
    reader.verify()


def forge_table(data: bytes, entries: list[bytes]) -> bytes:
    """Replace the sample file's table with ``entries`` (raw), with valid checksums."""
    reader = read(data)
    table = b"".join(entries)
    trailer_at = reader.table_offset + len(table)
    body = struct.pack(
        "<8sQI4x16sQQ",
        b"VMIPCEND",
        reader.table_offset,
        len(entries),
        SNAPSHOT_ID,
        xxhash.xxh3_64_intdigest(table),
        trailer_at,
    )
    trailer = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    return data[: reader.table_offset] + table + trailer


def raw_entry(name: bytes, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack("<16sIIQQQ16x", name, 1, flags, offset, length, 0)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([raw_entry(b"a", 4096, 10), raw_entry(b"a", 8192, 10)], "appears twice"),
        ([raw_entry(b"a", 8192, 10)], "starts at 0x2000, expected 0x1000"),
        ([raw_entry(b"Bad", 4096, 10)], "bad section name"),
        ([raw_entry(b"a\0b", 4096, 10)], "bad section name"),
        ([raw_entry(b"a", 4096, 10, flags=1)], "reserved"),
        ([raw_entry(b"a", 4096, 10)], "section table: starts at"),
    ],
)
def test_forged_tables_are_refused(entries: list[bytes], message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        read(forge_table(sample_file(), entries))


def test_trailer_of_another_snapshot_is_refused() -> None:
    data = sample_file()
    other = sample_file(SnapshotHeader(bytes(range(50, 66)), HEADER.producer, created_ns=1))
    assert len(other) == len(data)
    with pytest.raises(SnapshotError, match="another snapshot"):
        read(data[:4096] + other[4096:])


@pytest.mark.parametrize(
    ("descriptor", "message"),
    [
        (struct.pack("<IIII16x", 1000, 0, 1, 0), "page size"),
        (struct.pack("<IIII16x", PAGE, 5, 1, 0), "unknown memory encoding"),
        (struct.pack("<IIII16x", PAGE, 0, 0, 0), "0 regions"),
        (struct.pack("<IIII16x", PAGE, 0, 99, 0), "malformed"),
        (struct.pack("<IIII16x", PAGE, 0, 1, 7), "malformed"),
        (struct.pack("<IIII16xQQQ", PAGE, 0, 1, 0, 0, PAGE, 100), "not aligned"),
        (struct.pack("<IIII16xQQQ", PAGE, 0, 1, 0, 0, 64 * PAGE, 0), "does not hold"),
    ],
)
def test_bad_memory_descriptors(descriptor: bytes, message: str) -> None:
    memory = descriptor.ljust(4096, b"\0") + bytes(16 * PAGE)
    reader = read(sn.build_snapshot(HEADER, [("memory", 1, memory)]))
    with pytest.raises(SnapshotError, match=f"^section 'memory': .*{message}"):
        reader.memory()
    with pytest.raises(SnapshotError, match=f"^section 'memory': .*{message}"):
        reader.verify()


def test_garbage_is_not_a_snapshot() -> None:
    with pytest.raises(SnapshotError, match=r"^header: not a vmipc snapshot"):
        read(b"\x7fELF" + bytes(10000))
    with pytest.raises(SnapshotError, match=r"^header: file is only 0 bytes"):
        read(b"")
    with pytest.raises(SnapshotError, match=r"^header: file is only 5 bytes"):
        read(b"VMIPC")


def test_read_section_refuses_huge_sections() -> None:
    reader = read(sample_file(), max_read=100)
    with pytest.raises(ValueError, match="too large"):
        reader.read_section("vcpus")
    assert reader.read_section("devices") == b"uart-state"


# -- fuzz: only documented errors ---------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 1 << 20),
)
def test_fuzz_mutated_files(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(sample_file())
    for position, value in edits:
        data[position % len(data)] = value
    data = data[: len(data) - cut % 3 * (cut % 100)]
    try:
        reader = read(bytes(data))
        reader.verify()
        if "memory" in reader.names:
            reader.memory()
    except SnapshotError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=9000))
def test_fuzz_random_files(data: bytes) -> None:
    for candidate in (data, b"VMIPCSNP" + data):
        with contextlib.suppress(SnapshotError):
            read(candidate).verify()


def hexdump_blocks(text: str) -> dict[int, bytes]:
    """{offset: bytes} of every hexdump line (``00001000  68 65 ...``) in a spec."""
    found = {}
    for match in re.finditer(r"^([0-9a-f]{8})  ([0-9a-f]{2}(?: [0-9a-f]{2})*)", text, re.M):
        found[int(match.group(1), 16)] = bytes.fromhex(match.group(2))
    return found


def test_the_specs_worked_example_is_what_the_code_writes() -> None:
    header = SnapshotHeader(bytes(range(16)), "vmipc 0.1.0")
    image = b"\xf4\xeb\xfe\x90".ljust(PAGE, b"\0")
    memory = sn.encode_memory_section([(0, PAGE, 0)], image)
    data = sn.build_snapshot(header, [("config", 1, b"hello"), ("memory", 1, memory)])
    blocks = hexdump_blocks(SPEC.read_text())
    assert len(blocks) >= 20
    for offset, expected in blocks.items():
        assert data[offset : offset + len(expected)] == expected, hex(offset)
    assert len(data) == 0x40C0 == max(blocks) + 16
    assert "0x22cebac6e48caeaa" in SPEC.read_text()
    assert read(data).table_checksum == 0x22CEBAC6E48CAEAA
