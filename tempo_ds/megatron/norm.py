"""Tempo norms with Megatron's norm constructor: cls(config=, hidden_size=, eps=).

They keep the parameter names and shapes of the stock local spec's norm (WrappedTorchNorm, which
builds torch.nn.LayerNorm or torch.nn.RMSNorm), so checkpoints move freely between the specs, and
they save their output instead of their input for backward (see tempo_ds.modules.norm).

Differences from WrappedTorchNorm, each deliberate:
  * sequence_parallel is supported: like Megatron's FusedLayerNorm, the parameters are marked
    `param.sequence_parallel = True` so that finalize_model_grads (or
    tempo_ds.megatron.parallel.allreduce_sequence_parallel_grads) sums their gradients over the
    tensor-parallel group;
  * memory_efficient_layer_norm (apex's output-saving LayerNorm) is accepted: it is what Tempo does;
  * layernorm_zero_centered_gamma raises NotImplementedError: the output-based backward recovers
    the normalised input as (y - beta) / gamma and would need the +1 shift threaded through it.

The norms use the default recover_check="clamp": no host synchronisation per call, which matters
under ZeRO-3 and with many micro-batches; set the module attribute `recover_check = "exact"` on a
norm whose gamma may sit at zero (docs/norm.md).
"""
from ..modules.norm import TempoLayerNorm, TempoRMSNorm

__all__ = ["TempoNorm", "MegatronTempoLayerNorm", "MegatronTempoRMSNorm"]


def _check_config(config, cls_name):
    if config.layernorm_zero_centered_gamma:
        raise NotImplementedError(
            f"{cls_name}: layernorm_zero_centered_gamma=True is not supported by the Tempo norms; "
            "use the stock spec for this layer norm or set layernorm_zero_centered_gamma=False")


def _mark_sequence_parallel(module, config):
    for param in module.parameters():
        setattr(param, "sequence_parallel", bool(config.sequence_parallel))


def _init_the_megatron_way(module, base, config, hidden_size, eps):
    """base.__init__ (hidden_size, eps) after checking the config, then what Megatron's norms
    carry: the config, and each parameter marked for sequence parallelism when it is on."""
    _check_config(config, type(module).__name__)
    base.__init__(module, hidden_size, eps=eps)
    module.config = config
    _mark_sequence_parallel(module, config)


class MegatronTempoLayerNorm(TempoLayerNorm):
    """TempoLayerNorm built the Megatron way: params `weight`, `bias` of shape [hidden_size]."""

    def __init__(self, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                 zero_centered_gamma=False, normalization="LayerNorm"):
        _init_the_megatron_way(self, TempoLayerNorm, config, hidden_size, eps)


class MegatronTempoRMSNorm(TempoRMSNorm):
    """TempoRMSNorm built the Megatron way: param `weight` of shape [hidden_size] (no bias, as
    torch.nn.RMSNorm)."""

    def __init__(self, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                 zero_centered_gamma=False, normalization="RMSNorm"):
        _init_the_megatron_way(self, TempoRMSNorm, config, hidden_size, eps)


class TempoNorm:
    """Builds the Tempo norm that config.normalization names, as WrappedTorchNorm does for torch's.

    Args (Megatron's norm constructor):
        config: TransformerConfig; normalization "LayerNorm" or "RMSNorm".
        hidden_size: normalised size.
        eps: epsilon (Megatron passes config.layernorm_epsilon).
    """

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization=None):
        kind = config.normalization
        if kind == "LayerNorm":
            return MegatronTempoLayerNorm(config, hidden_size, eps)
        if kind == "RMSNorm":
            return MegatronTempoRMSNorm(config, hidden_size, eps)
        raise NotImplementedError(
            f"TempoNorm: normalization={kind!r} has no Tempo module (LayerNorm and RMSNorm do)")
