"""TimeoutManager under races (SPEC §4): same-iteration orderings, asyncio's own tools,
storms of tasks, random schedules, and a few real-time runs on asyncio and uvloop.

How the races are staged, on the virtual clock:

- *soon path*: a callback in iteration k calls, in the chosen order, ``scope.reschedule(now)``
  (our expiry, queued with ``call_soon``), ``call_soon(task.cancel)`` (an outer cancel) and
  ``call_soon(complete)`` (the awaited future gets its result): all three run in iteration
  k + 1, in that order, before the task resumes;
- *timer path*: handles due at the same loop time leave asyncio's heap in the order they
  were pushed when there are two of them, so pushing ours (by entering the block) before or
  after a ``call_at`` at the same deadline chooses which runs first.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import Implementation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtaio.exceptions import TimeoutError as MtaioTimeoutError

EVENTS = ("expiry", "cancel", "complete")
ORDERS = [order for n in (1, 2, 3) for order in itertools.permutations(EVENTS, n)]


def now() -> float:
    return asyncio.get_running_loop().time()


async def outcome(task: asyncio.Task[Any]) -> str:
    """``"cancelled"``, ``"timeout"`` (ours), or the task's result."""
    await asyncio.wait([task])
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    if error is not None:
        assert isinstance(error, MtaioTimeoutError), repr(error)
        return "timeout"
    result = task.result()
    assert isinstance(result, str)
    return result


async def sleep_in(*blocks: Any, seconds: float = 5) -> None:
    """``async with`` the blocks, outermost first, around ``asyncio.sleep(seconds)``."""
    if not blocks:
        await asyncio.sleep(seconds)
        return
    async with blocks[0]:
        await sleep_in(*blocks[1:], seconds=seconds)


def setter(future: asyncio.Future[str]) -> Callable[[], None]:
    def complete() -> None:
        if not future.done():  # our expiry may have cancelled it first
            future.set_result("result")

    return complete


# -- same-iteration races: the soon path ---------------------------------------------------


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
async def test_block_race_in_one_iteration(impl: Implementation, order: tuple[str, ...]) -> None:
    loop = asyncio.get_running_loop()
    tm = impl.TimeoutManager()
    future: asyncio.Future[str] = loop.create_future()
    entered: list[Any] = []

    async def body() -> str:
        async with tm.timeout(100) as scope:
            entered.append(scope)
            return await future

    task = asyncio.create_task(body())
    await asyncio.sleep(1)

    def stage() -> None:
        for event in order:
            if event == "expiry":
                entered[0].reschedule(loop.time())
            elif event == "cancel":
                loop.call_soon(task.cancel)
            else:
                loop.call_soon(setter(future))

    loop.call_soon(stage)
    got = await outcome(task)
    # An outer cancellation always wins and is never swallowed; otherwise our expiry wins
    # over a completion that has not resumed the block yet.
    expected = "cancelled" if "cancel" in order else "timeout" if "expiry" in order else "result"
    assert got == expected
    assert task.cancelling() == (1 if "cancel" in order else 0)
    assert entered[0].expired() == ("expiry" in order)
    assert now() == 1


# -- same-iteration races: the timer path --------------------------------------------------


async def stage_at(
    deadline: float,
    order: tuple[str, ...],
    start: Callable[[], Coroutine[Any, Any, str]],
    actions: Mapping[str, Callable[[], object]],
) -> asyncio.Task[str]:
    """Push the handles due at ``deadline`` in ``order``; "expiry" starts the work, which
    arms our timer (the manager's deadline is ``deadline`` too)."""
    loop = asyncio.get_running_loop()
    task: asyncio.Task[str] | None = None
    for event in order:
        if event == "expiry":
            task = asyncio.create_task(start())
            await asyncio.sleep(0)  # it runs up to its first suspension: our timer is armed
        else:
            loop.call_at(deadline, actions[event])
    assert task is not None
    return task


TIMER_ORDERS = [
    ("expiry",),
    ("complete", "expiry"),
    ("expiry", "complete"),
    ("cancel", "expiry"),
    ("expiry", "cancel"),
]


