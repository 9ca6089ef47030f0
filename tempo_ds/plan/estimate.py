"""tempo_ds.plan.estimate: the largest micro-batch that fits, per variant, before any GPU step.

For each variant the model is walked on the meta device at its full depth (tempo_ds.plan.walk):
kept bytes and the step's peak are exact at each walked micro-batch and linear in it (kept: every
activation has one batch dimension, bar GPT's shared causal mask; peak: the same phase of the step
peaks at every micro-batch the line is used for, which the confirming walk checks). Then

    predicted peak(mb) = states at the peak (tempo_ds.plan.states) + engine + walk peak(mb)
    fits(mb)           = predicted peak(mb) <= capacity
    capacity           = (GPU memory - context, or the allocator budget) - reserve

with context, reserve and engine the measured constants of the card (tempo_ds.plan.constants).
The micro-batch the line predicts is walked once more, and the line refitted through it until
the walk agrees, so the figure reported is a walked one, not an extrapolation.
"""
import contextlib
import gc
from dataclasses import dataclass, field
from typing import Optional

from .. import workload
from . import constants as _constants
from .states import model_states

# What each variant recomputes in backward, least first (the recommendation's order).
RECOMPUTATION = {
    "stock": (0, "nothing"),
    "tempo-flash": (1, "attention probabilities inside the fused kernel, dropout masks from seeds"),
    "tempo": (1, "dropout masks from seeds, GELU from its output"),
    "selective": (2, "every layer's core attention (Megatron selective)"),
    "full": (3, "every layer's forward (Megatron full, uniform, 1 layer)"),
    # --framework hf
    "eager": (0, "nothing"),
    "sdpa": (0, "nothing"),
    "sdpa-ckpt": (3, "every layer's forward (transformers' gradient checkpointing)"),
}
# The standard position tables of the named sizes (learned absolute positions).
POSITIONS = {"gpt": 1024, "bert": 512}
MAX_MICRO_BATCH = 8192


class PlanError(ValueError):
    """An input the planner cannot take; the message names the argument."""


@dataclass(frozen=True)
class Inputs:
    """What a plan is for (estimate()'s arguments, resolved)."""
    model: str
    size: str
    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    bf16: bool
    dropout: float
    zero_stage: int
    dp: int
    tp: int
    gpu_memory: Optional[int]
    memory_budget: Optional[int]
    variants: tuple
    framework: str
    card: str
    loss_head: str
    target_micro_batch: Optional[int]


@dataclass
class VariantPlan:
    """One variant's plan. Bytes: kept_per_sample / kept_fixed (the linear count of what autograd
    keeps), peak_per_sample / peak_fixed (the walk's step peak, states not included), largest
    micro-batch (0: not even 1 fits) and the predicted device peak there; walks: (mb, walk peak)."""
    variant: str
    description: str
    recomputes: str
    kept_per_sample: int
    kept_fixed: int
    head_per_sample: int
    peak_per_sample: int
    peak_fixed: int
    largest_micro_batch: int
    peak_at_largest: Optional[int]
    transient_at_largest: Optional[int]
    need_for_one: int
    attention_ran: tuple = ()
    kept_by_category: dict = field(default_factory=dict)
    walks: list = field(default_factory=list)


@dataclass
class Plan:
    """The plan: inputs, parameter count, states per rank, capacity, one VariantPlan per variant,
    the recommendation (one line) and the constants used."""
    inputs: Inputs
    n_params: int
    states: object
    capacity: int
    constants: object
    variants: list
    recommendation: str

    def to_dict(self):
        import dataclasses
        return {"inputs": dataclasses.asdict(self.inputs), "n_params": self.n_params,
                "states": dict(dataclasses.asdict(self.states), at_peak=self.states.at_peak,
                               total=self.states.total),
                "capacity": self.capacity, "constants": dataclasses.asdict(self.constants),
                "variants": [dataclasses.asdict(v) for v in self.variants],
                "recommendation": self.recommendation}


