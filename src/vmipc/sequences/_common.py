"""What every sequence shares: its error, best-effort clean-up calls, pause leases."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import trio

from vmipc.client import Client, CommandError, ConnectionClosed
from vmipc.errors import VmipcError

T = TypeVar("T")

#: seconds a clean-up call (resume the source, quit the destination) may take
CLEANUP_TIMEOUT = 10.0
#: seconds a sequence's pause lease lasts; it is renewed every third of that while the
#: sequence works, so only a client that hangs (not one that dies: its connection closes)
#: keeps a VM paused that long
DEFAULT_LEASE = 10.0


class SequenceError(VmipcError):
    """A sequence failed at ``step``; ``outcome`` says, in one line, what it left behind
    (which VM runs, what happened to the file). ``cause`` is the underlying error."""

    def __init__(self, step: str, cause: BaseException | str, outcome: str) -> None:
        reason = cause if isinstance(cause, str) else describe(cause)
        super().__init__(f"{step}: {reason}; {outcome}")
        self.step = step
        self.reason = reason
        self.outcome = outcome
        self.cause = cause if isinstance(cause, BaseException) else None


def describe(exc: BaseException) -> str:
    """One line for an error raised by a building block or the transport."""
    if isinstance(exc, CommandError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, ConnectionClosed):
        return f"connection lost ({exc})" if str(exc) else "connection lost"
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__


async def best_effort(
    call: Callable[[], Awaitable[T]], timeout: float = CLEANUP_TIMEOUT
) -> tuple[T | None, BaseException | None]:
    """Run a clean-up call shielded from cancellation and bounded in time; never raise.
    Returns (result, None) or (None, the error)."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout) as scope:
        try:
            return await call(), None
        except Exception as exc:
            return None, exc
    assert scope.cancelled_caught
    return None, trio.TooSlowError()


async def state_of(client: Client) -> str | None:
    """The VM's run state, or None when it cannot be asked (VMM gone)."""
    status, _ = await best_effort(client.query_status, timeout=5)
    return None if status is None else str(status["state"])


async def resume_if_paused(client: Client) -> str:
    """Resume a VM that a failed sequence paused; says in words what became of it."""
    _, error = await best_effort(client.resume)
    if error is None:
        return "the source VM runs again"
    state = await state_of(client)
    if state == "running":
        return "the source VM runs"
    if state is None:
        return f"the source VM could not be resumed ({describe(error)}): its VMM is gone"
    return f"the source VM could not be resumed ({describe(error)}): it is {state}"


def supports(client: Client, command: str) -> bool:
    """Whether the VMM offers ``command`` on this connection (``renew-lease``: pause
    leases, protocol 1.3; ``claim-priority``: protocol 1.4)."""
    return command in client.server_info.get("commands", ())


@contextlib.asynccontextmanager
async def going_first(client: Client) -> AsyncIterator[bool]:
    """Around a sequence: its requests go before other clients' (``claim-priority``, protocol
    1.4; yields False, and nothing changes, when the VMM does not know it). The claim is
    released afterwards, best effort (a VMM told to quit, or gone, has no claim to end)."""
    if not supports(client, "claim-priority"):
        yield False
        return
    await client.claim_priority()
    try:
        yield True
    finally:
        if not client.is_closed:
            await best_effort(client.release_priority)


class LeaseLost(VmipcError, RuntimeError):
    """The pause lease ended before the sequence proved it held (the VMM resumed the
    guest by itself): what was dumped meanwhile is not one paused moment."""


class PauseLease:
    """This connection's pause of a VM: a pause lease of ``seconds`` when the VMM offers
    leases (protocol 1.3), else a plain pause; or no pause at all (:meth:`none`, a VM that
    was paused already). :meth:`keep_while` renews it while work runs; :meth:`prove` is
    the proof, before the work counts, that the VM stayed paused throughout."""

    def __init__(self, client: Client, seconds: float | None) -> None:
        self.client = client
        #: the lease's length while this connection holds one, else None
        self.seconds = seconds

    @classmethod
    def none(cls, client: Client) -> PauseLease:
        return cls(client, None)

    @classmethod
    async def pause(cls, client: Client, seconds: float | None) -> PauseLease:
        """Pause with a lease of ``seconds`` if the VMM supports it (a plain pause when
        ``seconds`` is None or it does not)."""
        if seconds is not None and supports(client, "renew-lease"):
            await client.pause(lease=seconds)
            return cls(client, seconds)
        await client.pause()
        return cls(client, None)

    @property
    def held(self) -> bool:
        return self.seconds is not None

    async def keep_while(self, body: Callable[[], Awaitable[T]]) -> T:
        """Run ``body``, renewing the lease (if one is held) every third of it."""
        return await while_renewing(self.client, self.seconds, body)

    async def prove(self, *, release: bool, lost: str) -> None:
        """Renew the lease (or release it: then none is held afterwards). Either succeeds
        only if the VM stayed paused since this connection's pause; if not, raise
        :class:`LeaseLost` with ``lost``, which says what that spoils."""
        try:
            if release:
                await self.client.release_lease()
            else:
                await self.client.renew_lease()
        except CommandError as exc:
            if exc.code != "no-lease":
                raise
            raise LeaseLost(lost) from exc
        if release:
            self.seconds = None

    def ended(self) -> None:
        """The VM was resumed: the lease ended with the pause."""
        self.seconds = None


async def while_renewing(
    client: Client, lease: float | None, body: Callable[[], Awaitable[T]]
) -> T:
    """Run ``body`` while renewing this connection's pause lease every ``lease / 3``
    seconds (``lease`` None: just run it). A renewal that fails is not an error here: the
    sequence's next lease call (renew or release, its proof that the VM stayed paused)
    fails too and says so."""
    if lease is None:
        return await body()
    box: dict[str, Any] = {}

    async def renew() -> None:
        while True:
            await trio.sleep(lease / 3)
            try:
                # shielded, so that ending the block never cuts a request half-sent
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    await client.renew_lease()
            except Exception:
                return

    async def run(done: trio.CancelScope) -> None:
        try:
            box["value"] = await body()
        except Exception as exc:
            box["error"] = exc
        finally:
            done.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(renew)
        nursery.start_soon(run, nursery.cancel_scope)
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def as_dict(obj: Any) -> dict[str, Any]:
    """A report dataclass as JSON-friendly data."""
    import dataclasses

    return dataclasses.asdict(obj)


#: called with each ``progress`` event's data (``command``, ``phase``, ``done``, ``total``)
ProgressCallback = Callable[[Mapping[str, Any]], None]


@contextlib.asynccontextmanager
async def watch_progress(
    on_progress: ProgressCallback | None, *clients: Client
) -> AsyncIterator[None]:
    """While the body runs, pass the ``progress`` events of ``clients``' requests to
    ``on_progress``. The clients' other subscriptions and events are left as they were;
    ``progress`` is unsubscribed again afterwards if it was not before. A VMM that cannot
    subscribe shows nothing: it never fails the sequence."""
    if on_progress is None:
        yield
        return
    callback = on_progress
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:
            stack.callback(client.add_progress_observer(lambda event: callback(event.data)))
            before = client.subscriptions
            if "progress" in before:
                continue
            with contextlib.suppress(Exception):
                await client.subscribe(events=sorted(before | {"progress"}))
                stack.push_async_callback(_resubscribe, client, before)
        yield


async def _resubscribe(client: Client, events: frozenset[str]) -> None:
    with contextlib.suppress(Exception), trio.CancelScope(shield=True):
        await client.subscribe(events=sorted(events))
