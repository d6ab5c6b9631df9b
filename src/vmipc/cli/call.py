"""``vmipc call``: send one command to a VMM's control server.

    vmipc call [--socket PATH] [--json] [--timeout SECONDS] CMD [key=value ...]
               [key:=JSON ...] [--fd NAME=PATH|- ...] [-- CMD [key=value ...] ...]
    vmipc call [--socket PATH] --list
    vmipc call [--socket PATH] CMD --help

Arguments are typed from the server's catalogue (``query-commands``) and checked against
it before anything is sent. Exit codes: 0 success; 1 the server refused or failed the
command; 2 bad usage or arguments; 3 the server cannot be reached or broke the
connection; 130 interrupted. Errors are one line on standard error.

Several commands separated by ``--`` are sent at once as one ordered chain (protocol
1.8): the VMM runs them in order, each once the previous one succeeded, and answers
``chain-broken`` for those after a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from typing import Any, NoReturn, TextIO

from vmipc.cli import (
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    RawDescriptionHelpFormatter,
)
from vmipc.cli._progress import add_progress_argument, view_for
from vmipc.client import Call, SyncClient
from vmipc.errors import VmipcError
from vmipc.protocol import (
    ClosedByPeer,
    CommandError,
    CommandSpec,
    ConnectionClosed,
    ProtocolError,
    Schema,
    SchemaError,
    TypeSpec,
    UntrustedServer,
    ValidationError,
    load_schema,
    validate_args,
)

PROG = "vmipc call"
SOCKET_ENV = "VMIPC_SOCKET"
USAGE = (
    "vmipc call [--socket PATH] [--json] [--timeout SECONDS] CMD [key=value ...] "
    "[key:=JSON ...] [--fd NAME=PATH|- ...]\n"
    "                  [-- CMD [key=value ...] [--fd NAME=PATH|- ...] ...]\n"
    "       vmipc call [--socket PATH] --list\n"
    "       vmipc call [--socket PATH] CMD --help"
)
EPILOG = f"""\
arguments:
  key=value     typed by the command's schema: int (0x.. ok), float, bool
                (true/false/yes/no/on/off/1/0), string, bytes (UTF-8); lists as
                JSON or comma-separated; maps as JSON
  key:=JSON     the value as raw JSON (e.g. reason:=null)
  --fd NAME=PATH|-
                pass a file descriptor: PATH is opened for writing (out fds,
                created/truncated) or reading (in fds); - passes this process's
                stdout (out) or stdin (in), so `vmipc call CMD --fd out=- | zstd`
                works. The result then goes to stderr.
  -- CMD ...    more commands, sent at once as one ordered chain (protocol 1.8):
                the VMM runs them in the order given, each once the previous one
                succeeded; after a failure the rest answer chain-broken and do not
                run. Each command takes its own key=value and --fd, e.g.
                vmipc call pause lease=5 -- dump-state --fd out=st -- release-lease

The socket is --socket, else ${SOCKET_ENV}.

