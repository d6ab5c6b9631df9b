"""Connection-level commands: hello, query-commands, subscribe, cancel."""

from __future__ import annotations

import logging
from typing import Any

from vmipc.commands._registry import CommandContext, handler
from vmipc.protocol import (
    ECHO_ITEMS,
    CommandError,
    ErrorCode,
    echo,
    negotiate_minor,
    negotiate_version,
)

log = logging.getLogger("vmipc.server")


@handler("hello")
async def hello(ctx: CommandContext) -> dict[str, Any]:
    offered = ctx.args["versions"]
    version = negotiate_version(offered, ctx.schema)
    # the client's name and versions are the peer's: the log and the error repeat only a
    # bounded part of them
    log.info(
        "hello from %s offering %s: %s",
        echo(ctx.args["client"]),
        echo(offered),
        version or "refused",
    )
    if version is None:
        shown = ", ".join(map(str, offered[:ECHO_ITEMS])) or "nothing"
        if len(offered) > ECHO_ITEMS:
            shown += f", ... ({len(offered)} versions)"
        raise CommandError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"no common protocol version: the server speaks major {ctx.schema.major}, "
            f"the client offered {shown}",
            {"supported": [ctx.schema.major], "offered": list(offered[:ECHO_ITEMS])},
        )
    info = ctx.server_info
    minor = ctx.args.get("minor")
    if minor is not None:
        # the connection speaks the lower minor of the two, and says so
        minor = negotiate_minor(version, minor)
        version = f"{ctx.schema.major}.{minor}"
        ctx.connection.negotiated(minor)
    return {
        "protocol": version,
        "server": {"name": info.name, "version": info.version, "pid": info.pid},
        "commands": sorted(
            name
            for name in ctx.schema.commands
            if ctx.connection.allowed_commands is None or name in ctx.connection.allowed_commands
        ),
        "events": sorted(ctx.schema.events),
        "capabilities": list(info.capabilities),
        "limits": {
            "max_frame_size": info.max_frame_size,
            "max_fds_per_request": info.max_fds_per_request,
            "max_in_flight": info.max_in_flight,
            "max_request_size": info.max_request_size,
        },
        "connection": ctx.connection.id,
    }


@handler("query-commands")
async def query_commands(ctx: CommandContext) -> dict[str, Any]:
    return dict(ctx.schema.document)


@handler("subscribe")
async def subscribe(ctx: CommandContext) -> dict[str, Any]:
    events: list[str] = ctx.args["events"]
    for i, name in enumerate(events):
        if name not in ctx.schema.events:
            raise CommandError(
                ErrorCode.INVALID_ARGUMENTS,
                f"no event named {echo(name)}",
                {"argument": f"events[{i}]", "problem": "unknown event"},
            )
    chosen = frozenset(events)
    ctx.connection.subscribe(chosen)
    return {"events": sorted(chosen)}


@handler("cancel")
async def cancel(ctx: CommandContext) -> dict[str, Any]:
    return {"cancelled": ctx.connection.cancel(ctx.args["request"])}
