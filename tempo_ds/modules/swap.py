"""The one mechanism that swaps stock parts of a model for Tempo ones, driven by rows.

A row is one of two things:
- a ModuleRow: a stock module class (matched exactly) and a builder of the Tempo module from an
  instance, reusing its parameters (no re-initialisation); or
- an AttributeRow: an owner class and attribute names that hold a function (Megatron's MLP keeps
  its activation in `self.activation_func`), and the Tempo callable that replaces it. No module
  walk can see such a function otherwise.
Either may name a reason, per instance, to leave it stock (`blocked`), or a reason to refuse the
whole swap before anything changes (`refuse`, e.g. an attention path that cannot serve the model).
An IdleRow names child modules that their owner holds but never calls (Hugging Face attention keeps
an nn.Dropout and reads only its `.p`): those are neither swapped nor counted, and the report lists
them apart as "never called". A table, not a count of calls in a first step: the swap happens
before any forward, and a call count would misjudge a module that runs in some steps only.

The torch rows (nn.GELU, nn.Dropout, nn.LayerNorm, nn.RMSNorm, and nn.MultiheadAttention, which has
no twin) live here. Rows for a framework live in the layer that knows it and register themselves on
import: PROVIDERS maps a framework's module to ours, imported only when the framework is in
sys.modules already (a model of that framework implies it), so nothing here imports Megatron.

swap_modules() walks the model once and returns a SwapReport: what it swapped per kind and what it
left stock, with the reason. A module that looks like a known kind but has no row (a subclass of a
stock class, a foreign GELU class, ...) is reported too, so "no stock ones left" is only said when
it is true.
"""
import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .activation import TempoGELU
from .dropout import TempoDropout
from .norm import TempoLayerNorm, TempoRMSNorm

def _never(*_):
    return None


@dataclass(frozen=True)
class ModuleRow:
    """Instances of exactly `stock` become `build(module, option)`, where `option` is the caller's
    setting for `kind` (e.g. the attention path); `build` None marks a class with no Tempo twin,
    always left stock with the reason `blocked` gives."""
    stock: type
    kind: str
    build: Optional[Callable]
    blocked: Callable = _never  # module -> why it stays stock, or None
    refuse: Callable = _never  # (module, option) -> why the whole swap is refused, or None


@dataclass(frozen=True)
class AttributeRow:
    """Instances of `owner` (subclasses included) whose attribute in `attrs` holds a function that
    `twin` maps to a Tempo callable get that callable. `twin(fn)` returns None when fn is not of
    this kind (silently left alone), `no_twin(fn)` says why a function of this kind has none."""
    owner: type
    attrs: tuple
    kind: str
    twin: Callable  # stock function -> Tempo callable, or None
    no_twin: Callable = _never  # stock function -> why it has no twin, or None
    blocked: Callable = _never  # owner instance -> why it stays stock, or None
    install: Callable = setattr  # (owner instance, attribute, twin): puts the twin in place


@dataclass(frozen=True)
class IdleRow:
    """The child modules in `attrs` of an instance of exactly `owner` are never called when
    `idle(owner instance)` returns a reason (else None: they are called, and swapped as usual).
    `kind` is the kind they would be counted in."""
    owner: type
    attrs: tuple
    kind: str
    idle: Callable  # owner instance -> why its children in attrs are never called, or None


MODULE_ROWS = {}  # stock class -> ModuleRow
ATTRIBUTE_ROWS = {}  # (owner, attrs) -> AttributeRow
IDLE_ROWS = {}  # (owner, attrs) -> IdleRow

# framework module -> our module that registers its rows
PROVIDERS = {"megatron.core": "tempo_ds.megatron.swaps", "transformers": "tempo_ds.hf.swaps"}

# Class-name fragments of the kinds a module walk can miss: a module of no row whose class name
# has one is reported as left stock ("class X has no Tempo row"), never passed over in silence.
NAME_HINTS = {"gelu": "gelu", "dropout": "dropout", "layernorm": "layernorm", "rmsnorm": "rmsnorm"}


def register(row):
    """Add a ModuleRow or AttributeRow to the table (a later row for the same key replaces it)."""
    if isinstance(row, ModuleRow):
        MODULE_ROWS[row.stock] = row
    elif isinstance(row, AttributeRow):
        ATTRIBUTE_ROWS[(row.owner, row.attrs)] = row
    elif isinstance(row, IdleRow):
        IDLE_ROWS[(row.owner, row.attrs)] = row
    else:
        raise TypeError(f"register expects a ModuleRow, AttributeRow or IdleRow, got {type(row).__name__}")


def _load_providers():
    for framework, provider in PROVIDERS.items():
        if framework in sys.modules and provider not in sys.modules:
            try:
                importlib.import_module(provider)
            except ModuleNotFoundError as err:
                # a provider not written yet (or its package) is skipped; a failing import inside
                # an existing provider is a bug and raises
                if err.name is None or not provider.startswith(err.name):
                    raise


def _multi_dim_norm(module):
    if len(module.normalized_shape) != 1:
        return f"{type(module).__name__} over several trailing dimensions {tuple(module.normalized_shape)}"
    return None