@pytest.mark.parametrize("order", TIMER_ORDERS, ids="-".join)
@pytest.mark.parametrize("work", ["block", "run-future", "run-task", "run-coroutine"])
async def test_timer_race_at_the_deadline(
    impl: Implementation, order: tuple[str, ...], work: str
) -> None:
    loop = asyncio.get_running_loop()
    tm = impl.TimeoutManager(2)
    future: asyncio.Future[str] = loop.create_future()
    tasks: list[asyncio.Task[str]] = []

    async def wait() -> str:
        return await future

    async def start() -> str:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        result: str
        if work == "block":
            async with tm:
                result = await future
        elif work == "run-future":
            result = await tm.run(future)
        elif work == "run-task":
            result = await tm.run(asyncio.create_task(wait()))
        else:
            result = await tm.run(wait())
        return result

    actions = {"complete": setter(future), "cancel": lambda: tasks[0].cancel()}
    task = await stage_at(2, order, start, actions)
    got = await outcome(task)
    if "cancel" in order:
        expected = "cancelled"
    elif order == ("complete", "expiry") and work == "run-future":
        # run() awaited the future itself, which was done first: its result is returned.
        expected = "result"
    else:
        # A block, coroutine or task that had not resumed yet is cancelled by the deadline
        # (a task whose awaited future completed first still has to run to finish).
        expected = "timeout"
    assert got == expected
    assert task.cancelling() == (1 if "cancel" in order else 0)
    assert now() == 2


@pytest.mark.parametrize("order", list(itertools.permutations(EVENTS)), ids="-".join)
@pytest.mark.parametrize("work", ["block", "run-future"])
async def test_three_way_race_with_an_outer_cancel_is_always_cancelled(
    impl: Implementation, work: str, order: tuple[str, ...]
) -> None:
    """Three handles due together leave asyncio's heap in no promised order; whatever it
    is, the outer cancellation wins."""
    loop = asyncio.get_running_loop()
    tm = impl.TimeoutManager(2)
    future: asyncio.Future[str] = loop.create_future()
    tasks: list[asyncio.Task[str]] = []

    async def start() -> str:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        result: str
        if work == "block":
            async with tm:
                result = await future
        else:
            result = await tm.run(future)
        return result

    actions = {"complete": setter(future), "cancel": lambda: tasks[0].cancel()}
    task = await stage_at(2, order, start, actions)
    assert await outcome(task) == "cancelled"
    assert task.cancelling() == 1


# -- asyncio.timeout, TaskGroup, shield ----------------------------------------------------


async def test_asyncio_timeout_inside_ours_expiring_first(impl: Implementation) -> None:
    tm = impl.TimeoutManager()
    async with tm.timeout(10):
        with pytest.raises(TimeoutError) as info:
            async with asyncio.timeout(1):
                await asyncio.sleep(5)
        assert not isinstance(info.value, MtaioTimeoutError)  # asyncio's own
        await asyncio.sleep(5)
    assert now() == 6


async def test_ours_inside_asyncio_timeout_expiring_first(impl: Implementation) -> None:
    tm = impl.TimeoutManager()
    async with asyncio.timeout(10):
        with pytest.raises(MtaioTimeoutError):
            async with tm.timeout(1):
                await asyncio.sleep(5)
        await asyncio.sleep(5)
    assert now() == 6


async def test_asyncio_timeout_outside_expiring_inside_ours(impl: Implementation) -> None:
    tm = impl.TimeoutManager(10)
    with pytest.raises(TimeoutError) as info:
        await sleep_in(asyncio.timeout(1), tm)
    assert not isinstance(info.value, MtaioTimeoutError)
    assert now() == 1


async def test_ours_outside_expiring_inside_asyncio_timeout(impl: Implementation) -> None:
    tm = impl.TimeoutManager(1)
    with pytest.raises(MtaioTimeoutError):
        await sleep_in(tm, asyncio.timeout(10))
    assert now() == 1


