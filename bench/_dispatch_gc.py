"""dispatch.py with its garbage collector timed: for ``throughput.py --farm --gc-stats`` only.

Each collection's CPU time (the thread's, from the "start" to the "stop" callback) is added up
per generation, and the file named by BENCH_GC_LOG gets one JSON line a second: the time, per
generation [collections, seconds], and the collections of 10 ms or more ([time, generation,
seconds], the last 500). With BENCH_GC_THRESHOLD="a,b,c", ``gc.set_threshold(a, b, c)`` first (a
what-if; the dispatch module itself is unchanged).
"""

import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dispatch  # noqa: E402

_totals = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
_long: list = []
_started = [0.0]


def _timed(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.thread_time()
        return
    spent = time.thread_time() - _started[0]
    total = _totals[info["generation"]]
    total[0] += 1
    total[1] += spent
    if spent >= 0.01:
        _long.append([round(time.time(), 3), info["generation"], round(spent, 4)])
        del _long[:-500]


def _write(path: str) -> None:
    while True:
        time.sleep(1)
        line = json.dumps({"time": time.time(), "generations": _totals, "long": _long})
        with open(path, "a") as log:
            log.write(line + "\n")


if os.environ.get("BENCH_GC_THRESHOLD"):
    gc.set_threshold(*(int(x) for x in os.environ["BENCH_GC_THRESHOLD"].split(",")))
gc.callbacks.append(_timed)
if os.environ.get("BENCH_GC_LOG"):
    threading.Thread(target=_write, args=(os.environ["BENCH_GC_LOG"],), daemon=True).start()

if __name__ == "__main__":
    sys.exit(dispatch.main(sys.argv[1:]))
