"""Deadline storms: 10,000 tasks under one shared TimeoutManager.

Each task draws a schedule from a seeded generator, in whole time units: when it enters
(``start``), when its work completes (``done``), when it is cancelled from outside
(``cancel``, for half of them; possibly before it even enters) and its deadline(s), in one of
six forms: ``tm.timeout_at``, ``tm.timeout`` (zero and negative included), ``tm.run``
(zero and negative included: it must not start the work), ``async with tm:`` with the
manager's default, an inner scope nested in an outer one, and ``tm.run`` inside a scope.
Every event is a timer at its exact loop time, so the expected outcome of every task follows
from its schedule: the work's result, mtaio's ``TimeoutError`` from the right ``async with``,
or a ``CancelledError``. An outside cancellation in the same loop iteration as a deadline
must stay a ``CancelledError`` (those ties are drawn on purpose).

Afterwards: every task's ``cancelling()`` is back to 0 (1 for those cancelled from outside),
no task is left, and no timer handle is left armed on the loop.

On asyncio the clock is virtual and every outcome is checked. On uvloop (real time, timers
rounded to the millisecond, a relative deadline counts from the task's real entry) the
expected outcome is computed from the real entry times, and a task whose deciding events
fall within a few milliseconds of each other is only checked to have one of the outcomes
those events allow.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from mtaio.exceptions import TimeoutError as MtaioTimeoutError

from ._support import is_uvloop, is_virtual, live_timers

pytestmark = pytest.mark.stress

TASKS = 10_000
FORMS = ("at", "relative", "run", "default", "nested", "run_inside")
DEFAULT_UNITS = 12  # the shared manager's default_timeout, in units

CANCELLED, TIMEOUT, RESULT = "cancelled", "timeout", "result"
# What a task ends with: (CANCELLED, None), (TIMEOUT, <TimeoutError.timeout in units>) or
# (RESULT, <value returned>).
Outcome = tuple[str, object]


@dataclass
class Plan:
    """One task's schedule, in units; ``deadline``/``inner`` depend on the form."""

    form: str
    start: int
    done: int
    cancel: int | None
    deadline: int  # at, relative, run, default: the deadline; nested, run_inside: the outer
    inner: int | None = None  # nested: the inner scope; run_inside: run()'s deadline
    entry: float | None = None  # loop time of the real entry (set by the task)
    started: bool = False  # the work coroutine ran
    same_task: bool = True  # the work ran in the task that called run()
    caught: list[float | None] = field(default_factory=list)  # .timeout of inner errors


def draw_plan(rng: random.Random) -> Plan:
    while True:
        form = rng.choice(FORMS)
        start = rng.randint(1, 40)
        done = start + rng.randint(1, 30)
        cancel = None if rng.random() < 0.5 else rng.randint(0, start + 35)
        inner = None
        if form == "at":
            deadline = rng.randint(start - 3, start + 30)
        elif form == "relative":
            deadline = start + rng.randint(-3, 30)
        elif form == "run":
            deadline = start + rng.randint(-2, 30)
        elif form == "default":
            deadline = start + DEFAULT_UNITS
        elif form == "nested":
            deadline = rng.randint(start - 2, start + 30)
            inner = rng.randint(start - 2, start + 30)
        else:  # run_inside
            deadline = rng.randint(start - 2, start + 30)
            inner = start + rng.randint(-1, 30)
        plan = Plan(form, start, done, cancel, deadline, inner)
        if valid(plan):
            return plan


def valid(plan: Plan) -> bool:
    """No two events of one task at the same time, except the ties drawn on purpose:
    an outside cancellation at the exact time of an absolute (``timeout_at``) deadline, and
    two nested absolute deadlines at the same time."""
    deadlines = [plan.deadline] if plan.inner is None else [plan.deadline, plan.inner]
    absolute = {"at": [0], "nested": [0, 1], "run_inside": [0]}.get(plan.form, [])
    if plan.done in deadlines:
        return False
    if plan.cancel is not None:
        if plan.cancel in (plan.start, plan.done):
            return False
        for k, d in enumerate(deadlines):
            if plan.cancel == d and d > plan.start and k not in absolute:
                return False
    return not (plan.form == "run_inside" and plan.inner == plan.deadline)


