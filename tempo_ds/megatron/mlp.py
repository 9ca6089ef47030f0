"""Which Tempo activation a megatron-core MLP runs, decided from the MLP's own config, and putting it
in place: the one decision the layer specs (TempoTransformerLayer) and the swap row of a stock
model (tempo_ds.megatron.swaps) share.

What a stock MLP computes (megatron/core/transformer/mlp.py, 0.16.1 to 0.19):

    config                                     stock computes               Tempo runs
    bias_activation_fusion, F.gelu, no GLU     bias_gelu_impl: GELU(x + b)  ops.bias_gelu, tanh form,
                                               in the tanh form, keeping    one kernel (TempoMLP)
                                               x + b (and b)
    no fusion, a GELU with a Tempo form        activation_func(x + b)       TempoGELU of that form
    (F.gelu, approximate="tanh", openai_gelu,
    gelu_impl, fast_gelu)
    GLU (SwiGLU, GEGLU), Transformer Engine's  stock                        stock, reported
    activation, squared ReLU, erf_gelu, ...

Megatron's bias_gelu_impl computes the tanh approximation whatever activation_func says (F.gelu is
the erf form), so the fused Tempo op takes the tanh form there: the drop-in computes what stock
computes. Either way the MLP keeps its parameters and their names.
"""
import functools
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from ..modules import TempoGELU
from ..ops import bias_gelu, gelu

__all__ = ["MLPActivation", "TempoMLP", "gelu_form", "install_tempo_activation", "mlp_activation",
           "tempo_gelu", "tempo_gelu_tanh"]


def tempo_gelu(x):
    """erf GELU that saves its output and one bit per element (tempo_ds.ops.gelu)."""
    return gelu(x, "none")


def tempo_gelu_tanh(x):
    """tanh GELU (Megatron's openai_gelu / fast_gelu) with Tempo's saving contract."""
    return gelu(x, "tanh")


def gelu_form(fn):
    """The Tempo GELU form ("none" for erf, "tanh") whose math is `fn`'s to rounding, or None.

    F.gelu (also as functools.partial with approximate=) and Megatron's openai_gelu, gelu_impl and
    fast_gelu (whose sqrt(2/pi) is exact to 1e-11) have one. Megatron's erf_gelu has none: it divides
    by 1.41421 instead of sqrt(2), which moves fp32 outputs by about 1e-6, beyond their rounding.
    """
    from megatron.core import activations
    from megatron.core.transformer import utils
    if fn is F.gelu or fn is tempo_gelu:
        return "none"
    if fn is tempo_gelu_tanh:
        return "tanh"
    if isinstance(fn, TempoGELU):
        return fn.approximate
    if isinstance(fn, functools.partial) and fn.func is F.gelu and not fn.args and set(fn.keywords) <= {"approximate"}:
        form = fn.keywords.get("approximate", "none")
        return form if form in ("none", "tanh") else None
    if fn in (utils.openai_gelu, utils.gelu_impl, activations.fast_gelu):
        return "tanh"
    return None


def _name(fn):
    return getattr(fn, "__name__", type(fn).__name__)


def _is_tempo(fn):
    return fn in (tempo_gelu, tempo_gelu_tanh) or isinstance(fn, TempoGELU)


@dataclass(frozen=True)
class MLPActivation:
    """What an MLP of a given config and activation runs under Tempo.

    form: "none" or "tanh", the GELU form stock computes; None when the MLP stays stock.
    fused: bias and GELU in one kernel (stock fuses them: bias_activation_fusion).
    reason: why the MLP stays stock (None when it runs Tempo's GELU).
    """
    form: Optional[str]
    fused: bool = False
    reason: Optional[str] = None


def mlp_activation(config, fn):
    """The MLPActivation of an MLP built from `config` whose activation is `fn`."""
    if getattr(config, "use_te_activation_func", False):
        return MLPActivation(None, reason="use_te_activation_func builds Transformer Engine's activation")
    if config.gated_linear_unit:
        return MLPActivation(None, reason=f"gated_linear_unit (a GLU of {_name(fn)}, e.g. SwiGLU) has no "
                                          "Tempo form; it calls config.activation_func inside its GLU")
    if config.bias_activation_fusion:
        # stock compares with F.gelu (==) and then runs bias_gelu_impl, the tanh form
        if fn is F.gelu and config.add_bias_linear:
            return MLPActivation("tanh", fused=True)
        return MLPActivation(None, reason=f"bias_activation_fusion with {_name(fn)}: stock fuses only GELU "
                                          "with a bias")
    # Megatron-LM's --openai-gelu sets activation_func=openai_gelu; older configs carry the flag.
    form = "tanh" if getattr(config, "openai_gelu", False) else gelu_form(fn)
    if form is None:
        return MLPActivation(None, reason=f"activation_func {_name(fn)} has no Tempo form equal to it "
                                          "to rounding")
    return MLPActivation(form)


class TempoMLP(MLP):
    """Megatron's MLP (same parameters, same constructor) running Tempo's fused bias-GELU where
    stock runs bias_gelu_impl. Made from a built MLP by install_tempo_activation, so the
    TransformerLayer that builds it passes it the tensor-parallel group as to a stock MLP (it does
    so only for modules that are exactly MLP)."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        """fc1, bias-GELU (ops.bias_gelu, the form in self.activation_func), fc2; returns
        (output, output bias) as MLP.forward. Saved by the activation: its output + 1 bit."""
        if per_token_scale is not None:
            # MoE experts' scaled path: stock raises for bias-GELU with per_token_scale
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        intermediate = bias_gelu(intermediate, bias, self.activation_func.approximate)
        return self.linear_fc2(intermediate)


def install_tempo_activation(mlp):
    """Make the built stock MLP `mlp` run the Tempo activation of what it computes (mlp_activation),
    in place, its parameters untouched. Returns None when done (or when it already runs Tempo's),
    else the reason it stays stock."""
    if type(mlp) is TempoMLP or _is_tempo(mlp.activation_func):
        return None
    plan = mlp_activation(mlp.config, mlp.activation_func)
    if plan.reason is not None:
        return plan.reason
    # Into the instance's __dict__, as the stock MLP keeps its function, not registered as a child
    # module: MLP.sharded_state_dict calls sharded_state_dict() on every child (distributed
    # checkpoints), which TempoGELU, holding no state, does not have.
    vars(mlp)["activation_func"] = TempoGELU(plan.form)
    if plan.fused:
        # Same object, same state: only forward changes (a new module would need TransformerLayer's
        # constructor arguments and re-created parameters).
        mlp.__class__ = TempoMLP
    return None
