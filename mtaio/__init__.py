"""mtaio: asyncio resource control — rate limits, concurrency limits, deadlines, clean-up.

The public API lives in :mod:`mtaio.resources` and :mod:`mtaio.exceptions`; importing this
package itself loads neither.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
