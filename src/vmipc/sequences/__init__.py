"""Sequences: suspend, checkpoint, restore and live migration, each an explicit list of
building-block calls on a :class:`vmipc.client.Client` (async), with blocking wrappers.

The server never imports this package. Each sequence leaves exactly one healthy VM behind
whatever fails; the guarantee of every step is in docs/sequences.md.
"""

from __future__ import annotations

from vmipc._util import fixup_module_metadata
from vmipc.sequences._checkpoint import (
    CheckpointMode,
    Full,
    Incremental,
    Live,
    SnapshotReport,
    Then,
    checkpoint,
    checkpoint_blocking,
    suspend,
    suspend_blocking,
)
from vmipc.sequences._common import DEFAULT_LEASE, SequenceError, as_dict
from vmipc.sequences._migrate import (
    DEFAULT_MAX_DOWNTIME,
    DEFAULT_MAX_ROUNDS,
    DEFAULT_TIMEOUT,
    Destination,
    LocalDestination,
    MigrationNotConverged,
    MigrationPolicy,
    MigrationReport,
    Round,
    TransferError,
    migrate,
    migrate_blocking,
    migrate_local,
    run_transfer,
)
from vmipc.sequences._net import (
    HELLO_TIMEOUT,
    AuthenticationError,
    ControlError,
    Credentials,
    CredentialsError,
    ReceiveReport,
    Refused,
    Shape,
    TcpDestination,
    listen,
    migrate_tcp,
    parse_address,
    receive,
    security_for,
)
from vmipc.sequences._restore import RestoreReport, restore_into, restore_into_blocking
from vmipc.sequences._steps import ServerTime, StepTiming

# the offline file tools, re-exported here as before (their home is vmipc.snapshots)
from vmipc.snapshots import (
    PRODUCER,
    ChainError,
    ChainLink,
    MergeReport,
    merge,
    resolve_chain,
    seal,
    temp_path_for,
    verify_file,
)

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_MAX_DOWNTIME",
    "DEFAULT_MAX_ROUNDS",
    "DEFAULT_TIMEOUT",
    "HELLO_TIMEOUT",
    "PRODUCER",
    "AuthenticationError",
    "ChainError",
    "ChainLink",
    "CheckpointMode",
    "ControlError",
    "Credentials",
    "CredentialsError",
    "Destination",
    "Full",
    "Incremental",
    "Live",
    "LocalDestination",
    "MergeReport",
    "MigrationNotConverged",
    "MigrationPolicy",
    "MigrationReport",
    "ReceiveReport",
    "Refused",
    "RestoreReport",
    "Round",
    "SequenceError",
    "ServerTime",
    "Shape",
    "SnapshotReport",
    "StepTiming",
    "TcpDestination",
    "Then",
    "TransferError",
    "as_dict",
    "checkpoint",
    "checkpoint_blocking",
    "listen",
    "merge",
    "migrate",
    "migrate_blocking",
    "migrate_local",
    "migrate_tcp",
    "parse_address",
    "receive",
    "resolve_chain",
    "restore_into",
    "restore_into_blocking",
    "run_transfer",
    "seal",
    "security_for",
    "suspend",
    "suspend_blocking",
    "temp_path_for",
    "verify_file",
]

fixup_module_metadata(__name__, globals())
