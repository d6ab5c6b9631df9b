"""Make the package follow the schema: generate ``vmipc/client/_generated.py`` (typed
client methods) and ``vmipc/client/_results.py`` (their result types) from
``protocol/schema.json`` and copy the schema into the package
(``src/vmipc/protocol/schema.json``, what ``load_schema`` reads and the wheel ships).

Run ``python tools/gencode.py`` after changing ``protocol/schema.json``; a test fails while
the committed files differ from what this produces. ``--check`` exits 1 instead of
writing; ``--schema FILE`` generates the client module from another schema document (e.g.
a committed revision), and leaves the package's copy alone.
"""

from __future__ import annotations

import argparse
import json
import keyword
import re
import sys
import textwrap
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: use its sources
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from vmipc.protocol import CommandSpec, FieldSpec, Schema, TypeSpec, load_schema

ROOT = Path(__file__).resolve().parent.parent
#: the schema: the spec a stranger implements from, and the one source of truth
SPEC = ROOT / "protocol" / "schema.json"
#: the package's byte-identical copy of the spec
PACKAGE_SCHEMA = ROOT / "src" / "vmipc" / "protocol" / "schema.json"
#: the generated client module (the methods)
TARGET = ROOT / "src" / "vmipc" / "client" / "_generated.py"
#: the generated result types: apart, since the clients need them only for type checkers
#: and building them costs a short-lived `vmipc call` ~1.5 ms (``vmipc.client`` exports
#: the public ones, loading this module on first use)
RESULTS_TARGET = ROOT / "src" / "vmipc" / "client" / "_results.py"
_WIDTH = 100


def method_name(command: str) -> str:
    name = command.replace("-", "_")
    return f"{name}_" if keyword.iskeyword(name) else name


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_"))


def _param_name(name: str) -> str:
    """A Python parameter for a wire name: ``in`` (a keyword) becomes ``in_``."""
    return f"{name}_" if keyword.iskeyword(name) else name


