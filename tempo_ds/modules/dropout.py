"""nn.Module drop-in for dropout."""
from torch import nn

from ..ops.dropout import dropout


class TempoDropout(nn.Module):
    """Drop-in for nn.Dropout that keeps an 8-byte seed for backward instead of a 1-byte-per-element
    mask; the mask is regenerated from the seed (see tempo_ds.ops.dropout)."""

    def __init__(self, p=0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)

    @classmethod
    def from_torch(cls, module):
        """Build from an nn.Dropout (no parameters; `inplace` has no meaning without a saved mask).
        p = 1 (drop everything) is left stock: returns None so that swap_modules keeps it."""
        if not isinstance(module, nn.Dropout):
            raise TypeError(f"TempoDropout.from_torch expects nn.Dropout, got {type(module).__name__}")
        if module.p >= 1.0:
            return None
        new = cls(module.p)
        new.train(module.training)
        return new

    def extra_repr(self):
        return f"p={self.p}"
