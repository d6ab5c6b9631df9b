"""The machine-readable schema: loading, checking it, and validating values against it.

The schema document (``protocol/schema.json`` at the top of the repository, the spec,
with a byte-identical copy in this package that ``tools/gencode.py`` keeps and a test
checks) is the one source of truth for commands and events. The server
validates requests with it, the client's methods and the CLI's help are generated from
it, and ``docs/protocol-reference.md`` is rendered from it.

Types (``"type"`` of an argument, a result, an event's data, or a list's ``items``):

``bool``, ``int`` (``min``/``max`` optional), ``float`` (an int is accepted too),
``string``, ``bytes`` (msgpack bin), ``list`` (with ``items``), ``map`` (with ``fields``
when its keys are fixed, else any string keys), ``any``. Every type may carry
``nullable: true`` and ``enum: [...]``.
"""

from __future__ import annotations

import json
import keyword
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from vmipc._record import field, record
from vmipc.errors import VmipcError
from vmipc.protocol._errors import echo, shorten

TYPES = frozenset({"bool", "int", "float", "string", "bytes", "list", "map", "any"})
#: argument names that would clash with the client's ``call(name, *, fds=..., **args)``
RESERVED_ARG_NAMES = frozenset({"fds", "command", "self"})
# Names and versions are checked character by character, not with regular expressions:
# compiling three cost a short-lived `vmipc call` 0.3 ms, and `$` let a trailing newline in
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset("0123456789")
_KEBAB_CHARS = _LOWER | _DIGITS
_IDENT_CHARS = _LOWER | _DIGITS | {"_"}
#: what a field, argument or fd name looks like (for messages)
_IDENT_PATTERN = "^[a-z][a-z0-9_]*$"


def _is_ident(name: str) -> bool:
    """``^[a-z][a-z0-9_]*$``, no newline after."""
    return bool(name) and name[0] in _LOWER and all(c in _IDENT_CHARS for c in name)


def _is_kebab(name: str) -> bool:
    """``^[a-z][a-z0-9]*(-[a-z0-9]+)*$``, no newline after."""
    parts = name.split("-")
    if not parts[0] or parts[0][0] not in _LOWER:
        return False
    return all(part and all(c in _KEBAB_CHARS for c in part) for part in parts)


def _is_number(text: str) -> bool:
    """``0|[1-9][0-9]*``: ASCII digits, no leading zero."""
    if not text or not all(c in _DIGITS for c in text):
        return False
    return text == "0" or text[0] != "0"


class SchemaError(VmipcError):
    """The schema document itself is malformed (a bug in the schema, not in a request)."""


class ValidationError(VmipcError):
    """A value does not match its type. ``where`` is a dotted path, e.g. ``versions[2]``."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


class FdMismatch(VmipcError):
    """The fds attached to a request do not match the command's fd parameters."""

    def __init__(self, fd: str | None, problem: str) -> None:
        super().__init__(f"fd {fd!r}: {problem}" if fd else problem)
        self.fd = fd
        self.problem = problem


#: values that a deep copy returns as they are
_IMMUTABLE = frozenset({type(None), bool, int, float, str, bytes})


def _copied(value: Any) -> Any:
    """``copy.deepcopy(value)``, with the copy module (and weakref under it: ~1 ms of a
    short-lived `vmipc call`) imported only for a value that is not a plain scalar."""
    if type(value) in _IMMUTABLE:
        return value
    import copy

    return copy.deepcopy(value)


def parse_version(text: str) -> tuple[int, int]:
    major, dot, minor = text.partition(".")
    if not (dot and _is_number(major) and _is_number(minor)):
        raise ValueError(f"not a protocol version (major.minor): {text!r}")
    return int(major), int(minor)