class _Generator:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.typed_dicts: list[str] = []
        self.seen: set[str] = set()
        self.docs: dict[str, str] = {}
        for command in schema.commands:
            self.docs[_camel(command) + "Result"] = f"The result of ``{command}``."
        for event in schema.events:
            self.docs[_camel(event) + "Data"] = f"The data of the ``{event}`` event."

    def py_type(self, spec: TypeSpec, hint: str) -> str:
        t = spec.type
        text: str
        if spec.enum is not None and t in ("string", "int", "bool"):
            text = "Literal[" + ", ".join(repr(v).replace("'", '"') for v in spec.enum) + "]"
        elif t == "bool":
            text = "bool"
        elif t == "int":
            text = "int"
        elif t == "float":
            text = "float"
        elif t == "string":
            text = "str"
        elif t == "bytes":
            text = "bytes"
        elif t == "list":
            assert spec.items is not None
            text = f"list[{self.py_type(spec.items, hint + 'Item')}]"
        elif t == "map" and spec.fields is not None:
            text = self.typed_dict(hint, spec.fields, spec.doc or self.docs.get(hint, ""))
        elif t == "map":
            text = "dict[str, Any]"
        else:
            text = "Any"
        if spec.nullable and text != "Any":
            text += " | None"
        return text

    def typed_dict(self, name: str, fields: tuple[FieldSpec, ...], doc: str) -> str:
        if name in self.seen:
            return name
        self.seen.add(name)
        body = [f"class {name}(TypedDict):"]
        body += _docstring(doc or f"The fields of {name}.", 4)
        body.append("")
        if not fields:
            body.pop()
        for f in fields:
            body.append(f"    {f.name}: {self.py_type(f.type, name + _camel(f.name))}")
            body += _docstring(f.doc, 4, attribute=True)
        self.typed_dicts.append("\n".join(body))
        return name

    def method(self, spec: CommandSpec, *, sync: bool) -> str:
        result_type = self.py_type(spec.result, _camel(spec.name) + "Result")
        params: list[str] = []
        passed: list[str] = []
        # an argument left at its default is not sent (the server fills defaults in), so
        # that a newer client speaks to an older server of the same major version, which
        # would refuse an argument it does not know
        optional: list[str] = []
        for a in spec.args:
            annotation = self.py_type(a.type, _camel(spec.name) + _camel(a.name))
            default = "" if a.required else f" = {_literal(a.default)}"
            params.append(f"{a.name}: {annotation}{default}")
            if not a.required:
                if a.default is None:
                    differs = f"{a.name} is not None"
                elif a.default is False:  # ruff's E712 refuses `!= False`
                    differs = a.name
                else:
                    differs = f"{a.name} != {_literal(a.default)}"
                optional.append(f'        if {differs}:\n            args["{a.name}"] = {a.name}')
        required = [a.name for a in spec.args if a.required]
        if optional:
            passed.append("**args")
        else:
            passed += [f"{name}={name}" for name in required]
        for f in spec.fds:
            param = _param_name(f.name)
            params.append(f"{param}: FdLike" if f.required else f"{param}: FdLike | None = None")
        if spec.fds:
            items = ", ".join(f'"{f.name}": {_param_name(f.name)}' for f in spec.fds)
            if all(f.required for f in spec.fds):
                passed.append(f"fds={{{items}}}")
            else:
                passed.append(f"fds={{k: v for k, v in {{{items}}}.items() if v is not None}}")
        if spec.progress:
            params.append("on_progress: ProgressCallback | None = None")
            passed.append("on_progress=on_progress")
        name = method_name(spec.name)
        prefix = "def" if sync else "async def"
        head = f"    {prefix} {name}(self" + (", *, " + ", ".join(params) if params else "")
        head += f") -> {result_type}:"
        if len(head) > _WIDTH:
            lines = [f"    {prefix} {name}(", "        self,"]
            if params:
                lines.append("        *,")
                lines += [f"        {p}," for p in params]
            lines.append(f"    ) -> {result_type}:")
        else:
            lines = [head]
        lines += _docstring(_method_doc(self.schema, spec), 8)
        if optional:
            initial = ", ".join(f'"{name}": {name}' for name in required)
            lines.append(f"        args: dict[str, Any] = {{{initial}}}")
            lines += optional
        call = "self.call(" + ", ".join([f'"{spec.name}"', *passed]) + ")"
        if not sync:
            call = "await " + call
        # the type as a string: the result types are imported for type checkers only
        ret = f'        return cast("{result_type}", {call})'
        if len(ret) > _WIDTH:
            lines.append(f"        result = {call}")
            if len(lines[-1]) > _WIDTH:
                inner = ",\n".join(f"            {p}" for p in [f'"{spec.name}"', *passed])
                lines[-1] = (
                    "        result = "
                    + ("await " if not sync else "")
                    + "self.call(\n"
                    + inner
                    + ",\n        )"
                )
            lines.append(f'        return cast("{result_type}", result)')
        else:
            lines.append(ret)
        return "\n".join(lines)

    def module(self) -> str:
        """The methods' module."""
        return self.modules()[0]

    def modules(self) -> tuple[str, str]:
        """The methods' module and the result types' module."""
        commands = list(self.schema.commands.values())
        async_methods = [self.method(c, sync=False) for c in commands]
        sync_methods = [self.method(c, sync=True) for c in commands]
        for event in self.schema.events.values():
            self.py_type(event.data, _camel(event.name) + "Data")
        call_sig = (
            "        command: str,\n        /,\n        *,\n"
            "        fds: Mapping[str, FdLike] | None = None,\n"
            "        on_progress: ProgressCallback | None = None,\n"
            "        **args: Any,\n"
        )
        body = "\n\n".join(async_methods + sync_methods)
        typed = [t.split("(", 1)[0].removeprefix("class ") for t in self.typed_dicts]
        used = sorted(n for n in typed if re.search(rf"\b{n}\b", body))
        names = "".join(f"        {n},\n" for n in used)
        header = (
            f'"""Typed command methods, generated from the schema (version '
            f"{self.schema.version}).\n\nDo not edit: run ``python tools/gencode.py``. Their "
            "result types are in ``_results``, imported\nhere for type checkers only.\n"
            '"""\n\n'
            "from __future__ import annotations\n\n"
            "from collections.abc import Mapping\n"
            f"from typing import {_typing_names(body, 'TYPE_CHECKING', 'Any', 'cast')}\n\n"
            "from vmipc.client._common import FdLike, ProgressCallback\n\n"
            "if TYPE_CHECKING:\n"
            f"    from vmipc.client._results import (\n{names}    )\n\n"
            f'SCHEMA_VERSION = "{self.schema.version}"'
        )
        parts = [
            header,
            "class AsyncCommands:\n"
            '    """One coroutine method per schema command; each sends it with ``call``."""\n\n'
            "    async def call(\n        self,\n" + call_sig + "    ) -> Any:\n"
            "        raise NotImplementedError\n\n" + "\n\n".join(async_methods),
            "class SyncCommands:\n"
            '    """One blocking method per schema command; each sends it with ``call``."""\n\n'
            "    def call(\n        self,\n" + call_sig + "    ) -> Any:\n"
            "        raise NotImplementedError\n\n" + "\n\n".join(sync_methods),
        ]
        results_text = "\n\n".join(self.typed_dicts)
        results_header = (
            f'"""The result types of the command methods and the events\' data, generated from '
            f"the schema\n(version {self.schema.version}).\n\n"
            "Do not edit: run ``python tools/gencode.py``. ``vmipc.client`` loads this module on "
            "first use\nof one of the types it exports: building them costs a short-lived "
            "`vmipc call` ~1.5 ms.\n"
            '"""\n\n'
            "from __future__ import annotations\n\n"
            f"from typing import {_typing_names(results_text, 'TypedDict')}"
        )
        results = "\n\n\n".join([results_header, *self.typed_dicts]) + "\n"
        return "\n\n\n".join(parts) + "\n", results


