"""The schema document: loading, self-consistency, value validation."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from vmipc.protocol import (
    FdMismatch,
    Schema,
    SchemaError,
    TypeSpec,
    ValidationError,
    check_value,
    load_schema,
    match_fds,
    parse_version,
    validate_args,
)
from vmipc.vmm.runstate import RunState

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_ships_a_byte_identical_copy_of_the_spec_schema() -> None:
    # protocol/ stands alone (a real file, no link into src/); the package keeps its own
    # copy so that the wheel and an editable install both load it as package data
    spec = ROOT / "protocol" / "schema.json"
    assert not spec.is_symlink(), "protocol/schema.json is the spec, a real file"
    packaged = ROOT / "src" / "vmipc" / "protocol" / "schema.json"
    assert packaged.read_bytes() == spec.read_bytes(), (
        "src/vmipc/protocol/schema.json differs from protocol/schema.json: "
        "run python tools/gencode.py"
    )


def test_the_client_offers_the_minor_version_of_the_schema_it_was_generated_from() -> None:
    from vmipc.client._common import CLIENT_MINOR
    from vmipc.client._generated import SCHEMA_VERSION
    from vmipc.protocol import parse_version

    assert parse_version(SCHEMA_VERSION)[1] == CLIENT_MINOR


def test_schema_states_are_the_run_states() -> None:
    schema = load_schema()
    assert [s.name for s in schema.states] == [s.value for s in RunState]
    status = schema.commands["query-status"].result.fields
    assert status is not None
    state_field = next(f for f in status if f.name == "state")
    assert state_field.type.enum == tuple(s.value for s in RunState)


def test_every_entry_has_doc_and_since() -> None:
    schema = load_schema()
    current = parse_version(schema.version)
    for spec in [*schema.commands.values(), *schema.events.values(), *schema.errors.values()]:
        assert spec.doc.strip(), spec
        assert parse_version(spec.since) <= current, spec
    for cmd in schema.commands.values():
        for arg in cmd.args:
            assert arg.doc.strip()


def test_every_error_code_is_used_and_defined() -> None:
    from vmipc.protocol import ErrorCode

    schema = load_schema()
    assert set(schema.errors) == {c.value for c in ErrorCode}


def command(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in doc["commands"] if c["name"] == name)  # type: ignore[no-any-return]


def base_doc() -> dict[str, Any]:
    return copy.deepcopy(dict(load_schema().document))


MALFORMED_COMMANDS: list[Any] = [
    lambda d: d["commands"][0].pop("since"),
    lambda d: d["commands"][0].update(name="Bad_Name"),
    lambda d: d["commands"].append(copy.deepcopy(d["commands"][0])),
    lambda d: d["commands"][0].update(errors=["no-such-code"]),
    lambda d: d["commands"][0].update(states=["flying"]),
    lambda d: command(d, "pause").update(errors=[]),
    lambda d: d["commands"][0]["args"][0].update(type="complex"),
    lambda d: d["commands"][0].update(color="red"),
    lambda d: d.update(version="1"),
]


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda d: d["commands"][0].pop("since"), "since"),
        (lambda d: d["commands"][0].update(name="Bad_Name"), "kebab"),
        (lambda d: d["commands"].append(copy.deepcopy(d["commands"][0])), "duplicate"),
        (lambda d: d["commands"][0].update(errors=["no-such-code"]), "unknown codes"),
        (lambda d: d["commands"][0].update(states=["flying"]), "unknown states"),
        (lambda d: command(d, "pause").update(errors=[]), "invalid-state"),
        (lambda d: d["commands"][0]["args"][0].update(type="complex"), "unknown type"),
        (lambda d: d["commands"][0]["args"][1].update(default=3), "default"),
        (lambda d: d["commands"][0]["args"][0].update(name="fds"), "reserved"),
        (lambda d: d["commands"][0]["args"][0].update(name="for"), "reserved"),
        (lambda d: d["commands"][0]["args"][0].update(doc=""), "empty doc"),
        (
            lambda d: d["commands"][0].update(fds=[{"name": "x", "direction": "up", "doc": "."}]),
            "direction",
        ),
        (lambda d: d["commands"][0].update(color="red"), "unknown keys"),
        (lambda d: d.update(version="1"), "major.minor"),
    ],
)
def test_malformed_schema_is_refused(mutate: Any, problem: str) -> None:
    doc = base_doc()
    mutate(doc)
    with pytest.raises(SchemaError, match=problem):
        Schema.from_document(doc)


@pytest.mark.parametrize("mutate", MALFORMED_COMMANDS)
def test_a_lazy_catalogue_refuses_a_bad_command_when_it_is_looked_up(mutate: Any) -> None:
    # what `vmipc call` parses of the server's catalogue: the names now, an entry on use
    doc = base_doc()
    mutate(doc)
    with pytest.raises(SchemaError):
        dict(Schema.from_document(doc, lazy=True).commands)


def test_a_lazy_catalogue_is_the_same_schema_and_parses_only_what_is_used() -> None:
    doc = base_doc()
    eager = Schema.from_document(doc)
    assert Schema.from_document(base_doc(), lazy=True) == eager
    command(doc, "pause")["args"][0].update(type="complex")  # broken, but not used
    lazy = Schema.from_document(doc, lazy=True)
    assert lazy.commands["query-status"] == eager.commands["query-status"]
    assert set(lazy.commands) == set(eager.commands) and len(lazy.commands) == len(eager.commands)
    with pytest.raises(SchemaError, match="unknown type"):
        lazy.commands.get("pause")
    assert lazy.commands.get("no-such-command") is None
    assert lazy.document is doc  # kept, not copied


def test_schema_round_trips_through_json() -> None:
    schema = load_schema()
    again = Schema.from_document(json.loads(json.dumps(schema.document)))
    assert again.commands == schema.commands
    assert again.events == schema.events


@pytest.mark.parametrize(
    ("spec", "good", "bad"),
    [
        (TypeSpec("bool"), [True, False], [0, 1, "true", None]),
        (TypeSpec("int", minimum=0, maximum=9), [0, 9], [-1, 10, 1.0, True, "1"]),
        (TypeSpec("float"), [1, 1.5], ["1", None, False]),
        (TypeSpec("string", nullable=True), ["", "x", None], [b"x", 1]),
        (TypeSpec("bytes"), [b"", b"\x00"], ["x"]),
        (TypeSpec("list", items=TypeSpec("int")), [[], [1, 2]], [[1, "2"], {}, "12"]),
        (TypeSpec("map"), [{}, {"a": 1}], [[], {1: 2}]),
        (TypeSpec("string", enum=("a", "b")), ["a"], ["c"]),
        (TypeSpec("any"), [None, 1, {"x": [b""]}], []),
    ],
)
def test_check_value(spec: TypeSpec, good: list[Any], bad: list[Any]) -> None:
    for value in good:
        check_value(spec, value, "v")
    for value in bad:
        with pytest.raises(ValidationError):
            check_value(spec, value, "v")


def test_check_value_closed_map_names_the_path() -> None:
    spec = load_schema().commands["query-status"].result
    good = {
        "state": "running",
        "vcpu_count": 1,
        "memory_size": 1,
        "stop_reason": None,
        "lease": None,
        "first": [],
    }
    check_value(spec, good, "result")
    with pytest.raises(ValidationError) as info:
        check_value(spec, {**good, "extra": 1}, "result")
    assert info.value.where == "result.extra"
    with pytest.raises(ValidationError) as info:
        check_value(spec, {**good, "state": "asleep"}, "result")
    assert info.value.where == "result.state"


def test_validate_args_fills_defaults_and_names_the_culprit() -> None:
    hello = load_schema().commands["hello"]
    assert validate_args(hello, {"versions": [1]}) == {"versions": [1], "client": "", "minor": None}
    for args, where, problem in [
        ({}, "versions", "missing"),
        ({"versions": [1], "bogus": 1}, "bogus", "unknown"),
        ({"versions": "1"}, "versions", "expected list"),
        ({"versions": [0]}, "versions[0]", ">= 1"),
    ]:
        with pytest.raises(ValidationError) as info:
            validate_args(hello, args)
        assert info.value.where == where
        assert problem in info.value.problem


def test_match_fds() -> None:
    schema = load_schema().extended(
        {
            "commands": [
                {
                    "name": "copy",
                    "since": "1.0",
                    "doc": "test",
                    "args": [],
                    "fds": [
                        {"name": "src", "direction": "in", "doc": "."},
                        {"name": "dst", "direction": "out", "doc": "."},
                        {"name": "log", "direction": "out", "doc": ".", "required": False},
                    ],
                    "result": {"type": "map"},
                    "states": "any",
                    "errors": [],
                    "cancellable": True,
                    "progress": True,
                }
            ]
        }
    )
    copy_cmd = schema.commands["copy"]
    assert match_fds(copy_cmd, ["dst", "src"], 2) == {"dst": 0, "src": 1}
    assert match_fds(copy_cmd, ["dst", "src", "log"], 3) == {"dst": 0, "src": 1, "log": 2}
    for names, count, problem in [
        (["src"], 2, "names 1 fds but 2"),
        (["src", "src"], 2, "twice"),
        (["src", "zzz"], 2, "no fd named"),
        (["src"], 1, "missing required"),
    ]:
        with pytest.raises(FdMismatch, match=problem):
            match_fds(copy_cmd, names, count)


@pytest.mark.parametrize(
    "text", ["1.8\n", "01.2", "1.02", "1.2.3", "1", ".1", "1.", "", "\u0661.2"]
)
def test_parse_version_refuses_what_is_not_major_dot_minor(text: str) -> None:
    with pytest.raises(ValueError, match=r"major\.minor"):
        parse_version(text)


def test_parse_version_reads_major_and_minor() -> None:
    assert parse_version("0.0") == (0, 0)
    assert parse_version("10.12") == (10, 12)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_names_are_checked_to_their_end(lazy: bool) -> None:
    # a name followed by a newline once matched the `$` of the name patterns
    for mutate in (
        lambda d: command(d, "pause").update(name="pause\n"),
        lambda d: d["errors"][0].update(code=d["errors"][0]["code"] + "\n"),
        lambda d: command(d, "dump-memory")["fds"][0].update(name="out\n"),
    ):
        doc = base_doc()
        mutate(doc)
        with pytest.raises(SchemaError):
            dict(Schema.from_document(doc, lazy=lazy).commands)
