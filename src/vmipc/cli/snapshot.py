"""``vmipc snapshot``: look into snapshot files.

    vmipc snapshot inspect FILE [--json]     the header, the section table, the memory layout
    vmipc snapshot verify FILE [--section NAME]
                                             check every checksum (or one section's) and
                                             what a restore checks without KVM
    vmipc snapshot extract-disk FILE -o NEWIMG
                                             the disk section out to a new image file
    vmipc snapshot seal FILE RESULT.json...  finish a snapshot composed with vmipc call
    vmipc snapshot merge NEWEST -o OUT [--parent FILE]... [--chain-dir DIR]
                                             flatten an incremental chain into one full
                                             snapshot

Exit codes: 0 fine; 1 the file is corrupt, truncated, incomplete or of an unsupported
version (one line on standard error naming the part of the file and the problem); 2 bad
usage or a file that cannot be opened or read.

The file work is :mod:`vmipc.snapshots`' (seal, verify, merge); this module parses the
arguments and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from vmipc.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from vmipc.formats import FormatError, MissingSection, SectionEntry, SnapshotReader
from vmipc.formats import snapshot as fmt
from vmipc.snapshots import (
    ChainError,
    entries_of,
    extract_disk,
    merge,
    new_header,
    reader_of,
    seal,
    verify_restorable,
    verify_section,
)

PROG = "vmipc snapshot"


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "snapshot",
        help="inspect or verify a snapshot file",
        description="Inspect or verify a vmipc snapshot file (see protocol/snapshot-file.md).",
        epilog=(
            "exit codes: 0 fine; 1 corrupt, truncated, incomplete or unsupported file; "
            "2 bad usage or unreadable file"
        ),
    )
    actions = parser.add_subparsers(dest="snapshot_action", metavar="ACTION", required=True)
    inspect = actions.add_parser(
        "inspect",
        help="print the header, the section table and the memory layout",
        description=(
            "Print a snapshot's header, section table and memory layout. Checks the "
            "header, table and trailer checksums, not the sections' (use verify)."
        ),
    )
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(run=run, _action=_inspect)
    verify = actions.add_parser(
        "verify",
        help="check every checksum",
        description=(
            "Check every checksum of a snapshot (every byte of the file is covered) and "
            "everything a restore checks before it needs KVM: the sections it needs, "
            "state records that decode and match the configuration, and a memory "
            "section in the configuration's RAM layout."
        ),
    )
    verify.add_argument("file", metavar="FILE")
    verify.add_argument("--section", metavar="NAME", help="check only this section")
    verify.set_defaults(run=run, _action=_verify)
    seal = actions.add_parser(
        "seal",
        help="finish a snapshot composed with vmipc call",
        description=(
            "Finish a snapshot file whose sections were appended by building blocks "
            "(`vmipc call dump-state format=snapshot --fd out=+FILE --json`, then dump-memory "
            "likewise): write the header and, last, the section table built from the "
            "commands' JSON results."
        ),
    )
    seal.add_argument("file", metavar="FILE")
    seal.add_argument(
        "results",
        metavar="RESULT.json",
        nargs="+",
        help="the --json output of each dump-state / dump-memory call, in order",
    )
    seal.add_argument("--producer", default="vmipc snapshot seal", help="the producer string")
    seal.set_defaults(run=run_seal)
    merge = actions.add_parser(
        "merge",
        help="flatten an incremental chain into one full snapshot",
        description=(
            "Write one full snapshot holding what the chain ending in NEWEST holds: the "
            "base's memory with every increment's pages applied in order, and NEWEST's "
            "state. The parents are found among the --parent files and the snapshots in "
            "--chain-dir, each link checked (parent id and table checksum). OUT is written "
            "beside itself under a temporary name and renamed once complete. No VMM is "
            "involved; `vmipc vmm --restore OUT` then restores it."
        ),
    )
    merge.add_argument("newest", metavar="NEWEST", help="the newest snapshot of the chain")
    merge.add_argument("-o", "--output", metavar="OUT", required=True, help="the file to write")
    merge.add_argument(
        "--parent",
        metavar="FILE",
        action="append",
        default=[],
        help="a snapshot of the chain (repeat for every one)",
    )
    merge.add_argument("--chain-dir", metavar="DIR", help="look for the parents in DIR")
    merge.add_argument("--json", action="store_true", help="print the report as JSON")
    merge.set_defaults(run=run_merge)
    disk = actions.add_parser(
        "extract-disk",
        help="write a snapshot's disk section out to a new image file",
        description=(
            "Write the disk section of FILE (vmipc checkpoint --with-disk) to the new "
            "image file NEWIMG (created, never overwritten; sparse: only the stored "
            "extents are written), checked whole first (structure and checksum); on "
            "failure no file is left. Then `vmipc vmm --restore FILE --disk NEWIMG`, or "
            "`--disk-from-snapshot NEWIMG` does both."
        ),
    )
    disk.add_argument("file", metavar="FILE")
    disk.add_argument("-o", "--output", metavar="NEWIMG", required=True, help="the new image")
    disk.add_argument("--json", action="store_true", help="print the report as JSON")
    disk.set_defaults(run=run_extract_disk)


class _Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def _open_reader(path: str) -> Iterator[tuple[SnapshotReader, int]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _Failure(EXIT_USAGE, f"cannot open {path}: {exc.strerror}") from None
    try:
        yield reader_of(fd), fd
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> int:
    from vmipc.vmm.persist import BulkError

    action: Callable[[argparse.Namespace, SnapshotReader, int], int] = args._action
    try:
        with _open_reader(args.file) as (reader, fd):
            return action(args, reader, fd)
    except _Failure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except (FormatError, BulkError) as exc:
        print(f"{PROG}: {args.file}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"{PROG}: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE


def run_seal(args: argparse.Namespace) -> int:
    entries: list[SectionEntry] = []
    try:
        for name in args.results:
            with open(name, encoding="utf-8") as handle:
                found = entries_of(json.load(handle))
            if not found:
                raise _Failure(EXIT_USAGE, f"{name}: no snapshot sections in this result")
            entries += found
        fd = os.open(args.file, os.O_RDWR | os.O_CLOEXEC)
    except _Failure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except (OSError, ValueError, AttributeError) as exc:
        print(f"{PROG}: seal: {exc}", file=sys.stderr)
        return EXIT_USAGE
    header = new_header(args.producer)
    try:
        seal(fd, entries, header)
    except ValueError as exc:
        print(f"{PROG}: {args.file}: cannot seal: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        os.close(fd)
    print(f"{args.file}: sealed ({len(entries)} sections, snapshot {header.snapshot_id.hex()})")
    return EXIT_OK


def run_merge(args: argparse.Namespace) -> int:
    try:
        report = merge(args.newest, args.output, parents=args.parent, chain_dir=args.chain_dir)
    except ChainError as exc:
        print(f"{PROG}: merge: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: merge: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(
            f"{report.path}: merged {len(report.chain)} snapshots "
            f"({report.data_pages} pages from increments), snapshot {report.snapshot_id}"
        )
    return EXIT_OK


def run_extract_disk(args: argparse.Namespace) -> int:
    try:
        report = extract_disk(args.file, args.output)
    except FormatError as exc:
        print(f"{PROG}: {args.file}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: extract-disk: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        mode = "read-only" if report.readonly else "writable"
        print(
            f"{report.path}: {mode} disk of {report.disk_size} bytes "
            f"({report.data_bytes} bytes of data in {report.extents} extents)"
        )
    return EXIT_OK


def _verify(args: argparse.Namespace, reader: SnapshotReader, fd: int) -> int:

    if args.section is not None:
        entry = verify_section(reader, args.section)
        print(f"{args.file}: section '{entry.name}' ok ({entry.length} bytes)")
        return EXIT_OK
    # verify says ok only to a file a restore takes, short of register values only KVM
    # can judge
    verify_restorable(reader, fd)
    chain = "; incremental: restore it with its chain" if reader.header.incremental else ""
    print(f"{args.file}: ok ({len(reader.entries)} sections, {reader.size} bytes{chain})")
    return EXIT_OK


def describe(reader: SnapshotReader) -> dict[str, Any]:
    """The JSON form of ``inspect``."""
    header = reader.header
    memory: dict[str, Any] | None = None
    try:
        section = reader.memory()
    except MissingSection:
        pass
    else:
        desc = section.descriptor
        memory = {
            "encoding": desc.encoding_name,
            "page_size": desc.page_size,
            "data_offset": section.data_offset,
            "data_size": section.data_size,
            "regions": [
                {
                    "gpa": region.gpa,
                    "size": region.size,
                    "image_offset": region.offset,
                    "file_offset": section.data_offset + region.offset,
                }
                for region in desc.regions
            ],
        }
    return {
        "size": reader.size,
        "format": {"major": header.major, "minor": header.minor},
        "producer": header.producer,
        "snapshot_id": header.snapshot_id.hex(),
        "parent_id": header.parent_id.hex() if header.has_parent else None,
        "parent_checksum": header.parent_checksum if header.has_parent else None,
        "flags": header.flags,
        "incremental": header.incremental,
        "created_ns": header.created_ns or None,
        "table_checksum": reader.table_checksum,
        "sections": [entry.to_dict() for entry in reader.entries],
        "memory": memory,
    }


def _time(created_ns: int | None) -> str:
    if not created_ns:
        return "unknown"
    seconds, nanos = divmod(created_ns, 1_000_000_000)
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return f"{created_ns} ns after the epoch"
    return f"{moment:%Y-%m-%d %H:%M:%S}.{nanos // 1000:06d} UTC"


def _inspect(args: argparse.Namespace, reader: SnapshotReader, fd: int) -> int:
    info = describe(reader)
    if args.json:
        print(json.dumps({"file": args.file, **info}, indent=2))
        return EXIT_OK
    flags = f"{info['flags']:#x}" + (" (incremental)" if info["incremental"] else "")
    parent = (
        f"{info['parent_id']} (checksum {info['parent_checksum']:#018x})"
        if info["parent_id"]
        else "none"
    )
    lines = [
        f"file        {args.file} ({info['size']} bytes)",
        f"format      {info['format']['major']}.{info['format']['minor']} "
        f"(this reader reads {fmt.MAJOR}.0 to {fmt.MAJOR}.{fmt.MINOR})",
        f"producer    {info['producer']}",
        f"snapshot    {info['snapshot_id']}",
        f"parent      {parent}",
        f"flags       {flags}",
        f"created     {_time(info['created_ns'])}",
        f"checksum    {info['table_checksum']:#018x} (section table)",
        f"sections    {len(reader.entries)}",
    ]
    if reader.entries:
        lines.append(f"  {'NAME':16} {'VERSION':>7}  {'OFFSET':>12}  {'LENGTH':>14}  CHECKSUM")
        for entry in reader.entries:
            lines.append(
                f"  {entry.name:16} {entry.version:7}  {entry.offset:#12x}  "
                f"{entry.length:14}  {entry.checksum:#018x}"
            )
    memory = info["memory"]
    if memory is not None:
        lines.append(
            f"memory      {memory['encoding']}, page size {memory['page_size']}, "
            f"{memory['data_size']} bytes at file offset {memory['data_offset']:#x}"
        )
        lines.append(f"  {'GPA':>18}  {'SIZE':>14}  {'FILE OFFSET':>14}")
        for region in memory["regions"]:
            lines.append(
                f"  {region['gpa']:#18x}  {region['size']:#14x}  {region['file_offset']:#14x}"
            )
    print("\n".join(lines))
    return EXIT_OK
