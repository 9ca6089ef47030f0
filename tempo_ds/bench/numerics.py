"""`python -m tempo_ds.bench numerics`: gradient error of the in-place GELU against float64,
next to PyTorch's own error in the same dtype (the figures in docs/gelu.md)."""
import torch
import torch.nn.functional as F

from .. import ops
from .machine import header, machine_info


def _errors(dtype, approximate, x64):
    x = x64.to(dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = []
    for fn, inp in ((ops.gelu, x), (F.gelu, x), (F.gelu, x.double())):
        leaf = inp.detach().clone().requires_grad_()
        fn(leaf, approximate=approximate).backward(dy.to(leaf.dtype))
        grads.append(leaf.grad.double())
    ours, pt, ref = grads
    stats = {}
    for name, g in (("tempo", ours), ("pytorch", pt)):
        err = (g - ref).abs()
        stats[name] = (float(err.max()), float(err.pow(2).mean().sqrt()))
    return stats


def add_arguments(p):
    """`python -m tempo_ds.bench numerics` has no options: fixed inputs (seeded) and every dtype
    and form, so that its figures are the ones docs/gelu.md quotes."""
    p.description = __doc__


def main(args=None):
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "randn*2": torch.randn(1 << 18, generator=gen, dtype=torch.float64) * 2,
        "|x-x*|<0.05": -0.7518 + (torch.rand(1 << 16, generator=gen, dtype=torch.float64) - 0.5) * 0.1,
    }
    print(header(machine_info(), "cpu"))  # the comparisons run on the CPU build
    print(f"{'dtype':<10}{'form':<6}{'inputs':<14}{'max err':>11}{'PyTorch':>11}{'rms err':>11}{'PyTorch':>11}")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for approximate in ("none", "tanh"):
            for label, x64 in inputs.items():
                s = _errors(dtype, approximate, x64)
                print(f"{str(dtype).split('.')[-1]:<10}{approximate:<6}{label:<14}{s['tempo'][0]:>11.2e}"
                      f"{s['pytorch'][0]:>11.2e}{s['tempo'][1]:>11.2e}{s['pytorch'][1]:>11.2e}")
    return 0
