"""Launch-shape sweep behind the norm and GELU kernels' block sizes (docs/norm.md, docs/gelu.md).

A record of the experiment, not part of the package: sweep.cu holds bf16-only copies of the
kernels with the shape as a template parameter. Run on one H100 80GB HBM3 on 2026-11-27 with
`TORCH_CUDA_ARCH_LIST=9.0 python docs/results/h100_2026-11-27/sweep/sweep.py`; its output is
sweep.json beside this file. Prints the median ms of 25 calls per variant.
"""
import json, os, sys, time
import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

here = os.path.dirname(os.path.abspath(__file__))
t0 = time.time()
ext = load(name="tempo_sweep", sources=[os.path.join(here, "sweep.cu")],
           extra_include_paths=[os.path.join(here, "..", "..", "..", "..", "csrc", "includes")],
           extra_cuda_cflags=["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                              "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"],
           verbose=False)
print(f"built in {time.time() - t0:.0f}s", flush=True)
dev = torch.device("cuda")
print(torch.cuda.get_device_name(), torch.__version__)
out = {}

def med(fn, reps=25):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]

def rec(name, ms, nbytes=None):
    gbs = nbytes / ms / 1e6 if nbytes else None
    out[name] = {"ms": ms, "GBps": gbs}
    print(f"{name:40s} {ms:8.4f} ms" + (f"  {gbs:7.0f} GB/s" if gbs else ""), flush=True)

src = torch.empty(1 << 29, dtype=torch.float16, device=dev); dst = torch.empty_like(src)
rec("copy 1GiB", med(lambda: dst.copy_(src)), 2 << 30)
del src, dst

M, N = 65536, 4096
x = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
w = (1 + 0.1 * torch.randn(N, device=dev)).bfloat16()
b = (0.1 * torch.randn(N, device=dev)).bfloat16()
E = x.numel() * 2
# stock
rec("stock ln fwd", med(lambda: F.layer_norm(x, (N,), w, b, 1e-5)), 2 * E)
xr = x.clone().requires_grad_(); wr = w.clone().requires_grad_(); br = b.clone().requires_grad_()
yo = F.layer_norm(xr, (N,), wr, br, 1e-5); g = torch.randn_like(yo)
rec("stock ln bwd (autograd)", med(lambda: torch.autograd.grad(yo, [xr, wr, br], g, retain_graph=True)), 3 * E)
# recover check cost (what tempo_ds.ops.norm does before each forward)
def check():
    gam = w.float().abs(); bad = gam == 0
    bad |= gam * (1.0 / (16 * torch.finfo(torch.bfloat16).eps)) <= b.float().abs()
    return bool(bad.any())
rec("recover check + sync", med(check))
rec("stock ln fwd + check", med(lambda: (check(), F.layer_norm(x, (N,), w, b, 1e-5))))
# variants
y = torch.empty_like(x); rstd = torch.empty(M, device=dev)
ref = F.layer_norm(x.float(), (N,), w.float(), b.float(), 1e-5)
for v in range(7):
    rec(f"ln fwd v{v}", med(lambda: ext.ln_fwd(v, x, w, b, y, rstd)), 2 * E)
    out[f"ln fwd v{v}"]["err"] = float((y.float() - ref).abs().max())
dy = g
dx = torch.empty_like(x); dw = torch.empty_like(w); db = torch.empty_like(b)
ext.ln_fwd(0, x, w, b, y, rstd)
for v in range(6):
    for chunks in (512, 1024, 2048):
        gp = torch.empty(chunks, N, device=dev); bp = torch.empty(chunks, N, device=dev)
        try:
            rec(f"ln bwd v{v} chunks {chunks}", med(lambda: ext.ln_bwd(v, chunks, dy, y, rstd, w, b, dx, gp, bp, dw, db)), 3 * E)
        except Exception as e:
            print(f"ln bwd v{v}: {e}")
# GELU
n = x.numel()
rec("stock gelu erf fwd", med(lambda: F.gelu(x)), 2 * E)
rec("stock gelu tanh fwd", med(lambda: F.gelu(x, approximate="tanh")), 2 * E)
rec("stock gelu bwd", med(lambda: torch.ops.aten.gelu_backward(g, x)), 3 * E)
bits = torch.empty(n // 8, dtype=torch.uint8, device=dev)
table = torch.rand(2, 65536, device=dev)
yg = torch.empty_like(x)
for tanh in (False, True):
    for unroll in (1, 2, 4):
        for full in (0, 1):
            for threads in (128, 256):
                rec(f"gelu {'tanh' if tanh else 'erf'} fwd u{unroll} full{full} t{threads}",
                    med(lambda: ext.gelu_fwd(unroll, full, tanh, threads, x, yg, bits)), 2 * E + n // 8)
ext.gelu_fwd(1, 0, False, 256, x, yg, bits)
dxg = torch.empty_like(x)
for unroll in (1, 2, 4):
    for full in (0, 1):
        for threads in (128, 256):
            rec(f"gelu bwd u{unroll} full{full} t{threads}",
                med(lambda: ext.gelu_bwd(unroll, full, threads, table, g, yg, bits, dxg)), 3 * E + n // 8)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "sweep.json"), "w"), indent=1)
