"""Concurrency limiting: at most N tasks inside a block at once, served in FIFO order.

See ``docs/concurrency-limiter.md`` for the exact semantics.
"""

from __future__ import annotations

from mtaio._core import ConcurrencyLimiter

__all__ = ["ConcurrencyLimiter"]
