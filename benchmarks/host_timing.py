"""Host time to issue one call, for the host_* diagnostics (CUDA only).

    issue_us(fn, n)   median over n calls of the host time of fn(), the GPU queue emptied before
                      each (a synchronize), so the call measures its own issue cost, not a wait
    back_to_back_us(fn, n)
                      mean host time of n calls issued back to back (what a host-bound loop
                      sees; keep each call's GPU work short so the host stays the bound)
"""
import statistics, time
import torch


def issue_us(fn, n=300):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e6


def back_to_back_us(fn, n=300):
    return _loop_us(fn, n, wait=False)


def wall_us(fn, n=300):
    return _loop_us(fn, n, wait=True)


def _loop_us(fn, n, wait):
    """Mean us per call of ``n`` calls in a loop, the clock read before (``wait``: after) the GPU
    has finished them."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if wait:
        torch.cuda.synchronize()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t
