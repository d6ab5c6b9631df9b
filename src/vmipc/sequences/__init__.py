"""Sequences: suspend, checkpoint, restore and live migration, each an explicit list of
building-block calls on a :class:`vmipc.client.Client` (async), with blocking wrappers.

The server never imports this package. Each sequence leaves exactly one healthy VM behind
whatever fails; the guarantee of every step is in docs/sequences.md.
"""

from __future__ import annotations

from vmipc.sequences._common import SequenceError, as_dict
from vmipc.sequences._snapshot import (
    PRODUCER,
    RestoreReport,
    SnapshotReport,
    checkpoint,
    checkpoint_blocking,
    restore_into,
    restore_into_blocking,
    seal,
    suspend,
    suspend_blocking,
    temp_path_for,
    verify_file,
)

__all__ = [
    "PRODUCER",
    "RestoreReport",
    "SequenceError",
    "SnapshotReport",
    "as_dict",
    "checkpoint",
    "checkpoint_blocking",
    "restore_into",
    "restore_into_blocking",
    "seal",
    "suspend",
    "suspend_blocking",
    "temp_path_for",
    "verify_file",
]
