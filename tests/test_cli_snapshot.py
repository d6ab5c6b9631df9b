"""``vmipc snapshot inspect`` / ``verify``: output, exit codes, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.state_support import restorable_state
from vmipc.cli import main
from vmipc.formats import SnapshotHeader
from vmipc.formats import snapshot as sn
from vmipc.memory_layout import MIN_MEMORY, layout_for
from vmipc.vmm.machine import MachineState
from vmipc.vmm.persist import state_sections

PAGE = 4096
SNAPSHOT_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
REGIONS = ((0, 4 * PAGE, 0), (1 << 32, 4 * PAGE, 4 * PAGE))


def make_snapshot(path: Path, header: SnapshotHeader | None = None, *, memory: bool = True) -> Path:
    header = header or SnapshotHeader(SNAPSHOT_ID, "vmipc test", created_ns=1_700_000_000 * 10**9)
    image = bytearray(8 * PAGE)
    image[5 * PAGE] = 1
    sections = [("config", 1, b"cfg"), ("vcpus", 1, b"vcpu" * 10), ("devices", 1, b"dev")]
    if memory:
        sections.append(("memory", 1, sn.encode_memory_section(REGIONS, image)))
    path.write_bytes(sn.build_snapshot(header, sections))
    return path


def make_restorable(
    path: Path, state: MachineState | None = None, *, memory_size: int = MIN_MEMORY
) -> Path:
    """A snapshot `vmm --restore` takes (short of KVM's word on the registers): real
    state sections and a memory image of ``memory_size`` bytes in the layout of its RAM."""
    state = state or restorable_state()
    regions = [(r.gpa, r.size, r.offset) for r in layout_for(memory_size)]
    image = bytearray(memory_size)
    image[5 * PAGE] = 1
    sections = [*state_sections(state), ("memory", 1, sn.encode_memory_section(regions, image))]
    header = SnapshotHeader(SNAPSHOT_ID, "vmipc test")
    path.write_bytes(sn.build_snapshot(header, sections))
    return path


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["snapshot", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_prints_header_table_and_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_snapshot(tmp_path / "vm.snap")
    code, out, err = run_cli("inspect", str(path), capsys=capsys)
    assert (code, err) == (0, "")
    assert "format      1.0 (this reader reads 1.0 to 1.0)" in out
    assert "producer    vmipc test" in out
    assert f"snapshot    {SNAPSHOT_ID.hex()}" in out
    assert "parent      none" in out
    assert "created     2023-11-14 22:13:20.000000 UTC" in out
    assert "sections    4" in out
    for name in ("config", "vcpus", "devices", "memory"):
        assert f"\n  {name} " in out
    assert "memory      image, page size 4096" in out
    assert "0x100000000" in out


def test_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = SnapshotHeader(
        SNAPSHOT_ID,
        "vmipc test",
        flags=sn.FLAG_INCREMENTAL,
        parent_id=bytes(range(16)),
        parent_checksum=42,
    )
    path = make_snapshot(tmp_path / "vm.snap", header)
    code, out, _ = run_cli("inspect", "--json", str(path), capsys=capsys)
    assert code == 0
    info = json.loads(out)
    assert info["format"] == {"major": 1, "minor": 0}
    assert info["snapshot_id"] == SNAPSHOT_ID.hex()
    assert info["parent_id"] == bytes(range(16)).hex()
    assert info["parent_checksum"] == 42
    assert info["incremental"] is True
    assert [s["name"] for s in info["sections"]] == ["config", "vcpus", "devices", "memory"]
    memory = info["memory"]
    assert memory["encoding"] == "image"
    assert memory["data_offset"] % PAGE == 0
    assert [r["gpa"] for r in memory["regions"]] == [0, 1 << 32]
    assert memory["regions"][1]["file_offset"] == memory["data_offset"] + 4 * PAGE


def test_verify_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_restorable(tmp_path / "vm.snap")
    code, out, err = run_cli("verify", str(path), capsys=capsys)
    assert (code, err) == (0, "")
    assert out.startswith(f"{path}: ok (4 sections, ")
    code, out, _ = run_cli("verify", str(path), "--section", "memory", capsys=capsys)
    assert code == 0
    assert "section 'memory' ok" in out


def corrupt(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_names_the_corrupt_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_snapshot(tmp_path / "vm.snap")
    # the memory section starts at 0x4000; its image at 0x5000; corrupt page 5
    corrupt(path, 0x5000 + 5 * PAGE)
    code, out, err = run_cli("verify", str(path), capsys=capsys)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"vmipc snapshot: {path}: section 'memory': checksum mismatch (stored 0x")
    # the other sections are still fine on their own
    assert run_cli("verify", str(path), "--section", "config", capsys=capsys)[0] == 0
    # inspect does not read sections, so it still works
    assert run_cli("inspect", str(path), capsys=capsys)[0] == 0


@pytest.mark.parametrize("action", ["inspect", "verify"])
def test_refusals_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    path = make_snapshot(tmp_path / "vm.snap")
    data = path.read_bytes()
    cases = {
        "truncated": (data[:-100], "trailer: missing at the end of the file"),
        "header": (data[:50] + bytes([data[50] ^ 1]) + data[51:], "header: checksum mismatch"),
        "future": (None, "header: format version 2.0 is not supported"),
        "newer": (None, "header: format version 1.1 is newer than this reader's 1.0"),
    }
    for case, (content, message) in cases.items():
        if case == "future":
            make_snapshot(path, SnapshotHeader(SNAPSHOT_ID, "x", major=2))
        elif case == "newer":
            make_snapshot(path, SnapshotHeader(SNAPSHOT_ID, "x", minor=1))
        else:
            assert content is not None
            path.write_bytes(content)
        code, out, err = run_cli(action, str(path), capsys=capsys)
        assert code == 1, case
        assert out == ""
        assert err.count("\n") == 1, err
        assert err.startswith(f"vmipc snapshot: {path}: {message}"), (case, err)


def test_verify_refuses_an_incomplete_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_snapshot(tmp_path / "vm.snap", memory=False)
    code, _, err = run_cli("verify", str(path), capsys=capsys)
    assert code == 1
    assert err == f"vmipc snapshot: {path}: section 'memory': missing from the snapshot\n"
    assert run_cli("inspect", str(path), capsys=capsys)[0] == 0
    code, _, err = run_cli("verify", str(path), "--section", "nosuch", capsys=capsys)
    assert code == 1
    assert "section 'nosuch': missing" in err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli("verify", str(tmp_path / "absent"), capsys=capsys)
    assert code == 2
    assert err == f"vmipc snapshot: cannot open {tmp_path / 'absent'}: No such file or directory\n"
    code, _, err = run_cli("inspect", str(tmp_path), capsys=capsys)
    assert code == 2
    assert err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        main(["snapshot"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["snapshot", "inspect"])
    assert info.value.code == 2


def test_verify_refuses_what_a_restore_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every checksum right, but no restore would take it: verify says why, in one line
    (the same check `vmm --restore` makes; tests/test_restore.py runs both on real files)."""
    good = restorable_state()
    cases: list[tuple[str, Path, str]] = [
        (
            "fake records",
            make_snapshot(tmp_path / "1.snap"),
            "section 'config': 2 bytes after the record",
        ),
        (
            "no vcpus",
            make_restorable(
                tmp_path / "2.snap",
                dataclasses.replace(
                    good, config=dataclasses.replace(good.config, vcpus=0), vcpus=()
                ),
            ),
            "section 'config': 0 vcpus (1 .. 64 allowed)",
        ),
        (
            "RAM larger than the memory section",
            make_restorable(tmp_path / "3.snap", restorable_state(memory_size=2 * MIN_MEMORY)),
            "section 'memory': its layout 16 MiB at 0x0 is not the layout of the "
            "configuration's 32 MiB of RAM (32 MiB at 0x0)",
        ),
        (
            "unusable RAM size",
            make_restorable(
                tmp_path / "4.snap",
                restorable_state(memory_size=8 << 20),
                memory_size=MIN_MEMORY,
            ),
            "section 'config': memory size 8 MiB is outside 16 MiB .. 64 GiB",
        ),
    ]
    for case, bad, message in cases:
        code, out, err = run_cli("verify", str(bad), capsys=capsys)
        assert (code, out) == (1, ""), case
        assert err.startswith(f"vmipc snapshot: {bad}: {message}"), (case, err)
        assert err.count("\n") == 1, (case, err)


def test_the_vmipc_command(tmp_path: Path) -> None:
    path = make_restorable(tmp_path / "vm.snap")
    result = subprocess.run(
        [sys.executable, "-m", "vmipc", "snapshot", "verify", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ok (4 sections" in result.stdout