async def test_ours_and_asyncio_timeout_expiring_together_raise_at_the_outer(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager()
    with pytest.raises(MtaioTimeoutError):
        await sleep_in(tm.timeout_at(1), asyncio.timeout_at(1))
    with pytest.raises(TimeoutError) as info:
        await sleep_in(asyncio.timeout_at(2), tm.timeout_at(2))
    assert not isinstance(info.value, MtaioTimeoutError)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_task_group_inside_an_expiring_block(impl: Implementation) -> None:
    tm = impl.TimeoutManager(1)
    children: list[asyncio.Task[None]] = []

    async def block() -> None:
        async with tm, asyncio.TaskGroup() as group:
            children.append(group.create_task(asyncio.sleep(10)))
            children.append(group.create_task(asyncio.sleep(20)))

    with pytest.raises(MtaioTimeoutError):
        await block()
    assert all(child.cancelled() for child in children)
    assert now() == 1
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_task_group_cancelling_the_parent_inside_our_block(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(10)

    async def fail_at(seconds: float) -> None:
        await asyncio.sleep(seconds)
        raise KeyError("child failed")

    async def group_around_block() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(fail_at(1))
            async with tm:  # the group cancels the parent task here: not our deadline
                await asyncio.sleep(5)

    with pytest.raises(ExceptionGroup) as info:
        await group_around_block()
    assert [type(exc) for exc in info.value.exceptions] == [KeyError]
    assert now() == 1
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_children_of_a_task_group_each_with_their_own_deadline(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager()
    results: list[str] = []

    async def child(deadline: float, work: float) -> None:
        try:
            async with tm.timeout(deadline):
                await asyncio.sleep(work)
            results.append(f"{deadline}: done")
        except MtaioTimeoutError:
            results.append(f"{deadline}: timed out")

    async with asyncio.TaskGroup() as group:
        for deadline, work in [(1, 2), (3, 2), (2, 5), (4, 1)]:
            group.create_task(child(deadline, work))
    assert sorted(results) == ["1: timed out", "2: timed out", "3: done", "4: done"]
    assert now() == 2


async def test_shield_keeps_the_inner_work_running(impl: Implementation) -> None:
    tm = impl.TimeoutManager()

    async def work() -> str:
        await asyncio.sleep(5)
        return "finished"

    inner = asyncio.create_task(work())
    with pytest.raises(MtaioTimeoutError):
        async with tm.timeout(1):
            await asyncio.shield(inner)
    assert not inner.done()
    with pytest.raises(MtaioTimeoutError):
        await tm.run(asyncio.shield(inner), timeout=1)
    assert not inner.done()
    assert await inner == "finished"
    assert now() == 5


async def test_uncancel_by_the_body_does_not_confuse_the_count(impl: Implementation) -> None:
    """A body that handles an outer cancellation properly (uncancel) and then times out."""
    tm = impl.TimeoutManager()

    async def body() -> str:
        task = asyncio.current_task()
        assert task is not None
        async with tm.timeout(3):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                task.uncancel()  # "I handled that one"
            await asyncio.sleep(10)  # our deadline at 3 still applies
        return "unreachable"

    task = asyncio.create_task(body())
    await asyncio.sleep(1)
    task.cancel()
    assert await outcome(task) == "timeout"
    assert task.cancelling() == 0
    assert now() == 3


# -- one manager, many tasks ---------------------------------------------------------------


@dataclass
class Plan:
    """One task's schedule. Times have distinct fractional parts, so no two coincide."""

    outer: float  # the outer block's deadline (`async with tm:` when it equals DEFAULT)
    inner: float | None  # an inner scope's deadline
    work: float
    cancel: float | None  # when another task cancels this one

    def expected(self) -> str:
        """What ``follow()`` reports: the first event wins (``timeout_at`` reports None)."""
        events = {
            f"outer {DEFAULT if self.outer == DEFAULT else None}": self.outer,
            "result": self.work,
        }
        if self.inner is not None:
            events["inner None"] = self.inner
        if self.cancel is not None:
            events["cancelled"] = self.cancel
        return min(events, key=events.__getitem__)


DEFAULT = 7.25


def random_plan(rng: random.Random) -> Plan:
    return Plan(
        outer=DEFAULT if rng.random() < 0.3 else rng.randint(1, 15) + 0.25,
        inner=rng.randint(0, 15) + 0.125 if rng.random() < 0.5 else None,
        work=rng.randint(0, 15) + 0.5,
        cancel=rng.randint(0, 15) + 0.75 if rng.random() < 0.3 else None,
    )


async def follow(tm: Any, plan: Plan) -> tuple[str, int, float]:
    """Run ``plan`` in the current task: (what happened, cancel count then, when).

    What happened is ``"result"``, ``"cancelled"``, or ``"inner <timeout>"`` / ``"outer
    <timeout>"``: the block that raised and the ``timeout`` its error reported.
    """
    task = asyncio.current_task()
    assert task is not None
    if plan.cancel is not None:
        asyncio.get_running_loop().call_at(plan.cancel, task.cancel)
    block = tm if plan.outer == DEFAULT else tm.timeout_at(plan.outer)
    try:
        async with block:
            if plan.inner is None:
                await asyncio.sleep(plan.work)
                return "result", task.cancelling(), now()
            try:
                async with tm.timeout_at(plan.inner):
                    await asyncio.sleep(plan.work)
                    return "result", task.cancelling(), now()
            except MtaioTimeoutError as exc:
                return f"inner {exc.timeout}", task.cancelling(), now()
    except MtaioTimeoutError as exc:
        return f"outer {exc.timeout}", task.cancelling(), now()
    except asyncio.CancelledError:
        return "cancelled", task.cancelling(), now()


async def test_a_thousand_tasks_share_one_manager(impl: Implementation) -> None:
    rng = random.Random(20240604)
    tm = impl.TimeoutManager(DEFAULT)
    plans = [random_plan(rng) for _ in range(1000)]
    results = await asyncio.gather(*(follow(tm, plan) for plan in plans))
    seen = set()
    for plan, (what, count, when) in zip(plans, results, strict=True):
        assert what == plan.expected(), plan
        kind = what.split()[0]
        seen.add(kind)
        assert count == (1 if kind == "cancelled" else 0), plan
        expected_time = {"outer": plan.outer, "inner": plan.inner, "result": plan.work}
        assert when == expected_time.get(kind, plan.cancel), plan
    assert seen == {"outer", "inner", "result", "cancelled"}
    assert repr(tm) == f"<TimeoutManager default_timeout={DEFAULT} active=0>"
    await asyncio.sleep(20)
    loop = asyncio.get_running_loop()
    assert [h for h in loop._scheduled if not h.cancelled()] == []  # type: ignore[attr-defined]


plans = st.builds(
    Plan,
    outer=st.integers(1, 12).map(lambda n: n + 0.25) | st.just(DEFAULT),
    inner=st.none() | st.integers(0, 12).map(lambda n: n + 0.125),
    work=st.integers(0, 12).map(lambda n: n + 0.5),
    cancel=st.none() | st.integers(0, 12).map(lambda n: n + 0.75),
)


# `impl` is function-scoped but only selects classes: nothing in it needs resetting between
# the examples (each example makes its own manager). It is keyword-only because hypothesis
# probes the first positional parameter with hasattr(), which conftest's `Implementation`
# answers with a KeyError.
@settings(
    deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schedule=st.lists(st.tuples(st.integers(0, 5), plans), min_size=1, max_size=12))
async def test_random_schedules_on_one_manager(
    schedule: list[tuple[int, Plan]], *, impl: Implementation
) -> None:
    """Tasks start at random times (so their plans are relative to their start)."""
    tm = impl.TimeoutManager(DEFAULT)
    base = now()

    async def delayed(delay: int, plan: Plan) -> tuple[str, Plan]:
        await asyncio.sleep(delay)
        start = now()
        shifted = Plan(
            outer=plan.outer if plan.outer == DEFAULT else start + plan.outer,
            inner=None if plan.inner is None else start + plan.inner,
            work=plan.work,
            cancel=None if plan.cancel is None else start + plan.cancel,
        )
        what, count, _ = await follow(tm, shifted)
        assert count == (1 if what == "cancelled" else 0)
        relative = Plan(outer=plan.outer, inner=plan.inner, work=plan.work, cancel=plan.cancel)
        return what, relative

    results = await asyncio.gather(*(delayed(delay, plan) for delay, plan in schedule))
    for what, plan in results:
        assert what == plan.expected(), plan
    assert repr(tm) == f"<TimeoutManager default_timeout={DEFAULT} active=0>"
    assert now() - base <= 5 + 13


@settings(
    deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["enter", "exit", "reschedule", "sleep"]),
            st.integers(0, 20),
        ),
        max_size=60,
    )
)
async def test_every_deadline_fires_exactly_on_time_whatever_the_churn(
    steps: list[tuple[str, int]], *, impl: Implementation
) -> None:
    """Many blocks entered, exited early and rescheduled in any order: the one still open
    when its deadline comes expires at exactly that loop time, and no other does."""
    tm = impl.TimeoutManager()
    fired: dict[int, float] = {}
    releases: dict[int, asyncio.Event] = {}
    scopes: dict[int, Any] = {}
    deadlines: dict[int, float] = {}
    tasks: list[asyncio.Task[None]] = []

    async def holder(key: int, deadline: float) -> None:
        release = releases[key] = asyncio.Event()
        try:
            async with tm.timeout_at(deadline) as scope:
                scopes[key] = scope
                await release.wait()
        except MtaioTimeoutError:
            fired[key] = now()

    for n, (action, value) in enumerate(steps):
        open_keys = [k for k in scopes if not releases[k].is_set() and not scopes[k].expired()]
        if action == "enter" or not open_keys:
            deadlines[n] = now() + value + 0.5
            tasks.append(asyncio.create_task(holder(n, deadlines[n])))
            await asyncio.sleep(0)
        elif action == "exit":
            releases[open_keys[value % len(open_keys)]].set()
            await asyncio.sleep(0)
        elif action == "reschedule":
            key = open_keys[value % len(open_keys)]
            deadlines[key] = now() + value + 0.5
            scopes[key].reschedule(deadlines[key])
        else:
            await asyncio.sleep(value / 4)
    released = {k for k, event in releases.items() if event.is_set()}
    await asyncio.sleep(25)
    for event in releases.values():
        event.set()
    await asyncio.gather(*tasks)
    for key, deadline in deadlines.items():
        if key in released and key not in fired:
            continue  # exited before its deadline
        assert fired.get(key) == deadline, (key, deadline, fired)
    loop = asyncio.get_running_loop()
    assert [h for h in loop._scheduled if not h.cancelled()] == []  # type: ignore[attr-defined]


