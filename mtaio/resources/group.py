"""``ResourceGroup``: close a set of resources together, last added first.

Pure Python on purpose: adding, removing and closing are not hot paths.
"""

from __future__ import annotations

import asyncio
import inspect
import reprlib
from collections.abc import Iterator
from types import TracebackType
from typing import Final, Literal, Self, TypeVar

from mtaio.exceptions import ResourceError

__all__ = ["ResourceGroup"]

R = TypeVar("R")

_State = Literal["open", "entered", "closing", "closed"]

_MISSING: Final = object()

# Keeps member reprs in notes short, and survives a member whose __repr__ raises.
_repr: Final = reprlib.Repr()
_repr.maxother = 80


class ResourceGroup:
    """A set of resources closed together, last added first.

    ```python
    async with ResourceGroup() as group:
        limiter = await group.add(RateLimiter(10))
        conn = await group.add(await open_connection())
        ...
    # here conn, then limiter, have been closed
    ```

    Closing a member means ``await member.aclose()`` if it has an ``aclose``, else
    ``member.close()`` (awaited if that returns an awaitable), else nothing. Members are
    compared by identity, so unhashable objects and objects with a permissive ``__eq__``
    work; adding the same object twice keeps it once, in its first position.

    A group closes once, on leaving ``async with group`` or on ``await group.aclose()``,
    whichever comes first; a second close does nothing (another task's call waits until the
    first has finished). Every member is closed, whatever the others raise, and then:

    - a ``KeyboardInterrupt``/``SystemExit`` (from the body, else from a close) propagates;
    - else a ``CancelledError`` (from the body, else from a close) propagates, so a
      cancelled block still closes everything and stays cancelled;
    - else the body's exception propagates unchanged;
    - else one close failure is raised as is, several as an ``ExceptionGroup``.

    Whatever the closes raised that does not propagate is attached to the exception that
    does, as notes (``add_note``). A successful close raises nothing.

    Invariants:

    - ``_members`` maps ``id(member)`` to the member, in the order added. Holding the member
      keeps its ``id`` unique, so ``id(x) in _members`` is an exact identity test.
    - ``_state`` only moves forward: ``open`` -> ``entered`` -> ``closing`` -> ``closed``
      (``entered`` is skipped when ``aclose()`` is called without ``async with``).
    - From ``closing`` on, ``add`` and entering raise ``ResourceError``; the closing task
      pops members one at a time, so ``len``, iteration and ``in`` show the members not yet
      handed to their close, and ``remove`` can still take one back before its turn.
    - ``closed`` implies ``_members`` is empty.

    A group belongs to one event loop and is not thread-safe.
    """

    __slots__ = ("_closer", "_done", "_members", "_state")

    def __init__(self) -> None:
        self._members: dict[int, object] = {}
        self._state: _State = "open"
        self._closer: asyncio.Task[object] | None = None
        self._done: asyncio.Event | None = None

    # -- membership ---------------------------------------------------------------------

    async def add(self, resource: R) -> R:
        """Add ``resource`` to the group and return it.

        Adding a member again changes nothing (it keeps its place in the closing order).

        Raises:
            ResourceError: the group is closing or closed. The resource is not added and
                not closed: the caller still owns it.
            ValueError: ``resource`` is the group itself.
        """
        if resource is self:
            raise ValueError("a ResourceGroup cannot be a member of itself")
        if self._state in ("closing", "closed"):
            raise ResourceError(
                f"cannot add {_repr.repr(resource)}: the ResourceGroup is {self._state}"
            )
        self._members.setdefault(id(resource), resource)
        return resource

    async def remove(self, resource: object) -> None:
        """Take ``resource`` out of the group without closing it.

        While the group is closing, a member whose turn has not come yet can still be
        removed; the group then does not close it.

        Raises:
            ResourceError: ``resource`` is not a member (never added, already removed, or
                already closed or being closed by the group).
        """
        if self._members.pop(id(resource), _MISSING) is _MISSING:
            where = "" if self._state in ("open", "entered") else f" (the group is {self._state})"
            raise ResourceError(
                f"{_repr.repr(resource)} is not a member of this ResourceGroup{where}"
            )

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[object]:
        """The current members, in the order they were added (a snapshot)."""
        return iter(list(self._members.values()))

    def __contains__(self, resource: object) -> bool:
        return id(resource) in self._members

    @property
    def closed(self) -> bool:
        """True once closing has started (``add`` and entering are refused from then on)."""
        return self._state in ("closing", "closed")

    # -- closing ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state == "entered":
            raise ResourceError("the ResourceGroup is already entered; a group is entered once")
        if self._state != "open":
            raise ResourceError(f"cannot enter the ResourceGroup: it is {self._state}")
        self._state = "entered"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        raised = await self._close(exc)
        if raised is not None and raised is not exc:
            raise raised

    async def aclose(self) -> None:
        """Close every member, last added first; the same clean-up as leaving ``async with``.

        Idempotent. Lets a group be a member of another group, or be used without
        ``async with``.
        """
        raised = await self._close(None)
        if raised is not None:
            raise raised

    async def _close(self, body: BaseException | None) -> BaseException | None:
        """Close the members; return the exception that should propagate, if any."""
        if self._state == "closed":
            return body
        if self._state == "closing":
            # The same task again (a cycle of groups containing each other): nothing to do.
            # Another task: wait until the first closer is done, so that on return every
            # member is closed. Its failures were reported to the first closer.
            if asyncio.current_task() is not self._closer:
                assert self._done is not None
                await self._done.wait()
            return body
        self._state = "closing"
        self._closer = asyncio.current_task()
        self._done = asyncio.Event()
        failures: list[tuple[object, BaseException]] = []
        try:
            while self._members:
                # popitem() takes the last added: the closing order. A member leaves the
                # group before its close runs, so a concurrent remove() cannot race it.
                _, member = self._members.popitem()
                try:
                    await _close_member(member)
                except BaseException as exc:  # every member is closed, whatever this was
                    failures.append((member, exc))
        finally:
            self._state = "closed"
            self._closer = None
            self._done.set()
        return _outcome(body, failures)

    def __repr__(self) -> str:
        return f"<ResourceGroup {self._state} members={len(self._members)}>"


async def _close_member(member: object) -> None:
    close = getattr(member, "aclose", None)
    if close is None:
        close = getattr(member, "close", None)
    if close is None:
        return
    result = close()
    if inspect.isawaitable(result):
        await result


def _rank(exc: BaseException) -> int:
    """Lower wins: interpreter exits, then cancellation, then ordinary exceptions."""
    if isinstance(exc, Exception):
        return 2
    if isinstance(exc, asyncio.CancelledError):
        return 1
    return 0


def _outcome(
    body: BaseException | None, failures: list[tuple[object, BaseException]]
) -> BaseException | None:
    """Pick the exception to propagate and attach the other close failures to it as notes."""
    if not failures:
        return body
    # Candidates in priority order: the body before the closes at the same rank.
    candidates = ([] if body is None else [body]) + [exc for _, exc in failures]
    best = min(candidates, key=_rank)  # min() keeps the first of equal ranks
    if _rank(best) == 2 and best is not body:
        # Only ordinary close failures (and no body exception): raise them.
        errors = [exc for _, exc in failures if isinstance(exc, Exception)]
        if len(errors) == 1:
            return errors[0]
        return ExceptionGroup(f"{len(errors)} members of the ResourceGroup failed to close", errors)
    for member, exc in failures:
        if exc is not best:
            best.add_note(
                f"ResourceGroup: closing {_repr.repr(member)} also raised "
                f"{type(exc).__qualname__}: {exc}"
            )
    return best
