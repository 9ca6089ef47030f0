"""One generic mechanism to swap stock modules for Tempo ones, driven by a small table.

Each entry maps a stock module class to a function that builds the Tempo module from it and
reuses its parameters (no re-initialisation). A filter sees (module, qualified_name) and can
keep any module stock.
"""
from functools import partial

from torch import nn

from .activation import TempoGELU
from .dropout import TempoDropout
from .norm import TempoLayerNorm, TempoRMSNorm

# stock class -> (kind, builder). Later op families add their rows with register().
SWAPS = {
    nn.GELU: ("gelu", TempoGELU.from_torch),
    nn.Dropout: ("dropout", TempoDropout.from_torch),
    # norms over several trailing dimensions stay stock (from_torch declines them)
    nn.LayerNorm: ("layernorm", partial(TempoLayerNorm.from_torch, strict=False)),
    nn.RMSNorm: ("rmsnorm", partial(TempoRMSNorm.from_torch, strict=False)),
}


def register(stock_cls, kind, builder):
    """Add a row to the swap table: instances of `stock_cls` become `builder(module)`."""
    SWAPS[stock_cls] = (kind, builder)


def swap_modules(model, module_filter=None, kinds=None):
    """Replace, in place, every stock module that has a Tempo twin.

    Args:
        model: the nn.Module to convert (it may itself be swapped only if wrapped; the root is kept).
        module_filter: optional callable (module, qualified_name) -> bool; False keeps it stock.
        kinds: optional set of kinds to swap (e.g. {"gelu", "layernorm"}); None swaps all.

    Returns: dict kind -> number of modules swapped.
    """
    counts = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            row = SWAPS.get(type(child))
            if row is None:
                continue
            kind, builder = row
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            if kinds is not None and kind not in kinds:
                continue
            if module_filter is not None and not module_filter(child, qualified):
                continue
            new = builder(child)
            if new is None:  # the builder declined (e.g. an unsupported configuration)
                continue
            setattr(parent, child_name, new)
            counts[kind] = counts.get(kind, 0) + 1
    return counts