def _variants(names, loss_head, framework="megatron"):
    """The bench's Variant rows of `framework` for `names`; loss_head "stock" keeps Megatron's
    loss head in the Tempo variants (the trees of the 2026-11-26 runs had no fused one)."""
    from ..bench.train_types import Variant, variants_for

    known = variants_for(framework)
    out = []
    for name in names:
        if name not in known:
            raise PlanError(f"--variants: unknown {framework} variant {name!r}; known: {', '.join(known)}")
        v = known[name]
        if loss_head == "stock" and v.tempo and framework == "megatron":
            v = Variant(v.name, v.description, dict(v.tempo, loss=False), v.recompute)
        out.append(v)
    return out


def _check_shape(inputs, max_positions):
    if inputs.hidden % inputs.heads:
        raise PlanError(f"--heads {inputs.heads} does not divide --hidden {inputs.hidden}")
    if inputs.heads % inputs.tp:
        raise PlanError(f"--tp {inputs.tp} does not divide --heads {inputs.heads}")
    if inputs.seq > max_positions:
        raise PlanError(f"--seq-length {inputs.seq} is longer than the position table ({max_positions} "
                        f"positions; --max-positions sets it)")
    if inputs.hidden % inputs.tp:
        raise PlanError(f"--tp {inputs.tp} does not divide --hidden {inputs.hidden}")
    if inputs.tp > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            raise PlanError(f"--tp {inputs.tp}: this process has a process group; the walk builds its "
                            "tensor-parallel shards over a one-process group of its own: plan in a fresh "
                            "process (python -m tempo_ds.plan)")


def _hf_defaults(model, size, vocab_size, tp):
    """(base Shape, size name, arch, vocabulary) of a --framework hf model (tempo_ds.plan.hf)."""
    from . import hf
    try:
        size, base = hf.default_shape(model, size)
    except ValueError as err:
        raise PlanError(f"--model/--size: {err}") from None
    if tp != 1:
        raise PlanError(f"--tp {tp}: --framework hf plans one process (transformers' models have no "
                        "tensor parallelism here)")
    return base, size, "gpt" if hf.family_of(model) == "gpt2" else "bert", vocab_size or hf.default_vocab(model)


def resolve(model="gpt2", size=None, layers=None, hidden=None, heads=None, seq_length=None, vocab_size=None,
            gpu_memory=None, memory_budget=None, bf16=True, dropout=0.1, zero_stage=1, dp=1, tp=1,
            variants=None, framework="megatron", card=None, loss_head="tempo", target_micro_batch=None,
            max_positions=None):
    """estimate()'s arguments checked and resolved to Inputs (raises PlanError naming the bad one)."""
    from ..bench.train import parse_bytes
    from ..bench.train_types import FRAMEWORKS, variants_for

    if framework not in FRAMEWORKS:
        raise PlanError(f"--framework {framework!r}: expected one of {', '.join(FRAMEWORKS)}")
    if framework == "hf":
        base, size, arch, vocab_size = _hf_defaults(model, size, vocab_size, tp)
    else:
        try:
            arch = workload.arch_of(model)
        except ValueError as err:
            raise PlanError(f"--model: {err}") from None
        if size is None and not (layers and hidden and heads):
            size = "345m" if arch == "gpt" else "large"
        base = None
        if size is not None:
            try:
                base = workload.shape_of(arch, size)
            except ValueError as err:
                raise PlanError(f"--size: {err}") from None
    shape = workload.Shape(layers or base.num_layers, hidden or base.hidden_size, heads or base.num_attention_heads)
    for name, value in (("--layers", shape.num_layers), ("--hidden", shape.hidden_size),
                        ("--heads", shape.num_attention_heads), ("--seq-length", seq_length),
                        ("--dp", dp), ("--tp", tp)):
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} {value!r}: expected an integer >= 1")
    if zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"--zero-stage {zero_stage!r}: expected 0, 1, 2 or 3")
    parsed = {}
    for name, text in (("--gpu-memory", gpu_memory), ("--memory-budget", memory_budget)):
        try:
            parsed[name] = parse_bytes(text) if isinstance(text, str) else text
        except ValueError as err:
            raise PlanError(f"{name}: {err}") from None
    if parsed["--gpu-memory"] is None and parsed["--memory-budget"] is None:
        raise PlanError("--gpu-memory: give the GPU's memory (e.g. 80GiB) or an allocator --memory-budget")
    card = card or _constants.DEFAULT.card
    if card not in _constants.CARDS:
        raise PlanError(f"--card {card!r}: no measured constants; known: {', '.join(_constants.CARDS)}")
    if loss_head not in ("tempo", "stock"):
        raise PlanError(f"loss_head {loss_head!r}: expected 'tempo' or 'stock'")
    names = tuple(variants or variants_for(framework))
    _variants(names, loss_head, framework)
    inputs = Inputs(model=model, size=size if not (layers or hidden or heads) else "custom",
                    layers=shape.num_layers, hidden=shape.hidden_size, heads=shape.num_attention_heads,
                    seq=seq_length, vocab=vocab_size or (50257 if arch == "gpt" else 30522), bf16=bool(bf16),
                    dropout=float(dropout), zero_stage=zero_stage, dp=dp, tp=tp,
                    gpu_memory=parsed["--gpu-memory"], memory_budget=parsed["--memory-budget"], variants=names,
                    framework=framework, card=card, loss_head=loss_head, target_micro_batch=target_micro_batch)
    # transformers' models are built with positions for the sequence (tempo_ds.hf.trainer)
    positions = max_positions or (POSITIONS[arch] if inputs.size not in ("custom",) and max_positions is None
                                  and framework == "megatron" else seq_length)
    _check_shape(inputs, positions)
    return inputs


