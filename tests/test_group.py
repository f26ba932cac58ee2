"""ResourceGroup (SPEC §5): membership, closing order, failures, cancellation, races."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass, field
from typing import assert_type

import pytest
from conftest import Implementation
from hypothesis import given, settings
from hypothesis import strategies as st

from mtaio.exceptions import ResourceError, ResourceLimitError
from mtaio.resources import ResourceGroup

# -- test doubles --------------------------------------------------------------------------


class Closer:
    """``close()`` (sync) appends the name to a shared log."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def close(self) -> None:
        self.log.append(self.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class AsyncCloser(Closer):
    """``close()`` is a coroutine function that suspends once."""

    async def close(self) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        self.log.append(self.name)


class ACloser(Closer):
    """Has both ``aclose()`` and ``close()``: the group must use ``aclose()``."""

    async def aclose(self) -> None:
        await asyncio.sleep(0)
        self.log.append(f"{self.name}.aclose")

    def close(self) -> None:
        self.log.append(f"{self.name}.close")


class FutureCloser(Closer):
    """``close()`` is sync but returns an awaitable that finishes the close."""

    def close(self) -> asyncio.Future[None]:  # type: ignore[override]
        fut = asyncio.get_running_loop().create_future()

        def finish() -> None:
            self.log.append(self.name)
            fut.set_result(None)

        asyncio.get_running_loop().call_later(1.0, finish)
        return fut


class Failing(Closer):
    """``aclose()`` logs, then raises ``exc``."""

    def __init__(self, name: str, log: list[str], exc: BaseException) -> None:
        super().__init__(name, log)
        self.exc = exc

    async def aclose(self) -> None:
        self.log.append(self.name)
        raise self.exc


class Blocking(Closer):
    """``aclose()`` waits until ``release`` is set; ``closing`` is set when it starts."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(name, log)
        self.closing = asyncio.Event()
        self.release = asyncio.Event()

    async def aclose(self) -> None:
        self.closing.set()
        await self.release.wait()
        self.log.append(self.name)


class Sleeping(Closer):
    """``aclose()`` takes ``seconds`` (virtual time)."""

    def __init__(self, name: str, log: list[str], seconds: float) -> None:
        super().__init__(name, log)
        self.seconds = seconds

    async def aclose(self) -> None:
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.log.append(self.name)


class Plain:
    """No ``close`` and no ``aclose``: closing it does nothing."""


class EqualsEverything:
    """Unhashable and equal to everything: identity is the only way to tell members apart."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.name = name

    def __eq__(self, other: object) -> bool:
        return True

    def close(self) -> None:
        self.log.append(self.name)


# -- membership ----------------------------------------------------------------------------


async def test_add_returns_the_same_object_with_its_type() -> None:
    group = ResourceGroup()
    closer = Closer("a", [])
    added = await group.add(closer)
    assert_type(added, Closer)  # add() is generic: type checkers keep the type
    assert added is closer


async def test_adding_twice_keeps_one_membership_in_first_position() -> None:
    log: list[str] = []
    a, b = Closer("a", log), Closer("b", log)
    group = ResourceGroup()
    await group.add(a)
    await group.add(b)
    await group.add(a)
    assert len(group) == 2
    assert list(group) == [a, b]
    await group.aclose()
    assert log == ["b", "a"]


async def test_members_are_compared_by_identity() -> None:
    log: list[str] = []
    first, second = EqualsEverything(log, "first"), EqualsEverything(log, "second")
    group = ResourceGroup()
    await group.add(first)
    assert second not in group  # equal, but another object
    await group.add(second)
    assert len(group) == 2
    await group.remove(first)
    assert list(group) == [second]
    assert first not in group
    await group.aclose()
    assert log == ["second"]


async def test_len_iteration_and_in_show_current_members_in_order_added() -> None:
    log: list[str] = []
    a, b, c = Closer("a", log), Closer("b", log), Closer("c", log)
    group = ResourceGroup()
    assert len(group) == 0
    assert list(group) == []
    for member in (a, b, c):
        await group.add(member)
    assert len(group) == 3
    assert list(group) == [a, b, c]
    assert b in group
    await group.remove(b)
    assert b not in group
    assert list(group) == [a, c]


async def test_iteration_is_a_snapshot_that_survives_changes() -> None:
    group = ResourceGroup()
    members = [Closer(str(i), []) for i in range(3)]
    for member in members:
        await group.add(member)
    seen: list[object] = []
    for current in group:
        seen.append(current)
        await group.remove(current)
    assert seen == members
    assert len(group) == 0


async def test_remove_takes_a_member_out_without_closing_it() -> None:
    log: list[str] = []
    a = Closer("a", log)
    group = ResourceGroup()
    await group.add(a)
    await group.remove(a)
    await group.aclose()
    assert log == []


async def test_remove_of_a_non_member_raises_resource_error() -> None:
    group = ResourceGroup()
    a = Closer("a", [])
    with pytest.raises(ResourceError, match="not a member"):
        await group.remove(a)
    await group.add(a)
    await group.remove(a)
    with pytest.raises(ResourceError, match="not a member"):
        await group.remove(a)


async def test_none_is_a_member_like_any_other() -> None:
    group = ResourceGroup()
    await group.add(None)
    assert None in group
    assert list(group) == [None]
    await group.remove(None)
    assert None not in group
    with pytest.raises(ResourceError):
        await group.remove(None)


async def test_a_group_cannot_contain_itself() -> None:
    group = ResourceGroup()
    with pytest.raises(ValueError, match="itself"):
        await group.add(group)
    assert len(group) == 0


async def test_members_are_kept_alive_by_the_group() -> None:
    log: list[str] = []
    group = ResourceGroup()
    await group.add(Closer("temporary", log))
    gc.collect()
    await group.aclose()
    assert log == ["temporary"]


# -- closing -------------------------------------------------------------------------------


async def test_exit_closes_every_kind_of_member_last_added_first() -> None:
    log: list[str] = []
    group = ResourceGroup()
    async with group as entered:
        assert entered is group
        await group.add(Closer("sync", log))
        await group.add(AsyncCloser("async", log))
        await group.add(ACloser("both", log))
        await group.add(Plain())
        await group.add(FutureCloser("future", log))
        log.append("body")
    assert log == ["body", "future", "both.aclose", "async", "sync"]


async def test_close_returning_an_awaitable_is_awaited() -> None:
    log: list[str] = []
    async with ResourceGroup() as group:
        await group.add(FutureCloser("future", log))
    # FutureCloser finishes its close one (virtual) second later; exit waited for it.
    assert log == ["future"]
    assert asyncio.get_running_loop().time() == pytest.approx(1.0)


async def test_group_is_closed_and_empty_after_exit() -> None:
    group = ResourceGroup()
    async with group:
        await group.add(Closer("a", []))
        assert repr(group) == "<ResourceGroup entered members=1>"
    assert group.closed
    assert len(group) == 0
    assert list(group) == []
    with pytest.raises(ResourceError, match="closed"):
        await group.add(Closer("late", []))
    with pytest.raises(ResourceError, match="closed"):
        async with group:
            pass


async def test_entering_a_group_twice_raises() -> None:
    group = ResourceGroup()
    async with group:
        with pytest.raises(ResourceError, match="already entered"):
            async with group:
                pass
        assert not group.closed


async def test_refused_add_does_not_close_the_resource() -> None:
    log: list[str] = []
    group = ResourceGroup()
    await group.aclose()
    late = Closer("late", log)
    with pytest.raises(ResourceError):
        await group.add(late)
    assert log == []  # the caller still owns it


async def test_aclose_without_async_with_closes_members() -> None:
    log: list[str] = []
    group = ResourceGroup()
    await group.add(Closer("a", log))
    await group.add(AsyncCloser("b", log))
    await group.aclose()
    assert log == ["b", "a"]
    assert group.closed
    with pytest.raises(ResourceError):
        async with group:
            pass


async def test_closing_is_idempotent() -> None:
    log: list[str] = []
    group = ResourceGroup()
    async with group:
        await group.add(Closer("a", log))
        await group.aclose()
        assert log == ["a"]
        await group.aclose()
    await group.aclose()
    assert log == ["a"]


async def test_close_failures_are_reported_once() -> None:
    log: list[str] = []
    group = ResourceGroup()
    await group.add(Failing("bad", log, OSError("disk")))
    with pytest.raises(OSError, match="disk"):
        await group.aclose()
    await group.aclose()  # nothing left to close, nothing raised again


async def test_empty_group_closes_quietly() -> None:
    async with ResourceGroup() as group:
        pass
    assert group.closed
    assert repr(group) == "<ResourceGroup closed members=0>"


async def test_groups_nest_inside_groups() -> None:
    log: list[str] = []
    async with ResourceGroup() as outer:
        await outer.add(Closer("outer-first", log))
        inner = await outer.add(ResourceGroup())
        await inner.add(Closer("inner-a", log))
        await inner.add(AsyncCloser("inner-b", log))
        await outer.add(Closer("outer-last", log))
    assert log == ["outer-last", "inner-b", "inner-a", "outer-first"]
    assert inner.closed


async def test_a_cycle_of_groups_closes_without_deadlock() -> None:
    log: list[str] = []
    a, b = ResourceGroup(), ResourceGroup()
    await a.add(b)
    await b.add(a)
    await a.add(Closer("in-a", log))
    await b.add(Closer("in-b", log))
    await a.aclose()
    assert log == ["in-a", "in-b"]
    assert a.closed
    assert b.closed


@pytest.mark.uvloop
@pytest.mark.looptime(False)
async def test_closing_works_on_every_loop(impl: Implementation) -> None:
    log: list[str] = []
    async with ResourceGroup() as group:
        limiter = await group.add(impl.ConcurrencyLimiter(1))
        await group.add(Closer("sync", log))
        await group.add(Sleeping("timer", log, 0.01))  # a real 10 ms timer
        await group.add(AsyncCloser("async", log))
    assert log == ["async", "timer", "sync"]
    with pytest.raises(ResourceError):
        await limiter.acquire()


async def test_repr_shows_state_and_member_count() -> None:
    group = ResourceGroup()
    assert repr(group) == "<ResourceGroup open members=0>"
    await group.add(Closer("a", []))
    async with group:
        assert repr(group) == "<ResourceGroup entered members=1>"
        blocking = await group.add(Blocking("b", []))
        closing = asyncio.create_task(group.aclose())
        await blocking.closing.wait()
        assert repr(group) == "<ResourceGroup closing members=1>"
        blocking.release.set()
        await closing
    assert repr(group) == "<ResourceGroup closed members=0>"


# -- failures ------------------------------------------------------------------------------


async def test_one_close_failure_is_raised_as_is_after_closing_the_rest() -> None:
    log: list[str] = []
    error = OSError("disk full")

    async def block() -> None:
        async with ResourceGroup() as group:
            await group.add(Closer("a", log))
            await group.add(Failing("bad", log, error))
            await group.add(Closer("c", log))

    with pytest.raises(OSError) as info:
        await block()
    assert info.value is error
    assert not getattr(error, "__notes__", None)
    assert log == ["c", "bad", "a"]


async def test_several_close_failures_raise_an_exception_group_in_closing_order() -> None:
    log: list[str] = []
    first, second = OSError("first added"), KeyError("second added")
    group = ResourceGroup()
    await group.add(Failing("one", log, first))
    await group.add(Closer("ok", log))
    await group.add(Failing("two", log, second))
    with pytest.raises(ExceptionGroup) as info:
        await group.aclose()
    assert info.value.exceptions == (second, first)
    assert log == ["two", "ok", "one"]
    assert group.closed


async def test_body_exception_wins_and_close_failures_become_notes() -> None:
    log: list[str] = []
    body = ValueError("from the body")

    async def block() -> None:
        async with ResourceGroup() as group:
            await group.add(Failing("one", log, OSError("disk full")))
            await group.add(Closer("ok", log))
            await group.add(Failing("two", log, KeyError("gone")))
            raise body

    with pytest.raises(ValueError) as info:
        await block()
    assert info.value is body
    assert body.__notes__ == [
        "ResourceGroup: closing <Failing two> also raised KeyError: 'gone'",
        "ResourceGroup: closing <Failing one> also raised OSError: disk full",
    ]
    assert log == ["two", "ok", "one"]


async def test_body_exception_without_close_failures_is_unchanged() -> None:
    log: list[str] = []
    body = ValueError("from the body")

    async def block() -> None:
        async with ResourceGroup() as group:
            await group.add(Closer("a", log))
            raise body

    with pytest.raises(ValueError) as info:
        await block()
    assert info.value is body
    assert not getattr(body, "__notes__", None)
    assert log == ["a"]


async def test_note_survives_a_member_whose_repr_raises() -> None:
    class BadRepr(Failing):
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    async def block() -> None:
        async with ResourceGroup() as group:
            await group.add(BadRepr("x", [], OSError("boom")))
            raise ValueError("body")

    with pytest.raises(ValueError) as info:
        await block()
    (note,) = info.value.__notes__
    assert "BadRepr" in note
    assert "OSError: boom" in note


# -- cancellation and other BaseExceptions ---------------------------------------------------


async def test_body_cancellation_propagates_after_closing_every_member() -> None:
    log: list[str] = []
    started = asyncio.Event()

    async def body() -> None:
        async with ResourceGroup() as group:
            await group.add(Closer("a", log))
            await group.add(Sleeping("slow", log, 2.0))
            await group.add(Failing("bad", log, OSError("disk")))
            started.set()
            await asyncio.sleep(100)

    task = asyncio.create_task(body())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as info:
        await task
    # The slow close ran to its end although the task was being cancelled.
    assert log == ["bad", "slow", "a"]
    assert info.value.__notes__ == [
        "ResourceGroup: closing <Failing bad> also raised OSError: disk"
    ]
    assert asyncio.get_running_loop().time() == pytest.approx(2.0)


async def test_cancellation_during_a_close_still_closes_the_rest_then_propagates() -> None:
    log: list[str] = []
    blocking = Blocking("blocking", log)

    async def body() -> None:
        async with ResourceGroup() as group:
            await group.add(Closer("first", log))
            await group.add(Failing("bad", log, OSError("disk")))
            await group.add(blocking)
            await group.add(Closer("last", log))

    task = asyncio.create_task(body())
    await blocking.closing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as info:
        await task
    assert log == ["last", "bad", "first"]  # "blocking" was interrupted, the rest closed
    assert info.value.__notes__ == [
        "ResourceGroup: closing <Failing bad> also raised OSError: disk"
    ]


async def test_cancellation_during_close_wins_over_the_body_exception() -> None:
    # As with `finally`: an exception raised while cleaning up replaces the body's, which
    # stays reachable as its __context__.
    log: list[str] = []
    blocking = Blocking("blocking", log)
    body_error = ValueError("body")

    async def body() -> None:
        async with ResourceGroup() as group:
            await group.add(Closer("first", log))
            await group.add(blocking)
            raise body_error

    task = asyncio.create_task(body())
    await blocking.closing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as info:
        await task
    assert log == ["first"]
    assert info.value.__context__ is body_error


async def test_deadline_expiring_during_close_still_closes_the_rest() -> None:
    log: list[str] = []

    async def block() -> None:
        async with asyncio.timeout(1.0), ResourceGroup() as group:
            await group.add(Closer("first", log))
            await group.add(Sleeping("slow", log, 10.0))

    with pytest.raises(TimeoutError):
        await block()
    assert log == ["slow", "first"]
    assert asyncio.get_running_loop().time() == pytest.approx(1.0)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


@pytest.mark.parametrize("fatal", [KeyboardInterrupt, SystemExit])
async def test_interpreter_exit_from_a_close_wins_after_closing_the_rest(
    fatal: type[BaseException],
) -> None:
    log: list[str] = []
    exit_exc = fatal()
    body = ValueError("body")

    async def block() -> None:
        async with ResourceGroup() as group:
            await group.add(Closer("first", log))
            await group.add(Failing("bad", log, OSError("disk")))
            await group.add(Failing("exit", log, exit_exc))
            raise body

    with pytest.raises(fatal) as info:
        await block()
    assert info.value is exit_exc
    assert log == ["exit", "bad", "first"]
    assert info.value.__notes__ == [
        "ResourceGroup: closing <Failing bad> also raised OSError: disk"
    ]
    assert info.value.__context__ is body


async def test_interpreter_exit_wins_over_cancellation() -> None:
    log: list[str] = []
    group = ResourceGroup()
    await group.add(Failing("exit", log, KeyboardInterrupt()))
    await group.add(Failing("cancel", log, asyncio.CancelledError()))
    with pytest.raises(KeyboardInterrupt) as info:
        await group.aclose()
    assert log == ["cancel", "exit"]
    assert info.value.__notes__ == [
        "ResourceGroup: closing <Failing cancel> also raised CancelledError: "
    ]


async def test_body_keyboard_interrupt_wins_over_close_failures() -> None:
    log: list[str] = []
    interrupt = KeyboardInterrupt()

    async def block() -> None:
        async with ResourceGroup() as group:
            await group.add(Failing("cancel", log, asyncio.CancelledError()))
            raise interrupt

    with pytest.raises(KeyboardInterrupt) as info:
        await block()
    assert info.value is interrupt
    assert log == ["cancel"]


# -- races with other tasks ----------------------------------------------------------------


async def test_add_while_closing_is_refused_and_leaves_the_resource_to_the_caller() -> None:
    log: list[str] = []
    group = ResourceGroup()
    blocking = await group.add(Blocking("blocking", log))
    closing = asyncio.create_task(group.aclose())
    await blocking.closing.wait()
    late = Closer("late", log)
    with pytest.raises(ResourceError, match="closing"):
        await group.add(late)
    assert late not in group
    blocking.release.set()
    await closing
    assert log == ["blocking"]


async def test_remove_while_closing_takes_back_members_not_yet_closed() -> None:
    log: list[str] = []
    group = ResourceGroup()
    pending = await group.add(Closer("pending", log))
    blocking = await group.add(Blocking("blocking", log))
    closing = asyncio.create_task(group.aclose())
    await blocking.closing.wait()
    assert list(group) == [pending]
    await group.remove(pending)  # its turn had not come: the group will not close it
    with pytest.raises(ResourceError, match="not a member"):
        await group.remove(blocking)  # already handed to its close
    blocking.release.set()
    await closing
    assert log == ["blocking"]


async def test_second_closer_waits_until_every_member_is_closed() -> None:
    log: list[str] = []
    group = ResourceGroup()
    await group.add(Closer("first", log))
    blocking = await group.add(Blocking("blocking", log))
    await group.add(Failing("bad", log, OSError("disk")))
    first = asyncio.create_task(group.aclose())
    await blocking.closing.wait()
    second = asyncio.create_task(group.aclose())
    await asyncio.sleep(5)
    assert not second.done()
    blocking.release.set()
    await second  # returns quietly: the failure belongs to the first closer
    assert log == ["bad", "blocking", "first"]
    with pytest.raises(OSError, match="disk"):
        await first


async def test_body_exit_waits_for_a_close_started_by_another_task() -> None:
    log: list[str] = []
    async with ResourceGroup() as group:
        blocking = await group.add(Blocking("blocking", log))
        other = asyncio.create_task(group.aclose())
        await blocking.closing.wait()
        asyncio.get_running_loop().call_later(3.0, blocking.release.set)
    assert log == ["blocking"]
    assert asyncio.get_running_loop().time() == pytest.approx(3.0)
    await other


async def test_cancelling_a_waiting_second_closer_leaves_the_close_running() -> None:
    log: list[str] = []
    group = ResourceGroup()
    blocking = await group.add(Blocking("blocking", log))
    first = asyncio.create_task(group.aclose())
    await blocking.closing.wait()
    second = asyncio.create_task(group.aclose())
    await asyncio.sleep(1)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    blocking.release.set()
    await first
    assert log == ["blocking"]


@dataclass
class _Resource:
    """A member whose close yields ``yields`` times and counts closes in flight."""

    index: int
    yields: int
    stats: dict[str, int]
    closed: int = 0

    async def aclose(self) -> None:
        self.stats["in_flight"] += 1
        for _ in range(self.yields):
            await asyncio.sleep(0)
        self.closed += 1
        self.stats["in_flight"] -= 1


@dataclass
class _Script:
    """What the tasks of one race did; ``last_ok`` is each resource's last successful op."""

    last_ok: dict[int, str] = field(default_factory=dict)
    unexpected: list[BaseException] = field(default_factory=list)


_op = st.tuples(
    st.sampled_from(["add", "remove", "aclose"]),
    st.integers(0, 5),  # resource index
    st.integers(0, 3),  # yields before the op
)


@settings(deadline=None, max_examples=100)
@given(
    tasks=st.lists(st.lists(_op, max_size=6), min_size=1, max_size=4),
    yields=st.lists(st.integers(0, 3), min_size=6, max_size=6),
    body_yields=st.none() | st.integers(0, 12),
)
def test_add_remove_and_close_racing_never_leave_a_member_open(
    tasks: list[list[tuple[str, int, int]]], yields: list[int], body_yields: int | None
) -> None:
    # body_yields None: no `async with`; else the block exits after that many yields,
    # while the actor tasks may still be adding, removing and closing.
    stats = {"in_flight": 0}
    resources = [_Resource(i, yields[i], stats) for i in range(6)]
    script = _Script()

    async def actor(group: ResourceGroup, ops: list[tuple[str, int, int]]) -> None:
        for name, index, pause in ops:
            for _ in range(pause):
                await asyncio.sleep(0)
            resource = resources[index]
            try:
                if name == "add":
                    await group.add(resource)
                elif name == "remove":
                    await group.remove(resource)
                else:
                    await group.aclose()
                    # Whoever's aclose() returns, every member is closed by then.
                    assert stats["in_flight"] == 0
                    assert len(group) == 0
                    continue
            except ResourceError:
                continue
            except BaseException as exc:
                script.unexpected.append(exc)
                raise
            script.last_ok[index] = name

    async def race() -> ResourceGroup:
        group = ResourceGroup()
        if body_yields is None:
            await asyncio.gather(*(actor(group, ops) for ops in tasks))
            await group.aclose()
            return group
        async with group:
            actors = [asyncio.create_task(actor(group, ops)) for ops in tasks]
            for _ in range(body_yields):
                await asyncio.sleep(0)
        # The exit raced the actors: whatever they did, nothing the group kept is open.
        assert stats["in_flight"] == 0
        assert len(group) == 0
        await asyncio.gather(*actors)
        return group

    # A private loop: asyncio.run() would reset the current loop pytest-asyncio set up.
    loop = asyncio.new_event_loop()
    try:
        group = loop.run_until_complete(race())
    finally:
        loop.close()
    assert script.unexpected == []
    assert group.closed
    assert len(group) == 0
    assert stats["in_flight"] == 0
    for resource in resources:
        # Closed exactly once if the group kept it, never if it was given back or refused.
        expected = 1 if script.last_ok.get(resource.index) == "add" else 0
        assert resource.closed == expected, (resource, script.last_ok)


# -- the limiters and TimeoutManager as members (both implementations) ---------------------


async def test_limiters_and_timeout_manager_are_closed_by_the_group(impl: Implementation) -> None:
    async with ResourceGroup() as group:
        rate = await group.add(impl.RateLimiter(10.0))
        permits = await group.add(impl.ConcurrencyLimiter(2))
        deadlines = await group.add(impl.TimeoutManager(5.0))
        async with deadlines:
            await rate.acquire()
            async with permits:
                pass
    with pytest.raises(ResourceError):
        await rate.acquire()
    with pytest.raises(ResourceError):
        rate.try_acquire()
    with pytest.raises(ResourceError):
        await permits.acquire()
    with pytest.raises(ResourceError):
        async with deadlines:
            pass


async def test_reference_example_runs_on_both_implementations(impl: Implementation) -> None:
    done: list[float] = []
    group = ResourceGroup()
    rate_limiter = await group.add(impl.RateLimiter(10.0))
    timeout = await group.add(impl.TimeoutManager(5.0))
    async with group:  # noqa: SIM117 - as the reference writes it
        async with timeout:
            await rate_limiter.acquire()
            await asyncio.sleep(0.5)
            done.append(asyncio.get_running_loop().time())
    assert done == [pytest.approx(0.5)]
    assert list(group) == []
    with pytest.raises(ResourceError):
        await rate_limiter.acquire()


async def test_tasks_waiting_on_a_member_are_released_by_the_close(
    impl: Implementation,
) -> None:
    async with ResourceGroup() as group:
        permits = await group.add(impl.ConcurrencyLimiter(1))
        rate = await group.add(impl.RateLimiter(1.0, burst=1))
        await permits.acquire()
        await rate.acquire()
        waiting_for_permit = asyncio.create_task(permits.acquire())
        waiting_for_token = asyncio.create_task(rate.acquire())
        await asyncio.sleep(0.1)
        assert permits.waiting == 1
        assert rate.waiting == 1
    for waiter in (waiting_for_permit, waiting_for_token):
        with pytest.raises(ResourceError):
            await waiter
    permits.release()  # holders can still release after close


async def test_timeout_manager_deadline_in_a_group_closes_members_and_raises_timeout(
    impl: Implementation,
) -> None:
    log: list[str] = []
    async with ResourceGroup() as outer:
        deadlines = await outer.add(impl.TimeoutManager(1.0))

        async def block() -> None:
            async with deadlines, ResourceGroup() as group:
                await group.add(Closer("first", log))
                await group.add(Sleeping("slow", log, 10.0))

        with pytest.raises(TimeoutError):
            await block()
        assert log == ["slow", "first"]
        assert asyncio.get_running_loop().time() == pytest.approx(1.0)


async def test_limiter_members_close_in_reverse_order_with_a_failing_neighbour(
    impl: Implementation,
) -> None:
    log: list[str] = []
    group = ResourceGroup()
    rate = await group.add(impl.RateLimiter(5.0))
    await group.add(Failing("bad", log, OSError("disk")))
    permits = await group.add(impl.ConcurrencyLimiter(3))
    with pytest.raises(OSError, match="disk"):
        await group.aclose()
    with pytest.raises(ResourceError):
        permits.try_acquire()
    with pytest.raises(ResourceError):
        rate.try_acquire()


async def test_rejecting_limiter_in_a_group_keeps_its_errors_distinct(
    impl: Implementation,
) -> None:
    async with ResourceGroup() as group:
        limiter = await group.add(impl.RateLimiter(100.0, burst=1, max_wait=0))
        await limiter.acquire()
        with pytest.raises(ResourceLimitError):
            await limiter.acquire()
    with pytest.raises(ResourceError) as info:
        await limiter.acquire()
    assert not isinstance(info.value, ResourceLimitError)
