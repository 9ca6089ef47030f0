"""nn.Module drop-ins for LayerNorm and RMSNorm that keep their output, not their input.

Parameters are named `weight` and `bias` as in torch.nn.LayerNorm / torch.nn.RMSNorm, so state
dicts load either way; `from_torch` reuses the stock module's Parameter objects.
"""
import torch
from torch import nn

from ..ops.norm import feature_size, layer_norm_impl, recover_mode, rms_norm_impl


def _single_feature_dim(normalized_shape, cls_name):
    """(N,) for the one normalised (last) dimension; these ops normalise over one dim."""
    return (feature_size(normalized_shape, cls_name),)


def _torch_norm_supported(cls, module, stock_cls, strict):
    """Check that `module` is a `stock_cls` over one trailing dimension, as from_torch needs.

    Returns False (leave it stock) for several trailing dimensions when strict=False.
    """
    if not isinstance(module, stock_cls):
        raise TypeError(f"{cls.__name__}.from_torch expects nn.{stock_cls.__name__}, got {type(module).__name__}")
    if len(module.normalized_shape) != 1:
        if strict:
            raise ValueError(f"{cls.__name__} normalises over the last dimension only; this "
                             f"{stock_cls.__name__} has normalized_shape {tuple(module.normalized_shape)}")
        return False
    return True


def _check_last_dim(x, shape, cls_name):
    if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[-1] != shape[0]):
        raise ValueError(f"{cls_name}: x must have last dimension {shape[0]} (normalized_shape), "
                         f"got shape {tuple(x.shape)}")


class TempoLayerNorm(nn.Module):
    """Drop-in for nn.LayerNorm over the last dimension that saves its output y (shared with the
    next layer) and one fp32 rstd per row for backward, instead of its input and two statistics.

    Attribute `recover_check` (constructor keyword; read at every forward): what the backward
    does where gamma does not let the input be recovered from the output. "clamp" (default)
    keeps the gradients finite with no host sync (gamma clamped by magnitude where it is below one
    step of the output) and warns after the next optimizer step; "exact" (also True) checks on the
    host before every training forward (one sync per call) and keeps the input for that call;
    "off" (also False) does neither (see tempo_ds/ops/norm.py and docs/norm.md).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None,
                 dtype=None, *, recover_check="clamp"):
        super().__init__()
        self.normalized_shape = _single_feature_dim(normalized_shape, type(self).__name__)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.recover_check = recover_mode(recover_check)
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        _check_last_dim(x, self.normalized_shape, type(self).__name__)
        return layer_norm_impl(x, self.weight, self.bias, self.eps, self.recover_check, owner=self)

    @classmethod
    def from_torch(cls, module, strict=True, recover_check="clamp"):
        """Build from an nn.LayerNorm, reusing its Parameter objects (no copy, no re-init).

        A LayerNorm over several trailing dimensions raises ValueError, or returns None when
        strict=False (the swap table uses that to leave it stock).
        """
        if not _torch_norm_supported(cls, module, nn.LayerNorm, strict):
            return None
        new = cls(module.normalized_shape, module.eps, elementwise_affine=False, bias=False,
                  recover_check=recover_check)
        new.elementwise_affine = module.elementwise_affine
        new.weight = module.weight
        new.bias = module.bias
        return new

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"recover_check={self.recover_check}")


class TempoRMSNorm(nn.Module):
    """Drop-in for torch.nn.RMSNorm over the last dimension that saves its output y and one fp32
    rstd per row for backward. eps=None means torch's default (machine epsilon of the math type).

    Attribute `recover_check` as in TempoLayerNorm (the rule with beta_j = 0: |gamma_j| * R <= tiny).
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *,
                 recover_check="clamp"):
        super().__init__()
        self.normalized_shape = _single_feature_dim(normalized_shape, type(self).__name__)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.recover_check = recover_mode(recover_check)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x):
        _check_last_dim(x, self.normalized_shape, type(self).__name__)
        return rms_norm_impl(x, self.weight, self.eps, self.recover_check, owner=self)

    @classmethod
    def from_torch(cls, module, strict=True, recover_check="clamp"):
        """Build from a torch.nn.RMSNorm, reusing its weight Parameter; eps=None stays None.

        An RMSNorm over several trailing dimensions raises ValueError, or returns None when
        strict=False.
        """
        if not _torch_norm_supported(cls, module, nn.RMSNorm, strict):
            return None
        new = cls(module.normalized_shape, module.eps, elementwise_affine=False, recover_check=recover_check)
        new.elementwise_affine = module.elementwise_affine
        new.weight = module.weight
        return new

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"recover_check={self.recover_check}")