def _largest(walk_at, room, cap=MAX_MICRO_BATCH):
    """Largest mb with walk_at(mb) <= room, from walks at 1 and 2 and the line through the two
    walked points nearest the answer, refitted until a walked mb fits and the next is predicted
    not to (at most 4 more walks). Returns (mb, {mb: walk peak})."""
    seen = {1: walk_at(1), 2: walk_at(2)}
    if seen[1] > room:
        return 0, seen
    lo_mb, hi_mb = 1, 2
    for _ in range(4):
        slope = (seen[hi_mb] - seen[lo_mb]) / (hi_mb - lo_mb)
        guess = cap if slope <= 0 else int((room - seen[lo_mb]) // slope) + lo_mb
        guess = max(1, min(cap, guess))
        if guess in seen:
            break
        seen[guess] = walk_at(guess)
        fitting = [m for m in seen if seen[m] <= room]
        lo_mb = max(fitting)
        above = [m for m in seen if m > lo_mb]
        hi_mb = min(above) if above else max(m for m in seen if m < lo_mb) if lo_mb > 1 else 2
        if lo_mb + 1 in seen or (above and min(above) == lo_mb + 1):
            break
        if lo_mb == guess and hi_mb < lo_mb:
            lo_mb, hi_mb = hi_mb, lo_mb
    best = max(m for m in seen if seen[m] <= room)
    return best, seen


def _plan_variant(inputs, variant, states_at_peak, const, capacity, count_kept=True, scaled=None):
    from .scale import Scaled

    if scaled is None:
        scaled = Scaled(inputs.model, workload.Shape(inputs.layers, inputs.hidden, inputs.heads), inputs.seq,
                        inputs.vocab, variant, inputs.dropout, inputs.bf16, tp=inputs.tp, framework=inputs.framework)
    walks = {}

    def walk_at(mb):
        # the kept bytes are linear in mb: counted at 1 and 2, the other walks need the peak only
        walks[mb] = scaled.walk(mb, ledger=count_kept and mb <= 2)
        return walks[mb].peak

    room = capacity - states_at_peak - const.engine
    largest, _ = _largest(walk_at, room)
    one, two = walks[1], walks[2]
    rank, recomputes = RECOMPUTATION.get(variant.name, (9, "?"))
    at = walks.get(largest)
    fixed = 2 * one.kept - two.kept
    return VariantPlan(
        variant=variant.name, description=variant.description, recomputes=recomputes,
        kept_per_sample=two.kept - one.kept, kept_fixed=fixed,
        head_per_sample=(two.kept - two.kept_layers) - (one.kept - one.kept_layers),
        peak_per_sample=two.peak - one.peak, peak_fixed=2 * one.peak - two.peak,
        largest_micro_batch=largest,
        peak_at_largest=at.peak + states_at_peak + const.engine if at else None,
        transient_at_largest=at.peak - (fixed + largest * (two.kept - one.kept)) if at else None,
        need_for_one=one.peak + states_at_peak + const.engine + const.reserve,
        attention_ran=two.attention_ran, kept_by_category=two.kept_by_category,
        walks=sorted((m, w.peak) for m, w in walks.items()))


def _recommend(inputs, plans):
    fitting = [p for p in plans if p.largest_micro_batch > 0]
    if not fitting:
        need = min(plans, key=lambda p: p.need_for_one)
        return (f"nothing fits at micro-batch 1: {need.variant} needs the least, "
                f"{need.need_for_one / 2**30:.1f} GiB of GPU memory (with the context and reserve)")
    order = sorted(fitting, key=lambda p: (RECOMPUTATION.get(p.variant, (9,))[0], -p.largest_micro_batch))
    if inputs.target_micro_batch:
        reach = [p for p in order if p.largest_micro_batch >= inputs.target_micro_batch]
        if reach:
            p = reach[0]
            return (f"{p.variant}: reaches micro-batch {inputs.target_micro_batch} (up to "
                    f"{p.largest_micro_batch}) recomputing the least ({p.recomputes})")
    best = max(p.largest_micro_batch for p in fitting)
    p = next(p for p in order if p.largest_micro_batch == best)
    return (f"{p.variant}: the largest micro-batch ({best}) with the least recomputation "
            f"among those reaching it ({p.recomputes})")


@contextlib.contextmanager
def _frozen_heap():
    """gc.freeze() for the block: each walk's gc.collect() then scans only what the planning
    made, not the whole heap of torch and megatron (a full collection took ~0.4 s a walk)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def estimate(count_kept=True, scaled=None, **kwargs):
    """The plan (a Plan) for the arguments of resolve(): model ("gpt2"/"bert"), size or
    layers/hidden/heads, seq_length, vocab_size, gpu_memory (the device's memory, e.g. "80GiB")
    or memory_budget (an allocator cap, as `bench train --memory-budget`), bf16, dropout,
    zero_stage, dp, tp, variants (names of tempo_ds.bench.train_types.VARIANTS), framework,
    card (whose constants), loss_head, target_micro_batch, max_positions. count_kept=False skips
    the ledger (the kept figures are then 0; the largest micro-batch and peak are the same).
    scaled: a dict that keeps the walked models (tempo_ds.plan.scale.Scaled) for further plans of
    the same models and settings in this process (tempo_ds.plan.validate plans each recorded
    model for several budgets); None: kept for this plan only.
    Runs on CPU: the model is walked on the meta device (tempo_ds.plan.walk)."""
    import io
    import sys

    from .scale import scaled_model
    from .walk import tensor_parallel

    inputs = resolve(**kwargs)
    scaled = {} if scaled is None else scaled
    const = _constants.CARDS[inputs.card]
    variants = _variants(inputs.variants, inputs.loss_head, inputs.framework)
    # DeepSpeed's accelerator probe prints to stdout; the plan's output is the caller's.
    with contextlib.redirect_stdout(sys.stderr if sys.stderr else io.StringIO()), tensor_parallel(inputs.tp), \
            _frozen_heap():
        shape = workload.Shape(inputs.layers, inputs.hidden, inputs.heads)
        models = [scaled_model(scaled, inputs.model, shape, inputs.seq, inputs.vocab, v, inputs.dropout, inputs.bf16,
                               inputs.tp, inputs.framework) for v in variants]
        # the parameters one rank holds: TP divides the sharded ones, the norms and biases of
        # the row-parallel layers are whole on every rank
        n_params = models[0].n_params
        states = model_states(n_params, bf16=inputs.bf16, zero_stage=inputs.zero_stage, dp=inputs.dp)
        if inputs.memory_budget is not None:
            capacity = inputs.memory_budget - const.reserve
        else:
            capacity = inputs.gpu_memory - const.context - const.reserve
        plans = [_plan_variant(inputs, v, states.at_peak, const, capacity, count_kept, scaled=m)
                 for v, m in zip(variants, models)]
    return Plan(inputs, n_params, states, capacity, const, plans, _recommend(inputs, plans))