exit codes: 0 success; 1 the server refused or failed the command; 2 bad usage
or arguments; 3 the server cannot be reached or broke the connection; 130
interrupted.
"""


class UsageError(VmipcError):
    """Bad command line or arguments: exit 2 with one line."""


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "call",
        help="send one command to a VMM's control server",
        description="Send one command to a VMM's control server and print its result.",
        usage=USAGE,
        epilog=EPILOG,
        formatter_class=RawDescriptionHelpFormatter,
        add_help=False,
    )
    _configure(parser)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-h", "--help", action="store_true", help="show help (of CMD, if given)")
    parser.add_argument("--socket", metavar="PATH", help=f"control socket (default ${SOCKET_ENV})")
    parser.add_argument("--json", action="store_true", help="print results and errors as JSON")
    parser.add_argument("--list", action="store_true", help="list the server's commands")
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up after this long (default: wait)"
    )
    add_progress_argument(parser)
    parser.add_argument(
        "--fd",
        action="append",
        default=[],
        metavar="NAME=PATH|-",
        help=(
            "pass a file descriptor: a file (an out fd truncates it; NAME=+PATH adds to it), "
            "or - for this process's stdout (out) / stdin (in)"
        ),
    )
    # one REMAINDER for CMD and what follows: argparse would drop a "--" right after a
    # positional CMD, and "--" separates the commands of an ordered chain
    parser.add_argument(
        "params", nargs=argparse.REMAINDER, metavar="CMD ...", help="the command to send"
    )
    parser.set_defaults(run=run, _parser=parser, command=None, chain=[])


def _split_command(args: argparse.Namespace) -> None:
    """CMD is the first word of ``params`` that is not an option."""
    items = list(args.params)
    if items and items[0] == "--":
        items.pop(0)
    for i, item in enumerate(items):
        if item in ("--fd", "--socket", "--timeout", "--progress"):
            continue
        if i and items[i - 1] in ("--fd", "--socket", "--timeout", "--progress"):
            continue
        if not item.startswith("-"):
            args.command = items.pop(i)
            break
    args.params = items


def _take_trailing_options(args: argparse.Namespace) -> list[str]:
    """Options written after CMD (``vmipc call pause --json``) land in ``params``. The
    commands after ``--`` go to ``args.chain`` as (CMD, params, fd items)."""
    rest: list[str] = []
    items = list(args.params)
    chain: list[tuple[str, list[str], list[str]]] = []
    args.chain = chain
    while items:
        item = items.pop(0)
        if item == "--":
            if not items or items[0].startswith("-"):
                raise UsageError("-- wants a command after it")
            chain.append((items.pop(0), [], []))
        elif chain and item == "--fd":
            if not items:
                raise UsageError("--fd needs a value")
            chain[-1][2].append(items.pop(0))
        elif chain and item.startswith("--fd="):
            chain[-1][2].append(item.partition("=")[2])
        elif chain and not item.startswith("-"):
            chain[-1][1].append(item)
        elif item in ("-h", "--help"):
            args.help = True
        elif item == "--json":
            args.json = True
        elif item == "--list":
            args.list = True
        elif item in ("--fd", "--socket", "--timeout", "--progress"):
            if not items:
                raise UsageError(f"{item} needs a value")
            _set_option(args, item, items.pop(0))
        elif item.startswith(("--fd=", "--socket=", "--timeout=")):
            name, _, value = item.partition("=")
            _set_option(args, name, value)
        elif item.startswith("-") and "=" not in item:
            raise UsageError(f"unknown option {item}")
        else:
            rest.append(item)
    return rest


def _set_option(args: argparse.Namespace, name: str, value: str) -> None:
    if name == "--fd":
        args.fd.append(value)
    elif name == "--socket":
        args.socket = value
    else:
        try:
            args.timeout = float(value)
        except ValueError:
            raise UsageError(f"--timeout wants seconds, not {value!r}") from None


# --- typing key=value arguments -------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def convert(spec: TypeSpec, text: str, name: str) -> Any:
    """Turn the text of ``key=text`` into a value of type ``spec``. Raises UsageError."""
    t = spec.type
    try:
        if spec.nullable and text == "null" and t != "string":
            return None
        if t == "int":
            return int(text, 0)
        if t == "float":
            return float(text)
        if t == "bool":
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected true or false")
        if t == "string":
            return text
        if t == "bytes":
            return text.encode()
        if t == "list":
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, list):
                return value
            items = spec.items or TypeSpec("any")
            return [convert(items, part, name) for part in text.split(",")] if text else []
        return json.loads(text)
    except (ValueError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"argument {name!r}: cannot read {text!r} as {spec.describe()} ({exc})"
        ) from None


def parse_params(spec: CommandSpec, params: Sequence[str]) -> dict[str, Any]:
    """``key=value`` / ``key:=json`` items to checked arguments (defaults not filled)."""
    args: dict[str, Any] = {}
    for item in params:
        head, sep, text = item.partition("=")
        if sep and head.endswith(":"):
            key, raw = head[:-1], text
            try:
                value: Any = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise UsageError(f"argument {key!r}: not JSON: {exc}") from None
        elif sep:
            key = head
            arg = spec.arg(key)
            if arg is None:
                raise UsageError(f"{spec.name} has no argument {key!r}{_known_args(spec)}")
            value = convert(arg.type, text, key)
        else:
            raise UsageError(f"expected key=value, not {item!r}")
        if key in args:
            raise UsageError(f"argument {key!r} given twice")
        args[key] = value
    try:
        validate_args(spec, args)
    except ValidationError as exc:
        raise UsageError(f"{spec.name}: argument {exc.where!r}: {exc.problem}") from None
    return args


def _known_args(spec: CommandSpec) -> str:
    if not spec.args:
        return " (it takes none)"
    return f" (it takes {', '.join(a.name for a in spec.args)})"


# --- fds ------------------------------------------------------------------------------


@contextlib.contextmanager
def open_fds(spec: CommandSpec, items: Sequence[str]) -> Iterator[dict[str, int]]:
    """Open the files of ``--fd NAME=PATH|-`` items; close them (not stdin/stdout) after."""
    fds: dict[str, int] = {}
    opened: list[int] = []
    try:
        for item in items:
            name, sep, target = item.partition("=")
            if not sep or not name or not target:
                raise UsageError(f"--fd wants NAME=PATH or NAME=-, not {item!r}")
            fd_spec = spec.fd(name)
            if fd_spec is None:
                takes = ", ".join(f.name for f in spec.fds) or "none"
                raise UsageError(f"{spec.name} takes no fd {name!r} (it takes {takes})")
            if name in fds:
                raise UsageError(f"fd {name!r} given twice")
            if target == "-":
                fds[name] = 1 if fd_spec.direction == "out" else 0
                continue
            flags = os.O_CLOEXEC
            if fd_spec.direction == "out" and target.startswith("+"):
                # "+PATH": add to the file as it is (sections of a snapshot being composed)
                target = target[1:]
                flags |= os.O_RDWR | os.O_CREAT
            elif fd_spec.direction == "out":
                flags |= os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            else:
                flags |= os.O_RDONLY
            try:
                fd = os.open(target, flags, 0o666)
            except OSError as exc:
                raise UsageError(f"--fd {name}: cannot open {target}: {exc.strerror}") from None
            opened.append(fd)
            fds[name] = fd
        missing = [f.name for f in spec.fds if f.required and f.name not in fds]
        if missing:
            raise UsageError(f"{spec.name} needs --fd {missing[0]}=PATH|-")
        yield fds
    finally:
        for fd in opened:
            os.close(fd)


# --- output ---------------------------------------------------------------------------


def _json_default(value: object) -> Any:
    if isinstance(value, bytes | bytearray):
        import base64  # here: most calls print no bytes, and each import costs start-up

        return {"base64": base64.b64encode(value).decode()}
    raise TypeError(f"cannot print {type(value).__name__}")


def to_json(value: Any) -> str:
    return json.dumps(value, default=_json_default, sort_keys=False)


def print_human(value: Any, out: TextIO, indent: int = 0) -> None:
    pad = "  " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict) and item:
                print(f"{pad}{key}:", file=out)
                print_human(item, out, indent + 1)
            else:
                print(f"{pad}{key}: {_scalar(item)}", file=out)
    elif value is not None:
        print(f"{pad}{_scalar(value)}", file=out)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(_scalar(v) for v in value) if value else "(none)"
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if isinstance(value, dict):
        return to_json(value) if value else "{}"
    return str(value)


def command_help(schema: Schema, spec: CommandSpec) -> str:
    """The ``vmipc call CMD --help`` text, from the command's schema entry."""
    import textwrap  # here, not at the top: only help wraps text

    usage = f"usage: vmipc call {spec.name}"
    for a in spec.args:
        usage += f" {a.name}=VALUE" if a.required else f" [{a.name}=VALUE]"
    for f in spec.fds:
        part = f"--fd {f.name}=PATH|-"
        usage += f" {part}" if f.required else f" [{part}]"
    lines = [usage, ""]
    lines += textwrap.wrap(spec.doc.replace("`", ""), 79)
    if spec.args:
        lines += ["", "arguments:"]
        for a in spec.args:
            note = "required" if a.required else f"default {to_json(a.default)}"
            lines.append(f"  {a.name} ({a.type.describe()}, {note})")
            lines += textwrap.wrap(
                a.doc.replace("`", ""), 75, initial_indent="    ", subsequent_indent="    "
            )
    if spec.fds:
        lines += ["", "fds:"]
        for f in spec.fds:
            kind = "read by the server" if f.direction == "in" else "written by the server"
            note = "required" if f.required else "optional"
            lines.append(f"  {f.name} ({f.direction}: {kind}, {note})")
            lines += textwrap.wrap(
                f.doc.replace("`", ""), 75, initial_indent="    ", subsequent_indent="    "
            )
    if spec.result.fields:
        lines += ["", "result:"]
        for field in spec.result.fields:
            lines.append(f"  {field.name} ({field.type.describe()}): {field.doc.replace('`', '')}")
    states = "any" if spec.states is None else ", ".join(sorted(spec.states))
    lines += ["", f"allowed in states: {states}"]
    own = ", ".join(spec.errors) or "none beyond the common ones"
    lines.append(f"errors: {own} (common: {', '.join(schema.common_errors)})")
    lines.append(f"since protocol {spec.since}" + ("; cancellable" if spec.cancellable else ""))
    return "\n".join(lines)


