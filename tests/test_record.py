"""``vmipc._record.record``: the protocol's value classes behave as the frozen dataclasses
they replaced (made so that importing the protocol compiles nothing)."""

from __future__ import annotations

import pytest

from vmipc._record import field, record
from vmipc.protocol import ErrorInfo, Frame, Request, Schema, load_schema


@record
class Point:
    x: int
    y: int = 0
    tags: list[str] = field(default_factory=list)
    note: str = field(default="", repr=False, compare=False)


@record(frozen=False)
class Box:
    size: int
    items: list[int] = field(default_factory=list)


def test_init_takes_positional_and_keyword_arguments_with_defaults() -> None:
    assert Point(1).y == 0 and Point(1).tags == [] and Point(1).note == ""
    p = Point(1, 2, ["a"], note="n")
    assert (p.x, p.y, p.tags, p.note) == (1, 2, ["a"], "n")
    assert Point(y=3, x=4) == Point(4, 3)
    assert Point(1).tags is not Point(1).tags  # a fresh default each time
    assert Point.y == 0  # the default stays on the class, as a dataclass's does
    with pytest.raises(TypeError, match="missing required argument 'x'"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        Point(1, z=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values"):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes 4 arguments"):
        Point(1, 2, [], "", 5)  # type: ignore[call-arg]


def test_repr_eq_hash_follow_the_fields() -> None:
    assert repr(Point(1, 2, note="hidden")) == "Point(x=1, y=2, tags=[])"
    assert Point(1, note="a") == Point(1, note="b")  # note: compare=False
    assert Point(1) != Point(2)
    assert Point(1) != (1, 0, [])  # another class never equals
    assert hash(Point(1, 2, ("t",), note="a")) == hash(Point(1, 2, ("t",), note="b"))  # type: ignore[arg-type]
    assert ErrorInfo("c", "m") == ErrorInfo("c", "m", {})
    assert Point.__match_args__ == ("x", "y", "tags", "note")  # type: ignore[attr-defined]


def test_frozen_refuses_assignment_mutable_does_not() -> None:
    p = Point(1)
    with pytest.raises(AttributeError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.x  # type: ignore[misc]
    assert hash(Point(1, 2, ("t",))) == hash(Point(1, 2, ("t",)))  # type: ignore[arg-type]
    b = Box(1)
    b.size = 2
    assert b == Box(2)
    with pytest.raises(TypeError):
        hash(b)  # mutable: unhashable, as a mutable dataclass


def test_a_field_without_a_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError, match="non-default field"):

        @record
        class Bad:  # pragma: no cover - never built
            a: int = 0
            b: int  # type: ignore[misc]


def test_the_protocol_classes_are_records() -> None:
    assert Request(1, "hello") == Request(id=1, command="hello", args={}, fds=(), chain=None)
    assert repr(Frame(b"x")) == "Frame(payload=b'x', fds=[], fds_truncated=False)"
    schema = load_schema()
    again = Schema.from_document(schema.document)
    assert again == schema  # ``document`` is compare=False
    assert "document=" not in repr(schema)  # repr=False