def _typing_names(text: str, *always: str) -> str:
    """The names ``text`` uses of typing, for its import line."""
    # in an annotation, not a docstring's word
    found = {"Any": r"(: |, |\[|\| )Any\b", "Literal": r"\bLiteral\["}
    names = set(always) | {n for n, pattern in found.items() if re.search(pattern, text)}
    # ruff's order: constants, then classes, then functions
    return ", ".join(sorted(names, key=lambda n: (not n.isupper(), n[0].islower(), n)))


def _literal(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    raise ValueError(f"generated methods support scalar defaults only, not {value!r}")


def _method_doc(schema: Schema, spec: CommandSpec) -> str:
    states = "any" if spec.states is None else ", ".join(sorted(spec.states))
    text = spec.doc.replace("`", "``")
    own = ", ".join(spec.errors)
    errors = f"{own}, and the common errors" if own else "the common errors only"
    return (
        f"{text}\n\nAllowed in states: {states}. Since protocol {spec.since}.\n"
        f"Errors: {errors} ({', '.join(schema.common_errors)})."
    )


def _docstring(text: str, indent: int, *, attribute: bool = False) -> list[str]:
    pad = " " * indent
    paragraphs = [p for p in text.strip().split("\n\n")]
    wrapped: list[str] = []
    for i, para in enumerate(paragraphs):
        if i:
            wrapped.append("")
        for line in para.split("\n"):
            wrapped += textwrap.wrap(line, _WIDTH - indent - 3, break_on_hyphens=False) or [""]
    if len(wrapped) == 1 and len(pad) + len(wrapped[0]) + 6 <= _WIDTH:
        return [f'{pad}"""{wrapped[0]}"""']
    lines = [f'{pad}"""{wrapped[0]}']
    lines += [f"{pad}{w}" if w else "" for w in wrapped[1:]]
    lines.append(f'{pad}"""')
    return lines


def generate(schema: Schema | None = None) -> str:
    """The methods' module (``_generated.py``)."""
    return _Generator(schema or load_schema()).modules()[0]


def generate_results(schema: Schema | None = None) -> str:
    """The result types' module (``_results.py``)."""
    return _Generator(schema or load_schema()).modules()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    parser.add_argument("--schema", type=Path, help="generate from this schema document")
    args = parser.parse_args(argv)
    document = (args.schema or SPEC).read_bytes()
    schema = Schema.from_document(json.loads(document))
    methods, results = _Generator(schema).modules()
    outputs = {TARGET: methods.encode(), RESULTS_TARGET: results.encode()}
    if args.schema is None:
        outputs[PACKAGE_SCHEMA] = document
    stale = {p: data for p, data in outputs.items() if not p.exists() or p.read_bytes() != data}
    if args.check:
        for path in stale:
            print(f"{path} is stale: run python tools/gencode.py", file=sys.stderr)
        return 1 if stale else 0
    for path, data in stale.items():
        path.write_bytes(data)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
