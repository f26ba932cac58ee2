"""The public API: rate limiting, concurrency limiting, deadlines and grouped clean-up."""

from __future__ import annotations

__all__: list[str] = []
