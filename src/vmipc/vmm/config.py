"""What a machine is built from: its configuration record, saved with its state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_VCPUS = 64


@dataclass(frozen=True)
class BootSource:
    """What to boot. ``kind`` is "builtin", "bootsector", "multiboot" or "none" (incoming)."""

    kind: str = "builtin"
    path: str | None = None
    cmdline: str = ""
    guest_options: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "cmdline": self.cmdline,
            "guest_options": [list(pair) for pair in self.guest_options],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BootSource:
        if not isinstance(data, dict):
            raise ValueError(f"boot source record is a {type(data).__name__}, not a map")
        return cls(
            kind=str(data["kind"]),
            path=data.get("path"),
            cmdline=str(data.get("cmdline", "")),
            guest_options=tuple((str(k), str(v)) for k, v in data.get("guest_options", [])),
        )


@dataclass(frozen=True)
class MachineConfig:
    """Everything needed to build the same machine again (saved with its state)."""

    VERSION = 1

    memory_size: int
    vcpus: int = 1
    boot: BootSource = field(default_factory=BootSource)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "memory_size": self.memory_size,
            "vcpus": self.vcpus,
            "boot": self.boot.to_dict(),
        }

    def without_guest(self) -> MachineConfig:
        """This shape with nothing to boot: what a restore or an incoming VMM builds."""
        return MachineConfig(self.memory_size, self.vcpus, BootSource("none"))

    def mismatch(self, other: MachineConfig) -> str | None:
        """Why a machine built from ``other`` cannot take this configuration's state."""
        if self.memory_size != other.memory_size:
            return f"memory {self.memory_size >> 20} MiB vs {other.memory_size >> 20} MiB"
        if self.vcpus != other.vcpus:
            return f"{self.vcpus} vcpus vs {other.vcpus}"
        return None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MachineConfig:
        if not isinstance(data, dict):
            raise ValueError(f"machine config is a {type(data).__name__}, not a map")
        if data.get("version") != cls.VERSION:
            raise ValueError(f"machine config version {data.get('version')} is not supported")
        return cls(
            memory_size=int(data["memory_size"]),
            vcpus=int(data["vcpus"]),
            boot=BootSource.from_dict(data["boot"]),
        )
