"""What running e5m2 operands through an e4m3 GEMM (cuBLAS blockwise takes e4m3 only) would cost in
accuracy: each e5m2-quantized operand re-encoded as e4m3 (value q * 2^-7, scale * 2^7; exact for |q| >= 1,
the rest rounded to multiples of 0.25), the GEMM compared in float64 with the e5m2 product and the true one.
CPU only (the reference math):

    PYTHONPATH=. python benchmarks/e5m2_reencode.py

Session 13: results/e5m2-reencode-cpu-2026-11-27-s13.txt. Not a library feature (see NOTES.md).
"""
import torch
from blockwise_fp8 import reference as R
torch.manual_seed(0)
def reencode(q, s):
    q2 = (q.float() * 2.0**-7).to(torch.float8_e4m3fn)
    return q2, s * 128.0
def sq(ref, x):
    return float(20 * torch.log10(ref.norm() / (ref - x).norm()))
M, N, K = 256, 512, 4096
for name, gen in (("normal", lambda *s: torch.randn(*s, dtype=torch.float64)),
                  ("log-uniform 2^-30..1, random sign", lambda *s: torch.sign(torch.randn(*s, dtype=torch.float64)) * 2.0 ** (-30 * torch.rand(*s, dtype=torch.float64))),
                  ("normal with 1% outliers x1e4", lambda *s: torch.randn(*s, dtype=torch.float64) * torch.where(torch.rand(*s) < 0.01, 1e4, 1.0))):
    x, w = gen(M, K), gen(N, K)
    aq, as_ = R.quantize(x, (1, 128), torch.float8_e5m2)
    wq, ws = R.quantize(w, (128, 128), torch.float8_e5m2)
    aq2, as2 = reencode(aq, as_)
    wq2, ws2 = reencode(wq, ws)
    ch_a = int(((aq2.double() * 128) != aq.double()).sum()); ch_w = int(((wq2.double() * 128) != wq.double()).sum())
    ref = R._dequantize_f64(aq, as_, (1, 128)) @ R._dequantize_f64(wq, ws, (128, 128)).T
    alt = R._dequantize_f64(aq2, as2, (1, 128)) @ R._dequantize_f64(wq2, ws2, (128, 128)).T
    true = x @ w.T
    print(f"{name}: changed {ch_a}/{aq.numel()} act, {ch_w}/{wq.numel()} weight elements; "
          f"max |alt - e5m2| / max|e5m2| = {float((alt - ref).abs().max() / ref.abs().max()):.2e}; "
          f"SQNR vs true: e5m2 {sq(true, ref):.4f} dB, re-encoded {sq(true, alt):.4f} dB")
