"""Tempo for Hugging Face transformers models: `tempo_ds.hf.apply(model, tempo=True)`.

    model = BertForMaskedLM(config)            # or from_pretrained(...)
    report = tempo_ds.hf.apply(model, "ds_config.json")   # or True, {"attention": "tempo"}, a TempoConfig
    print(report.summary())

The conversion is tempo_ds.modules.swap's one mechanism with the rows of tempo_ds/hf/swaps.py
(LayerNorm, the GELU classes, dropout, and attention through transformers' AttentionInterface as
"tempo", tempo_ds/hf/attention.py); tempo_ds.initialize runs the same rows on a transformers model.
Parameters are kept (the same Parameter objects under the same names), so save_pretrained and
from_pretrained work both ways with stock models.
"""
import os

from ..deepspeed.apply import prepare_ops, swap_model
from ..ops import _backend
from ..deepspeed.config import TempoConfig, TempoConfigError, load_ds_config, split_config

# importing the rows registers them (and "tempo" with transformers' attention interfaces)
from .swaps import ATTENTION_CLASSES, GELU_FORMS


def tempo_config(tempo):
    """The TempoConfig that `tempo` means: a bool, the "tempo" object of a ds_config (dict), a
    TempoConfig, or a ds_config (path, or whole dict holding a "tempo" key), parsed once here.

    Raises TempoConfigError for a bad "tempo" entry, TypeError for any other type.
    """
    if isinstance(tempo, TempoConfig):
        return tempo
    if isinstance(tempo, bool):
        return TempoConfig(enabled=tempo)
    if isinstance(tempo, (str, os.PathLike)):
        return split_config(load_ds_config(tempo))[0]
    if isinstance(tempo, dict):
        # a whole ds_config carries "tempo" (maybe beside DeepSpeed's keys); the "tempo" object
        # itself has only TempoConfig's fields, which parse() checks
        return split_config(tempo)[0] if "tempo" in tempo else TempoConfig.parse(tempo)
    raise TypeError(f"tempo must be a bool, a TempoConfig, the \"tempo\" object of a ds_config or a ds_config "
                    f"path, got {type(tempo).__name__}")


def apply(model, tempo=True, *, log=True, build_ops=True):
    """Convert a transformers model to Tempo in place and return the SwapReport.

    Args:
        model: a transformers PreTrainedModel (any nn.Module is walked the same way).
        tempo: True/False, the "tempo" object of a ds_config, a TempoConfig, or a ds_config path
            or dict (see tempo_config).
        log: log the report on rank 0 (INFO per kind; WARNING for a kind that left stock parts
            and for a model with nothing to swap).
        build_ops: build (or load) the op families for the model's device first, so a JIT build
            happens here, with its progress message, and not inside the first training step.

    What changes: nn.LayerNorm -> TempoLayerNorm and nn.Dropout -> TempoDropout (same Parameter
    objects and names), transformers' GELU classes -> TempoGELU of the same form, and each known
    attention module's config -> attn_implementation="tempo" on the path of "tempo.attention",
    and with "tempo.loss" the fused loss head of GPT-2, BERT, RoBERTa and XLM-R (training with
    labels: no logits, MLM at the counted positions only; tempo_ds/hf/loss_head.py).
    Saves for backward: see tempo_ds/hf/attention.py and the modules' docstrings.
    With "tempo" off nothing changes; the report lists every stock part as off.

    Raises TempoConfigError when the config asks for what the model cannot take.
    """
    config = tempo_config(tempo)
    # TEMPO_DS_OPS=torch runs the PyTorch implementations: nothing to build
    if config.enabled and build_ops and _backend.mode() != "torch":
        param = next(iter(model.parameters()), None)
        prepare_ops(config, "cpu" if param is None else param.device.type)
    return swap_model(model, config, log=log)


__all__ = ["ATTENTION_CLASSES", "GELU_FORMS", "TempoConfigError", "apply", "tempo_config"]
