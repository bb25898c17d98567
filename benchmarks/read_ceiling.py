"""Development benchmark (GPU): how fast the card reads a weight of each decode-grid size, the
ceiling of the weight-streaming GEMMs (gemv, skinny).

    python benchmarks/read_ceiling.py [--out FILE]

A Triton kernel that only reads (int32 words, summed per program into one int32 store) is timed
like bench_gemm.py (median of ``do_bench_cudagraph``, the same buffer every replay) over a sweep
of words per step, warps and programs per SM; the best config per size is the read ceiling. A
device-to-device copy of the same bytes is timed beside it (its TB/s count bytes read plus
written)."""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

SHAPES = [(8192, 8192), (10240, 8192), (57344, 8192), (8192, 28672)]  # the grid's FP8 weights, N x K bytes


@triton.jit
def read_kernel(x_ptr, out_ptr, n_words, programs, BLOCK: tl.constexpr):
    """Program p sums words [p * BLOCK + i * programs * BLOCK, ...) (a grid-stride loop) and
    stores the sum, so the loads cannot be dropped."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    offs = tl.arange(0, BLOCK)
    for start in range(pid * BLOCK, n_words, programs * BLOCK):
        acc += tl.load(x_ptr + start + offs, mask=start + offs < n_words, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def timed(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lines = [f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}; "
             "median us of do_bench_cudagraph; TB/s = 1e12 bytes/s",
             "N x K (MB) | read: best us, TB/s, (words per step, warps, programs per SM) | copy us (read+write TB/s) | all configs"]
    print("\n".join(lines), flush=True)
    for n, k in SHAPES:
        w = torch.randint(-2**31, 2**31 - 1, (n * k // 4,), dtype=torch.int32, device="cuda")
        out = torch.empty(sms * 16, dtype=torch.int32, device="cuda")
        res = {}
        for block, warps, per_sm in itertools.product((1024, 2048, 4096, 8192), (4, 8), (4, 8, 16)):
            progs = sms * per_sm
            res[(block, warps, per_sm)] = timed(
                lambda: read_kernel[(progs,)](w, out, w.numel(), progs, BLOCK=block, num_warps=warps))
        best = min(res, key=res.get)
        dst = torch.empty_like(w)
        copy = timed(lambda: dst.copy_(w))
        nbytes = n * k
        lines.append(f"{n} x {k} ({nbytes / 1e6:.0f}) | {res[best]:.1f} us {nbytes / res[best] / 1e6:.2f} TB/s {best} | "
                     f"{copy:.1f} us ({2 * nbytes / copy / 1e6:.2f}) | "
                     + " ".join(f"{b}/{wp}/{p}:{t:.1f}" for (b, wp, p), t in sorted(res.items())))
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
