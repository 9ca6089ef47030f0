"""Every megatron-core version difference that tempo_ds meets, in one place.

tempo_ds supports megatron-core SUPPORTED (setup.py's requirement; a test keeps the two equal).
CI tests both ends, TESTED: `make test` runs the whole suite on 0.16.1, `make test-compat` the
Megatron spec, TP and trainer tests on 0.19.2 (docs/megatron.md). Code elsewhere calls the helpers
below instead of comparing versions. A branch tests for the feature (a module, a method, what a
function returns) rather than for a version number: between the tested ends we do not know which
release changed what, and 0.17 or 0.18 then takes whichever side it has.

What differs between 0.16.1 and 0.19.2, and the helper that handles it:

  tokenizer_base()     megatron.core.datasets.megatron_tokenizer (MegatronLegacyTokenizer, the base
                       of our tokenizers) is gone in 0.19; its datasets read the same attributes.
  quiet_gpt_model_deprecation()
                       GPTModel logs "GPTModel IS DEPRECATED" (in favour of HybridModel, which
                       0.16.1 lacks) on every construction in 0.19.
  bda_operands()       the stock bias-dropout-add casts the residual to x's dtype (0.16.1); 0.19
                       casts x and the bias to the residual's dtype instead (fp32 residual stream).
  stock_bert_takes_custom_attention()
                       stock BertModel, given a core_attention other than DotProductAttention and
                       no Transformer Engine, raises TypeError in 0.16.1 (TempoBertModel exists for
                       that); 0.19 takes the missing TE for version 0.0.0 and uses [b, 1, s, s].
  mlp_spec(), spec_submodules(), spec_module()
                       a layer spec's `mlp` is ModuleSpec(MLP, submodules) in 0.16.1; 0.19 builds
                       it as partial(MLP.as_mlp_submodule, submodules=...) (a ModuleSpec of an MLP
                       subclass would get pg_collection, which MLP.__init__ does not take).

Unchanged where we looked (so no helper): DotProductAttention (constructor and forward), the
core_attention call in SelfAttention, SelfAttentionSubmodules / TransformerLayerSubmodules field
names, the bda factory signature f(training, fused), the norm constructor cls(config=,
hidden_size=, eps=), and the targets of tempo_ds.megatron.cpu's patches (checked at run time).
"""
import contextlib
import functools
import logging

__all__ = [
    "SUPPORTED", "TESTED", "bda_operands", "is_supported", "mlp_spec", "quiet_gpt_model_deprecation",
    "spec_module", "spec_submodules", "stock_bert_takes_custom_attention", "tokenizer_base", "version",
]

# The megatron-core releases tempo_ds supports (setup.py says the same; tests/test_compat.py checks).
SUPPORTED = ">=0.16.1,<0.20"
# The releases CI runs: make test (the main environment) and make test-compat (Makefile MCORE_COMPAT).
TESTED = ("0.16.1", "0.19.2")


@functools.lru_cache(maxsize=None)
def version():
    """The version of the megatron.core that imports here (not of whatever pip metadata says),
    as a packaging Version."""
    from packaging.version import Version
    from megatron.core import package_info
    # an sdist built inside a git checkout stamps a local "+<hash>" (0.19.2+72ae2d4 in CI): the
    # release is the public part
    return Version(Version(package_info.__version__).public)


def is_supported(v=None):
    """True when megatron-core `v` (default: the imported one) lies in SUPPORTED."""
    from packaging.specifiers import SpecifierSet
    return SpecifierSet(SUPPORTED).contains(version() if v is None else v, prereleases=True)


# -- tokenizers ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def tokenizer_base():
    """The base class of tempo_ds.data's tokenizers: megatron-core's MegatronLegacyTokenizer where it
    exists (0.16.1), else a class with its contract (0.19 removed it; its datasets read only
    vocab_size, eod, pad, eos, cls, sep, mask and inv_vocab of a tokenizer, as 0.16.1's do)."""
    try:
        from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer
        return MegatronLegacyTokenizer
    except ImportError:
        return _LegacyTokenizer


class _LegacyTokenizer:
    """MegatronLegacyTokenizer's contract: unique_identifiers / unique_description from the paths
    and options given, tokenize / vocab / inv_vocab / vocab_size to be defined by the subclass, and
    the optional parts raising NotImplementedError (which megatron's datasets catch)."""

    def __init__(self, *tokenizer_paths, **tokenizer_options):
        import json
        from collections import OrderedDict
        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = list(tokenizer_paths)
        for option, value in tokenizer_options.items():
            self.unique_identifiers[option] = str(value)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    def tokenize(self, text):
        raise NotImplementedError(f"{type(self).__name__} has no method 'tokenize'")

    def detokenize(self, ids):
        raise NotImplementedError(f"{type(self).__name__} has no method 'detokenize'")

    def offsets(self, ids, text):
        raise NotImplementedError(f"{type(self).__name__} has no method 'offsets'")


