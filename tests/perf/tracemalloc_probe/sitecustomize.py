"""``bench_memory.py --tracemalloc``: traces the Python allocations of the ldapsync server it starts.

Python imports ``sitecustomize`` at start from ``PYTHONPATH``; the bench puts this folder there and
names a directory in ``LDAPSYNC_BENCH_TRACEMALLOC_DIR``.  In the server process (twistd) only,
tracing starts at once and each SIGUSR2 writes a snapshot (``snap.<n>``) to that directory, which
the bench compares.  Anything else started with this PYTHONPATH is left alone.
"""

import os
import sys

_DIR = os.environ.get("LDAPSYNC_BENCH_TRACEMALLOC_DIR")
if _DIR and os.path.basename(sys.argv[0] if sys.argv else "") == "twistd":
    import signal
    import tracemalloc

    tracemalloc.start(8)
    _taken = [0]

    def _snapshot(*_args):
        _taken[0] += 1
        tracemalloc.take_snapshot().dump(os.path.join(_DIR, f"snap.{_taken[0]}"))

    signal.signal(signal.SIGUSR2, _snapshot)
