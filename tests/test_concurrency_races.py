"""ConcurrencyLimiter under cancellation: races driven step by step, a state machine, storms.

The race table and the state machine run on :class:`SteppedLoop`, an asyncio loop whose
clock only moves when the test says so and which runs exactly one loop iteration per
``step()``. That makes "in the same loop iteration" exact: two timers due at the same step
run in the order of their deadlines, and a task woken in one step runs in the next.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import Implementation
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from mtaio._core import Kind
from mtaio.exceptions import ResourceError, ResourceLimitError


class SteppedLoop(asyncio.SelectorEventLoop):
    """An event loop driven by the test: ``step()`` runs one iteration, ``advance()`` time."""

    _ready: deque[asyncio.Handle]  # BaseEventLoop's queue of callbacks to run next

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.iterations = 0

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def step(self, count: int = 1) -> None:
        """Run ``count`` loop iterations; timers due at the current time fire."""
        for _ in range(count):
            self.iterations += 1
            self.call_soon(self.stop)
            self.run_forever()

    def settle(self, limit: int = 10_000) -> int:
        """Step until no callback is ready (timers in the future stay pending)."""
        for done in range(limit):
            if not self._ready:
                return done
            self.step()
        raise AssertionError(f"the loop did not settle in {limit} steps")


@pytest.fixture
def loop() -> Iterator[SteppedLoop]:
    stepped = SteppedLoop()
    yield stepped
    for task in asyncio.all_tasks(stepped):
        task.cancel()
    stepped.settle()
    stepped.close()


@dataclass
class Acquirer:
    """A task that calls ``limiter.acquire()`` and records how the call ended."""

    limiter: Any
    loop: SteppedLoop
    timeout: float | None = None
    outcome: str = "not started"  # -> waiting -> acquired / cancelled / timed out / closed
    task: asyncio.Task[None] = field(init=False)

    def __post_init__(self) -> None:
        self.task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        self.outcome = "waiting"
        try:
            await self.limiter.acquire(timeout=self.timeout)
        except asyncio.CancelledError:
            self.outcome = "cancelled"
            raise
        except ResourceLimitError:
            self.outcome = "timed out"
            return
        except ResourceError:
            self.outcome = "closed"
            return
        self.outcome = "acquired"

    def cancel(self) -> None:
        self.task.cancel()


def check_counts(limiter: Any) -> None:
    if limiter.in_use <= limiter.capacity:
        assert limiter.in_use + limiter.available == limiter.capacity
    else:
        assert limiter.available == 0
    assert limiter.locked() == (limiter.available == 0)


# -- the race table ---------------------------------------------------------------------------
#
# Every case starts with capacity 1, the permit held by the test, and queued tasks a, b, c
# (in that order; `a` with timeout=1). Between steps, the case does things (release, cancel,
# close, resize, advance the clock) and at the end says how each task's call ended and what
# the limiter holds once the loop has settled. The step at which a cancellation lands is
# the point of each case: queued, promised-not-yet-run, racing a grant, racing a timeout.

Action = Callable[[Any, dict[str, Acquirer], SteppedLoop], None]


def release(limiter: Any, tasks: dict[str, Acquirer], loop: SteppedLoop) -> None:
    limiter.release()


def cancel(name: str) -> Action:
    def action(limiter: Any, tasks: dict[str, Acquirer], loop: SteppedLoop) -> None:
        tasks[name].cancel()

    action.__name__ = f"cancel_{name}"
    return action


def step(limiter: Any, tasks: dict[str, Acquirer], loop: SteppedLoop) -> None:
    loop.step()


def close(limiter: Any, tasks: dict[str, Acquirer], loop: SteppedLoop) -> None:
    limiter.close()


def capacity(value: int) -> Action:
    def action(limiter: Any, tasks: dict[str, Acquirer], loop: SteppedLoop) -> None:
        limiter.capacity = value

    action.__name__ = f"capacity_{value}"
    return action


def at_deadline(*ordered: str) -> Action:
    """Reach a's deadline (t=1) in one step, with releases/cancels timed around it.

    ``ordered`` lists, in firing order, "timeout" (a's own timer, due at 1.0) and
    "release" / "cancel_a" scheduled as timers just before or after it — all due in the
    same loop iteration.
    """

    def action(limiter: Any, tasks: dict[str, Acquirer], loop: SteppedLoop) -> None:
        position = ordered.index("timeout")
        for index, what in enumerate(ordered):
            if what == "timeout":
                continue
            when = 1.0 + (index - position) * 1e-7
            callback = limiter.release if what == "release" else tasks["a"].cancel
            loop.call_at(when, callback)
        loop.advance(1.0 + 1e-6)  # everything above is due now
        loop.step()

    action.__name__ = "deadline_" + "_then_".join(ordered)
    return action


@dataclass(frozen=True)
class Race:
    name: str
    actions: tuple[Action, ...]
    outcomes: dict[str, str]  # a, b, c after settling
    in_use: int  # after settling (the test's own permit included unless released)


RACES = [
    Race(
        "queued_cancel_takes_nothing",
        (cancel("a"), step, release),
        {"a": "cancelled", "b": "acquired", "c": "waiting"},
        in_use=1,
    ),
    Race(
        "promised_cancel_passes_the_permit_on",
        (release, cancel("a")),
        {"a": "cancelled", "b": "acquired", "c": "waiting"},
        in_use=1,
    ),
    Race(
        "cancel_then_release_in_one_iteration",
        (cancel("a"), release),
        {"a": "cancelled", "b": "acquired", "c": "waiting"},
        in_use=1,
    ),
    Race(
        "promised_cancel_chain_passes_on_to_the_last",
        (release, cancel("a"), step, cancel("b")),
        {"a": "cancelled", "b": "cancelled", "c": "acquired"},
        in_use=1,
    ),
    Race(
        "all_promised_cancelled_return_the_permit",
        (cancel("b"), cancel("c"), release, cancel("a")),
        {"a": "cancelled", "b": "cancelled", "c": "cancelled"},
        in_use=0,
    ),
    Race(
        "cancel_after_the_woken_task_ran_keeps_the_permit",
        (release, step, cancel("a")),
        {"a": "acquired", "b": "waiting", "c": "waiting"},
        in_use=1,
    ),
    Race(
        "timeout_fires_before_the_release",
        (at_deadline("timeout", "release"),),
        {"a": "timed out", "b": "acquired", "c": "waiting"},
        in_use=1,
    ),
    Race(
        "release_just_before_the_timeout",
        (at_deadline("release", "timeout"),),
        {"a": "acquired", "b": "waiting", "c": "waiting"},
        in_use=1,
    ),
    Race(
        "timeout_then_cancel_holds_nothing",
        (at_deadline("timeout", "cancel_a"), release),
        {"a": "cancelled", "b": "acquired", "c": "waiting"},
        in_use=1,
    ),
    Race(
        "release_then_timeout_then_cancel_passes_on",
        (at_deadline("release", "timeout", "cancel_a"),),
        {"a": "cancelled", "b": "acquired", "c": "waiting"},
        in_use=1,
    ),
    Race(
        "cancel_before_the_timeout_fires",
        (at_deadline("cancel_a", "timeout"), release),
        {"a": "cancelled", "b": "acquired", "c": "waiting"},
        in_use=1,
    ),
    Race(
        "close_fails_the_queued_and_keeps_the_promised",
        (release, close),
        {"a": "acquired", "b": "closed", "c": "closed"},
        in_use=1,
    ),
    Race(
        "close_then_cancel_holds_nothing",
        (close, cancel("a"), release),
        {"a": "cancelled", "b": "closed", "c": "closed"},
        in_use=0,
    ),
    Race(
        "raise_capacity_then_cancel_a_woken_task",
        (capacity(3), cancel("a")),
        {"a": "cancelled", "b": "acquired", "c": "acquired"},
        in_use=3,
    ),
    Race(
        "lower_capacity_while_promised_then_cancel",
        (capacity(2), capacity(1), cancel("a"), step, release),
        # a was promised the second permit; when it leaves, in_use (2) is not below the new
        # capacity (1), so b is not admitted until the test's own permit is released.
        {"a": "cancelled", "b": "acquired", "c": "waiting"},
        in_use=1,
    ),
]


@pytest.mark.parametrize("race", RACES, ids=[race.name for race in RACES])
def test_cancellation_race(impl: Implementation, loop: SteppedLoop, race: Race) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    assert limiter.try_acquire()  # the test holds the only permit
    tasks = {
        "a": Acquirer(limiter, loop, timeout=1.0),
        "b": Acquirer(limiter, loop),
        "c": Acquirer(limiter, loop),
    }
    loop.step()
    assert limiter.waiting == 3
    for action in race.actions:
        action(limiter, tasks, loop)
        check_counts(limiter)
    loop.settle()
    assert {name: task.outcome for name, task in tasks.items()} == race.outcomes
    assert limiter.in_use == race.in_use
    still_waiting = sum(task.outcome == "waiting" for task in tasks.values())
    assert limiter.waiting == still_waiting
    check_counts(limiter)
    # Every permit is accounted for: the holders give theirs back, then nothing is in use
    # and a newcomer gets a permit at once.
    for task in tasks.values():
        if task.outcome == "waiting":
            task.cancel()
    loop.settle()
    for _ in range(race.in_use):
        limiter.release()
    assert (limiter.in_use, limiter.waiting) == (0, 0)
    if race.outcomes["c"] != "closed":
        assert limiter.try_acquire()


def test_try_acquire_between_grant_and_run_gets_nothing(
    impl: Implementation, loop: SteppedLoop
) -> None:
    limiter = impl.ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    a = Acquirer(limiter, loop)
    loop.step()
    limiter.release()
    assert not limiter.try_acquire()  # the permit is a's though a has not run
    late = Acquirer(limiter, loop)  # a newcomer queues behind
    loop.step()
    assert (a.outcome, late.outcome) == ("acquired", "waiting")
    limiter.release()
    loop.settle()
    assert late.outcome == "acquired"


def test_newcomer_scheduled_before_the_grant_still_queues(
    impl: Implementation, loop: SteppedLoop
) -> None:
    """The newcomer's first step runs before the woken task's: it still must not overtake."""
    limiter = impl.ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    a = Acquirer(limiter, loop)
    loop.step()
    newcomer = Acquirer(limiter, loop)  # its first step is queued ahead of a's wake-up
    limiter.release()
    loop.step()
    assert newcomer.outcome == "waiting"
    loop.step()
    assert a.outcome == "acquired"


def test_grant_and_deadline_in_one_step_never_both_never_neither(
    impl: Implementation, loop: SteppedLoop
) -> None:
    """Sweep the release time around the deadline: each waiter ends exactly one way."""
    for offset in (-2e-7, -1e-7, 0.0, 1e-7, 2e-7):
        limiter = impl.ConcurrencyLimiter(1)
        assert limiter.try_acquire()
        start = loop.time()
        a = Acquirer(limiter, loop, timeout=1.0)
        b = Acquirer(limiter, loop)
        loop.step()
        loop.call_at(start + 1.0 + offset, limiter.release)
        loop.advance(1.0 + 1e-6)
        loop.step()  # both timers fire in this one iteration
        loop.settle()
        assert a.outcome in ("acquired", "timed out")
        assert b.outcome == ("waiting" if a.outcome == "acquired" else "acquired")
        assert (limiter.in_use, limiter.waiting) == (1, int(b.outcome == "waiting"))
        b.cancel()
        loop.settle()
        limiter.release()
        assert (limiter.in_use, limiter.waiting) == (0, 0)


# -- the state machine ------------------------------------------------------------------------


@dataclass(eq=False)
class Worker:
    """A task of the state machine: acquires (maybe with a timeout), then holds until told."""

    number: int
    timeout: float | None
    style: str  # "acquire": acquire() ... release(); "with": async with limiter
    state: str = "new"  # new -> inside -> holding -> released; or cancelled / timed out
    queued: bool = False  # acquire() suspended (it did not return in the step it started)
    gate: asyncio.Future[None] | None = None
    task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Worker {self.number} {self.style} timeout={self.timeout} {self.state}>"


class LimiterMachine(RuleBasedStateMachine):
    """Random acquire / release / cancel / resize / timeout / try_acquire against a model.

    Checked after every rule: the counters agree, ``in_use <= capacity`` unless a shrink is
    still pending, ``in_use`` covers exactly the holders plus (until the loop settles) the
    promised, ``waiting`` counts the tasks inside ``acquire()``. After a settle: nobody
    waits while a permit is free (no lost wake-up), and promised permits are all taken up.
    Throughout: tasks that queued get their permits in the order they queued (FIFO among
    survivors). At the end: every permit is accounted for.
    """

    kind: Kind = "python"
    workers = Bundle("workers")

    def __init__(self) -> None:
        super().__init__()
        self.loop = SteppedLoop()
        self.limiter: Any = Implementation(self.kind).ConcurrencyLimiter  # set in start()
        self.all: list[Worker] = []
        self.external = 0  # permits taken by try_acquire and not yet released
        self.queued_order: list[int] = []  # numbers of queued workers, in the order they queued
        self.granted_order: list[int] = []  # numbers of queued workers, in acquisition order
        self.shrink_pending = False

    @initialize(capacity=st.integers(1, 3))
    def start(self, capacity: int) -> None:
        self.limiter = Implementation(self.kind).ConcurrencyLimiter(capacity)

    # -- the workers --

    async def _work(self, worker: Worker) -> None:
        limiter = self.limiter
        worker.state = "inside"
        started = self.loop.iterations
        self.queued_order.append(worker.number)
        try:
            if worker.style == "with":
                async with limiter:
                    self._acquired(worker, started)
                    await self._hold(worker)
            else:
                await limiter.acquire(timeout=worker.timeout)
                self._acquired(worker, started)
                try:
                    await self._hold(worker)
                finally:
                    limiter.release()
        except asyncio.CancelledError:
            if worker.state == "holding":
                worker.state = "released"
            else:
                worker.state = "cancelled"
            raise
        except ResourceLimitError:
            worker.state = "timed out"
        else:
            worker.state = "released"
        finally:
            if not worker.queued:
                self.queued_order.remove(worker.number)

    def _acquired(self, worker: Worker, started: int) -> None:
        worker.queued = self.loop.iterations != started
        worker.state = "holding"
        if worker.queued:
            self.granted_order.append(worker.number)

    async def _hold(self, worker: Worker) -> None:
        worker.gate = self.loop.create_future()
        await worker.gate

    def holders(self) -> int:
        return sum(w.state == "holding" for w in self.all) + self.external

    def inside(self) -> int:
        return sum(w.state == "inside" for w in self.all)

    # -- rules --

    @rule(
        target=workers,
        timeout=st.sampled_from([None, None, 0.0, 0.5, 1.0, 3.0]),
        style=st.sampled_from(["acquire", "with"]),
    )
    def spawn(self, timeout: float | None, style: str) -> Worker:
        worker = Worker(len(self.all), timeout if style == "acquire" else None, style)
        worker.task = self.loop.create_task(self._work(worker))
        self.all.append(worker)
        return worker

    @rule()
    def step(self) -> None:
        self.loop.step()

    @rule()
    def settle(self) -> None:
        self.loop.settle()
        self.loop.step()  # nothing ready: one more iteration is a no-op
        assert self.limiter.in_use == self.holders()  # no promised permit left over
        assert self.limiter.waiting == self.inside()
        if self.limiter.waiting:
            assert self.limiter.in_use >= self.limiter.capacity  # nobody stalls

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0]))
    def advance(self, seconds: float) -> None:
        self.loop.advance(seconds)
        self.loop.step()

    @rule(worker=workers)
    def cancel(self, worker: Worker) -> None:
        assert worker.task is not None
        worker.task.cancel()

    @rule(worker=consumes(workers))
    def finish(self, worker: Worker) -> None:
        if worker.gate is not None and not worker.gate.done():
            worker.gate.set_result(None)

    @rule(capacity=st.integers(1, 4))
    def resize(self, capacity: int) -> None:
        self.limiter.capacity = capacity
        if self.limiter.in_use > capacity:
            self.shrink_pending = True

    @rule()
    def try_acquire(self) -> None:
        if self.limiter.try_acquire():
            self.external += 1

    @rule()
    def release_external(self) -> None:
        if self.external:
            self.limiter.release()
            self.external -= 1

    # -- invariants --

    @invariant()
    def counts_agree(self) -> None:
        limiter = self.limiter
        if not isinstance(limiter, type):  # before start()
            check_counts(limiter)
            if limiter.in_use <= limiter.capacity:
                self.shrink_pending = False
            assert self.shrink_pending or limiter.in_use <= limiter.capacity
            assert self.holders() <= limiter.in_use <= self.holders() + self.inside()
            assert limiter.waiting == self.inside()

    @invariant()
    def fifo_among_survivors(self) -> None:
        assert self.granted_order == [n for n in self.queued_order if n in self.granted_order]

    def teardown(self) -> None:
        try:
            if not isinstance(self.limiter, type):
                self.loop.settle()  # every task has started
                for worker in self.all:  # first the waiters leave ...
                    if worker.state == "inside":
                        assert worker.task is not None
                        worker.task.cancel()
                self.loop.settle()
                for worker in self.all:  # ... then the holders
                    if worker.gate is not None and not worker.gate.done():
                        worker.gate.set_result(None)
                self.loop.settle()
                for _ in range(self.external):
                    self.limiter.release()
                assert (self.limiter.in_use, self.limiter.waiting) == (0, 0)
                finished = ("new", "released", "cancelled", "timed out")  # new: cancelled unstarted
                assert all(w.state in finished for w in self.all)
        finally:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.settle()
            self.loop.close()


def test_state_machine(impl: Implementation) -> None:
    impl.ConcurrencyLimiter  # noqa: B018 - skips the cython leg if it is not built

    class Machine(LimiterMachine):
        kind = impl.kind

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=120,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- storms -----------------------------------------------------------------------------------


async def storm(limiter: Any, tasks: int, seed: int) -> dict[str, int]:
    """``tasks`` tasks through the limiter, a fifth of them cancelled at random moments."""
    rng = random.Random(seed)
    active = peak = 0
    done = {"ran": 0, "cancelled": 0}

    async def work(pause: float) -> None:
        nonlocal active, peak
        async with limiter:
            active += 1
            peak = max(peak, active)
            try:
                await asyncio.sleep(pause)
            finally:
                active -= 1
        done["ran"] += 1

    loop = asyncio.get_running_loop()
    running = []
    for _ in range(tasks):
        task = loop.create_task(work(rng.choice([0.0, 0.0, 0.001, 0.01])))
        running.append(task)
        if rng.random() < 0.2:
            loop.call_later(rng.choice([0.0, 0.0005, 0.003, 0.02, 1.0]), task.cancel)
    results = await asyncio.gather(*running, return_exceptions=True)
    done["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
    assert peak <= limiter.capacity
    return done


async def test_ten_thousand_tasks_with_random_cancellations(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(10)
    done = await storm(limiter, 10_000, seed=3)
    assert done["ran"] + done["cancelled"] == 10_000
    assert done["cancelled"] > 500
    assert (limiter.in_use, limiter.waiting, limiter.available) == (0, 0, 10)


@pytest.mark.stress
async def test_hundred_thousand_tasks_with_random_cancellations(impl: Implementation) -> None:
    limiter = impl.ConcurrencyLimiter(10)
    done = await storm(limiter, 100_000, seed=4)
    assert done["ran"] + done["cancelled"] == 100_000
    assert (limiter.in_use, limiter.waiting, limiter.available) == (0, 0, 10)
