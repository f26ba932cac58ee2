"""Every example in ``examples/`` runs, on both implementations, on the virtual clock.

Each example is loaded fresh for each test, after ``mtaio.resources``' twinned classes have
been swapped for the ``impl`` under test, so the example's own
``from mtaio.resources import RateLimiter`` picks that implementation. The quickstart also
runs as a script, in real time, the way the README runs it.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib.util
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import Implementation

import mtaio.resources
from mtaio._core import _TWINS
from mtaio.exceptions import ResourceError, ResourceLimitError
from mtaio.exceptions import TimeoutError as MtaioTimeoutError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

Load = Callable[[str], Any]

# Every example and the tests below that run it (checked by test_every_example_is_tested).
TESTED: set[str] = set()


def runs(stem: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a test as running ``examples/<stem>.py``."""
    TESTED.add(stem)
    return lambda test: test


@pytest.fixture
def load(impl: Implementation, monkeypatch: pytest.MonkeyPatch) -> Load:
    """``load("stem")`` executes ``examples/stem.py`` as a fresh module using ``impl``."""
    for name in _TWINS:
        monkeypatch.setattr(mtaio.resources, name, getattr(impl, name), raising=False)

    def load_example(stem: str) -> Any:
        path = EXAMPLES / f"{stem}.py"
        spec = importlib.util.spec_from_file_location(f"examples_{stem}", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # dataclasses and pickling look the module up by name while it executes.
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        return module

    return load_example


def now() -> float:
    return asyncio.get_running_loop().time()


# -- the quickstart ------------------------------------------------------------------------


@runs("quickstart")
async def test_quickstart_shows_all_four_components(
    load: Load, capsys: pytest.CaptureFixture[str]
) -> None:
    quickstart = load("quickstart")
    await quickstart.main()
    out = capsys.readouterr().out
    # 40 calls, 10 from the full bucket and 30 more at 50/s; 5 at a time, 50 ms each.
    assert "fetched 40 pages in 0.65s" in out
    assert "the block ran out of time after 0.1s" in out
    assert "request 0: accepted" in out
    assert "request 1: accepted" in out
    assert "request 2: rejected, retry after 10 ms" in out
    assert "after the group:" in out


def _run_script(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MTAIO_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, str(path)],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.parametrize("env", [{}, {"MTAIO_NO_EXTENSIONS": "1"}], ids=["default", "python"])
def test_quickstart_runs_as_a_script(env: dict[str, str]) -> None:
    # Real time, the README's command: `python examples/quickstart.py`.
    result = _run_script(EXAMPLES / "quickstart.py", **env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    if env:
        assert "running its python implementation" in result.stdout
    assert re.search(r"fetched 40 pages in 0\.\d\ds", result.stdout)
    assert "request 2: rejected" in result.stdout
    assert "after the group:" in result.stdout


@pytest.mark.stress
@pytest.mark.parametrize("env", [{}, {"MTAIO_NO_EXTENSIONS": "1"}], ids=["default", "python"])
@pytest.mark.parametrize("stem", sorted(p.stem for p in EXAMPLES.glob("*.py")))
def test_every_example_runs_as_a_script(stem: str, env: dict[str, str]) -> None:
    # Real time: every example finishes in a few seconds.
    result = _run_script(EXAMPLES / f"{stem}.py", **env)
    assert result.returncode == 0, result.stderr


# -- RateLimiter / Basic Usage --------------------------------------------------------------


@runs("rate_limiter_basic")
async def test_rate_limiter_basic_shares_one_bucket_between_both_forms(load: Load) -> None:
    example = load("rate_limiter_basic")
    await example.main()
    # The first 10 from the full bucket, then one every 100 ms, whichever form asked.
    expected = [0.0] * 10 + [0.1 * k for k in range(1, 11)]
    assert example.calls == pytest.approx(expected, abs=1e-6)
    assert example.rate_limited_operation.__name__ == "rate_limited_operation"


# -- TimeoutManager / Basic Usage -----------------------------------------------------------


@runs("timeout_manager_basic")
async def test_timeout_manager_basic_runs_both_operations(load: Load) -> None:
    example = load("timeout_manager_basic")
    await example.main()
    assert await example.operation_with_timeout() == ("long", "another")
    assert now() == pytest.approx(3.0)  # 1.5 s per run


@runs("timeout_manager_basic")
async def test_timeout_manager_basic_per_call_timeout_applies(load: Load) -> None:
    example = load("timeout_manager_basic")
    example.ANOTHER_SECONDS = 3.0  # more than its 2 s
    with pytest.raises(MtaioTimeoutError) as info:
        await example.operation_with_timeout()
    assert info.value.timeout == 2.0
    assert now() == pytest.approx(1.0 + 2.0)


@runs("timeout_manager_basic")
async def test_timeout_manager_basic_block_deadline_applies_across_calls(load: Load) -> None:
    example = load("timeout_manager_basic")
    example.LONG_RUNNING_SECONDS = 4.5
    example.ANOTHER_SECONDS = 1.0  # fits its own 2 s, but the block's 5 s end first
    with pytest.raises(MtaioTimeoutError) as info:
        await example.operation_with_timeout()
    assert info.value.timeout == 5.0
    assert now() == pytest.approx(5.0)


# -- ConcurrencyLimiter / Basic Usage -------------------------------------------------------


@runs("concurrency_limiter_basic")
async def test_concurrency_limiter_basic_never_exceeds_five(load: Load) -> None:
    example = load("concurrency_limiter_basic")
    await example.main()
    assert example.most_inside == 5
    assert now() == pytest.approx(0.4)
    assert example.limiter.in_use == 0


# -- ResourceGroup / Basic Usage ------------------------------------------------------------


@runs("resource_group_basic")
async def test_resource_group_basic_closes_its_members(load: Load) -> None:
    example = load("resource_group_basic")
    group, rate_limiter, timeout = await example.manage_resources()
    assert example.operations == 1
    assert len(group) == 0
    with pytest.raises(ResourceError):
        await rate_limiter.acquire()
    with pytest.raises(ResourceError):
        async with timeout:
            pass
    await example.main()
    assert example.operations == 2


# -- Adaptive Rate Limiting (corrected) -----------------------------------------------------


@runs("adaptive_rate_limiter")
async def test_adaptive_rate_limiter_gives_each_resource_its_rate(load: Load) -> None:
    example = load("adaptive_rate_limiter")
    rates = await example.main()
    # 10 tokens/s; a call costs 1 / rate tokens, twice that under load.
    assert rates["search"] == pytest.approx(10 * 4.8, rel=1e-6)
    assert rates["upload"] == pytest.approx(10 * 0.512, rel=1e-6)
    assert rates["search under load"] == pytest.approx(10 * 4.8 / 2, rel=1e-6)


@runs("adaptive_rate_limiter")
async def test_adaptive_rate_limiter_is_a_working_subclass(load: Load) -> None:
    example = load("adaptive_rate_limiter")
    assert issubclass(example.AdaptiveRateLimiter, mtaio.resources.RateLimiter)
    limiter = example.AdaptiveRateLimiter(rate=2.0, burst=4.0)
    assert limiter.rate == 2.0
    assert limiter.burst == 4.0
    limiter.rates["x"] = 2.0
    await limiter.acquire("x")  # costs 0.5 tokens
    assert limiter.available == pytest.approx(3.5)
    # Rates stay within bounds, so a cost never exceeds the bucket.
    for _ in range(50):
        limiter.adjust_rate("y", load=0.95)
    assert limiter.rates["y"] == example.MIN_RATE
    for _ in range(50):
        limiter.adjust_rate("z", load=0.1)
    assert limiter.rates["z"] == example.MAX_RATE


@runs("adaptive_rate_limiter")
async def test_adaptive_rate_limiter_without_its_corrections_fails(load: Load) -> None:
    example = load("adaptive_rate_limiter")

    class AsInTheReference(example.AdaptiveRateLimiter):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:  # no super().__init__(), as in the reference
            self.rates: dict[str, float] = {}
            self._current_load = 0.0

    broken = AsInTheReference()
    with pytest.raises(KeyError):
        # The reference's adjust_rate indexed a missing key.
        example_reference_adjust_rate(broken, "new", 0.95)
    with pytest.raises(Exception):  # noqa: B017 - whichever way the base class fails
        async with asyncio.timeout(60):
            await broken.acquire("x")


def example_reference_adjust_rate(self: Any, resource_id: str, load: float) -> None:
    """The reference's ``adjust_rate``, verbatim."""
    self._current_load = load
    if load > 0.9:  # High load
        self.rates[resource_id] *= 0.8
    elif load < 0.5:  # Low load
        self.rates[resource_id] *= 1.2


# -- Cascading Timeouts (corrected) ---------------------------------------------------------


@runs("cascading_timeouts")
async def test_cascading_timeouts_example_runs(
    load: Load, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load("cascading_timeouts")
    await example.main()
    out = capsys.readouterr().out
    assert "'answer after 0.5s' on attempt 2, 1.5s in" in out
    assert "gave up after 2 attempts, 3.0s: " in out


@runs("cascading_timeouts")
async def test_cascading_timeouts_retry_with_each_timeout_in_turn(load: Load) -> None:
    example = load("cascading_timeouts")
    controller = example.TimeoutController()
    service = example.FlakyService(5.0, 5.0, 0.5)
    assert await controller.cascading_timeout(service.fetch, [1.0, 2.0, 3.0]) == (
        "answer after 0.5s"
    )
    assert service.calls == 3
    assert now() == pytest.approx(1.0 + 2.0 + 0.5)


@runs("cascading_timeouts")
async def test_cascading_timeouts_raise_the_last_timeout(load: Load) -> None:
    example = load("cascading_timeouts")
    controller = example.TimeoutController()
    service = example.FlakyService(10.0)
    with pytest.raises(MtaioTimeoutError) as info:
        await controller.cascading_timeout(service.fetch, [1.0, 1.0])
    assert info.value.timeout == 1.0
    assert service.calls == 2  # equal timeouts are two attempts (the reference made one)
    with pytest.raises(ValueError, match="empty"):
        await controller.cascading_timeout(service.fetch, [])


@runs("cascading_timeouts")
async def test_cascading_timeouts_as_in_the_reference_break_on_the_first_timeout(
    impl: Implementation,
) -> None:
    # Why the example was corrected: the reference's generator yields again after a timeout.
    timeouts_manager = impl.TimeoutManager()

    @asynccontextmanager
    async def cascading_timeout(timeouts: list[float]) -> Any:
        for timeout in timeouts:
            try:
                async with timeouts_manager.timeout(timeout):
                    yield
                break
            except TimeoutError:
                if timeout == timeouts[-1]:
                    raise
                continue

    async def use_it() -> None:
        async with cascading_timeout([1.0, 2.0]):
            await asyncio.sleep(5)

    with pytest.raises(RuntimeError, match="didn't stop after athrow"):
        await use_it()


# -- Best Practices / Resource Cleanup ------------------------------------------------------


@runs("resource_cleanup")
async def test_resource_cleanup_enters_limiter_and_manager_in_an_exit_stack(
    load: Load,
) -> None:
    example = load("resource_cleanup")
    await example.cleanup_resources()
    rate_limiter, timeout, available = await example.cleanup_and_close()
    assert available == pytest.approx(9.0)  # entering the limiter took one token
    with pytest.raises(ResourceError):
        rate_limiter.try_acquire()
    with pytest.raises(ResourceError):
        async with timeout:
            pass
    await example.main()


@runs("resource_cleanup")
async def test_entering_a_limiter_or_manager_returns_it(impl: Implementation) -> None:
    # What the example relies on: `as` binds the object itself (SPEC §2, §4).
    limiter = impl.RateLimiter(10.0)
    manager = impl.TimeoutManager(5.0)
    async with limiter as entered_limiter, manager as entered_manager:
        assert entered_limiter is limiter
        assert entered_manager is manager
        assert limiter.available == pytest.approx(9.0)


# -- Best Practices / Error Handling --------------------------------------------------------


@runs("error_handling")
async def test_error_handling_logs_the_timeout(
    load: Load, caplog: pytest.LogCaptureFixture
) -> None:
    example = load("error_handling")
    with caplog.at_level(logging.ERROR):
        await example.main()
    assert [r.getMessage() for r in caplog.records] == ["Operation timed out"]
    assert now() == pytest.approx(5.0)


@runs("error_handling")
async def test_error_handling_logs_a_refused_limit(
    load: Load, caplog: pytest.LogCaptureFixture
) -> None:
    example = load("error_handling")

    async def refused() -> None:
        raise ResourceLimitError("too many", retry_after=0.5)

    example.operation = refused
    with caplog.at_level(logging.ERROR):
        await example.handle_resource_errors()
    assert [r.getMessage() for r in caplog.records] == ["Resource limit exceeded: too many"]


@runs("error_handling")
async def test_error_handling_is_quiet_when_the_operation_fits(
    load: Load, caplog: pytest.LogCaptureFixture
) -> None:
    example = load("error_handling")
    example.OPERATION_SECONDS = 4.0
    with caplog.at_level(logging.DEBUG):
        await example.handle_resource_errors()
    assert caplog.records == []
    assert now() == pytest.approx(4.0)


# -- Error Handling Examples ----------------------------------------------------------------


@runs("handle_errors")
async def test_handle_errors_as_written_succeeds(
    load: Load, caplog: pytest.LogCaptureFixture
) -> None:
    example = load("handle_errors")
    with caplog.at_level(logging.DEBUG):
        await example.main()
    assert caplog.records == []


@runs("handle_errors")
async def test_handle_errors_warns_when_the_limit_refuses(
    load: Load, impl: Implementation, caplog: pytest.LogCaptureFixture
) -> None:
    example = load("handle_errors")
    example.RateLimiter = functools.partial(impl.RateLimiter, burst=1, max_wait=0)
    with caplog.at_level(logging.DEBUG):
        await example.handle_errors()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "Rate limit exceeded")
    ]
    assert now() == pytest.approx(1.0)  # the handler's back-off


@runs("handle_errors")
async def test_handle_errors_reports_a_closed_limiter(
    load: Load, impl: Implementation, caplog: pytest.LogCaptureFixture
) -> None:
    example = load("handle_errors")

    def closed(rate: float) -> Any:
        limiter = impl.RateLimiter(rate)
        limiter.close()
        return limiter

    example.RateLimiter = closed
    with caplog.at_level(logging.DEBUG):
        await example.handle_errors()
    (record,) = caplog.records
    assert record.levelname == "ERROR"
    assert record.getMessage().startswith("Resource error: ")


# -- Best Practices / Performance Optimization ----------------------------------------------


@runs("performance_settings")
async def test_performance_settings_allow_a_burst_then_the_rate(load: Load) -> None:
    example = load("performance_settings")
    assert example.rate_limiter.rate == 100.0
    assert example.rate_limiter.burst == 20
    assert example.concurrency_limiter.capacity == (os.cpu_count() or 1) * 2
    elapsed = await example.main()
    # 20 from the full bucket, 100 more at 100/s, the last one's 1 ms of work.
    assert elapsed == pytest.approx(1.0 + 0.001, abs=1e-6)


# -- Integration Examples / Web Application -------------------------------------------------


@runs("web_application")
async def test_web_application_example_runs(load: Load, capsys: pytest.CaptureFixture[str]) -> None:
    example = load("web_application")
    await example.main()
    out = capsys.readouterr().out
    assert "RateLimitedAPI: 200 responses in 1.05s" in out
    assert "RejectingAPI: 20 accepted, 30 answered 429" in out


@runs("web_application")
async def test_web_application_holds_200_concurrent_requests_on_one_timeout_manager(
    load: Load,
) -> None:
    example = load("web_application")
    api = example.RateLimitedAPI()
    started: list[float] = []
    real_process = example.process_request

    async def process_request(request: Any) -> str:
        started.append(now())
        result: str = await real_process(request)
        return result

    example.process_request = process_request
    # Every 10th request needs 10 s: those run out of their own 5 s, and only those.
    requests = [example.Request(i, work=10.0 if i % 10 == 0 else 0.05) for i in range(200)]
    outcomes = await asyncio.gather(
        *(api.handle_request(r) for r in requests), return_exceptions=True
    )

    for request, outcome in zip(requests, outcomes, strict=True):
        if request.work > 5:
            assert isinstance(outcome, MtaioTimeoutError)
            assert outcome.timeout == 5.0
        else:
            assert outcome == f"response {request.id}"
    # 100 start at once from the full bucket, then one every 10 ms, in arrival order.
    assert started == pytest.approx([0.0] * 100 + [0.01 * k for k in range(1, 101)], abs=1e-6)
    assert now() == pytest.approx(5.0)  # the slow ones, cut at 5 s after they arrived
    assert api.rate_limiter.waiting == 0


@runs("web_application")
async def test_web_application_cancelled_requests_stay_cancelled(load: Load) -> None:
    example = load("web_application")
    api = example.RateLimitedAPI()
    tasks = [
        asyncio.create_task(api.handle_request(example.Request(i, work=1.0))) for i in range(200)
    ]
    await asyncio.sleep(0.5)
    for task in tasks[::2]:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for index, outcome in enumerate(outcomes):
        if index % 2 == 0:
            assert isinstance(outcome, asyncio.CancelledError)  # never a TimeoutError
        else:
            assert outcome == f"response {index}"


@runs("web_application")
async def test_rejecting_api_answers_429_with_retry_after(load: Load) -> None:
    example = load("web_application")
    api = example.RejectingAPI()
    responses = await asyncio.gather(*(api.handle_request(example.Request(i)) for i in range(50)))
    assert [status for status, _, _ in responses] == [200] * 20 + [429] * 30
    assert responses[-1][1] == {"Retry-After": "1"}
    await asyncio.sleep(0.1)  # 10 tokens later
    status, _, _ = await api.handle_request(example.Request(99))
    assert status == 200


# -- Integration Examples / Task Processing -------------------------------------------------


@runs("task_processing")
async def test_task_processing_runs_ten_batches_at_a_time(load: Load) -> None:
    example = load("task_processing")
    await example.main()
    processor = example.TaskProcessor()
    results = await asyncio.gather(*(processor.process_tasks([0.1, 0.2]) for _ in range(25)))
    assert results == [["done in 0.1s", "done in 0.2s"]] * 25
    assert processor.most_running == 10
    assert processor.limiter.in_use == 0


# -- bookkeeping ---------------------------------------------------------------------------


def _example_stems() -> Iterator[str]:
    return (path.stem for path in EXAMPLES.glob("*.py"))


def test_every_example_is_tested() -> None:
    assert set(_example_stems()) == TESTED


def test_every_example_is_shown_in_the_docs() -> None:
    page = (ROOT / "docs" / "examples.md").read_text()
    for stem in _example_stems():
        assert f"examples/{stem}.py" in page, stem


@pytest.mark.parametrize(
    "page", ["index", "getting-started", "resource-group", "migrating", "examples"]
)
def test_python_snippets_in_the_guide_compile(page: str) -> None:
    # The guide's short snippets are fragments (they use names they do not define); they
    # must at least be valid Python. Whole programs are embedded from examples/ instead.
    text = (ROOT / "docs" / f"{page}.md").read_text()
    blocks = re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.DOTALL | re.MULTILINE)
    for block in blocks:
        code = textwrap.dedent(block.group(2))
        if "--8<--" not in code:
            compile(code, f"docs/{page}.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_examples_use_only_the_public_api() -> None:
    for path in EXAMPLES.glob("*.py"):
        for line in path.read_text().splitlines():
            if re.match(r"\s*(from|import) mtaio\._core", line):
                assert "IMPLEMENTATION" in line, f"{path.name}: {line}"
