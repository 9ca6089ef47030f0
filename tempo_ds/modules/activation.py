"""nn.Module drop-ins for activations."""
from torch import nn

from ..ops import gelu


class TempoGELU(nn.Module):
    """Drop-in for nn.GELU that keeps its output (shared with the next layer) and one branch bit
    per element for backward, instead of its input."""

    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return gelu(x, self.approximate)

    @classmethod
    def from_torch(cls, module):
        """Build from an nn.GELU (it has no parameters)."""
        if not isinstance(module, nn.GELU):
            raise TypeError(f"TempoGELU.from_torch expects nn.GELU, got {type(module).__name__}")
        return cls(module.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"