class Lag:
    """How late the loop ran the storm's own timers, worst per time bucket (real time).

    A loop running late runs the timers due meanwhile in one go: events that were apart
    on the schedule then happen in one iteration, where different rules decide.
    """

    def __init__(self, bucket: float) -> None:
        self.bucket = bucket
        self.worst: dict[int, float] = {}

    def note(self, scheduled: float, now: float) -> None:
        key = int(scheduled / self.bucket)
        self.worst[key] = max(self.worst.get(key, 0.0), now - scheduled)

    def between(self, start: float, end: float) -> float:
        keys = range(int(start / self.bucket), int(end / self.bucket) + 1)
        return max((self.worst.get(key, 0.0) for key in keys), default=0.0)


def expected(plan: Plan, unit: float, origin: float, lag: Lag) -> tuple[set[Outcome], bool]:
    """The outcome(s) the task may end with, and whether exactly one is possible.

    Scheduled events happen at ``origin + units * unit``; a relative deadline counts from
    the task's real entry. A deadline at or before entry expires at the first suspension,
    before any later event. On the virtual clock every task has exactly one outcome; in
    real time, events within a few milliseconds of the first one (or a task that entered
    late) leave a choice.
    """
    if plan.cancel is not None and plan.cancel < plan.start:
        return {(CANCELLED, None)}, True
    real = unit >= 0.005

    def at(units: int) -> float:
        return origin + units * unit

    margin = 0.4 * unit if real else 0.0
    entry = at(plan.start) if plan.entry is None else plan.entry
    if real and (plan.entry is None or entry - at(plan.start) > margin / 2):
        # Entered late (or never: cancelled first): events may have passed before entry.
        return {(CANCELLED, None), (RESULT, plan_result(plan)), *LATE[plan.form](plan)}, False

    def relative(units: int) -> float:
        return entry + (units - plan.start) * unit

    def due(when: float) -> float:
        # Expired on entry: due right after it, before every later event.
        return max(when, entry + 1e-9)

    events: list[tuple[float, int, Outcome]] = []  # (time, rank on ties, outcome)
    if plan.cancel is not None:
        events.append((at(plan.cancel), 0, (CANCELLED, None)))  # wins every tie
    events.append((at(plan.done), 3, (RESULT, plan_result(plan))))
    form = plan.form
    if form == "at":
        events.append((due(at(plan.deadline)), 1, (TIMEOUT, None)))
    elif form in ("relative", "default"):
        events.append((due(relative(plan.deadline)), 1, (TIMEOUT, plan.deadline - plan.start)))
    elif form == "run":
        if plan.deadline <= plan.start:
            return {(TIMEOUT, plan.deadline - plan.start)}, True  # never started
        events.append((relative(plan.deadline), 1, (TIMEOUT, plan.deadline - plan.start)))
    elif form == "nested":
        assert plan.inner is not None
        # The outer one wins a tie (both expire together: the inner lets it through).
        events.append((due(at(plan.deadline)), 1, (TIMEOUT, None)))
        events.append((due(at(plan.inner)), 2, (RESULT, "inner timed out")))
    else:  # run_inside
        assert plan.inner is not None
        if plan.inner <= plan.start:
            return {(RESULT, "run timed out")}, True  # raises before suspending
        events.append((due(at(plan.deadline)), 1, (TIMEOUT, None)))
        events.append((relative(plan.inner), 2, (RESULT, "run timed out")))
    events.sort(key=lambda e: (e[0], e[1]))
    first = events[0][0]
    if real:
        slack = margin + lag.between(first - unit, first + 2 * unit)
        allowed = {e[2] for e in events if e[0] - first <= slack}
    else:
        allowed = {events[0][2]}
    return allowed, len(allowed) == 1


# The outcomes other than a cancellation or the work's result that a late entry may give.
LATE: dict[str, Any] = {
    "at": lambda p: {(TIMEOUT, None)},
    "relative": lambda p: {(TIMEOUT, p.deadline - p.start)},
    "default": lambda p: {(TIMEOUT, p.deadline - p.start)},
    "run": lambda p: {(TIMEOUT, p.deadline - p.start)},
    "nested": lambda p: {(TIMEOUT, None), (RESULT, "inner timed out")},
    "run_inside": lambda p: {(TIMEOUT, None), (RESULT, "run timed out")},
}


