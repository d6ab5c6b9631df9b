"""The public face, in the style of trio's ``test_exports``.

``vmipc`` re-exports what most programs need (the client, the sequences, the error root
and the main errors); each layer's package re-exports its own names from its private
modules. Checked here: every name in an ``__all__`` exists and is not private; the
top-level names are documented; a class's or function's ``__module__`` is the public
module that exports it (rewritten by ``fixup_module_metadata``), so tracebacks and reprs
never name a private module; ``dir(vmipc)`` shows nothing else; and importing one layer
does not import the face's upper layers.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import vmipc

SRC = Path(__file__).resolve().parent.parent / "src"

#: the public modules with an ``__all__``: the face, each layer's package, and the public
#: modules of formats (the codecs) and the error root
PUBLIC_MODULES = [
    "vmipc",
    "vmipc.client",
    "vmipc.commands",
    "vmipc.errors",
    "vmipc.formats",
    "vmipc.formats.errors",
    "vmipc.formats.pagestream",
    "vmipc.formats.snapshot",
    "vmipc.kvm",
    "vmipc.protocol",
    "vmipc.sequences",
    "vmipc.server",
]

#: names whose ``__module__`` is not the public module that exports them, and why
MODULE_NOT_REWRITTEN: dict[str, str] = {}


def _exports(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    return [(name, getattr(module, name)) for name in module.__all__]


def _is_private(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_name_in_all_exists_and_is_public(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert len(module.__all__) == len(set(module.__all__)), "a name twice in __all__"
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name} is in __all__ but missing"
        assert not name.startswith("_"), f"{module_name}.{name} is private"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_module_names_are_public(module_name: str) -> None:
    for name, obj in _exports(module_name):
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants, type aliases and modules have no __module__ of their own
        place = f"{module_name}.{name}"
        if place in MODULE_NOT_REWRITTEN:
            continue
        home = obj.__module__
        assert not _is_private(home), f"{place}.__module__ is {home}: a private module leaks"
        assert getattr(importlib.import_module(home), name, None) is obj, (
            f"{place}.__module__ is {home}, which does not export it"
        )


def _own_doc(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and "__doc__" not in vars(obj):
        return ""
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""  # the signature a dataclass makes up when the class has no docstring
    return doc


@pytest.mark.parametrize("name", vmipc.__all__)
def test_the_top_level_names_are_documented(name: str) -> None:
    assert _own_doc(getattr(vmipc, name)).strip(), f"vmipc.{name} has no docstring"


def test_the_face_shows_nothing_but_its_names_and_submodules() -> None:
    for name in dir(vmipc):
        if name.startswith("_") or name in vmipc.__all__:
            continue
        value = getattr(vmipc, name)
        assert isinstance(value, ModuleType), f"vmipc.{name} leaks: not in __all__"
        assert value.__name__ == f"vmipc.{name}"


def test_star_import_gives_the_names() -> None:
    namespace: dict[str, object] = {}
    exec("from vmipc import *", namespace)
    assert set(vmipc.__all__) <= set(namespace)


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        vmipc.nothing_here  # noqa: B018


def test_the_lazy_table_is_the_type_checking_imports() -> None:
    # the names load on first use (vmipc._LAZY); type checkers read the TYPE_CHECKING
    # imports: the two must say the same
    tree = ast.parse((SRC / "vmipc" / "__init__.py").read_text())
    imported: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module is not None
                for alias in stmt.names:
                    imported[alias.name] = stmt.module
    assert imported == vmipc._LAZY
    assert set(vmipc.__all__) == {*vmipc._LAZY, "VmipcError"}


@pytest.mark.parametrize("layer", ["vmipc.kvm", "vmipc.protocol", "vmipc.formats"])
def test_importing_a_lower_layer_does_not_import_the_upper_ones(layer: str) -> None:
    code = (
        f"import sys, {layer}\n"
        "loaded = sorted(m for m in sys.modules if m in ('trio', 'vmipc.client', "
        "'vmipc.sequences', 'vmipc.server'))\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""
