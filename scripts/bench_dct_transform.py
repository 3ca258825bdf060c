"""DCT of an (s, l) gradient along its short side: one matmul with the (s, s) basis vs Makhoul FFT.

Run alone on a quiet machine: .venv/bin/python scripts/bench_dct_transform.py
"""
import time, torch
from gradlore.projectors.dct import dct_fft, dct_basis
torch.set_num_threads(2)
def med(f, n=5):
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]
for s,l in [(256,1024),(512,512),(512,1376),(768,2048),(1024,1024),(1024,2752),(2048,2048),(2048,5461)]:
    g=torch.randn(s,l)
    q=dct_basis(s)
    a=med(lambda: q.mT@g); b=med(lambda: dct_fft(g))
    gt=torch.randn(l,s).mT
    c=med(lambda: q.mT@gt); d=med(lambda: dct_fft(gt))
    err=(q.mT@g-dct_fft(g)).abs().max().item()
    print(f"{s}x{l}: matmul {a*1e3:.1f} ms fft {b*1e3:.1f} ms | transposed view: matmul {c*1e3:.1f} fft {d*1e3:.1f} | maxdiff {err:.1e}")
