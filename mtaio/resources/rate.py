"""Rate limiting: :class:`RateLimiter`, an exact, strictly FIFO token bucket.

``RateLimiter(rate, burst=None, *, max_wait=None)``: ``await limiter.acquire(tokens)`` waits
for the tokens (or fails at once with ``ResourceLimitError`` when they could never come in
time); ``try_acquire`` never waits; ``async with limiter`` and ``@limiter.limit`` take one
token (or ``tokens=``) before the block or call. See ``docs/rate-limiter.md``.
"""

from __future__ import annotations

from mtaio._core import RateLimiter

__all__ = ["RateLimiter"]
