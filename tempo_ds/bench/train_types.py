"""Typed inputs and outputs of `python -m tempo_ds.bench train`, and their JSON form.

RunConfig is what the command line resolves to; VariantResult is one variant's measurement;
Report is the machine, the config and the results. Each converts to and from the dict that
train_<tag>.json holds (to_dict / from_dict), and nothing else reads or writes that JSON's fields
by name: the worker process receives a RunConfig and returns a VariantResult through it, and
`--from-json` reads a stored report through it. The JSON field names are those of the first H100
runs (docs/results/h100_*), so their files still load.
"""
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from .machine import json_safe


@dataclass(frozen=True)
class Variant:
    """A row of the experiment: the ds_config "tempo" value and Megatron's recomputation."""
    name: str
    description: str
    tempo: object = False        # the ds_config "tempo" value
    recompute: str = None        # None, "selective" or "full"
    attn_implementation: str = None  # --framework hf: transformers' attention ("eager", "sdpa")


VARIANTS = {v.name: v for v in (
    Variant("stock", "megatron-core local spec"),
    Variant("selective", "stock + selective recomputation", recompute="selective"),
    Variant("full", "stock + full recomputation", recompute="full"),
    Variant("tempo-flash", "Tempo spec, flash attention", tempo={"attention": "flash"}),
    Variant("tempo", "Tempo spec, softmax-dropout-matmul attention", tempo={"attention": "tempo"}),
)}

# --framework hf (train_hf_model): recompute "full" is transformers' gradient checkpointing
HF_VARIANTS = {v.name: v for v in (
    Variant("eager", "transformers, eager attention", attn_implementation="eager"),
    Variant("sdpa", "transformers, SDPA attention", attn_implementation="sdpa"),
    Variant("sdpa-ckpt", "transformers, SDPA + gradient checkpointing", recompute="full",
            attn_implementation="sdpa"),
    Variant("tempo", 'tempo_ds.hf.apply, "tempo": true', tempo=True, attn_implementation="sdpa"),
)}
FRAMEWORKS = ("megatron", "hf")


def variants_for(framework):
    """The variants of `framework` ("megatron" or "hf"), by name."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework {framework!r}: expected one of {FRAMEWORKS}")
    return HF_VARIANTS if framework == "hf" else VARIANTS


def _from_fields(cls, data, what):
    """cls(**data), naming the unknown fields and the missing ones (those without a default)."""
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    missing = sorted(n for n in names - set(data)
                     if cls.__dataclass_fields__[n].default is dataclasses.MISSING
                     and cls.__dataclass_fields__[n].default_factory is dataclasses.MISSING)
    if unknown or missing:
        problems = [f"{label} fields {names}" for label, names in (("unknown", unknown), ("missing", missing)) if names]
        raise ValueError(f"{what}: {', '.join(problems)}")
    return cls(**data)


@dataclass(frozen=True)
class RunConfig:
    """The settings of one run of the benchmark (every variant shares them)."""
    model: str                    # "gpt2" or "bert"; --framework hf: a key of tempo_ds.hf.trainer.MODELS
    size: str                     # a key of tempo_ds.workload.SIZES[arch], or "custom"
    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    common_mb: int                # the micro-batch every variant is timed and ledgered at
    steps: int                    # timed steps per point
    warmup: int                   # untimed steps before them
    cap: int                      # largest micro-batch the search tries
    memory_budget: Optional[int]  # bytes the CUDA allocator may use, or None
    dropout: float
    seed: int
    zero_stage: Optional[int]     # None: the launch config's stage
    sweep: tuple = ()             # further micro-batches timed for the throughput plot
    device: str = "cuda"
    cpu_sized: bool = False       # the CPU-sized defaults: ledger bytes and ratios, not speeds
    framework: str = "megatron"   # "megatron" (train_model) or "hf" (train_hf_model)

    def __post_init__(self):
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"RunConfig.framework={self.framework!r}: expected one of {FRAMEWORKS}")
        if self.framework == "megatron" and self.model not in ("gpt2", "bert"):
            raise ValueError(f"RunConfig.model={self.model!r}: expected 'gpt2' or 'bert'")
        for name in ("layers", "hidden", "heads", "seq", "vocab", "common_mb", "steps", "cap"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RunConfig.{name}={getattr(self, name)!r}: expected an integer >= 1")
        if self.warmup < 0:
            raise ValueError(f"RunConfig.warmup={self.warmup}: expected an integer >= 0")
        if self.hidden % self.heads:
            raise ValueError(f"RunConfig.hidden={self.hidden} is not divisible by heads={self.heads}")
        object.__setattr__(self, "sweep", tuple(self.sweep or ()))

    @property
    def tag(self):
        """The name of the run's files: train_<tag>.json / .csv / _*.png."""
        budget = f"_budget{self.memory_budget / 2**30:g}GiB" if self.memory_budget else ""
        framework = "hf_" if self.framework == "hf" else ""
        return f"{framework}{self.model}_{self.size}_s{self.seq}{budget}{'_cpu' if self.cpu_sized else ''}"

    def to_dict(self):
        data = dict(dataclasses.asdict(self), sweep=list(self.sweep))
        if self.framework == "megatron":
            # the default, left out: the stored Megatron reports, which predate the field, round-trip
            del data["framework"]
        return data

    @classmethod
    def from_dict(cls, data):
        return _from_fields(cls, data, "train config")