def list_text(schema: Schema) -> str:
    width = max(len(name) for name in schema.commands)
    lines = []
    for spec in schema.commands.values():
        first = spec.doc.replace("`", "").split(". ")[0].split(": ")[0].rstrip(".")
        if len(first) > 72:
            first = first[:69].rsplit(" ", 1)[0] + "..."
        lines.append(f"  {spec.name:<{width}}  {first}")
    return f"commands of {schema.name} {schema.version}:\n" + "\n".join(lines)


# --- running --------------------------------------------------------------------------


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _fail(code: int, message: str) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr)
    raise _Exit(code)


def _catalogue(client: SyncClient) -> Schema:
    try:
        # lazy: a call parses the one or two commands it uses of the catalogue, not all
        return Schema.from_document(client.query_commands(), lazy=True)
    except SchemaError as exc:
        _fail(EXIT_ENVIRONMENT, f"the server's catalogue is not usable: {exc}")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _Exit as exc:
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    try:
        _split_command(args)
        params = _take_trailing_options(args)
    except UsageError as exc:
        _fail(EXIT_USAGE, str(exc))
    if args.help and args.command is None:
        args._parser.print_help()
        return EXIT_OK
    if args.command is None and not args.list:
        _fail(EXIT_USAGE, "which command? (vmipc call --list shows them)")
    socket_path = args.socket or os.environ.get(SOCKET_ENV)
    if not socket_path:
        if args.help or args.list:
            return _offline_help(args)
        _fail(EXIT_USAGE, f"no socket: pass --socket PATH or set ${SOCKET_ENV}")
    try:
        client = SyncClient(socket_path, timeout=args.timeout, client_name="vmipc-call")
    except UntrustedServer as exc:
        _fail(EXIT_ENVIRONMENT, str(exc))
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
        if args.help or args.list:
            return _offline_help(args, f"{socket_path}: {exc.strerror}")
        _fail(EXIT_ENVIRONMENT, f"cannot connect to {socket_path}: {exc.strerror}")
    except Exception as exc:
        return _connection_failure(exc, socket_path)
    with client:
        try:
            return _call(client, args, params)
        except (ConnectionClosed, ProtocolError, TimeoutError, OSError) as exc:
            return _connection_failure(exc, socket_path)


