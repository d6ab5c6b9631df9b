"""What every package's ``__init__`` uses to publish its names (imports nothing of vmipc)."""

from __future__ import annotations

import types
from typing import Any


def fixup_module_metadata(module_name: str, namespace: dict[str, Any]) -> None:
    """Name the package as the ``__module__`` of what it re-exports from its private modules.

    As trio does: tracebacks, reprs, pickles and docs then say ``vmipc.client.Client``,
    not ``vmipc.client._async.Client``. Only classes and functions listed in
    ``namespace["__all__"]`` and defined in a private module of ``module_name`` (one whose
    name starts with ``module_name + "._"``) change; re-exports of other packages' names
    keep their own.
    """
    private = module_name + "._"
    for name in namespace.get("__all__", ()):
        obj = namespace[name]
        # not the inspect module: it costs every import of vmipc ~10 ms
        if not isinstance(obj, type | types.FunctionType):
            continue
        if obj.__module__.startswith(private):
            obj.__module__ = module_name
