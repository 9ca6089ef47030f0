"""The "tempo" key of ds_config: parse, validate, apply (tempo_ds.initialize)."""
from .config import TempoConfig, TempoConfigError, split_config

__all__ = ["TempoConfig", "TempoConfigError", "initialize", "MegatronMPU", "split_config"]


def __getattr__(name):
    # deepspeed and megatron are heavy imports; load them only when these names are used.
    if name == "initialize":
        from .engine import initialize
        return initialize
    if name == "MegatronMPU":
        from .mpu import MegatronMPU
        return MegatronMPU
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
