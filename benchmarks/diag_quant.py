"""GPU diagnostic: our activation/weight quant kernels vs reference.quantize computed on the CPU."""
import torch
from blockwise_fp8 import reference
from blockwise_fp8.kernels import quant as Q

torch.manual_seed(0)
for shape, gm in (((64, 1024), 1), ((256, 384), 128)):
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = (torch.randn(shape) * 3).to(torch.bfloat16)
        q, s = Q.quantize(x.cuda(), gm, 128, dt)
        qr, sr = reference.quantize(x.float(), (gm, 128), dt)
        qb, qrb = q.cpu().view(torch.uint8), qr.view(torch.uint8)
        bad = (qb != qrb)
        print(shape, gm, dt, "scale equal", torch.equal(s.cpu(), sr), "q mismatches", int(bad.sum()), "of", bad.numel())
        if bad.any():
            i = bad.nonzero()[:5]
            for r, c in i.tolist():
                sc = s.cpu()[r // gm, c // 128].item()
                print("   x", x[r, c].item(), "x/s", x[r, c].float().item() / sc, "kernel", q.cpu()[r, c].float().item(),
                      "ref", qr[r, c].float().item(), "scale k/r", sc, sr[r // gm, c // 128].item())
