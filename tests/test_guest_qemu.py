"""The built-in guest: its Python twin, its image, and a boot in QEMU (TCG) when present."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmipc.guest import (
    BUILTIN_GUEST_PATH,
    banner,
    beat_line,
    check_disk_image,
    expected_disk_lines,
    expected_lines,
    pass_sums,
)

QEMU = shutil.which("qemu-system-x86_64")

# Printed by the guest under QEMU TCG, QEMU KVM and the project's VMM (vcpus=4 passes=3).
GOLDEN = {
    0: ["1378e27974d85c71", "f744a210e8008565", "92d728a5ccaec8e5"],
    1: ["7cdf0fe35655e164", "22da29d84cf334d5", "b69ddda8d0c3bdbb"],
    2: ["a1ac335ca58386b6", "f0fcd9b474f3ec81", "3c16651f301a69b5"],
    3: ["6ddc51e94a895ff5", "10013eeace033595", "14a01b0dd6cca2cf"],
}


@pytest.mark.parametrize("vcpu", sorted(GOLDEN))
def test_expected_lines_match_what_the_guest_printed(vcpu: int) -> None:
    sums = GOLDEN[vcpu]
    assert expected_lines(vcpu, 3) == [
        *(f"vcpu={vcpu} pass={n} sum={s}" for n, s in enumerate(sums, 1)),
        f"vcpu={vcpu} done",
    ]


def test_expected_lines_options() -> None:
    # seed=0x10 ws=5000 (rounded up to 8192) every=2, as printed by the guest
    assert expected_lines(1, 2, 5000, 16, every=2) == [
        "vcpu=1 pass=2 sum=036b236642b94256",
        "vcpu=1 done",
    ]
    assert expected_lines(0, 3, every=0) == ["vcpu=0 done"]
    sums = pass_sums(2)
    assert [f"{next(sums):016x}" for _ in range(3)] == GOLDEN[2]
    with pytest.raises(ValueError, match="passes"):
        expected_lines(0, 0)


def test_banner() -> None:
    assert banner(vcpus=4, passes=3, ws=5000) == (
        "vmipc-guest 1 vcpus=4 ws=8192 rate=4096 passes=3 seed=0 hz=100 every=1 clock=kvmclock"
    )
    # the heartbeat shows in the banner only when it is on (beat=0, the default, leaves it)
    assert banner(beat=0) == banner()
    assert banner(hz=1000, beat=2000).endswith(" hz=1000 every=1 clock=kvmclock beat=2000")
    assert banner(beat=500, beatonly=True).endswith(" beat=500 beatonly=1")
    assert banner(beatonly=True) == banner()
    assert beat_line(7) == "vcpu=0 beat=7"
    with pytest.raises(ValueError, match="from 1"):
        beat_line(0)


def test_image_is_an_elf32_multiboot_kernel() -> None:
    image = BUILTIN_GUEST_PATH.read_bytes()
    assert image[:5] == b"\x7fELF\x01"  # ELF, 32-bit class: QEMU -kernel refuses ELF64
    assert int.from_bytes(image[18:20], "little") == 3  # EM_386
    header = image.find((0x1BADB002).to_bytes(4, "little"))
    assert 0 <= header < 8192 and header % 4 == 0
    magic, flags, checksum = (
        int.from_bytes(image[header + i : header + i + 4], "little") for i in (0, 4, 8)
    )
    assert (magic + flags + checksum) % 2**32 == 0
    assert not flags & 0x10000  # loaded from its ELF program headers, no a.out kludge


def boot_in_qemu(smp: int, append: str) -> tuple[int, list[str]]:
    assert QEMU is not None
    # fmt: off
    command = [
        QEMU, "-accel", "tcg", "-smp", str(smp), "-m", "64",
        "-kernel", str(BUILTIN_GUEST_PATH), "-append", append,
        "-nographic", "-serial", "stdio", "-monitor", "none", "-nodefaults", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0x501,iosize=1",
    ]
    # fmt: on
    done = subprocess.run(command, capture_output=True, timeout=60, check=False)
    text = done.stdout.decode("ascii", errors="replace")
    start = text.find("vmipc-guest ")  # SeaBIOS writes to the same console first
    assert start >= 0, f"no banner; qemu said: {done.stderr.decode(errors='replace')[-500:]}"
    return done.returncode, text[start:].splitlines()


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("smp", [3, 5])  # with 5, two APs are never started
def test_guest_in_qemu_prints_the_expected_lines(smp: int) -> None:
    vcpus = 3
    status, lines = boot_in_qemu(smp, "vcpus=3 passes=3")
    assert status == 1, lines  # isa-debug-exit: (0 << 1) | 1, the guest wrote 0 to 0x501
    assert lines[0] == banner(vcpus=vcpus, passes=3, clock=lines[0].rsplit("=", 1)[1])
    assert lines[0].endswith(("clock=tsc", "clock=kvmclock"))
    for vcpu in range(vcpus):
        mine = [line for line in lines if line.startswith(f"vcpu={vcpu} ")]
        assert mine == expected_lines(vcpu, 3)
    assert len(lines) == 1 + vcpus * 4


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_guest_in_qemu_refuses_bad_options() -> None:
    status, lines = boot_in_qemu(1, "passes=1 vcpu=2")
    assert status == 3  # the guest wrote 1 to 0x501
    assert lines[1:] == ["vcpu=0 ERROR bad option 'vcpu=2'"]


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_guest_in_qemu_prints_heartbeats_beside_the_passes() -> None:
    status, lines = boot_in_qemu(1, "passes=3 ws=64K rate=256 hz=1000 beat=2000")
    assert status == 1, lines
    clock = lines[0].split()[-2].removeprefix("clock=")
    assert lines[0] == banner(ws=64 << 10, rate=256, passes=3, hz=1000, clock=clock, beat=2000)
    beats = [line for line in lines[1:] if " beat=" in line]
    assert beats == [beat_line(n) for n in range(1, len(beats) + 1)]
    # 3 passes of 16 pages at 256/s take ~190 ms of guest time, ~90 beats on a quiet
    # machine; every console line costs milliseconds under QEMU's emulation, more on a
    # loaded machine (49 seen), so the count only shows the beat ran all along the passes
    assert len(beats) >= 10
    work = [line for line in lines[1:] if " beat=" not in line]
    assert work == expected_lines(0, 3, 64 << 10)
    # beats beside the work, not only before or after it
    first_pass_end = lines.index(work[0])
    assert any(" beat=" in line for line in lines[1:first_pass_end])
    assert any(" beat=" in line for line in lines[first_pass_end + 1 :])


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_guest_drives_qemu_microvms_virtio_blk_device(tmp_path: Path) -> None:
    """The guest's virtio-blk driver against another VMM's device: QEMU's -M microvm boots
    the multiboot guest, which finds the block device among microvm's virtio-mmio
    transports (``mmio=`` ``mmios=``, as benchmarks/bench_blk.py runs it); its disk lines
    are the model's and its blocks check from outside."""
    assert QEMU is not None
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(1 << 20)
    append = "vcpus=1 passes=2 disk=1 depth=4 blocks=16 mmio=0xfeb00000 mmios=24"
    # fmt: off
    command = [
        QEMU, "-M", "microvm", "-accel", "tcg", "-m", "64",
        "-kernel", str(BUILTIN_GUEST_PATH), "-append", append,
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0x501,iosize=1",
        "-global", "virtio-mmio.force-legacy=false",
        "-drive", f"id=d0,file={image},format=raw,if=none",
        "-device", "virtio-blk-device,drive=d0",
    ]
    # fmt: on
    done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    text = done.stdout.decode("ascii", errors="replace")
    lines = text[text.find("vmipc-guest ") :].splitlines()
    assert done.returncode == 1, (lines, done.stderr.decode(errors="replace")[-500:])
    assert lines[1:] == expected_disk_lines(2, 16)
    check = check_disk_image(image.read_bytes(), 16)
    assert check.passes == dict.fromkeys(range(16), 2) and not check.torn
