"""The layers, as data, and a test that fails when an import runs up a layer or reaches
into another package's private module.

Every import of every module under ``src/vmipc`` counts: top-level, in a function, under
``TYPE_CHECKING``. A package imports only packages of lower ranks (its own modules
aside); two packages of one rank do not import each other. ``from vmipc.x._y import`` (or
``import vmipc.x._y``) is for modules inside package ``vmipc.x`` only: the others use the
names ``vmipc.x`` exports. Where today's code breaks a rule, the import is listed in
:data:`ALLOWED` with the reason; a listed import that is gone fails the test too, so the
list only shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import vmipc

SRC = Path(__file__).resolve().parent.parent / "src"

#: the layers, lowest first, as they are in the code. DESIGN.md's order made precise: the
#: codecs depend on nothing but the root, and the machine (its snapshot and page-stream
#: data plane) uses them, so they sit below vmm/; the server dispatches to the command
#: handlers, so commands/ sits below it. Packages of one rank do not import each other.
LAYERS: list[tuple[str, set[str]]] = [
    # the root package's own __version__, the exception root, the helpers of every __init__
    ("base", {"vmipc", "vmipc.errors", "vmipc._util", "vmipc._record"}),
    # guest RAM's layout: the one memory-range vocabulary of vmm/ and formats/ (pure)
    ("layout", {"vmipc.memory_layout"}),
    # typed ioctls; the built-in guest image (data); the sans-I/O page-stream and
    # snapshot-file codecs
    ("kvm/formats", {"vmipc.kvm", "vmipc.guest", "vmipc.formats"}),
    # the machine, its builder and its data plane (vmm/persist/)
    ("vmm", {"vmipc.vmm"}),
    # the sans-I/O control protocol
    ("protocol", {"vmipc.protocol"}),
    # the clients; the command handlers (building blocks)
    ("client/commands", {"vmipc.client", "vmipc.commands"}),
    # offline snapshot-file tools: formats, and the restore check (no client, no trio)
    ("snapshots", {"vmipc.snapshots"}),
    # the trio server (dispatches to commands/); the client-side sequences
    ("server/sequences", {"vmipc.server", "vmipc.sequences"}),
    # argument parsing and output
    ("cli", {"vmipc.cli"}),
    # `python -m vmipc`; the top-level face (its names load on first use)
    ("entry", {"vmipc.__main__", "vmipc (face)"}),
]
RANK = {package: rank for rank, (_, packages) in enumerate(LAYERS) for package in packages}

#: (importing module, imported name) -> why it is allowed for now
ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import in the file, relative ones resolved."""
    name, is_package = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([module] if module else [])])
            for alias in node.names:
                yield node.lineno, module if alias.name == "*" else f"{module}.{alias.name}"


def package_of(dotted: str) -> str:
    """The layer's package an imported name belongs to."""
    parts = dotted.split(".")
    if len(parts) == 1 or parts[1] == "__version__":
        return "vmipc"
    if parts[1] in vmipc._LAZY:  # a name of the face: its home package
        return package_of(vmipc._LAZY[parts[1]])
    return ".".join(parts[:2])


def importer_package(module: str) -> str:
    return "vmipc (face)" if module == "vmipc" else package_of(module)


def private_owner(dotted: str) -> str | None:
    """The package whose private module ``dotted`` names, if it names one."""
    parts = dotted.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def every_import() -> Iterator[tuple[str, int, str]]:
    for path in sorted((SRC / "vmipc").rglob("*.py")):
        module, _ = _module_name(path)
        for line, target in imports(path):
            if target == "vmipc" or target.startswith("vmipc."):
                yield module, line, target


def test_every_package_has_a_layer() -> None:
    packages = {importer_package(module) for module, _, _ in every_import()}
    packages |= {package_of(target) for _, _, target in every_import()}
    assert packages - set(RANK) == set()


def test_no_import_runs_up_a_layer_or_across_one() -> None:
    wrong = []
    for module, line, target in every_import():
        here, there = importer_package(module), package_of(target)
        if here == there or (module, target) in ALLOWED:
            continue
        if RANK[there] >= RANK[here]:
            wrong.append(
                f"{module}:{line} imports {target}: {there} is not below {here} "
                f"({LAYERS[RANK[there]][0]} vs {LAYERS[RANK[here]][0]})"
            )
    assert not wrong, "\n".join(wrong)


def test_no_module_reaches_into_another_package_s_private_module() -> None:
    wrong = []
    for module, line, target in every_import():
        owner = private_owner(target)
        if owner is None or module == owner or module.startswith(owner + "."):
            continue
        if (module, target) not in ALLOWED:
            wrong.append(f"{module}:{line} imports {target}, private to {owner}")
    assert not wrong, "\n".join(wrong)


def test_every_allowed_exception_is_still_needed() -> None:
    found = {(module, target) for module, _, target in every_import()}
    gone = sorted(set(ALLOWED) - found)
    assert not gone, f"no longer imported, drop from ALLOWED: {gone}"


def test_the_rules_catch_what_they_are_for() -> None:
    # the helpers above, on imports that break the rules
    assert package_of("vmipc.sequences._snapshot.checkpoint") == "vmipc.sequences"
    assert package_of("vmipc.checkpoint") == "vmipc.sequences"
    assert package_of("vmipc.__version__") == "vmipc"
    assert RANK[package_of("vmipc.sequences")] >= RANK[importer_package("vmipc.server._server")]
    assert private_owner("vmipc.protocol._errors.echo") == "vmipc.protocol"
    assert private_owner("vmipc.protocol.echo") is None
    assert private_owner("vmipc._util.fixup_module_metadata") == "vmipc"
