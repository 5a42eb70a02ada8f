"""dispatch.py with ``PRAGMA synchronous = FULL``: an fsync at every commit.

Used only by ``throughput.py --peers --durability full`` to match Redis with
``appendfsync always``. Everything else is the unmodified dispatch module; the pragma is set
right after dispatch opens its own connection.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dispatch  # noqa: E402

_open = dispatch.Store.open.__func__


async def _open_full(cls, where, clock=None):
    store = await _open(cls, where, clock)
    await store.engine.all("PRAGMA synchronous = FULL")
    return store


dispatch.Store.open = classmethod(_open_full)

if __name__ == "__main__":
    sys.exit(dispatch.main(sys.argv[1:]))
