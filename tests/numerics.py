"""Numerical checks shared by the tests: our error against a float64 reference may be at most
twice PyTorch's own error in the same dtype, plus a tiny atol."""
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tiny_atol(dtype, ref):
    """A sixteenth of the dtype's epsilon, relative to the reference's scale."""
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return torch.finfo(dtype).eps / 16 * scale


def max_err(a, ref):
    if a.numel() == 0:
        return 0.0
    return float((a.double() - ref.double()).abs().max())


def assert_within_pytorch_error(ours, pytorch, ref, name="output", factor=2.0, atol=None):
    """max|ours - ref| <= factor * max|pytorch - ref| + atol, where ref is float64."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == pytorch.dtype, f"{name}: dtype {ours.dtype} != {pytorch.dtype}"
    atol = tiny_atol(pytorch.dtype, ref) if atol is None else atol
    ours_err, pt_err = max_err(ours, ref), max_err(pytorch, ref)
    assert ours_err <= factor * pt_err + atol, (
        f"{name}: our error {ours_err:.3e} > {factor} x PyTorch's {pt_err:.3e} + atol {atol:.1e}")
    return ours_err, pt_err
