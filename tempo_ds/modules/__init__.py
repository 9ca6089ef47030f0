"""nn.Module drop-ins holding parameters; `from_torch(module)` reuses the original weights."""
from .activation import TempoGELU

__all__ = ["TempoGELU"]