def plan_result(plan: Plan) -> object:
    return f"done at {plan.done}"


async def deadline_storm(impl: Any, unit: float, seed: int) -> tuple[Counter[str], float]:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    tm = impl.TimeoutManager(DEFAULT_UNITS * unit)
    plans = [draw_plan(rng) for _ in range(TASKS)]
    starts = [loop.create_future() for _ in range(TASKS)]
    works = [loop.create_future() for _ in range(TASKS)]
    tasks: list[asyncio.Task[object]] = []

    async def work(plan: Plan, me: asyncio.Task[Any] | None, future: asyncio.Future[str]) -> str:
        plan.started = True
        plan.same_task = asyncio.current_task() is me
        return await future

    async def body(i: int) -> object:
        plan = plans[i]
        await starts[i]
        plan.entry = loop.time()
        me = asyncio.current_task()
        future = works[i]
        form = plan.form
        if form == "at":
            async with tm.timeout_at(origin + plan.deadline * unit):
                return await work(plan, me, future)
        if form == "relative":
            async with tm.timeout((plan.deadline - plan.start) * unit):
                return await work(plan, me, future)
        if form == "default":
            async with tm:
                return await work(plan, me, future)
        if form == "run":
            coro = work(plan, me, future)
            try:
                return await tm.run(coro, timeout=(plan.deadline - plan.start) * unit)
            finally:
                # A coroutine run() never started is closed, not left to warn.
                assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
        assert plan.inner is not None
        if form == "nested":
            async with tm.timeout_at(origin + plan.deadline * unit):
                try:
                    async with tm.timeout_at(origin + plan.inner * unit):
                        return await work(plan, me, future)
                except TimeoutError as exc:
                    plan.caught.append(exc.timeout if isinstance(exc, MtaioTimeoutError) else -1)
                    return "inner timed out"
        async with tm.timeout_at(origin + plan.deadline * unit):  # run_inside
            try:
                return await tm.run(
                    work(plan, me, future), timeout=(plan.inner - plan.start) * unit
                )
            except TimeoutError as exc:
                plan.caught.append(exc.timeout if isinstance(exc, MtaioTimeoutError) else -1)
                return "run timed out"

    lag = Lag(unit / 10)

    def finish(i: int, when: float) -> None:
        lag.note(when, loop.time())
        if not works[i].done():
            works[i].set_result(plan_result(plans[i]))

    def release(i: int, when: float) -> None:
        lag.note(when, loop.time())
        if not starts[i].done():
            starts[i].set_result(None)

    def cancel(i: int, when: float) -> None:
        lag.note(when, loop.time())
        if not tasks[i].done():
            tasks[i].cancel()

    def at(units: int) -> float:
        return origin + units * unit

    wall = time.perf_counter()
    tasks.extend(asyncio.create_task(body(i)) for i in range(TASKS))
    if is_virtual(loop):
        origin = loop.time()
    else:
        await asyncio.sleep(0)  # uvloop's clock only moves between iterations
        origin = loop.time() + 0.2  # room for the set-up before the first event
    handles = []
    for i, plan in enumerate(plans):
        handles.append(loop.call_at(at(plan.start), release, i, at(plan.start)))
        handles.append(loop.call_at(at(plan.done), finish, i, at(plan.done)))
        if plan.cancel is not None:
            handles.append(loop.call_at(at(plan.cancel), cancel, i, at(plan.cancel)))
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - wall

    tally: Counter[str] = Counter()
    for i, (plan, task) in enumerate(zip(plans, tasks, strict=True)):
        allowed, exact = expected(plan, unit, origin, lag)
        got = outcome_of(task, unit)
        tally[f"{'exact' if exact else 'inexact'} {got[0]}"] += 1
        assert got in allowed, f"task {i} {plan}: got {got}, expected one of {allowed}"
        cancelled = got[0] == CANCELLED
        assert task.cancelling() == (1 if cancelled else 0), f"task {i} {plan}"
        if got[0] == TIMEOUT:
            exc = task.exception()
            assert isinstance(exc, MtaioTimeoutError)
            never_started = plan.form == "run" and plan.deadline <= plan.start
            if not never_started:
                assert isinstance(exc.__cause__, asyncio.CancelledError), f"task {i} {plan}"
        if plan.form == "nested" and got == (RESULT, "inner timed out"):
            assert plan.caught == [None]
        if plan.form == "run_inside" and got == (RESULT, "run timed out"):
            assert plan.caught == [pytest.approx(((plan.inner or 0) - plan.start) * unit)]
        entered = plan.entry is not None
        if exact or is_virtual(loop):
            assert entered == (plan.cancel is None or plan.cancel > plan.start)
        no_run = (plan.form == "run" and plan.deadline <= plan.start) or (
            plan.form == "run_inside" and (plan.inner or 0) <= plan.start
        )
        assert plan.started == (entered and not no_run), f"task {i} {plan}"
        assert plan.same_task, f"task {i}: run() awaited the work in another task"

    for handle in handles:
        handle.cancel()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    if not is_uvloop(loop):
        # Every block is over: no deadline of theirs may still be armed.
        assert live_timers(loop) == [], "timer handles left armed on the loop"
        latest = max(max(p.done, p.deadline, p.inner or 0) for p in plans)
        await asyncio.sleep(origin + (latest + 1) * unit - loop.time())
        assert live_timers(loop) == []
    return tally, wall


