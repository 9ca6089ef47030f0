"""The "tempo" key of a DeepSpeed config: parsed and validated before training starts.

DeepSpeed ignores unknown top-level keys, so a typo in our key would otherwise train the stock
model without a word. Every field is checked here and an error names the field and the values it
accepts. The fields are documented in docs/config.md.
"""
import os
from dataclasses import dataclass, fields

ATTENTION_CHOICES = ("auto", "tempo", "flash", "stock")
BUILD_CHOICES = ("jit", "prebuilt")
# swap kind (tempo_ds.modules.swap) -> the field of "tempo" that turns it on
KIND_FIELDS = {"gelu": "gelu", "layernorm": "layernorm", "rmsnorm": "layernorm", "dropout": "dropout",
               "attention": "attention", "loss": "loss"}


class TempoConfigError(ValueError):
    """A "tempo" entry of ds_config that tempo_ds cannot accept."""


@dataclass(frozen=True)
class TempoConfig:
    """What `"tempo": ...` in ds_config asks for.

    Attributes:
        enabled: master switch; False makes tempo_ds.initialize exactly deepspeed.initialize.
        gelu: swap GELU activations for the in-place GELU (keeps output + 1 bit per element).
        layernorm: swap LayerNorm and RMSNorm for the output-saving norms (keep output + stats).
        dropout: swap dropout for the seed-based dropout (keeps no mask).
        attention: core attention: "tempo" (softmax saving its output, seeded dropout), "flash"
            (fused kernel that keeps no probabilities), "stock" (leave it), or "auto" (flash
            where the device and settings allow it, else tempo).
        build: "jit" builds the ops on first use (cached); "prebuilt" requires ops installed
            with TEMPO_BUILD_OPS=1 and fails at initialize if they are missing.
        loss: give megatron-core GPT/BERT models and Hugging Face GPT2LMHeadModel /
            BertForMaskedLM / RobertaForMaskedLM / XLMRobertaForMaskedLM the fused linear
            cross-entropy head (keeps the fp32 lse per token, not the fp32 softmax; the MLM head
            runs at the masked positions only).
    """
    enabled: bool = True
    gelu: bool = True
    layernorm: bool = True
    dropout: bool = True
    attention: str = "auto"
    build: str = "jit"
    loss: bool = True

    @property
    def kinds(self):
        """The swap-table kinds (tempo_ds.modules.swap) this configuration turns on."""
        if not self.enabled:
            return frozenset()
        wanted = {"gelu": self.gelu, "layernorm": self.layernorm, "rmsnorm": self.layernorm,
                  "dropout": self.dropout, "attention": self.attention != "stock", "loss": self.loss}
        return frozenset(k for k, on in wanted.items() if on)

    def off_reason(self, kind):
        """Why `kind` (one not in self.kinds) is off, in the words of the config, for the report."""
        if not self.enabled:
            return '"tempo" is off'
        name = KIND_FIELDS[kind]
        value = getattr(self, name)
        return f'"tempo.{name}" is "{value}"' if isinstance(value, str) else f'"tempo.{name}" is false'

    def swap_options(self):
        """The per-kind settings of tempo_ds.modules.swap.swap_modules (the attention path)."""
        return {"attention": self.attention}

    @classmethod
    def disabled(cls):
        """"tempo" off: tempo_ds.initialize is deepspeed.initialize."""
        return cls(enabled=False)

    @classmethod
    def parse(cls, value):
        """Build from the JSON value of "tempo": None/absent, a bool, or an object.

        Raises TempoConfigError naming the offending field and the accepted values.
        """
        if value is None:
            return cls.disabled()
        # bool first: JSON true/false. (int is rejected below: 1 is not a switch.)
        if isinstance(value, bool):
            return cls(enabled=value)
        if not isinstance(value, dict):
            raise TempoConfigError(
                f'"tempo" must be true, false or an object with fields {_field_list()}; '
                f"got {type(value).__name__} {value!r}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise TempoConfigError(
                f'"tempo" has unknown field(s) {", ".join(repr(u) for u in unknown)}; '
                f"accepted fields: {_field_list()}")
        for name, raw in value.items():
            _check_field(name, raw)
        return cls(**value)

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _field_list():
    return ", ".join(f.name for f in fields(TempoConfig))


_CHOICES = {"attention": ATTENTION_CHOICES, "build": BUILD_CHOICES}


def _check_field(name, raw):
    if name in _CHOICES:
        choices = _CHOICES[name]
        if not isinstance(raw, str) or raw not in choices:
            raise TempoConfigError(
                f'"tempo.{name}" must be one of {", ".join(repr(c) for c in choices)}; got {raw!r}')
    elif not isinstance(raw, bool):
        raise TempoConfigError(f'"tempo.{name}" must be true or false; got {raw!r}')


def load_ds_config(config):
    """A DeepSpeed config as a new dict, from a dict or from what deepspeed.initialize accepts as a
    string (a JSON/HJSON path or base64), read by DeepSpeed's own loader so both see the same."""
    if config is None:
        return None
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, os.PathLike):
        config = os.fspath(config)
    if isinstance(config, str):
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config as ds_load
        return dict(ds_load(config))
    raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def tempo_entry(ds_config):
    """The TempoConfig of a DeepSpeed config dict: disabled when "tempo" is absent. An explicit
    null is refused rather than read as absent, which would train the stock model without a word."""
    if "tempo" in ds_config and ds_config["tempo"] is None:
        raise TempoConfigError(f'"tempo" must be true, false or an object with fields {_field_list()}; got null')
    return TempoConfig.parse(ds_config.get("tempo"))


def split_config(ds_config):
    """(TempoConfig, the DeepSpeed config without the "tempo" key): "tempo" parsed once, here."""
    rest = {k: v for k, v in ds_config.items() if k != "tempo"}
    return tempo_entry(ds_config), rest
