"""Code, schema and docs agree: one source of truth, and a failing test on any drift.

When one of these fails after a schema change, regenerate:
``python tools/gencode.py`` and ``python tools/gendocs.py``.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import itertools
import keyword
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from vmipc.cli.call import command_help
from vmipc.client import Client, SyncClient
from vmipc.commands import load_handlers
from vmipc.protocol import ErrorCode, encode_frame, load_schema, pack

ROOT = Path(__file__).resolve().parent.parent


def _load_tool(name: str) -> ModuleType:
    """A code generator from tools/ (scripts, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        f"vmipc_tools_{name}", ROOT / "tools" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gencode = _load_tool("gencode")
gendocs = _load_tool("gendocs")
method_name = gencode.method_name


def test_client_code_is_generated_from_the_schema() -> None:
    assert gencode.TARGET.read_text() == gencode.generate(), (
        "src/vmipc/client/_generated.py is stale: run python tools/gencode.py"
    )
    assert gencode.RESULTS_TARGET.read_text() == gencode.generate_results(), (
        "src/vmipc/client/_results.py is stale: run python tools/gencode.py"
    )


def test_reference_docs_are_generated_from_the_schema() -> None:
    page = ROOT / "docs" / "protocol-reference.md"
    assert page.read_text() == gendocs.render(), (
        "docs/protocol-reference.md is stale: run python tools/gendocs.py"
    )


def test_every_command_has_exactly_one_handler_and_vice_versa() -> None:
    assert set(load_handlers()) == set(load_schema().commands)


def test_error_codes_in_code_are_the_schema_catalogue() -> None:
    assert {c.value for c in ErrorCode} == set(load_schema().errors)


@pytest.mark.parametrize("client_class", [Client, SyncClient])
def test_client_methods_match_the_schema(client_class: type) -> None:
    for spec in load_schema().commands.values():
        method = getattr(client_class, method_name(spec.name))
        params = inspect.signature(method).parameters
        fd_params = (f"{f.name}_" if keyword.iskeyword(f.name) else f.name for f in spec.fds)
        expected = ["self", *(a.name for a in spec.args), *fd_params]
        if spec.progress:
            expected.append("on_progress")
        assert list(params) == expected, spec.name
        for a in spec.args:
            assert (params[a.name].default is inspect.Parameter.empty) == a.required


def test_cli_help_covers_every_argument_and_fd() -> None:
    schema = load_schema()
    for spec in schema.commands.values():
        text = command_help(schema, spec)
        assert text.startswith(f"usage: vmipc call {spec.name}")
        for a in spec.args:
            assert f"{a.name}=VALUE" in text
        for f in spec.fds:
            assert f"--fd {f.name}=PATH|-" in text


def test_handlers_only_raise_error_codes_their_command_documents() -> None:
    schema = load_schema()
    for path in (ROOT / "src" / "vmipc" / "commands").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.AsyncFunctionDef):
                continue
            commands = [
                d.args[0].value
                for d in node.decorator_list
                if isinstance(d, ast.Call)
                and getattr(d.func, "id", None) == "handler"
                and isinstance(d.args[0], ast.Constant)
            ]
            codes = {
                ErrorCode[n.attr].value
                for n in ast.walk(node)
                if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name)
                and n.value.id == "ErrorCode"
            }
            for command in commands:
                undocumented = codes - set(schema.errors_of(command))
                assert not undocumented, f"{path.name}: {command} raises {undocumented}"


def _hex_blocks(text: str) -> list[bytes]:
    """The bytes of each fenced block of hex dumps (annotations after the hex ignored)."""
    blocks: list[bytes] = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        data = bytearray()
        for line in block.splitlines():
            tokens = line.replace("→", " ").replace("←", " ").split()
            hex_tokens = list(itertools.takewhile(lambda t: re.fullmatch("[0-9a-f]{2}", t), tokens))
            if not hex_tokens:
                data = bytearray()
                break
            data += bytes.fromhex("".join(hex_tokens))
        if data:
            blocks.append(bytes(data))
    return blocks


def test_the_spec_examples_are_the_bytes_the_code_sends() -> None:
    blocks = _hex_blocks((ROOT / "protocol" / "README.md").read_text())
    hello = {"type": "request", "id": 0, "command": "hello"}
    hello["args"] = {"versions": [1], "client": "demo"}  # type: ignore[assignment]
    status = {"type": "request", "id": 1, "command": "query-status"}
    result = {
        "type": "result",
        "id": 1,
        "result": {
            "state": "running",
            "vcpu_count": 2,
            "memory_size": 64 << 20,
            "stop_reason": None,
            "lease": None,
            "first": [],
        },
    }
    assert blocks[0] == encode_frame(pack(hello))
    assert blocks[1] == encode_frame(pack(status)) + encode_frame(pack(result))


def test_the_spec_and_the_docs_show_the_current_protocol_version() -> None:
    # an example of a hello answer, or of `vmipc call --list`, shows the version spoken now;
    # the "(since 1.3)" marks and the changelog name older versions on purpose
    version = load_schema().version
    shown = re.compile(r"""protocol"?: "(\d+\.\d+)"|commands of vmipc-control (\d+\.\d+)""")
    pages = [*(ROOT / "protocol").glob("*.md"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    found = {(page.name, a or b) for page in pages for a, b in shown.findall(page.read_text())}
    assert found, "no example shows the version"
    assert {name for name, v in found if v != version} == set(), (found, version)