@record
class TypeSpec:
    type: str
    doc: str = ""
    nullable: bool = False
    enum: tuple[Any, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    items: TypeSpec | None = None
    #: for ``map``: the fixed fields, or None for a map with any string keys
    fields: tuple[FieldSpec, ...] | None = None

    def describe(self) -> str:
        """A short human name for the type, e.g. ``list of int`` or ``string or null``."""
        if self.type == "list" and self.items is not None:
            text = f"list of {self.items.describe()}"
        elif self.enum is not None:
            text = " | ".join(json.dumps(v) for v in self.enum)
        else:
            text = self.type
            if self.minimum is not None or self.maximum is not None:
                lo = "" if self.minimum is None else str(self.minimum)
                hi = "" if self.maximum is None else str(self.maximum)
                text += f" [{lo}..{hi}]"
        return f"{text} or null" if self.nullable else text


@record
class FieldSpec:
    name: str
    type: TypeSpec
    doc: str
    required: bool = True
    default: Any = None
    since: str | None = None


@record
class FdSpec:
    name: str
    direction: Literal["in", "out"]
    doc: str
    required: bool = True
    since: str | None = None


@record
class CommandSpec:
    name: str
    doc: str
    since: str
    args: tuple[FieldSpec, ...]
    fds: tuple[FdSpec, ...]
    result: TypeSpec
    #: the run states in which the command is allowed; None means any state
    states: frozenset[str] | None
    errors: tuple[str, ...]
    cancellable: bool
    progress: bool

    def arg(self, name: str) -> FieldSpec | None:
        return next((a for a in self.args if a.name == name), None)

    def fd(self, name: str) -> FdSpec | None:
        return next((f for f in self.fds if f.name == name), None)


@record
class EventSpec:
    name: str
    doc: str
    since: str
    data: TypeSpec


@record
class ErrorSpec:
    code: str
    scope: Literal["request", "connection"]
    doc: str
    since: str


@record
class StateSpec:
    name: str
    doc: str


@record
class Schema:
    name: str
    version: str
    doc: str
    states: tuple[StateSpec, ...]
    errors: Mapping[str, ErrorSpec]
    common_errors: tuple[str, ...]
    commands: Mapping[str, CommandSpec]
    events: Mapping[str, EventSpec]
    #: the document this was parsed from (what ``query-commands`` returns)
    document: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def major(self) -> int:
        return parse_version(self.version)[0]

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], *, lazy: bool = False) -> Schema:
        """Parse and check a schema document. Raises SchemaError.

        ``lazy``: for a client that uses one or two commands of a server's catalogue
        (``vmipc call``): the document's top level, its events and its command names are
        checked now, each command's entry when it is first looked up in ``commands``
        (which raises SchemaError then). The document is kept as it is, not copied: the
        caller does not change it afterwards.
        """
        return _parse_schema(doc, lazy=lazy)

    def extended(self, extra: Mapping[str, Any]) -> Schema:
        """A new schema with ``extra``'s ``commands``, ``events`` and ``errors`` added."""
        doc = _copied(dict(self.document))
        for key in ("commands", "events", "errors"):
            doc[key] = list(doc[key]) + list(_copied(extra.get(key, [])))
        return _parse_schema(doc)

    def errors_of(self, command: str) -> tuple[str, ...]:
        """Every error code ``command`` can answer with: the common ones and its own."""
        own = self.commands[command].errors
        return tuple(dict.fromkeys((*self.common_errors, *own)))


_cached: Schema | None = None


def load_schema() -> Schema:
    """The schema shipped with this package (parsed once, then cached)."""
    global _cached
    if _cached is None:
        # beside this module in every install (package data); not importlib.resources,
        # which costs a short-lived `vmipc call` ~10 ms of imports, nor pathlib (~3 ms)
        path = os.path.join(os.path.dirname(__file__), "schema.json")
        with open(path, encoding="utf-8") as file:
            text = file.read()
        _cached = _parse_schema(json.loads(text))
    return _cached


# --- parsing the schema document ------------------------------------------------------