def _offline_help(args: argparse.Namespace, why: str = "no socket given") -> int:
    schema = load_schema()
    print(f"({why}: showing this client's own schema)", file=sys.stderr)
    if args.list:
        print(list_text(schema))
        return EXIT_OK
    spec = schema.commands.get(args.command)
    if spec is None:
        _fail(EXIT_USAGE, f"unknown command {args.command!r} (vmipc call --list shows them)")
    print(command_help(schema, spec))
    return EXIT_OK


def _connection_failure(exc: BaseException, socket_path: str) -> int:
    if isinstance(exc, ClosedByPeer) and exc.error is not None:
        message = f"{socket_path}: the server closed the connection: {exc.error}"
    elif isinstance(exc, CommandError):  # the handshake itself failed
        message = f"{socket_path}: handshake failed: {exc.code}: {exc.message}"
    elif isinstance(exc, TimeoutError):
        message = f"{socket_path}: timed out"
    elif isinstance(exc, OSError) and exc.strerror:
        message = f"{socket_path}: {exc.strerror}"
    else:
        message = f"{socket_path}: {exc}"
    _fail(EXIT_ENVIRONMENT, message)


def _call(client: SyncClient, args: argparse.Namespace, params: list[str]) -> int:
    schema = _catalogue(client)
    try:
        return _call_with(client, schema, args, params)
    except SchemaError as exc:  # a command's entry, checked when it is first looked up
        _fail(EXIT_ENVIRONMENT, f"the server's catalogue is not usable: {exc}")


