"""Cancellation storms: 100,000 waiters, a random half cancelled around their wake-up.

Every task queues on one limiter at once. Half of them, drawn with a seeded generator, are
cancelled, each at a moment drawn for it:

- ``before``: while still queued (or before it even started), by a driver task that wakes at
  random moments (random virtual sleeps and runs of ``await asyncio.sleep(0)``);
- ``woken``: after the limiter granted it (its future is done) but before it ran: by a done
  callback on its future, which runs before the task's own wake-up, or by the task served
  just before it, which looks ahead as soon as it returns from ``acquire()``;
- ``after``: right after ``acquire()`` returned, a few ``sleep(0)`` steps into its work
  (for the ``ConcurrencyLimiter``: inside the ``async with`` block, holding the permit).

A cancellation aimed at one moment that finds the task already past it lands at the next
moment instead; the phase the task was really in is what is recorded, and each phase must
have been hit thousands of times. Then: every survivor completes, every cancelled task ends
cancelled (the cancellation is never swallowed), survivors were served in FIFO order, nothing
is leaked (``in_use == 0``, ``waiting == 0``, a full bucket after a refill) and, for the
rate limiter, the tokens granted add up: none were lost with a cancelled waiter.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from mtaio.exceptions import ResourceError

from ._support import is_virtual, woken_not_run

pytestmark = pytest.mark.stress

TASKS = 100_000
BEFORE, WOKEN, AFTER = "before", "woken", "after"
PHASES = (BEFORE, WOKEN, AFTER)


class Storm:
    """The plan of one storm (who is cancelled, aimed at which moment) and what happened.

    ``targets`` maps the index of each task to be cancelled to the moment aimed at;
    ``phase`` records, for each task actually cancelled, the phase it was in when
    ``cancel()`` was called. ``served`` lists tasks in the order they returned from
    ``acquire()``.
    """

    def __init__(self, n: int, seed: int) -> None:
        rng = random.Random(seed)
        self.rng = rng
        self.n = n
        self.targets: dict[int, str] = {i: rng.choice(PHASES) for i in rng.sample(range(n), n // 2)}
        # sleep(0) steps each task takes after its wake-up (>= 1, so that a cancellation
        # scheduled right after the wake-up lands inside the task's work).
        self.steps = [rng.randrange(1, 4) for _ in range(n)]
        self.tasks: list[asyncio.Task[int]] = []
        self.phase: dict[int, str] = {}
        self.served: list[int] = []
        self.is_served = bytearray(n)
        self.last_served = -1
        self.last_served_at = 0.0
        self._woken_targets = deque(sorted(i for i, t in self.targets.items() if t == WOKEN))
        # A `before` target is cancelled once the served frontier has covered a random part
        # of the way to it: at a random moment of its wait.
        self._before: list[tuple[int, int]] = [
            (int(rng.random() * i) - 1, i) for i, t in self.targets.items() if t == BEFORE
        ]
        heapq.heapify(self._before)

    def cancel(self, i: int) -> None:
        if i in self.phase:
            return
        task = self.tasks[i]
        assert not task.done(), f"task {i} finished before its cancellation"
        if self.is_served[i]:
            self.phase[i] = AFTER
        elif woken_not_run(task):
            self.phase[i] = WOKEN
        else:
            self.phase[i] = BEFORE
        task.cancel()

    def on_served(self, i: int, now: float) -> None:
        """Task ``i`` returned from ``acquire()``: record it, and cancel what is due."""
        self.served.append(i)
        self.is_served[i] = 1
        self.last_served = i
        self.last_served_at = now
        if i in self.targets and i not in self.phase:
            # Aimed at this moment, or missed its earlier one: cancel it right after its
            # wake-up, a few steps into its work.
            asyncio.get_running_loop().call_soon(self.cancel, i)
        self.cancel_woken()

    def cancel_woken(self) -> None:
        """Cancel the `woken` targets that the limiter has granted but that have not run."""
        woken = self._woken_targets
        while woken and (woken[0] <= self.last_served or woken[0] in self.phase):
            woken.popleft()
        for j in itertools.islice(woken, 4):
            if j in self.phase:
                continue
            if not woken_not_run(self.tasks[j]):
                break  # still queued: so is everyone behind it
            self.cancel(j)

    async def drive(self) -> None:
        """Cancel the `before` targets at random moments while they wait."""
        rng = self.rng
        while self._before:
            if rng.random() < 0.5:
                for _ in range(rng.randrange(1, 4)):
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(rng.choice((0.0001, 0.0005, 0.001, 0.002)))
            while self._before and self._before[0][0] <= self.last_served:
                _, i = heapq.heappop(self._before)
                if i not in self.phase and not self.is_served[i]:
                    self.cancel(i)

    def _on_grant(self, i: int, waiter: asyncio.Future[Any]) -> None:
        """The future that task ``i`` waits on completed: cancel the task before it runs."""
        task = self.tasks[i]
        if i not in self.phase and not waiter.cancelled() and task._fut_waiter is waiter:  # type: ignore[attr-defined]
            self.cancel(i)

    def _watch_grants(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Hook the loop's ``create_future`` so that `woken` targets are cancelled in the
        exact window between their grant and their next step.

        Both limiters create their waiters' futures with ``loop.create_future()``. A done
        callback added here, at creation, is the future's first, so it runs one iteration
        after the grant and before the task's own wake-up. Returns the undo function.
        """
        create = loop.create_future
        index = {task: i for i, task in enumerate(self.tasks)}

        def create_future() -> asyncio.Future[Any]:
            future = create()
            i = index.get(asyncio.current_task())  # type: ignore[arg-type]
            if i is not None and self.targets.get(i) == WOKEN:
                future.add_done_callback(functools.partial(self._on_grant, i))
            return future

        setattr(loop, "create_future", create_future)  # noqa: B010 - mypy: method assignment
        return lambda: delattr(loop, "create_future")

    async def run(self, worker: Callable[[int], Coroutine[Any, Any, int]]) -> float:
        """Start the driver and every task, wait for all; return the wall time taken."""
        start = time.perf_counter()
        driver = asyncio.create_task(self.drive())
        self.tasks = [asyncio.create_task(worker(i)) for i in range(self.n)]
        unwatch = self._watch_grants(asyncio.get_running_loop())
        try:
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await driver
        finally:
            unwatch()
        return time.perf_counter() - start

    def check_outcomes(self) -> None:
        """Survivors completed, targets ended cancelled, FIFO order, each phase was hit."""
        assert set(self.phase) == set(self.targets), "some targets were never cancelled"
        for i, task in enumerate(self.tasks):
            if i in self.targets:
                assert task.cancelled(), (
                    f"task {i} was cancelled ({self.phase[i]}) but ended with "
                    f"{task.exception() or task.result()!r}"
                )
            else:
                assert not task.cancelled(), f"survivor {i} was cancelled"
                assert task.exception() is None, f"survivor {i} raised {task.exception()!r}"
                assert task.result() == i
        served = self.served
        overtakes = [(a, b) for a, b in itertools.pairwise(served) if a >= b]
        assert not overtakes, f"not FIFO: {len(overtakes)} overtakes, first {overtakes[0]}"
        survivors = self.n - len(self.targets)
        assert sum(not self.is_served[i] for i in range(self.n) if i not in self.targets) == 0
        assert len(served) >= survivors
        counts = self.phase_counts()
        for phase in PHASES:
            assert counts[phase] >= self.n // 100, f"phase {phase} hit only {counts}"

    def phase_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(PHASES, 0)
        for phase in self.phase.values():
            counts[phase] += 1
        return counts


