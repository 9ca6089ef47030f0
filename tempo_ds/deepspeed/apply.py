"""Apply a TempoConfig to a model that was built stock: build the ops, swap the modules.

Two declarative tables drive it, beside the generic module table in tempo_ds.modules.swap:
- modules: every child whose class has a row in tempo_ds.modules.swap.SWAPS (nn.GELU,
  nn.LayerNorm — which is what Megatron's WrappedTorchNorm builds —, nn.Dropout, Megatron's
  DotProductAttention once the attention row is registered, ...).
- ATTRIBUTE_SWAPS: functions stored as attributes rather than modules, which no module walk can
  see. Megatron's MLP keeps `config.activation_func` (e.g. F.gelu) in `self.activation_func`; its
  TransformerLayer keeps the bias-dropout-add factory in `self_attn_bda` and `mlp_bda`.
- Megatron's DotProductAttention becomes TempoCoreAttention (a subclass with the same constructor
  and forward) on the path that "tempo.attention" names.
A model already built from the Tempo specs has nothing left to swap; that is not an error.
"""
import logging
from dataclasses import dataclass
from typing import Callable

from ..modules.swap import swap_modules

logger = logging.getLogger("tempo_ds")


@dataclass(frozen=True)
class AttributeSwap:
    """Instances of `owner` (import path "module:Class") whose attribute in `attrs` holds a
    function that `replacement` maps to a Tempo callable (which has no parameters) get that
    callable, unless `blocked(instance)` gives a reason to leave the instance stock."""
    owner: str
    attrs: tuple
    kind: str
    replacement: Callable  # stock function -> factory of the Tempo callable, or None
    blocked: Callable = lambda module: None  # instance -> why it must stay stock, or None


def _gelu_replacement(fn):
    from ..megatron.specs import gelu_form
    from ..modules import TempoGELU
    # Twins to rounding only (gelu_form): erf_gelu, quick_gelu and silu stay stock.
    form = gelu_form(fn)
    return None if form is None else (lambda: TempoGELU(form))


def _mlp_runs_activation_attribute(mlp):
    """Why MLP.forward would not call mlp.activation_func, or None when it does."""
    config = mlp.config
    if getattr(config, "use_te_activation_func", False):
        return "use_te_activation_func builds Transformer Engine's activation"
    if config.bias_activation_fusion:
        return "bias_activation_fusion runs Megatron's fused bias-GELU, chosen by the function itself"
    if config.gated_linear_unit:
        return "gated_linear_unit calls config.activation_func inside its GLU"
    return None


def _bda_replacement(fn):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    from ..megatron.bda import get_tempo_bias_dropout_add
    return (lambda: get_tempo_bias_dropout_add) if fn is get_bias_dropout_add else None


ATTRIBUTE_SWAPS = (
    AttributeSwap("megatron.core.transformer.mlp:MLP", ("activation_func",), "gelu",
                  _gelu_replacement, _mlp_runs_activation_attribute),
    AttributeSwap("megatron.core.transformer.transformer_layer:TransformerLayer",
                  ("self_attn_bda", "mlp_bda"), "dropout", _bda_replacement),
)


def _import_owner(path):
    import importlib
    module, cls = path.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        return None


def swap_attributes(model, kinds):
    """Apply ATTRIBUTE_SWAPS to `model` in place; returns {kind: count}. An instance that a row's
    `blocked` keeps stock is logged as a warning (once per reason), not counted."""
    counts = {}
    for row in ATTRIBUTE_SWAPS:
        if row.kind not in kinds:
            continue
        owner = _import_owner(row.owner)
        if owner is None:
            continue
        warned = set()
        for name, module in model.named_modules():
            if not isinstance(module, owner):
                continue
            for attr in row.attrs:
                factory = row.replacement(getattr(module, attr, None))
                if factory is None:
                    continue
                reason = row.blocked(module)
                if reason is not None:
                    if reason not in warned:
                        warned.add(reason)
                        logger.warning("tempo_ds: %s %s keeps the stock %s: %s (first: %s)", row.owner.split(":")[1],
                                       attr, row.kind, reason, name or "the model")
                    continue
                setattr(module, attr, factory())
                counts[row.kind] = counts.get(row.kind, 0) + 1
    return counts