def _call_with(
    client: SyncClient, schema: Schema, args: argparse.Namespace, params: list[str]
) -> int:
    if args.list:
        print(to_json(dict(schema.document)) if args.json else list_text(schema))
        return EXIT_OK
    spec = schema.commands.get(args.command)
    if spec is None:
        _fail(EXIT_USAGE, f"unknown command {args.command!r} (vmipc call --list shows them)")
    if args.help:
        print(command_help(schema, spec))
        return EXIT_OK
    try:
        call_args = parse_params(spec, params)
        if args.chain:
            return _send_chain(client, schema, spec, call_args, args)
        with open_fds(spec, args.fd) as fds:
            return _send(client, spec, call_args, fds, as_json=args.json, progress=args.progress)
    except UsageError as exc:
        _fail(EXIT_USAGE, str(exc))


def _send_chain(
    client: SyncClient,
    schema: Schema,
    first: CommandSpec,
    first_args: dict[str, Any],
    args: argparse.Namespace,
) -> int:
    """CMD and the commands after ``--``, sent at once as one ordered chain."""
    steps: list[tuple[CommandSpec, dict[str, Any], list[str]]] = [(first, first_args, args.fd)]
    for name, params, fd_items in args.chain:
        spec = schema.commands.get(name)
        if spec is None:
            raise UsageError(f"unknown command {name!r} (vmipc call --list shows them)")
        steps.append((spec, parse_params(spec, params), fd_items))
    if not client.supports_ordered:
        _fail(
            EXIT_ENVIRONMENT,
            f"commands separated by -- need protocol 1.8; the server speaks "
            f"{client.protocol_version}",
        )
    with ExitStack() as stack:
        calls = []
        passed: set[int] = set()
        for spec, call_args, fd_items in steps:
            fds = stack.enter_context(open_fds(spec, fd_items))
            passed.update(fds.values())
            calls.append(Call(spec.name, fds=fds, **call_args))
        out = sys.stderr if 1 in passed else sys.stdout
        handles = client.send_ordered(calls)
        stack.close()  # the VMM has its own copies: a pipe's reader sees its end
        replies: list[dict[str, Any]] = []
        failed = False
        for handle in handles:
            try:
                result = handle.result()
            except CommandError as exc:
                failed = True
                error = {"code": exc.code, "message": exc.message, "details": dict(exc.details)}
                replies.append({"command": handle.command, "error": error})
                print(f"{PROG}: {handle.command}: {exc.code}: {exc.message}", file=sys.stderr)
                continue
            replies.append({"command": handle.command, "result": result})
            if not args.json:
                print(f"{handle.command}:", file=out)
                print_human(result, out, 1)
    if args.json:
        print(to_json(replies), file=out)
    return EXIT_FAILED if failed else EXIT_OK


def _send(
    client: SyncClient,
    spec: CommandSpec,
    call_args: dict[str, Any],
    fds: dict[str, int],
    *,
    as_json: bool,
    progress: str = "auto",
) -> int:
    # when stdout is passed to the server as an fd it carries data: report on stderr
    out = sys.stderr if 1 in fds.values() else sys.stdout
    view = view_for(progress) if spec.progress else None
    try:
        if view is not None:
            client.subscribe(events=["progress"])
            result = client.call(
                spec.name, fds=fds, on_progress=lambda event: view.update(event.data), **call_args
            )
        else:
            result = client.call(spec.name, fds=fds, **call_args)
    except CommandError as exc:
        if as_json:
            error = {"code": exc.code, "message": exc.message, "details": dict(exc.details)}
            print(to_json({"error": error}), file=out)
        _fail(EXIT_FAILED, f"{spec.name}: {exc.code}: {exc.message}")
    finally:
        if view is not None:
            view.close()
    if as_json:
        print(to_json(result), file=out)
    else:
        print_human(result, out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE,
        epilog=EPILOG,
        add_help=False,
        formatter_class=RawDescriptionHelpFormatter,
        description="Send one command to a VMM's control server and print its result.",
    )
    _configure(parser)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
