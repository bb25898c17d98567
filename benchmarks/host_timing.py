"""Host time to issue one call, for the host_* diagnostics (CUDA only).

    issue_us(fn, n)   median over n calls of the host time of fn(), the GPU queue emptied before
                      each (a synchronize), so the call measures its own issue cost, not a wait
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
