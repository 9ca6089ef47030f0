"""nn.Module drop-ins holding parameters; `from_torch(module)` reuses the original weights."""
from .activation import TempoGELU
from .dropout import TempoDropout
from .norm import TempoLayerNorm, TempoRMSNorm

__all__ = ["TempoDropout", "TempoGELU", "TempoLayerNorm", "TempoRMSNorm"]