register(ModuleRow(nn.GELU, "gelu", lambda m, _: TempoGELU.from_torch(m)))
register(ModuleRow(nn.Dropout, "dropout", lambda m, _: TempoDropout.from_torch(m),
                   blocked=lambda m: f"dropout p={m.p} (drops everything)" if m.p >= 1.0 else None))
register(ModuleRow(nn.LayerNorm, "layernorm", lambda m, _: TempoLayerNorm.from_torch(m), blocked=_multi_dim_norm))
register(ModuleRow(nn.RMSNorm, "rmsnorm", lambda m, _: TempoRMSNorm.from_torch(m), blocked=_multi_dim_norm))
register(ModuleRow(nn.MultiheadAttention, "attention", None,
                   blocked=lambda m: "nn.MultiheadAttention has no Tempo twin"))


@dataclass
class SwapReport:
    """What swap_modules did.

    Attributes:
        kinds: the kinds that were asked for (None: every kind).
        swapped: kind -> number of modules or attributes swapped (kinds with none are absent).
        left: (kind, qualified name, reason) for every stock part of a known kind left stock.
        off: kind -> why it was not asked for (the caller's words), for kinds outside `kinds`.
        idle: (kind, qualified name, reason) for every module held but never called (IdleRow):
            neither swapped nor counted, never a reason to warn.
        tempo_found: how many parts of the model were Tempo ones already.
    """
    kinds: Optional[frozenset] = None
    swapped: dict = field(default_factory=dict)
    left: list = field(default_factory=list)
    off: dict = field(default_factory=dict)
    idle: list = field(default_factory=list)
    tempo_found: int = 0

    @property
    def found_nothing(self):
        """True when something was asked for and the model has no part of any known kind (stock or
        Tempo): the model is not one these rows know, which the report says as a WARNING."""
        return (self.kinds is None or bool(self.kinds)) and not (
            self.swapped or self.left or self.idle or self.tempo_found)

    def left_stock(self, kind):
        """The (qualified name, reason) pairs of `kind` left stock."""
        return [(where, reason) for k, where, reason in self.left if k == kind]

    def warns(self, kind):
        """True when `kind` was asked for and some part of it stays stock; for the kind "model",
        when the model has nothing to swap at all (found_nothing)."""
        if kind == "model":
            return self.found_nothing
        return (self.kinds is None or kind in self.kinds) and bool(self.left_stock(kind))

    def never_called(self, kind):
        """The (qualified name, reason) pairs of `kind` held by the model but never called."""
        return [(where, reason) for k, where, reason in self.idle if k == kind]

    def lines(self):
        """(kind, one line of text) for every kind asked for, swapped or left stock, sorted; a
        ("model", ...) line first when the model has nothing to swap."""
        shown = set(self.kinds or ()) | set(self.swapped) | {k for k, _, _ in self.left}
        out = []
        if self.found_nothing:
            out.append(("model", "nothing to swap: no part of this model matches a Tempo row (no LayerNorm, "
                                 "GELU, dropout or attention class the rows know)"))
        for kind in sorted(shown):
            off = self.off.get(kind)
            text = f"{kind}: off ({off})" if off is not None else f"{kind}: swapped {self.swapped.get(kind, 0)}"
            idle = self.never_called(kind)
            if idle:
                text += f" ({len(idle)} never called, not counted: {idle[0][1]}, e.g. {idle[0][0]})"
            left = self.left_stock(kind)
            if not left:
                out.append((kind, text + ", no stock ones left"))
                continue
            by_reason = {}
            for where, reason in left:
                by_reason.setdefault(reason, []).append(where)
            # an off kind's stock parts are there for that reason: not repeated after "off (...)"
            parts = [f"{len(names)}, e.g. {names[0]}" if reason == off else f"{reason} ({len(names)}, e.g. {names[0]})"
                     for reason, names in by_reason.items()]
            out.append((kind, f"{text}, left {len(left)} stock: " + "; ".join(parts)))
        return out

    def summary(self):
        """One line per kind, e.g. "gelu: swapped 2, no stock ones left"."""
        return "\n".join(text for _, text in self.lines())


def _is_tempo(obj):
    """True for our own modules, classes and functions: never swapped, never reported."""
    return (getattr(obj, "__module__", None) or "").startswith("tempo_ds.")