def record(figures: Any, storm: Storm, seconds: float) -> None:
    counts = storm.phase_counts()
    figures.add("tasks", storm.n, "tasks")
    figures.add("storm time", seconds, "s")
    for phase in PHASES:
        figures.add(f"cancelled {phase}", counts[phase], "tasks")


# looptime idles 42 loop iterations before each jump of its clock by default; the virtual
# leg jumps once per grant (tens of thousands of times), and nothing here needs the idling.
@pytest.mark.looptime(noop_cycles=0)
@pytest.mark.uvloop
async def test_rate_limiter_survives_a_cancellation_storm(impl: Any, figures: Any) -> None:
    loop = asyncio.get_running_loop()
    virtual = is_virtual(loop)
    rate, burst = 20_000.0, 50.0
    limiter = impl.RateLimiter(rate, burst=burst)
    storm = Storm(TASKS, seed=20240)
    sizes = [storm.rng.choice((0.5, 1.0, 1.0, 2.0)) for _ in range(TASKS)]
    start = loop.time()

    async def worker(i: int) -> int:
        await limiter.acquire(sizes[i])
        storm.on_served(i, loop.time())
        for _ in range(storm.steps[i]):
            await asyncio.sleep(0)
        return i

    seconds = await storm.run(worker)
    storm.check_outcomes()
    assert limiter.waiting == 0

    # The tokens add up. Demand was continuous from the start to the last grant, so the
    # tokens granted are what the bucket held plus what the rate produced since, less what
    # is left in it (at most about one wake-up's worth). A woken waiter that was cancelled
    # and did not give its tokens back would show up here as missing tokens.
    granted = sum(sizes[i] for i in storm.served)
    produced = burst + rate * (storm.last_served_at - start)
    assert granted <= produced + rate * 0.001 + 1e-6, "more tokens granted than the bound"
    if virtual:
        assert granted >= produced - (rate * 0.003 + 10), (
            f"{produced - granted:.1f} tokens went missing: "
            f"woken-then-cancelled waiters did not give theirs back ({storm.phase_counts()})"
        )

    # Refilled, the bucket is full again and serves a whole burst at once.
    await asyncio.sleep(burst / rate + 0.01)
    assert limiter.available == pytest.approx(burst)
    assert limiter.waiting == 0
    assert limiter.try_acquire(burst)
    record(figures, storm, seconds)
    figures.add("tokens granted", granted, "tokens")


@pytest.mark.uvloop
async def test_concurrency_limiter_survives_a_cancellation_storm(impl: Any, figures: Any) -> None:
    capacity = 8
    limiter = impl.ConcurrencyLimiter(capacity)
    storm = Storm(TASKS, seed=31337)
    holds_time = [storm.rng.random() < 0.05 for _ in range(TASKS)]
    inside = 0
    most_inside = 0

    async def worker(i: int) -> int:
        nonlocal inside, most_inside
        async with limiter:
            inside += 1
            most_inside = max(most_inside, inside)
            assert limiter.in_use <= capacity
            try:
                storm.on_served(i, 0.0)
                for _ in range(storm.steps[i]):
                    await asyncio.sleep(0)
                if holds_time[i]:
                    await asyncio.sleep(0.001)
            finally:
                inside -= 1
        # The release just woke the next waiter: look for woken targets to cancel.
        storm.cancel_woken()
        return i

    seconds = await storm.run(worker)
    storm.check_outcomes()
    assert most_inside == capacity
    assert (limiter.in_use, limiter.waiting, limiter.available) == (0, 0, capacity)
    assert not limiter.locked()
    # Exactly `capacity` permits exist: no permit leaked, none granted twice.
    assert all(limiter.try_acquire() for _ in range(capacity))
    assert not limiter.try_acquire()
    for _ in range(capacity):
        limiter.release()
    with pytest.raises(ResourceError):
        limiter.release()
    assert limiter.in_use == 0
    record(figures, storm, seconds)
