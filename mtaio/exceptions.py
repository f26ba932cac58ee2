"""The exceptions mtaio raises.

::

    MTAIOError(Exception)
     ├─ ResourceError                 misuse: closed resource, over-release, ...
     │   └─ ResourceLimitError        a limit refused the request (``retry_after``)
     └─ TimeoutError(MTAIOError, builtins.TimeoutError)   a deadline expired (``timeout``)

``except TimeoutError`` and ``except asyncio.TimeoutError`` (the same class since 3.11) both
catch mtaio's :class:`TimeoutError`.
"""

from __future__ import annotations

import builtins

__all__ = ["MTAIOError", "ResourceError", "ResourceLimitError", "TimeoutError"]


class MTAIOError(Exception):
    """Base class of every exception mtaio raises; ``message`` is ``str(exc)``."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[MTAIOError], tuple[str]]:
        return type(self), (self.message,)


class ResourceError(MTAIOError):
    """A resource was misused: used after ``close()``, released more than acquired, ..."""


class ResourceLimitError(ResourceError):
    """A limit refused the request.

    ``retry_after`` is how many seconds the caller would have had to wait for the request to
    succeed, or ``None`` when waiting would never help (e.g. more tokens than the burst).
    """

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type[ResourceLimitError], tuple[str, float | None]]:  # type: ignore[override]
        return type(self), (self.message, self.retry_after)


class TimeoutError(MTAIOError, builtins.TimeoutError):  # noqa: A001 - the documented name
    """A deadline expired.

    ``timeout`` is the relative timeout (seconds) that was asked for, or ``None`` when the
    deadline was absolute. Raised timeouts chain the ``CancelledError`` that carried them.
    """

    def __init__(self, message: str = "", timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout

    def __reduce__(self) -> tuple[type[TimeoutError], tuple[str, float | None]]:  # type: ignore[override]
        return type(self), (self.message, self.timeout)
