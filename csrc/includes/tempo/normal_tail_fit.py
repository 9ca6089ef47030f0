"""Derives the constants of tempo::normal_tail (gelu.h): the left tail of the standard normal CDF
in fp32 arithmetic, for the GELU forward of 16-bit tensors.

    Phi(-u) = t * 2^(P(t) - u^2 log2(e) / 2),   t = 1 / (1 + B u),   u >= 0,

with P of degree 8 fitted to log2(Phi(-u) e^(u^2/2) / t) on u in [0, U_MAX], minimax in absolute
error (Lawson's iteratively reweighted least squares), so that the error of P is the relative
error of Phi. The transformed tail is smooth and bounded on the whole half-line (P(0) is the
asymptote log2(B / sqrt(2 pi))), so a low degree reaches fp32 precision. Beyond U_MAX Phi(-u)
underflows in fp32.

Run `python csrc/includes/tempo/normal_tail_fit.py` to print the constants; tests/test_gelu.py
checks that the header's constants reach the fit's error.
"""
import math

import torch

B = 0.39 / math.sqrt(2)
DEGREE = 8
U_MAX = 10 * math.sqrt(2)


def _t_nodes(count):
    t_min = 1 / (1 + B * U_MAX)
    k = torch.arange(count, dtype=torch.float64)
    return (t_min + 1) / 2 + (1 - t_min) / 2 * torch.cos(math.pi * k / (count - 1))


def _target(t):
    """log2(Phi(-u) e^(u^2/2) / t) at u(t), from float64 erfcx."""
    u = (1 / t - 1) / B
    return torch.log2(0.5 * torch.special.erfcx(u / math.sqrt(2)) / t)


def fit(nodes=4000, iterations=80):
    """Coefficients of P, lowest degree first (float64)."""
    t = _t_nodes(nodes)
    target = _target(t)
    powers = torch.stack([t ** k for k in range(DEGREE + 1)], dim=1)
    weight = torch.ones_like(t)
    for _ in range(iterations):
        coef = torch.linalg.lstsq(powers * weight[:, None], (target * weight)[:, None]).solution[:, 0]
        err = (powers @ coef - target).abs()
        weight = weight * (err / err.max() + 1e-3).sqrt()
        weight = weight / weight.max()
    return coef


def max_error(coef, points=200001):
    """Largest |P(t) - target| over a dense grid of u in [0, U_MAX] (float64 arithmetic): the
    relative error of the fit itself, before fp32 rounding."""
    u = torch.linspace(0, U_MAX, points, dtype=torch.float64)
    t = 1 / (1 + B * u)
    p = torch.zeros_like(t)
    for c in reversed(coef.tolist()):
        p = p * t + c
    return float((p - _target(t)).abs().max() * math.log(2))


if __name__ == "__main__":
    coef = fit()
    print(f"B = {B:.9e}f, relative error of the fit: {max_error(coef):.2e}, "
          f"with fp32 coefficients: {max_error(coef.float().double()):.2e}")
    print(", ".join(f"{float(torch.tensor(c, dtype=torch.float32)):.9e}f" for c in coef.tolist()))
