"""The public API: rate limiting, concurrency limiting, deadlines and grouped clean-up."""

from __future__ import annotations

from mtaio.resources.concurrency import ConcurrencyLimiter
from mtaio.resources.group import ResourceGroup
from mtaio.resources.rate import RateLimiter
from mtaio.resources.timeout import Timeout, TimeoutManager

__all__: list[str] = [
    "ConcurrencyLimiter",
    "RateLimiter",
    "ResourceGroup",
    "Timeout",
    "TimeoutManager",
]
