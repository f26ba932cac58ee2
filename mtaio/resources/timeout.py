"""Deadlines: :class:`TimeoutManager` and its :class:`Timeout` scopes.

``TimeoutManager(default_timeout=None)``: ``async with tm:`` gives the block a deadline
``default_timeout`` seconds from entry; ``tm.timeout(seconds)`` / ``tm.timeout_at(when)``
return a :class:`Timeout` scope that behaves like ``asyncio.Timeout``; ``await tm.run(aw,
timeout=...)`` awaits in the calling task with its own deadline. An expired deadline raises
:class:`mtaio.exceptions.TimeoutError` at the ``async with`` that owns it; any other
cancellation stays a ``CancelledError``. One manager may be shared by any number of tasks.
See ``docs/timeout-manager.md``.
"""

from __future__ import annotations

from mtaio._core import Timeout, TimeoutManager

__all__ = ["Timeout", "TimeoutManager"]
