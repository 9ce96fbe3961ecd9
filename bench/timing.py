"""The benchmarks' shared timer."""
from __future__ import annotations

import time


def best_of(fn, reps: int) -> float:
    """Best wall seconds of `reps` calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
