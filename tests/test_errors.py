"""One exception root that is true: every exception class vmipc defines derives from
:class:`vmipc.VmipcError`, as its docstring says, and keeps the builtin base callers catch.

The classes are found by parsing every module of the package (so a new module or a new
class is checked without anyone listing it) and looked up on the imported module.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from vmipc.errors import VmipcError

SRC = Path(__file__).resolve().parent.parent / "src"

#: classes that are exempt, with the reason
EXEMPT = {
    "vmipc.cli.call._Exit": "control flow of `vmipc call`: an exit code for its run(), "
    "raised and caught in the module",
    "vmipc.cli.snapshot._Failure": "control flow of `vmipc snapshot`: an exit code and a "
    "line for its run(), raised and caught in the module",
}

#: builtins that classes refine, and must keep (callers catch these)
BUILTIN_BASES = {
    "vmipc.kvm._errors.KvmError": OSError,
    "vmipc.server._os.SocketPathError": OSError,
    "vmipc.formats._bounded.MsgpackRefused": ValueError,
    "vmipc.vmm.loaders._common.GuestImageError": ValueError,
    "vmipc.memory_layout.MemoryConfigError": ValueError,
    "vmipc.vmm.state.StateRecordError": ValueError,
}


def _modules() -> list[str]:
    names = []
    for path in sorted((SRC / "vmipc").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # runs the CLI
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined at the top level of a vmipc module, by its place."""
    found: dict[str, type[BaseException]] = {}
    for name in _modules():
        module = importlib.import_module(name)
        assert module.__file__ is not None
        tree = ast.parse(Path(module.__file__).read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                obj = getattr(module, node.name)
                if isinstance(obj, type) and issubclass(obj, BaseException):
                    found[f"{name}.{node.name}"] = obj
    return found


CLASSES = exception_classes()


def test_the_walk_finds_the_exceptions_of_every_layer() -> None:
    packages = {place.split(".")[1] for place in CLASSES}
    assert {"kvm", "vmm", "formats", "protocol", "server", "sequences", "cli"} <= packages
    assert len(CLASSES) > 30


@pytest.mark.parametrize("place", sorted(set(CLASSES) - set(EXEMPT)))
def test_every_exception_class_derives_from_the_root(place: str) -> None:
    assert issubclass(CLASSES[place], VmipcError), f"{place} does not derive from VmipcError"


@pytest.mark.parametrize("place", sorted(BUILTIN_BASES))
def test_refined_builtins_are_kept(place: str) -> None:
    assert issubclass(CLASSES[place], BUILTIN_BASES[place])


def test_the_exemptions_are_private_and_still_exist() -> None:
    for place in EXEMPT:
        assert place in CLASSES, f"{place} is gone: drop its exemption"
        assert place.rpartition(".")[2].startswith("_"), f"{place} is public: no exemption"
        assert not issubclass(CLASSES[place], VmipcError), f"{place} derives: no exemption"