class _Walk:
    """One pass over a model with the caller's choices; fills `report`."""

    def __init__(self, kinds, module_filter, options, off_reason):
        self.kinds = None if kinds is None else frozenset(kinds)
        self.module_filter = module_filter
        self.options = options or {}
        self.off_reason = off_reason or (lambda kind: f"{kind} not asked for")
        self.report = SwapReport(kinds=self.kinds)
        self.done = {}  # id(stock module) -> its Tempo module: a shared module is swapped once

    def wanted(self, kind, module, qualified):
        """None when `kind` may be swapped here, else the reason it stays stock."""
        if self.kinds is not None and kind not in self.kinds:
            self.report.off.setdefault(kind, self.off_reason(kind))
            return self.report.off[kind]
        if self.module_filter is not None and not self.module_filter(module, qualified):
            return "kept stock by the filter"
        return None

    def leave(self, kind, where, reason):
        self.report.left.append((kind, where, reason))

    def count(self, kind):
        self.report.swapped[kind] = self.report.swapped.get(kind, 0) + 1

    def refusals(self, model):
        """(kind, message) of the first row that refuses this model, or None."""
        for qualified, module in model.named_modules():
            row = MODULE_ROWS.get(type(module))
            if row is None or row.build is None or self.wanted(row.kind, module, qualified) is not None:
                continue
            message = row.refuse(module, self.options.get(row.kind))
            if message is not None:
                return row.kind, message
        return None

    def attributes(self, module, prefix):
        for row in ATTRIBUTE_ROWS.values():
            if not isinstance(module, row.owner):
                continue
            for attr in row.attrs:
                fn = getattr(module, attr, None)
                if fn is None or _is_tempo(fn):
                    continue
                where = f"{prefix}.{attr}" if prefix else attr
                twin = row.twin(fn)
                reason = row.no_twin(fn) if twin is None else (
                    self.wanted(row.kind, module, where) or row.blocked(module))
                if twin is None and reason is None:
                    continue  # not a function of this row's kind
                if reason is not None:
                    self.leave(row.kind, where, reason)
                    continue
                row.install(module, attr, twin)
                self.count(row.kind)

    def idle_children(self, parent):
        """{child name: (kind, why it is never called)} from the IdleRows of `parent`'s class."""
        found = {}
        for row in IDLE_ROWS.values():
            if type(parent) is not row.owner:
                continue
            reason = row.idle(parent)
            if reason is not None:
                found.update({attr: (row.kind, reason) for attr in row.attrs})
        return found

    def child(self, child, qualified):
        """The module to put in place of `child` (itself when it stays stock)."""
        if _is_tempo(type(child)):
            self.report.tempo_found += 1
            return child
        if id(child) in self.done:
            return self.done[id(child)]
        row = MODULE_ROWS.get(type(child))
        if row is None:
            self.unknown(child, qualified)
            return child
        reason = self.wanted(row.kind, child, qualified) or row.blocked(child)
        if reason is None and row.build is None:
            reason = f"class {type(child).__name__} has no Tempo twin"
        if reason is not None:
            self.leave(row.kind, qualified, reason)
            return child
        new = row.build(child, self.options.get(row.kind))
        self.done[id(child)] = new
        self.count(row.kind)
        return new

    def unknown(self, module, qualified):
        """Report a module of no row that is a subclass of a row's class or is named like a kind."""
        cls = type(module)
        for stock, row in MODULE_ROWS.items():
            if isinstance(module, stock):
                reason = self.wanted(row.kind, module, qualified) or (
                    f"class {cls.__name__} subclasses {stock.__name__} and has no Tempo row")
                self.leave(row.kind, qualified, reason)
                return
        name = cls.__name__.lower()
        for hint, kind in NAME_HINTS.items():
            if hint in name:
                reason = self.wanted(kind, module, qualified) or f"class {cls.__name__} has no Tempo row"
                self.leave(kind, qualified, reason)
                return

    def visit(self, parent, prefix):
        self.attributes(parent, prefix)
        idle = self.idle_children(parent)
        for name, child in list(parent.named_children()):
            qualified = f"{prefix}.{name}" if prefix else name
            if name in idle and not _is_tempo(type(child)):
                kind, reason = idle[name]
                self.report.idle.append((kind, qualified, reason))
                continue
            new = self.child(child, qualified)
            if new is not child:
                setattr(parent, name, new)
            self.visit(new, qualified)


class SwapRefused(ValueError):
    """A row refuses the model as asked (e.g. an attention path that cannot apply its mask);
    raised before anything is swapped. `kind` names the row's kind."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def swap_modules(model, *, kinds=None, module_filter=None, options=None, off_reason=None):
    """Swap, in place, every stock part of `model` that a row has a Tempo twin for.

    Args:
        model: the nn.Module to convert; the root itself is never replaced (its attributes are).
        kinds: optional set of kinds to swap (e.g. {"gelu", "layernorm"}); None swaps every kind.
        module_filter: optional callable (module, qualified_name) -> bool; False keeps it stock.
            For an attribute row it sees the owner module and "owner.attribute".
        options: optional dict kind -> setting handed to that kind's builders (e.g.
            {"attention": "flash"}, the path of TempoCoreAttention).
        off_reason: optional callable kind -> why a kind outside `kinds` is off, for the report.

    Returns a SwapReport. Raises SwapRefused, with nothing swapped, when a row refuses the model.
    """
    _load_providers()
    walk = _Walk(kinds, module_filter, options, off_reason)
    refused = walk.refusals(model)
    if refused is not None:
        raise SwapRefused(*refused)
    walk.visit(model, "")
    return walk.report


__all__ = ["AttributeRow", "IdleRow", "ModuleRow", "PROVIDERS", "SwapRefused", "SwapReport", "register", "swap_modules"]
