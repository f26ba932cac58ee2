"""RateLimiter against a reference model (hypothesis), on both implementations.

A scenario is a random sequence of arrivals (token amounts, some larger than the burst),
cancellations and rate changes at random times. It runs on the virtual clock; a small exact
model of SPEC §2's token bucket replays it. The properties:

(a) grants come in arrival order among the requests that were not cancelled or refused
    (requests for 0 tokens return at once);
(b) over every interval, tokens granted <= max capacity + the tokens the rate added;
(c) every request is granted when the model grants it (the earliest time the bucket allows),
    to the clock's resolution, and refused exactly when the model refuses it;
(d) nothing is granted to a cancelled request.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from conftest import Implementation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtaio.exceptions import ResourceLimitError

CATCH_UP = 0.002  # SPEC §2: the effective capacity is max(burst, rate * 2 ms)
# Events happen on whole microseconds (looptime's resolution); a timer fires on the first
# tick at or after its time, so a grant may come up to a microsecond late.
TOLERANCE = 3e-6
SLACK = 2e-9


@dataclass(frozen=True)
class Arrive:
    at: float
    tokens: float


@dataclass(frozen=True)
class Cancel:
    at: float
    arrival: int  # index among the arrivals


@dataclass(frozen=True)
class ChangeRate:
    at: float
    rate: float


Event = Arrive | Cancel | ChangeRate


@dataclass(frozen=True)
class Scenario:
    rate: float
    burst: float
    events: tuple[Event, ...]


rates = st.one_of(st.sampled_from([0.5, 1.0, 4.0, 10.0, 1000.0]), st.floats(0.5, 2000.0))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    burst = draw(st.one_of(st.sampled_from([0.5, 1.0, 2.0, 5.0]), st.floats(0.25, 8.0)))
    amounts = st.one_of(
        st.sampled_from([0.0, 0.25, 1.0, burst]),
        st.floats(0.0, burst),
        st.just(burst * 1.5),  # refused: more than the burst
    )
    events: list[Event] = []
    arrivals = 0
    micros = 0
    for _ in range(draw(st.integers(1, 24))):
        micros += draw(st.one_of(st.just(0), st.integers(0, 500_000)))
        at = micros / 1e6
        kind = draw(st.sampled_from(["arrive", "arrive", "arrive", "cancel", "rate"]))
        if kind == "cancel" and arrivals:
            events.append(Cancel(at, draw(st.integers(0, arrivals - 1))))
        elif kind == "rate":
            events.append(ChangeRate(at, draw(rates)))
        else:
            events.append(Arrive(at, draw(amounts)))
            arrivals += 1
    return Scenario(draw(rates), burst, tuple(events))


# -- what the implementation did ----------------------------------------------------------------


@dataclass
class Observed:
    granted: dict[int, float]  # arrival -> time its acquire() returned
    refused: set[int]
    cancelled: set[int]  # cancelled and never granted
    done_when_cancelled: dict[int, bool]  # arrival -> had acquire() already returned?
    times: list[float]  # when each event happened (the sleeps may round by a microsecond)


async def run(limiter_class: Any, scenario: Scenario) -> Observed:
    loop = asyncio.get_running_loop()
    start = loop.time()
    limiter = limiter_class(scenario.rate, burst=scenario.burst)
    observed = Observed({}, set(), set(), {}, [])
    tasks: list[asyncio.Task[None]] = []

    async def request(index: int, tokens: float) -> None:
        try:
            await limiter.acquire(tokens)
        except ResourceLimitError:
            observed.refused.add(index)
            return
        observed.granted[index] = loop.time() - start

    try:
        for event in scenario.events:
            delay = start + event.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            observed.times.append(loop.time() - start)
            if isinstance(event, Arrive):
                tasks.append(loop.create_task(request(len(tasks), event.tokens)))
                await asyncio.sleep(0)  # it calls acquire() now, in arrival order
            elif isinstance(event, Cancel):
                task = tasks[event.arrival]
                observed.done_when_cancelled.setdefault(event.arrival, task.done())
                task.cancel()
            else:
                limiter.rate = event.rate
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
    observed.cancelled = {i for i, task in enumerate(tasks) if task.cancelled()}
    assert limiter.waiting == 0
    return observed


# -- the model ----------------------------------------------------------------------------------


@dataclass
class Expected:
    granted: dict[int, float]
    refused: set[int]


def model(scenario: Scenario, observed: Observed) -> Expected:
    """SPEC §2's bucket, computed exactly, event by event.

    A cancellation at the very moment of the grant is a tie the loop settles either way:
    granted and returned first (the cancellation comes too late), or cancelled first, or
    granted then cancelled before ``acquire()`` returned (refunded: the same as cancelled
    first). The model follows what the implementation saw: whether the task's
    ``acquire()`` had returned when it was cancelled.
    """
    burst = scenario.burst
    rate = scenario.rate
    capacity = max(burst, rate * CATCH_UP)
    level, stamp = capacity, 0.0
    # The bucket is full until the limiter first reads the clock: a token request that is
    # neither 0 nor refused, or a rate change once a request has bound it to the loop.
    fresh, bound = True, False
    queue: deque[tuple[int, float]] = deque()
    expected = Expected({}, set())

    def first_reading(at: float) -> None:
        nonlocal fresh, level, stamp
        if fresh:
            fresh, level, stamp = False, capacity, at

    def advance(to: float) -> None:
        nonlocal level, stamp
        if fresh:
            return  # full, and nobody can be queued yet
        while queue:
            index, tokens = queue[0]
            fits_at = stamp + max(0.0, tokens - level) / rate
            if fits_at > to:
                break
            # Timers fire on the clock's ticks, so a grant comes up to a tick after it is due
            # (checked against ``fits_at`` afterwards). A bucket that fills up meanwhile
            # overflows then, so the bucket is refilled up to when the grant really came.
            came = observed.granted.get(index, fits_at)
            if fits_at < came <= fits_at + TOLERANCE:
                if came > to:
                    break  # it came after the next event, on a later tick
            else:
                came = fits_at
            level = min(capacity, level + (came - stamp) * rate) - tokens
            stamp = came
            expected.granted[index] = fits_at
            queue.popleft()
        if to > stamp:
            level = min(capacity, level + (to - stamp) * rate)
            stamp = to

    arrivals = 0
    amounts: list[float] = []
    for event, at in zip(scenario.events, observed.times, strict=True):
        if isinstance(event, Arrive):
            bound = True
            if 0 < event.tokens <= burst:
                first_reading(at)
            advance(at)
            index, arrivals = arrivals, arrivals + 1
            amounts.append(event.tokens)
            if event.tokens > burst:
                expected.refused.add(index)
            elif event.tokens == 0:
                expected.granted[index] = at
            elif not queue and level >= event.tokens:
                level -= event.tokens
                expected.granted[index] = at
            else:
                queue.append((index, event.tokens))
        elif isinstance(event, Cancel):
            advance(at)
            index = event.arrival
            if observed.done_when_cancelled[index]:
                continue  # its acquire() had returned: nothing to cancel
            queued = [entry for entry in queue if entry[0] == index]
            if queued:
                queue.remove(queued[0])  # it takes nothing; those behind move up
            elif at - expected.granted.get(index, -math.inf) <= TOLERANCE:
                # Granted at this very instant, cancelled before acquire() returned: the
                # tokens go back, which is the same as never granting them.
                del expected.granted[index]
                level = min(capacity, level + amounts[index])
            advance(at)
        else:
            if bound:
                first_reading(at)
            advance(at)
            rate = event.rate
            capacity = max(burst, rate * CATCH_UP)
            level = capacity if fresh else min(level, capacity)
    advance(math.inf)
    return expected


def added_by_rate(scenario: Scenario, times: list[float], begin: float, end: float) -> float:
    """Tokens the rate adds over [begin, end], following the rate changes."""
    changes = [(0.0, scenario.rate)] + [
        (at, e.rate)
        for e, at in zip(scenario.events, times, strict=True)
        if isinstance(e, ChangeRate)
    ]
    total = 0.0
    for k, (since, rate) in enumerate(changes):
        until = changes[k + 1][0] if k + 1 < len(changes) else math.inf
        overlap = min(end, until) - max(begin, since)
        if overlap > 0:
            total += overlap * rate
    return total


# -- the properties -----------------------------------------------------------------------------


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios())
async def test_grants_match_the_exact_bucket(impl: Implementation, scenario: Scenario) -> None:
    observed = await run(impl.RateLimiter, scenario)
    expected = model(scenario, observed)
    arrivals = [e for e in scenario.events if isinstance(e, Arrive)]

    # (d) a cancelled request is never granted; a granted one was not cancelled first.
    assert not observed.cancelled & observed.granted.keys()
    for index, was_done in observed.done_when_cancelled.items():
        assert (index in observed.granted) == (was_done and index not in observed.refused)

    # (c) refused exactly when the model refuses; granted exactly when the model grants.
    assert observed.refused == expected.refused
    assert observed.granted.keys() == expected.granted.keys()
    for index, at in observed.granted.items():
        assert abs(at - expected.granted[index]) <= TOLERANCE + 1e-9 * at, index

    # (a) arrival order (a request for 0 tokens takes nothing and returns at once).
    order = sorted(i for i in observed.granted if arrivals[i].tokens > 0)
    for earlier, later in itertools.pairwise(order):
        assert observed.granted[earlier] <= observed.granted[later] + TOLERANCE

    # (b) the bound, over every interval between two grants.
    all_rates = [scenario.rate] + [e.rate for e in scenario.events if isinstance(e, ChangeRate)]
    capacity = max(max(scenario.burst, rate * CATCH_UP) for rate in all_rates)
    # asyncio fires a timer up to 1 ns early (its clock resolution); such a grant counts as
    # due, so it may run up to 1 ns of tokens ahead (SLACK seconds, with float rounding).
    slack = 1e-9 + max(all_rates) * SLACK
    grants = sorted((at, arrivals[i].tokens) for i, at in observed.granted.items())
    for i, (begin, _) in enumerate(grants):
        total = 0.0
        for end, tokens in grants[i:]:
            total += tokens
            assert total <= capacity + added_by_rate(scenario, observed.times, begin, end) + slack
