"""A model of any depth from walks at two small depths (docs/plan.md, "What is linear").

Every transformer layer is the same, so the counts of an L-layer model follow from walks of the
same model at 3 and 5 layers (tempo_ds.plan.walk.walk): the kept bytes on a line in L, the step's
peak from the segments of the step (scaled_peak). Scaled does this per variant and micro-batch.
"""
from .. import workload
from .walk import Walk, build_meta_model, walk

# The depths a deep model is walked at (Scaled): two, so that every per-layer count has a slope;
# the shallower has 2 layers besides the first and the last, the deeper 4, so that the inner
# layers' segments have a slope in k and one point more than the slope needs (a check).
DEPTHS = (3, 5)


def _line(at_a, at_b, layers, a=DEPTHS[0], b=DEPTHS[1]):
    """The value at `layers` of the line through (a, at_a) and (b, at_b)."""
    return at_a + (at_b - at_a) * (layers - a) // (b - a)


class NotAffine(ArithmeticError):
    """The inner layers' segment peaks of the two walks do not lie on one plane in (L, k)."""


def scaled_peak(shallow, deep, layers):
    """The step peak of a `layers`-deep model from its segments walked at DEPTHS (3, 5 layers).

    Every layer is the same, so each segment's peak is affine in the depth L and the layer index
    k: entering the forward of layer k, what is alive is the kept bytes of the k layers below;
    in backward, the kept bytes of layers 0..k and the parameter gradients of the L-1-k layers
    above. The first layer is apart: what it receives (the embedding's output) is freed or kept
    differently from what the others receive (another layer's output), so ("fwd", 0) and
    ("bwd", 0) have a line in L of their own, as "pre", "turn" and "post" do. The inner layers'
    ("fwd", k) and ("bwd", k), 1 <= k <= L-2, are a + b L + c k through (3, 1), (5, 1), (5, 2),
    checked at (5, 3) (NotAffine if not on it); an affine function of k is largest at an end,
    k = 1 or k = L-2. The peak is the largest of these at `layers`."""
    s1, s2 = shallow.segments, deep.segments
    L1, L2 = DEPTHS
    peaks = [_line(s1[kind], s2[kind], layers) for kind in ("pre", "turn", "post", ("fwd", 0), ("bwd", 0))]
    for phase in ("fwd", "bwd"):
        slope = s2[phase, 2] - s2[phase, 1]
        if s2[phase, 3] - s2[phase, 2] != slope:
            raise NotAffine(f"{phase}: inner layers' peaks {[s2[phase, k] for k in (1, 2, 3)]} at {L2} layers")
        at1 = _line(s1[phase, 1], s2[phase, 1], layers)
        peaks += [at1, at1 + slope * (layers - 3)]  # k = 1 and k = L - 2
    return int(max(peaks))


class Scaled:
    """A variant's model at any depth from walks at DEPTHS (3 and 5 layers): its walk(mb) is the
    Walk of the full-depth model, kept bytes (in total, in the layers, per category) on the line
    through the two depths (every layer keeps the same), the peak by scaled_peak (or, where its
    check fails, a walk at the full depth). At 5 layers or fewer the model is walked at its
    depth. Build and walk inside tensor_parallel(tp)."""

    def __init__(self, model, shape, seq, vocab, variant, dropout=0.1, bf16=True, tp=1, framework="megatron"):
        self.model, self.shape, self.seq, self.vocab = model, shape, seq, vocab
        self.variant, self.dropout, self.bf16, self.tp, self.framework = variant, dropout, bf16, tp, framework
        depths = (shape.num_layers,) if shape.num_layers <= DEPTHS[-1] else DEPTHS
        self.nets = {L: build_meta_model(model, self._at(L), seq, vocab, variant, dropout, bf16, tp=tp,
                                         framework=framework) for L in depths}
        counts = {L: sum(p.numel() for p in net.parameters()) for L, net in self.nets.items()}
        # parameters per rank (sharded ones divided by TP): the same per layer
        self.n_params = counts[shape.num_layers] if len(depths) == 1 else _line(*counts.values(), shape.num_layers)
        # walks made at the full depth because scaled_peak found its segments not affine
        self.fallbacks = 0
        # {(mb, ledger): Walk}: a model planned for several budgets walks each micro-batch once
        self._walks = {}

    def _at(self, layers):
        return workload.Shape(layers, self.shape.hidden_size, self.shape.num_attention_heads)

    def _walk(self, layers, mb, ledger):
        return walk(self.model, self._at(layers), self.seq, self.vocab, self.variant, mb, self.dropout, self.bf16,
                    net=self.nets[layers], ledger=ledger, tp=self.tp, framework=self.framework)

    def walk(self, mb, ledger=True):
        """The full-depth Walk at micro-batch `mb` (ledger: count the kept bytes too)."""
        if (mb, True) in self._walks or (mb, ledger) in self._walks:
            return self._walks.get((mb, True)) or self._walks[mb, ledger]
        self._walks[mb, ledger] = self._full_depth(mb, ledger)
        return self._walks[mb, ledger]

    def _full_depth(self, mb, ledger):
        L = self.shape.num_layers
        if len(self.nets) == 1:
            return self._walk(L, mb, ledger)
        shallow, deep = (self._walk(depth, mb, ledger) for depth in DEPTHS)
        try:
            peak = scaled_peak(shallow, deep, L)
        except NotAffine:
            self.fallbacks += 1
            return walk(self.model, self.shape, self.seq, self.vocab, self.variant, mb, self.dropout, self.bf16,
                        ledger=ledger, tp=self.tp, framework=self.framework)
        categories = set(shallow.kept_by_category) | set(deep.kept_by_category)
        by_category = {c: _line(shallow.kept_by_category.get(c, 0), deep.kept_by_category.get(c, 0), L)
                       for c in categories}
        return Walk(layers=L, micro_batch=mb, kept=_line(shallow.kept, deep.kept, L),
                    kept_layers=_line(shallow.kept_layers, deep.kept_layers, L), peak=peak,
                    kept_by_category=dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
                    attention_ran=deep.attention_ran)


def scaled_model(cache, model, shape, seq, vocab, variant, dropout=0.1, bf16=True, tp=1, framework="megatron"):
    """The Scaled of these arguments from `cache` (a dict), built and added when missing."""
    key = (framework, model, shape, seq, vocab, variant.name, repr(variant.tempo), variant.recompute, dropout, bf16, tp)
    if key not in cache:
        cache[key] = Scaled(model, shape, seq, vocab, variant, dropout, bf16, tp=tp, framework=framework)
    return cache[key]