def _optional(name):
    def missing(self):
        raise NotImplementedError(f"{type(self).__name__} has no attribute {name!r}")
    return property(missing, doc=f"Optional attribute {name!r}: raises NotImplementedError unless defined.")


for _name in ("vocab", "inv_vocab", "vocab_size", "cls", "sep", "pad", "eod", "bos", "eos", "mask"):
    setattr(_LegacyTokenizer, _name, _optional(_name))
del _name


# -- GPTModel ------------------------------------------------------------------------------------
_GPT_MODEL_LOGGER = "megatron.core.models.gpt.gpt_model"
_GPT_MODEL_DEPRECATION = "GPTModel IS DEPRECATED"


class _DropGPTModelDeprecation(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith(_GPT_MODEL_DEPRECATION)


@contextlib.contextmanager
def quiet_gpt_model_deprecation():
    """Inside the block, drop exactly the "GPTModel IS DEPRECATED" record that 0.19 logs per model.

    tempo_ds builds GPTModel because it is the GPT class every supported release has (HybridModel,
    its successor, is not in 0.16.1); the message would repeat for every model a test builds. The
    filter is removed on exit, so a user's own GPTModel still logs it. No-op on 0.16.1.
    """
    logger = logging.getLogger(_GPT_MODEL_LOGGER)
    dropper = _DropGPTModelDeprecation()
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


# -- BertModel -----------------------------------------------------------------------------------
def stock_bert_takes_custom_attention():
    """True when stock BertModel builds with a core_attention other than DotProductAttention here.

    BertModel takes any other core_attention for Transformer Engine's and picks the mask layout
    from TE's version. Without TE, 0.19 reports version 0.0.0 and picks [b, 1, s, s] (what
    TempoCoreAttention takes); 0.16.1 reports None, and comparing it raises TypeError, which is
    why TempoBertModel exists. TempoBertModel gives "b1ss" on every release.
    """
    from megatron.core.utils import get_te_version
    return get_te_version() is not None


# -- bias-dropout-add ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _bda_casts_to_residual():
    # Ask the stock bda itself which operand it casts: one 1-element call, once per process.
    import torch
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    x = torch.zeros(1, dtype=torch.bfloat16)
    residual = torch.zeros(1, dtype=torch.float32)
    out = get_bias_dropout_add(False, False)((x, None), residual, 0.0)
    return out.dtype == residual.dtype


def bda_operands(x, bias, residual):
    """(x, bias, residual) cast as the installed megatron-core's stock bias-dropout-add casts them
    when their dtypes differ (AMP O1, fp32_residual_connection): the residual to x's dtype (0.16.1),
    or x and bias to the residual's dtype (0.19.2, which keeps an fp32 residual stream in fp32).
    The output of the bda then has the dtype stock gives. Operands of one dtype come back as given.
    """
    if x.dtype == residual.dtype:
        return x, bias, residual
    if _bda_casts_to_residual():
        return x.to(residual.dtype), None if bias is None else bias.to(residual.dtype), residual
    return x, bias, residual.to(x.dtype)


# -- layer specs ---------------------------------------------------------------------------------
def mlp_spec(module, submodules):
    """The `mlp` entry of a TransformerLayerSubmodules for MLP class `module` (MLP or a subclass)
    with MLPSubmodules `submodules`, in the form the installed TransformerLayer builds without a
    warning: ModuleSpec(module, submodules=) (0.16.1), partial(module.as_mlp_submodule,
    submodules=) where MLP has that constructor (0.19)."""
    if hasattr(module, "as_mlp_submodule"):
        return functools.partial(module.as_mlp_submodule, submodules=submodules)
    from megatron.core.transformer.spec_utils import ModuleSpec
    return ModuleSpec(module=module, submodules=submodules)


def spec_submodules(spec):
    """The submodules of a spec entry: ModuleSpec.submodules, or the `submodules` keyword of a
    partial (the 0.19 MLP form of mlp_spec)."""
    if isinstance(spec, functools.partial):
        return spec.keywords.get("submodules")
    return getattr(spec, "submodules", None)


def spec_module(spec):
    """The class a spec entry builds: ModuleSpec.module, the class of a partial of a bound
    classmethod (`MLP.as_mlp_submodule`), a partial's function, or the entry itself (a class)."""
    if isinstance(spec, functools.partial):
        func = spec.func
        owner = getattr(func, "__self__", None)
        return owner if isinstance(owner, type) else func
    return getattr(spec, "module", spec)
