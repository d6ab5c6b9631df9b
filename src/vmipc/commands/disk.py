"""``dump-disk`` (1.9): the block device's image, sparsely, into a snapshot file's
``disk`` section, so that a suspended VM and its disk move as one file.

An adapter like the other bulk commands (:mod:`vmipc.commands.bulk`): the fd is checked
before anything is written, the work is the data plane's
(:func:`vmipc.vmm.persist.write_disk_section`) in a worker thread, with progress in bytes
of the disk gone through.
"""

from __future__ import annotations

from typing import Any

from vmipc.commands._registry import CommandContext, handler
from vmipc.commands.bulk import _require_file, _require_positional, _run_bulk
from vmipc.protocol import CommandError
from vmipc.vmm.machine_api import NoDisk


@handler("dump-disk")
async def dump_disk(ctx: CommandContext) -> dict[str, Any]:
    fd = ctx.fds["out"]
    _require_file(ctx, "out", "snapshot")
    _require_positional(ctx, "out", "snapshot")
    try:
        dump = await _run_bulk(ctx, "disk", lambda t: ctx.machine.dump_disk(fd, t))
    except NoDisk as exc:
        raise CommandError("no-disk", f"dump-disk: {exc}") from None
    stats = dump.stats
    return {
        "disk_size": stats.disk_size,
        "data_bytes": stats.data_bytes,
        "extents": stats.extents,
        "bytes": stats.bytes,
        "section": dump.section.to_dict(),
    }