def outcome_of(task: asyncio.Task[object], unit: float) -> Outcome:
    if task.cancelled():
        return CANCELLED, None
    exc = task.exception()
    if exc is None:
        return RESULT, task.result()
    if isinstance(exc, MtaioTimeoutError):
        timeout = None if exc.timeout is None else round(exc.timeout / unit)
        return TIMEOUT, timeout
    raise AssertionError(f"unexpected {exc!r}") from exc


@pytest.mark.uvloop
async def test_shared_timeout_manager_survives_a_deadline_storm(impl: Any, figures: Any) -> None:
    loop = asyncio.get_running_loop()
    # Real time: 10,000 tasks make ~30,000 events; 50 ms units keep a loaded loop on time.
    # Real time (uvloop): libuv reads its clock once per iteration, so a timer armed during a
    # long iteration (a batch of expiries among 10,000 tasks) fires that much late. Units of
    # 200 ms keep such stalls well inside one unit, so every outcome stays decidable.
    unit = 0.001 if is_virtual(loop) else 0.200
    tally, wall = await deadline_storm(impl, unit, seed=4242)
    figures.add("tasks", TASKS, "tasks")
    figures.add("storm time", wall, "s")
    for key in sorted(tally):
        figures.add(key, tally[key], "tasks")
    inexact = sum(n for k, n in tally.items() if k.startswith("inexact"))
    if is_virtual(loop):
        assert inexact == 0
        for kind in (CANCELLED, TIMEOUT, RESULT):
            assert tally[f"exact {kind}"] > TASKS // 5
    else:
        # Real time on a busy machine: most tasks still have a single possible outcome.
        assert inexact < TASKS // 2


@pytest.mark.parametrize("form", ["timeout", "timeout_at", "default", "run"])
async def test_blocks_that_end_early_leave_no_timer_armed(impl: Any, form: str) -> None:
    # SPEC §4: "A block that exits before its deadline leaves no work behind on the loop."
    loop = asyncio.get_running_loop()
    tm = impl.TimeoutManager(60.0)
    rng = random.Random(7)

    async def block(seconds: float) -> None:
        if form == "timeout":
            async with tm.timeout(seconds):
                await asyncio.sleep(0.001)
        elif form == "timeout_at":
            async with tm.timeout_at(loop.time() + seconds):
                await asyncio.sleep(0.001)
        elif form == "default":
            async with tm:
                await asyncio.sleep(0.001)
        else:
            await tm.run(asyncio.sleep(0.001), timeout=seconds)

    await asyncio.gather(*(block(rng.uniform(1.0, 100.0)) for _ in range(1_000)))
    assert live_timers(loop) == [], "a deadline timer outlived every block"