@dataclass(frozen=True)
class TimedPoint:
    """`steps` timed optimizer steps at one micro-batch (after the warm-up ones)."""
    micro_batch: int
    steps: int
    seconds: float
    samples_per_s: float
    tokens_per_s: float
    losses: list
    peak_bytes: Optional[int]     # the allocator's peak over warm-up and timed steps; None on CPU
    mfu: Optional[float] = None   # model FLOPs utilisation; None without a known bf16 peak

    @classmethod
    def from_dict(cls, data):
        return None if data is None else _from_fields(cls, data, "timed point")


@dataclass(frozen=True)
class LedgerSummary:
    """Bytes autograd keeps for one forward (tempo_ds.memory.SavedTensorLedger) at micro_batch."""
    micro_batch: int
    total_bytes: int
    layers_bytes: int             # inside the transformer layers
    head_bytes: int               # the rest: embeddings, final norm, logits, loss
    by_category: dict             # largest first
    by_op: dict                   # largest first

    @classmethod
    def from_dict(cls, data):
        return None if data is None else _from_fields(cls, data, "ledger")


@dataclass
class VariantResult:
    """One variant's measurement (train_variant.run_variant); a failed variant has only its
    name, description and error."""
    variant: str
    description: str
    error: Optional[str] = None
    n_params: Optional[int] = None
    attention_asked: Optional[str] = None
    attention_ran: list = field(default_factory=list)
    memory_budget_bytes: Optional[int] = None
    fixed_bytes: Optional[int] = None
    common: Optional[TimedPoint] = None
    largest_micro_batch: Optional[int] = None
    search_capped: Optional[bool] = None
    search_trials: list = field(default_factory=list)
    peak_at_largest_bytes: Optional[int] = None
    predicted_micro_batch: Optional[int] = None   # tempo_ds.plan's largest micro-batch (GPU runs)
    predicted_peak_bytes: Optional[int] = None    # and its predicted peak there
    best: Optional[TimedPoint] = None
    sweep: list = field(default_factory=list)
    ledger: Optional[LedgerSummary] = None
    activation_per_sample_ledger_bytes: Optional[float] = None
    activation_per_sample_allocator_bytes: Optional[float] = None
    flops_per_token: Optional[int] = None
    wall_s: Optional[float] = None

    def to_dict(self):
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data):
        # A failed variant's row carries only some fields: the rest take their defaults.
        result = _from_fields(cls, data, "train result")
        result.common, result.best = TimedPoint.from_dict(result.common), TimedPoint.from_dict(result.best)
        result.sweep = [TimedPoint.from_dict(p) for p in result.sweep or []]
        result.ledger = LedgerSummary.from_dict(result.ledger)
        result.search_trials = [tuple(t) for t in result.search_trials or []]
        result.attention_ran = list(result.attention_ran or [])
        return result


@dataclass
class Report:
    """What train_<tag>.json holds."""
    machine: dict                 # tempo_ds.bench.machine.machine_info()
    config: RunConfig
    results: list = field(default_factory=list)   # VariantResult, in the order run

    @property
    def tag(self):
        return self.config.tag

    def to_dict(self):
        return json_safe({"machine": self.machine, "config": self.config.to_dict(),
                          "results": [r.to_dict() for r in self.results], "tag": self.tag})

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict) or not {"machine", "config", "results"} <= set(data):
            raise ValueError("a train report is a JSON object with machine, config and results")
        return cls(data["machine"], RunConfig.from_dict(data["config"]),
                   [VariantResult.from_dict(r) for r in data["results"]])

    @classmethod
    def load(cls, path):
        """The report stored at `path` (a train_<tag>.json)."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def dump(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=str)
