"""Small value classes, as ``dataclasses`` makes them, at no cost when a module loads.

``@dataclass`` compiles the source of ``__init__``, ``__repr__``, ``__eq__`` and
``__hash__`` for every class as it is defined (half a millisecond each) and imports
``inspect`` (~7 ms): the protocol's two dozen classes cost a short-lived ``vmipc call``
a quarter of its start-up. :func:`record` gives a class the same methods, generic ones
that read the class's field list, with nothing compiled. Type checkers see a dataclass
(``dataclass_transform``). What it does not offer: ``dataclasses.fields``/``replace``/
``asdict`` (use the attributes), ``__post_init__``, ordering, inheritance between
records, ``ClassVar`` fields.

    @record
    class Point:
        x: int
        y: int = 0
        tags: list[str] = field(default_factory=list)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform, overload

__all__ = ["field", "record"]

_T = TypeVar("_T", bound=type)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


_MISSING: Any = _Missing()


class _Field:
    __slots__ = ("compare", "default", "factory", "repr")

    def __init__(
        self, default: Any, factory: Callable[[], Any] | None, repr: bool, compare: bool
    ) -> None:
        self.default = default
        self.factory = factory
        self.repr = repr
        self.compare = compare


@overload
def field(*, default: Any, repr: bool = True, compare: bool = True) -> Any: ...
@overload
def field(
    *, default_factory: Callable[[], Any], repr: bool = True, compare: bool = True
) -> Any: ...
@overload
def field(*, repr: bool = True, compare: bool = True) -> Any: ...
def field(
    *,
    default: Any = _MISSING,
    default_factory: Callable[[], Any] | None = None,
    repr: bool = True,
    compare: bool = True,
) -> Any:
    """A field's default made afresh for each instance (``default_factory``), or one left
    out of ``repr`` or of ``==`` and ``hash`` (as ``dataclasses.field``)."""
    if default is not _MISSING and default_factory is not None:
        raise ValueError("a field takes a default or a default_factory, not both")
    return _Field(default, default_factory, repr, compare)


@overload
def record(cls: _T, /) -> _T: ...
@overload
def record(*, frozen: bool = True) -> Callable[[_T], _T]: ...
@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: _T | None = None, /, *, frozen: bool = True) -> Any:
    """Make ``cls`` a value class from its annotated fields: ``__init__`` (positional or
    keyword arguments, in field order), ``__repr__``, ``__eq__``, ``__match_args__`` and,
    when ``frozen`` (the default), no assignment after ``__init__`` and a ``__hash__``."""
    if cls is None:
        return lambda c: _build(c, frozen)
    return _build(cls, frozen)


def _build(cls: _T, frozen: bool) -> _T:
    # the class's own annotations, in order (not inspect.get_annotations: importing inspect
    # is what this module saves); with ``from __future__ import annotations`` they are
    # strings, never evaluated
    names = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    defaults: dict[str, Any] = {}
    factories: dict[str, Callable[[], Any]] = {}
    shown: list[str] = []
    compared: list[str] = []
    for name in names:
        value = cls.__dict__.get(name, _MISSING)
        spec = value if isinstance(value, _Field) else _Field(value, None, True, True)
        if spec.factory is not None:
            factories[name] = spec.factory
        elif spec.default is not _MISSING:
            defaults[name] = spec.default
        if isinstance(value, _Field):
            if spec.default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, spec.default)  # as a dataclass: the default on the class
        if (defaults or factories) and name not in defaults and name not in factories:
            raise TypeError(f"{cls.__name__}: non-default field {name!r} after a default one")
        if spec.repr:
            shown.append(name)
        if spec.compare:
            compared.append(name)
    _install(cls, names, defaults, factories, tuple(shown), tuple(compared), frozen)
    return cls


def _install(
    cls: type,
    names: tuple[str, ...],
    defaults: dict[str, Any],
    factories: dict[str, Callable[[], Any]],
    shown: tuple[str, ...],
    compared: tuple[str, ...],
    frozen: bool,
) -> None:
    count = len(names)
    known = frozenset(names)
    qualname = cls.__qualname__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) == count and not kwargs:  # every field given in order: the common case
            self.__dict__.update(zip(names, args, strict=True))
            return
        if len(args) > count:
            raise TypeError(f"{qualname}() takes {count} arguments, {len(args)} given")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in known:
                raise TypeError(f"{qualname}() got an unexpected keyword argument {key!r}")
            if key in values:
                raise TypeError(f"{qualname}() got multiple values for argument {key!r}")
            values[key] = value
        if len(values) < count:
            for name in names:
                if name in values:
                    continue
                if name in defaults:
                    values[name] = defaults[name]
                elif name in factories:
                    values[name] = factories[name]()
                else:
                    raise TypeError(f"{qualname}() missing required argument {name!r}")
        # in field order, as a dataclass's __init__ would assign them
        self.__dict__.update((name, values[name]) for name in names)

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return tuple(getattr(self, n) for n in compared) == tuple(
            getattr(other, n) for n in compared
        )

    methods: dict[str, Any] = {"__init__": __init__, "__repr__": __repr__, "__eq__": __eq__}
    if frozen:

        def __hash__(self: Any) -> int:
            return hash(tuple(getattr(self, n) for n in compared))

        def __setattr__(self: Any, name: str, value: Any) -> None:
            raise AttributeError(f"cannot assign to field {name!r} of a frozen {qualname}")

        def __delattr__(self: Any, name: str) -> None:
            raise AttributeError(f"cannot delete field {name!r} of a frozen {qualname}")

        methods.update(__hash__=__hash__, __setattr__=__setattr__, __delattr__=__delattr__)
    for name, method in methods.items():
        method.__qualname__ = f"{qualname}.{name}"
        method.__module__ = cls.__module__
        setattr(cls, name, method)
    if not frozen:
        cls.__hash__ = None  # type: ignore[assignment]  # as a mutable dataclass: unhashable
    # the field names, in order (for ``match`` and for code that lists them)
    cls.__match_args__ = names  # type: ignore[attr-defined,misc]
