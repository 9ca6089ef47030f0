"""Numerical checks shared by the tests: our error against a float64 reference may be at most
twice PyTorch's own error in the same dtype, plus a tiny atol."""
import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tiny_atol(dtype):
    """A sixteenth of the dtype's epsilon. Not scaled by the data: a scale taken from max|ref|
    let one large value (GELU's x = 1e4) widen the check of all the others."""
    return torch.finfo(dtype).eps / 16


def max_err(a, ref):
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - ref.detach().double()).abs().max())


def scaled_err(a, ref):
    """max over elements of |a - ref| / max(1, |ref|): the error relative to each value's own size
    above 1, absolute below, so that data spanning many powers of two (GELU's inputs, from 1e-3
    to 1e4) is checked at every magnitude."""
    if a.numel() == 0:
        return 0.0
    ref = ref.detach().double()
    return float(((a.detach().double() - ref).abs() / ref.abs().clamp(min=1.0)).max())


def assert_within_pytorch_error(ours, pytorch, ref, name="output", factor=2.0, atol=None, err=max_err):
    """err(ours, ref) <= factor * err(pytorch, ref) + atol, where ref is float64.

    err is max_err (largest absolute error) by default; scaled_err suits data whose magnitudes
    span many powers of two, where the largest values' rounding would set the bound for all."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == pytorch.dtype, f"{name}: dtype {ours.dtype} != {pytorch.dtype}"
    atol = tiny_atol(pytorch.dtype) if atol is None else atol
    ours_err, pt_err = err(ours, ref), err(pytorch, ref)
    assert ours_err <= factor * pt_err + atol, (
        f"{name}: our error {ours_err:.3e} > {factor} x PyTorch's {pt_err:.3e} + atol {atol:.1e} "
        f"({err.__name__})")
    return ours_err, pt_err


def assert_double_backward_raises(out, leaf):
    """A gradient penalty through the op that made `out` from `leaf`: the op's backward is not
    differentiable, so differentiating the gradient must raise rather than silently drop the op's
    second-order term. (The leaf's own square keeps the graph connected, so without
    once_differentiable the penalty would back-propagate without a word.)"""
    grad, = torch.autograd.grad(out.float().square().sum(), [leaf], create_graph=True)
    penalty = grad.float().square().sum() + leaf.float().square().sum()
    with pytest.raises(RuntimeError, match="differentiate twice"):
        penalty.backward()