async def test_a_timer_that_fires_a_little_early_expires_without_spinning(
    impl: Implementation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop fires a timer when its millisecond clock reaches the rounded deadline, when
    ``loop.time()`` may still read a hair less. Modelled here by rounding every ``call_at``
    down to the millisecond: the expiry must happen when the loop fires the timer, not
    after re-arming it again and again for a deadline the clock has not reached."""
    loop = asyncio.get_running_loop()
    call_at = loop.call_at
    arms: list[float] = []

    def early_call_at(when: float, callback: Any, *args: Any, context: Any = None) -> Any:
        arms.append(when)
        if len(arms) > 20:
            raise RuntimeError("busy spin: the same deadline re-armed over and over")
        return call_at(math.floor(when * 1000) / 1000, callback, *args, context=context)

    monkeypatch.setattr(loop, "call_at", early_call_at)
    with pytest.raises(MtaioTimeoutError):
        await sleep_in(impl.TimeoutManager().timeout(1.0004), seconds=5)
    assert now() == 1.0
    assert len(arms) <= 3  # ours once, the sleep's, maybe one re-arm


# -- real time, on asyncio and uvloop ------------------------------------------------------


def elapsed_since(start: float) -> float:
    return asyncio.get_running_loop().time() - start


@pytest.mark.uvloop
@pytest.mark.looptime(False)
async def test_block_and_scope_expire_in_real_time_on_every_loop(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(0.03)
    start = now()
    with pytest.raises(MtaioTimeoutError):
        await sleep_in(tm, seconds=1)
    assert 0.025 <= elapsed_since(start) < 0.5
    start = now()
    scope = tm.timeout(0.02)
    with pytest.raises(MtaioTimeoutError):
        await sleep_in(scope, seconds=1)
    assert scope.expired()
    assert 0.015 <= elapsed_since(start) < 0.5
    async with tm.timeout(0.5):
        await asyncio.sleep(0.01)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


@pytest.mark.uvloop
@pytest.mark.looptime(False)
async def test_run_and_shared_deadlines_in_real_time_on_every_loop(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(0.04)

    async def worker(work: float) -> str:
        try:
            result: str = await tm.run(asyncio.sleep(work, "done"))
        except MtaioTimeoutError:
            return "timeout"
        return result

    works = [0.005, 0.1, 0.01, 0.2, 0.0, 0.15]
    results = await asyncio.gather(*(worker(work) for work in works))
    assert results == ["done", "timeout", "done", "timeout", "done", "timeout"]
    with pytest.raises(MtaioTimeoutError):
        await tm.run(asyncio.sleep(1), timeout=0.01)
    assert await tm.run(asyncio.sleep(0, "zero")) == "zero"


@pytest.mark.uvloop
@pytest.mark.looptime(False)
async def test_outer_cancel_in_real_time_stays_cancelled_on_every_loop(
    impl: Implementation,
) -> None:
    tm = impl.TimeoutManager(0.02)

    async def body() -> str:
        async with tm:
            await asyncio.sleep(1)
        return "unreachable"

    tasks = [asyncio.create_task(body()) for _ in range(20)]
    await asyncio.sleep(0.005)
    for task in tasks[::2]:
        task.cancel()
    results = [await outcome(task) for task in tasks]
    assert results == ["cancelled", "timeout"] * 10