def _need(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise SchemaError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SchemaError(f"{where}.{key}: wrong type {type(value).__name__}")
    return value


def _only(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = set(obj) - allowed
    if extra:
        raise SchemaError(f"{where}: unknown keys {sorted(extra)}")


def _since(obj: Mapping[str, Any], where: str, required: bool) -> str | None:
    if "since" not in obj:
        if required:
            raise SchemaError(f"{where}: missing 'since'")
        return None
    since = _need(obj, "since", str, where)
    try:
        parse_version(since)
    except ValueError as exc:
        raise SchemaError(f"{where}.since: {exc}") from None
    return str(since)


_TYPE_KEYS = {"type", "doc", "nullable", "enum", "min", "max", "items", "fields"}


def _parse_type(obj: Mapping[str, Any], where: str) -> TypeSpec:
    if not isinstance(obj, Mapping):
        raise SchemaError(f"{where}: a type must be an object")
    tname = _need(obj, "type", str, where)
    if tname not in TYPES:
        raise SchemaError(f"{where}: unknown type {tname!r}")
    items = None
    if tname == "list":
        items = _parse_type(_need(obj, "items", dict, where), f"{where}.items")
    elif "items" in obj:
        raise SchemaError(f"{where}: 'items' only belongs to lists")
    fields = None
    if "fields" in obj:
        if tname != "map":
            raise SchemaError(f"{where}: 'fields' only belongs to maps")
        fields = tuple(
            _parse_field(f, f"{where}.fields[{i}]", arg=False)
            for i, f in enumerate(_need(obj, "fields", list, where))
        )
        _unique([f.name for f in fields], where)
    enum = obj.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise SchemaError(f"{where}.enum: must be a list")
    for bound in ("min", "max"):
        if bound in obj and (tname != "int" or type(obj[bound]) is not int):
            raise SchemaError(f"{where}.{bound}: only ints have integer bounds")
    spec = TypeSpec(
        type=tname,
        doc=str(obj.get("doc", "")),
        nullable=bool(obj.get("nullable", False)),
        enum=tuple(enum) if enum is not None else None,
        minimum=obj.get("min"),
        maximum=obj.get("max"),
        items=items,
        fields=fields,
    )
    if spec.enum is not None:
        for value in spec.enum:
            try:
                check_value(TypeSpec(spec.type, items=spec.items), value)
            except ValidationError as exc:
                raise SchemaError(f"{where}.enum: {exc}") from None
    return spec


def _parse_field(obj: Mapping[str, Any], where: str, *, arg: bool) -> FieldSpec:
    if not isinstance(obj, Mapping):
        raise SchemaError(f"{where}: a field must be an object")
    _only(obj, _TYPE_KEYS | {"name", "default", "since"}, where)
    name = _need(obj, "name", str, where)
    if not _is_ident(name):
        raise SchemaError(f"{where}: field name {name!r} must match {_IDENT_PATTERN}")
    if arg and (name in RESERVED_ARG_NAMES or keyword.iskeyword(name)):
        # arguments become keyword arguments of the clients' methods
        raise SchemaError(f"{where}: argument name {name!r} is reserved")
    doc = _need(obj, "doc", str, where)
    if not doc.strip():
        raise SchemaError(f"{where}: empty doc")
    tspec = _parse_type(obj, where)
    has_default = "default" in obj
    if has_default and not arg:
        raise SchemaError(f"{where}: only arguments have defaults")
    if has_default:
        try:
            check_value(tspec, obj["default"], name)
        except ValidationError as exc:
            raise SchemaError(f"{where}.default: {exc}") from None
    return FieldSpec(
        name=name,
        type=tspec,
        doc=doc,
        required=not has_default,
        default=_copied(obj.get("default")),
        since=_since(obj, where, required=False),
    )


def _unique(names: Sequence[str], where: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise SchemaError(f"{where}: duplicate name {n!r}")
        seen.add(n)


def _parse_command(
    obj: Mapping[str, Any], where: str, state_names: set[str], error_codes: set[str]
) -> CommandSpec:
    _only(
        obj,
        {
            "name",
            "since",
            "doc",
            "args",
            "fds",
            "result",
            "states",
            "errors",
            "cancellable",
            "progress",
        },
        where,
    )
    name = _need(obj, "name", str, where)
    where = f"command {name!r}"
    if not _is_kebab(name):
        raise SchemaError(f"{where}: command names are kebab-case")
    args = tuple(
        _parse_field(a, f"{where}.args[{i}]", arg=True)
        for i, a in enumerate(_need(obj, "args", list, where))
    )
    fds: list[FdSpec] = []
    for i, f in enumerate(_need(obj, "fds", list, where)):
        fwhere = f"{where}.fds[{i}]"
        _only(f, {"name", "direction", "doc", "required", "since"}, fwhere)
        fname = _need(f, "name", str, fwhere)
        if not _is_ident(fname) or fname in RESERVED_ARG_NAMES:
            raise SchemaError(f"{fwhere}: bad fd name {fname!r}")
        direction = _need(f, "direction", str, fwhere)
        if direction not in ("in", "out"):
            raise SchemaError(f"{fwhere}: direction must be 'in' or 'out'")
        fds.append(
            FdSpec(
                fname,
                direction,
                _need(f, "doc", str, fwhere),
                bool(f.get("required", True)),
                _since(f, fwhere, required=False),
            )
        )
    _unique([a.name for a in args] + [f.name for f in fds], where)
    states_obj = _need(obj, "states", (str, list), where)
    if states_obj == "any":
        states = None
    elif isinstance(states_obj, list) and states_obj:
        unknown = set(states_obj) - state_names
        if unknown:
            raise SchemaError(f"{where}.states: unknown states {sorted(unknown)}")
        states = frozenset(states_obj)
    else:
        raise SchemaError(f"{where}.states: 'any' or a non-empty list of states")
    errors = tuple(_need(obj, "errors", list, where))
    unknown_errors = set(errors) - error_codes
    if unknown_errors:
        raise SchemaError(f"{where}.errors: unknown codes {sorted(unknown_errors)}")
    if states is not None and "invalid-state" not in errors:
        raise SchemaError(f"{where}: restricted to some states but does not list invalid-state")
    doc = _need(obj, "doc", str, where)
    return CommandSpec(
        name=name,
        doc=doc,
        since=_since(obj, where, required=True) or "",
        args=args,
        fds=tuple(fds),
        result=_parse_type(_need(obj, "result", dict, where), f"{where}.result"),
        states=states,
        errors=errors,
        cancellable=_need(obj, "cancellable", bool, where),
        progress=_need(obj, "progress", bool, where),
    )


class _LazyCommands(Mapping[str, CommandSpec]):
    """A catalogue's commands by name, each parsed and checked on its first lookup."""

    def __init__(
        self,
        entries: dict[str, tuple[str, Mapping[str, Any]]],
        state_names: set[str],
        error_codes: set[str],
    ) -> None:
        self._entries = entries
        self._state_names = state_names
        self._error_codes = error_codes
        self._parsed: dict[str, CommandSpec] = {}

    def __getitem__(self, name: str) -> CommandSpec:
        spec = self._parsed.get(name)
        if spec is None:
            where, obj = self._entries[name]
            spec = _parse_command(obj, where, self._state_names, self._error_codes)
            self._parsed[name] = spec
        return spec

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<commands {', '.join(self._entries)}>"


def _parse_schema(doc: Mapping[str, Any], *, lazy: bool = False) -> Schema:
    if not isinstance(doc, Mapping):
        raise SchemaError("the schema must be an object")
    _only(
        doc,
        {"name", "version", "doc", "states", "errors", "common_errors", "commands", "events"},
        "schema",
    )
    version = _need(doc, "version", str, "schema")
    try:
        parse_version(version)
    except ValueError as exc:
        raise SchemaError(str(exc)) from None
    states = tuple(
        StateSpec(_need(s, "name", str, "state"), _need(s, "doc", str, "state"))
        for s in _need(doc, "states", list, "schema")
    )
    errors: dict[str, ErrorSpec] = {}
    for e in _need(doc, "errors", list, "schema"):
        _only(e, {"code", "scope", "doc", "since"}, "error")
        code = _need(e, "code", str, "error")
        if not _is_kebab(code) or code in errors:
            raise SchemaError(f"error {code!r}: bad or duplicate code")
        scope = _need(e, "scope", str, f"error {code!r}")
        if scope not in ("request", "connection"):
            raise SchemaError(f"error {code!r}: scope must be 'request' or 'connection'")
        errors[code] = ErrorSpec(
            code,
            scope,
            _need(e, "doc", str, f"error {code!r}"),
            _since(e, f"error {code!r}", required=True) or "",
        )
    common = tuple(_need(doc, "common_errors", list, "schema"))
    if set(common) - set(errors):
        raise SchemaError(f"common_errors: unknown codes {sorted(set(common) - set(errors))}")
    state_names = {s.name for s in states}
    commands: Mapping[str, CommandSpec]
    if lazy:
        entries: dict[str, tuple[str, Mapping[str, Any]]] = {}
        for i, c in enumerate(_need(doc, "commands", list, "schema")):
            where = f"commands[{i}]"
            if not isinstance(c, Mapping):
                raise SchemaError(f"{where}: a command must be an object")
            name = _need(c, "name", str, where)
            if not _is_kebab(name):
                raise SchemaError(f"command {name!r}: command names are kebab-case")
            if name in entries:
                raise SchemaError(f"command {name!r}: duplicate")
            entries[name] = (where, c)
        commands = _LazyCommands(entries, state_names, set(errors))
    else:
        parsed: dict[str, CommandSpec] = {}
        for i, c in enumerate(_need(doc, "commands", list, "schema")):
            spec = _parse_command(c, f"commands[{i}]", state_names, set(errors))
            if spec.name in parsed:
                raise SchemaError(f"command {spec.name!r}: duplicate")
            parsed[spec.name] = spec
        commands = parsed
    events: dict[str, EventSpec] = {}
    for e in _need(doc, "events", list, "schema"):
        _only(e, {"name", "since", "doc", "data"}, "event")
        name = _need(e, "name", str, "event")
        if not _is_kebab(name) or name in events:
            raise SchemaError(f"event {name!r}: bad or duplicate name")
        events[name] = EventSpec(
            name,
            _need(e, "doc", str, f"event {name!r}"),
            _since(e, f"event {name!r}", required=True) or "",
            _parse_type(_need(e, "data", dict, f"event {name!r}"), f"event {name!r}.data"),
        )
    return Schema(
        name=str(doc.get("name", "")),
        version=version,
        doc=str(doc.get("doc", "")),
        states=states,
        errors=errors,
        common_errors=common,
        commands=commands,
        events=events,
        document=doc if lazy else _copied(dict(doc)),
    )


# --- validating values ----------------------------------------------------------------


def check_value(spec: TypeSpec, value: Any, where: str = "") -> None:
    """Raise ValidationError unless ``value`` has type ``spec``."""
    if value is None:
        if spec.nullable or spec.type == "any":
            return
        raise ValidationError(where, f"expected {spec.describe()}, got null")
    t = spec.type
    ok: bool
    if t == "bool":
        ok = isinstance(value, bool)
    elif t == "int":
        ok = type(value) is int
    elif t == "float":
        ok = type(value) in (int, float)
    elif t == "string":
        ok = isinstance(value, str)
    elif t == "bytes":
        ok = isinstance(value, bytes | bytearray)
    elif t == "list":
        ok = isinstance(value, list | tuple)
    elif t == "map":
        ok = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
    else:  # any
        ok = True
    if not ok:
        raise ValidationError(where, f"expected {spec.describe()}, got {_kind(value)}")
    if spec.enum is not None and value not in spec.enum:
        raise ValidationError(
            where, f"expected one of {', '.join(map(repr, spec.enum))}, got {echo(value)}"
        )
    if t == "int":
        if spec.minimum is not None and value < spec.minimum:
            raise ValidationError(where, f"must be >= {spec.minimum}, got {value}")
        if spec.maximum is not None and value > spec.maximum:
            raise ValidationError(where, f"must be <= {spec.maximum}, got {value}")
    elif t == "list" and spec.items is not None:
        for i, item in enumerate(value):
            check_value(spec.items, item, f"{where}[{i}]")
    elif t == "map" and spec.fields is not None:
        names = {f.name for f in spec.fields}
        for key in value:
            if key not in names:
                raise ValidationError(_join(where, shorten(key)), "unknown field")
        for f in spec.fields:
            if f.name not in value:
                raise ValidationError(_join(where, f.name), "missing field")
            check_value(f.type, value[f.name], _join(where, f.name))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes | bytearray):
        return "bytes"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, Mapping):
        return "map"
    return type(value).__name__


def validate_args(spec: CommandSpec, args: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``args`` against ``spec`` and return them with defaults filled in.

    Raises ValidationError whose ``where`` names the argument at fault.
    """
    known = {a.name for a in spec.args}
    for name in args:
        if name not in known:
            # the name is the peer's: repeat a bounded part of it
            raise ValidationError(shorten(str(name)), "unknown argument")
    out: dict[str, Any] = {}
    for a in spec.args:
        if a.name in args:
            check_value(a.type, args[a.name], a.name)
            out[a.name] = args[a.name]
        elif a.required:
            raise ValidationError(a.name, "missing required argument")
        else:
            out[a.name] = _copied(a.default)
    return out


def match_fds(spec: CommandSpec, names: Sequence[str], count: int) -> dict[str, int]:
    """Map each fd name of a request to its index among the ``count`` attached fds.

    Raises FdMismatch when the names and the fds do not match the command.
    """
    if len(names) != count:
        raise FdMismatch(None, f"the request names {len(names)} fds but {count} are attached")
    out: dict[str, int] = {}
    for i, name in enumerate(names):
        if spec.fd(name) is None:
            raise FdMismatch(shorten(name), f"{spec.name} takes no fd named {echo(name)}")
        if name in out:
            raise FdMismatch(shorten(name), "named twice")
        out[name] = i
    for f in spec.fds:
        if f.required and f.name not in out:
            raise FdMismatch(f.name, "missing required fd")
    return out
