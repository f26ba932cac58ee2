"""SPEC §1: the exception hierarchy."""

from __future__ import annotations

import asyncio
import builtins
import pickle

import pytest

from mtaio.exceptions import MTAIOError, ResourceError, ResourceLimitError, TimeoutError


def test_hierarchy() -> None:
    assert issubclass(ResourceError, MTAIOError)
    assert issubclass(ResourceLimitError, ResourceError)
    assert issubclass(TimeoutError, MTAIOError)
    assert issubclass(TimeoutError, builtins.TimeoutError)
    assert not issubclass(ResourceError, builtins.TimeoutError)
    assert TimeoutError.__mro__[:3] == (TimeoutError, MTAIOError, builtins.TimeoutError)


def test_builtin_and_asyncio_timeout_catch_ours() -> None:
    with pytest.raises(builtins.TimeoutError):
        raise TimeoutError("late", timeout=1.5)
    caught = False
    try:
        raise TimeoutError("late")
    except asyncio.TimeoutError:  # noqa: UP041 - the alias is what is under test
        caught = True
    assert caught


@pytest.mark.parametrize(
    "exc",
    [
        MTAIOError("boom"),
        ResourceError("boom"),
        ResourceLimitError("boom", retry_after=0.25),
        TimeoutError("boom", timeout=2.0),
    ],
    ids=lambda e: type(e).__name__,
)
def test_str_is_the_message(exc: MTAIOError) -> None:
    assert str(exc) == "boom"
    assert exc.message == "boom"
    assert exc.args == ("boom",)


def test_timeout_str_has_no_oserror_formatting() -> None:
    exc = TimeoutError("deadline of 2s expired", timeout=2.0)
    assert str(exc) == "deadline of 2s expired"
    assert exc.errno is None
    assert exc.timeout == 2.0


def test_attributes_default_to_none() -> None:
    assert ResourceLimitError("x").retry_after is None
    assert TimeoutError("x").timeout is None
    assert MTAIOError().message == ""


@pytest.mark.parametrize(
    "exc",
    [ResourceError("r"), ResourceLimitError("l", retry_after=3.0), TimeoutError("t", timeout=1.0)],
    ids=lambda e: type(e).__name__,
)
def test_pickle_round_trip_keeps_attributes(exc: MTAIOError) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert vars(copy) == vars(exc)
    assert str(copy) == str(exc)


def test_timeout_chains_cancelled_error() -> None:
    cancelled = asyncio.CancelledError()
    with pytest.raises(TimeoutError) as info:
        raise TimeoutError("t") from cancelled
    assert info.value.__cause__ is cancelled