def _attention_from_stock(module, path):
    """TempoCoreAttention with the constructor arguments `module` (a DotProductAttention) was
    built with, its state (softmax_offset, when the config has one) and its train/eval mode."""
    from ..megatron.core_attention import TempoCoreAttention
    new = TempoCoreAttention(
        config=module.config, layer_number=module.layer_number, attn_mask_type=module.attn_mask_type,
        attention_type=module.attention_type, attention_dropout=module.attention_dropout.p,
        pg_collection=module.pg_collection, path=path)
    # module.softmax_scale is the constructor's scale already divided by the layer-scaling
    # coefficient; passing it to the constructor would divide it again
    new.softmax_scale = module.softmax_scale
    new.load_state_dict(module.state_dict())
    new.train(module.training)
    return new


def _check_attention_path(model, path):
    """"flash" cannot apply a padding mask, which every forward of a padding-mask attention (BERT's)
    passes: refused before anything is swapped, naming the setting."""
    try:
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        from megatron.core.transformer.enums import AttnMaskType
    except ImportError:
        return
    if path == "flash" and any(type(m) is DotProductAttention and m.attn_mask_type == AttnMaskType.padding
                               for m in model.modules()):
        from .config import TempoConfigError
        raise TempoConfigError('"tempo.attention": "flash" cannot apply the padding mask of this model\'s '
                               'attention (BERT); use "auto" or "tempo"')


def swap_attention(model, path):
    """Replace every stock DotProductAttention (exact class) by TempoCoreAttention; returns the count.
    swap_model checks first that the path can serve the model (_check_attention_path)."""
    try:
        from megatron.core.transformer.dot_product_attention import DotProductAttention
    except ImportError:
        return 0
    count = 0
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is DotProductAttention:
                setattr(parent, name, _attention_from_stock(child, path))
                count += 1
    return count


def swap_model(model, config, log=True):
    """Swap the stock modules of `model` that `config` (a TempoConfig) turns on, in place.

    Returns {kind: count}; with `log`, logs one line per kind, e.g.
    "tempo_ds: swapped 4 gelu module(s)".
    """
    kinds = set(config.kinds)
    if "attention" in kinds:
        _check_attention_path(model, config.attention)
    counts = swap_modules(model, kinds=kinds - {"attention"})
    for kind, n in swap_attributes(model, kinds).items():
        counts[kind] = counts.get(kind, 0) + n
    if "attention" in kinds:
        n = swap_attention(model, config.attention)
        if n:
            counts["attention"] = n
    if log:
        for kind in sorted(kinds - {"rmsnorm"} | set(counts)):
            logger.info("tempo_ds: swapped %d %s module(s)%s", counts.get(kind, 0), kind,
                        "" if counts.get(kind) else " (no stock ones left)")
    return counts


def prepare_ops(config, device_type):
    """Build (or find prebuilt) every op family for `device_type` before training starts.

    With build="prebuilt" a family that was not installed with TEMPO_BUILD_OPS=1 is an error here,
    not a JIT build in the middle of the first step.
    """
    from ..op_builder import FAMILIES

    index = {"cpu": 0, "cuda": 1}.get(device_type)
    if index is None:
        raise NotImplementedError(f"tempo_ds has no ops for device type {device_type!r}")
    loaded = []
    for family, builders in sorted(FAMILIES.items()):
        builder = builders[index]()
        if config.build == "prebuilt" and builder.prebuilt() is None:
            raise RuntimeError(
                f'"tempo.build": "prebuilt" but op {builder.NAME} is not prebuilt, or its prebuilt '
                f'module was built from other sources than csrc/ holds now; install with '
                f'TEMPO_BUILD_OPS=1 pip install . or set "tempo.build": "jit"')
        builder.load(verbose=False)
        loaded.append(builder.NAME)
    logger.info("tempo_ds: ops ready (%s, build=%s): %s", device_type, config.build, ", ".join(loaded))
    return loaded
