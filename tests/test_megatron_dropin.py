"""The Tempo layer specs as literal drop-ins: they take the config a Megatron-core or Megatron-LM job
already has (bias_activation_fusion on, as Megatron-LM sets it by default; the other fusions on or
off; any GELU), with no rewrite, and compute what the stock local spec computes."""
import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

from tempo_ds import workload
from tempo_ds.memory import SavedTensorLedger

from . import megatron_utils as mu
from .test_megatron_specs import _compare_with_stock

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.usefixtures("megatron_world")


@pytest.fixture(autouse=True)
def _stock_fusions_eager():
    """Megatron's fused bias-GELU and bias-dropout-add are torch.compile'd; their first CPU compile
    took 279 s (fp32) and 89 s (fp64) on this 2-core machine under load (2026-12-02). The stock
    models run them eagerly here: the same expressions, op by op. The Tempo models compile nothing."""
    with torch.compiler.set_stance("force_eager"):
        yield


def _mlps(model):
    from megatron.core.transformer.mlp import MLP
    return [m for m in model.modules() if isinstance(m, MLP)]


def _tempo_forms(model):
    """Per MLP: ("fused", form) for TempoMLP, ("gelu", form) for a TempoGELU activation, or
    ("stock", None)."""
    from tempo_ds.megatron import TempoMLP
    from tempo_ds.modules import TempoGELU
    out = []
    for mlp in _mlps(model):
        act = mlp.activation_func
        if isinstance(mlp, TempoMLP):
            out.append(("fused", act.approximate))
        elif isinstance(act, TempoGELU):
            out.append(("gelu", act.approximate))
        else:
            out.append(("stock", None))
    return out


@pytest.mark.parametrize("arch", workload.ARCHS)
def test_drop_in_for_a_stock_config_with_bias_gelu_fusion(arch):
    """The config as Megatron-LM makes it (bias_activation_fusion=True), dropout 0: the Tempo model
    runs the fused Tempo bias-GELU and matches the stock model, whose bias_gelu_impl computes the
    tanh form, within 2x the stock fp32 error against float64 (logits, loss, every gradient)."""
    model = mu.build(arch, "tempo", mu.tiny_config(bias_activation_fusion=True))
    assert _tempo_forms(model) == [("fused", "tanh")] * mu.TINY.num_layers
    _compare_with_stock(arch, "auto", torch.float32, bias_activation_fusion=True)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", workload.ARCHS)
def test_drop_in_bf16_on_gpu(arch):
    """As above in bf16 on the GPU: the CUDA bias-GELU against Megatron's torch.compile'd one."""
    _compare_with_stock(arch, "auto", torch.bfloat16, bias_activation_fusion=True)


def test_megatron_lm_selects_the_spec_by_name(monkeypatch):
    """Megatron-LM's --spec tempo_ds.megatron get_gpt_layer_tempo_spec goes through megatron's
    spec_utils.import_module, which reads the name from vars(module) after an import with that
    name in its fromlist (tempo_ds.megatron defines it lazily: the fromlist's hasattr loads it),
    and the function is called with no arguments. The spec takes Megatron-LM's config unchanged;
    the model has the stock local spec's state-dict keys and runs the fused Tempo bias-GELU."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import import_module

    package = importlib.import_module("tempo_ds.megatron")
    # as in a fresh process: the lazily loaded name not yet cached in the package
    monkeypatch.delitem(vars(package), "get_gpt_layer_tempo_spec", raising=False)
    config = mu.tiny_config(bias_activation_fusion=True)
    spec = import_module(("tempo_ds.megatron", "get_gpt_layer_tempo_spec"))()
    models = {}
    for name, layer_spec in (("stock", get_gpt_layer_local_spec()), ("tempo", spec)):
        torch.manual_seed(0)
        models[name] = GPTModel(config=config, transformer_layer_spec=layer_spec, vocab_size=mu.VOCAB,
                                max_sequence_length=mu.SEQ)
    assert list(models["tempo"].state_dict()) == list(models["stock"].state_dict())
    # distributed checkpoints: MLP.sharded_state_dict asks every child module for its own
    assert models["tempo"].sharded_state_dict().keys() == models["stock"].sharded_state_dict().keys()
    assert _tempo_forms(models["tempo"]) == [("fused", "tanh")] * mu.TINY.num_layers
    assert models["tempo"].config is config and config.bias_activation_fusion  # no rewrite


def test_layer_from_an_unmodified_config_keeps_gelu_output_and_bits():
    """The ledger, on GPT models from the config with bias_activation_fusion=True: stock keeps the
    4h intermediate twice per layer (bias_gelu_impl's input x + b, and fc2's input), Tempo once
    (fc2's input, the GELU output) plus one bit per element, and no GELU input."""
    config = mu.tiny_config(bias_activation_fusion=True)
    tokens, layers = mu.BATCH * mu.SEQ, config.num_layers
    intermediate = tokens * config.ffn_hidden_size
    reports = {}
    for spec in ("stock", "tempo"):
        model = mu.build("gpt", spec, config)
        with SavedTensorLedger(model) as ledger:
            loss = workload.loss("gpt", model, mu.batch("gpt"))
        reports[spec] = ledger.report(loss)
    wide = {spec: [r for r in report.records if _numel(r.shape) == intermediate]
            for spec, report in reports.items()}
    assert len(wide["stock"]) == 2 * layers
    assert len(wide["tempo"]) == layers
    assert all(r.module.endswith("mlp.linear_fc2") for r in wide["tempo"]), [r.module for r in wide["tempo"]]
    gelu = [r for r in reports["tempo"].records if r.category == "gelu"]
    assert {r.op for r in gelu} == {"BiasGeluFunction"}
    assert sum(r.nbytes for r in gelu) == layers * intermediate // 8
    assert [r.dtype for r in gelu] == [torch.uint8] * layers


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _megatron_fn(name):
    from megatron.core import activations
    from megatron.core.transformer import utils
    return {"openai_gelu": utils.openai_gelu, "gelu_impl": utils.gelu_impl, "fast_gelu": activations.fast_gelu,
            "erf_gelu": utils.erf_gelu, "squared_relu": activations.squared_relu}[name]


# (config fields, what each MLP of the Tempo model runs). Names stand for Megatron's functions.
VARIANTS = {
    "gelu-fused": (dict(bias_activation_fusion=True), ("fused", "tanh")),
    "gelu": (dict(), ("gelu", "none")),
    "gelu-tanh": (dict(activation_func=functools.partial(F.gelu, approximate="tanh")), ("gelu", "tanh")),
    "openai_gelu": (dict(activation_func="openai_gelu"), ("gelu", "tanh")),
    "gelu_impl": (dict(activation_func="gelu_impl"), ("gelu", "tanh")),
    "fast_gelu": (dict(activation_func="fast_gelu"), ("gelu", "tanh")),
    "bias-dropout-fusion": (dict(bias_activation_fusion=True, bias_dropout_fusion=True), ("fused", "tanh")),
    "masked-softmax-fusion": (dict(bias_activation_fusion=True, masked_softmax_fusion=True), ("fused", "tanh")),
    "no-bias": (dict(add_bias_linear=False), ("gelu", "none")),
    "swiglu": (dict(gated_linear_unit=True, activation_func=F.silu), ("stock", "gated_linear_unit")),
    "squared_relu": (dict(activation_func="squared_relu"), ("stock", "squared_relu")),
    "erf_gelu": (dict(activation_func="erf_gelu"), ("stock", "erf_gelu")),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_build_and_match_stock(variant):
    """Each config the stock local spec takes builds with the Tempo spec, unchanged, and runs what
    stock runs: the Tempo GELU of the same form, the fused one under bias_activation_fusion, or,
    for an activation with no Tempo form, the stock MLP with the reason recorded and warned
    (never refused). Logits and every gradient match the stock model's (fp32; the float64 rule
    for the default config is test_drop_in_for_a_stock_config_with_bias_gelu_fusion)."""
    fields, (kind, detail) = VARIANTS[variant]
    fields = {k: _megatron_fn(v) if k == "activation_func" and isinstance(v, str) else v
              for k, v in fields.items()}
    config = mu.tiny_config(**fields)
    stock = mu.build("gpt", "stock", config)
    if kind == "stock":
        with pytest.warns(UserWarning, match=detail):
            tempo = mu.build("gpt", "tempo", config)
        assert all(detail in layer.tempo_mlp_left_stock for layer in tempo.decoder.layers)
        assert all(mlp.activation_func is config.activation_func for mlp in _mlps(tempo))
    else:
        tempo = mu.build("gpt", "tempo", config)
        assert _tempo_forms(tempo) == [(kind, detail)] * config.num_layers
        assert all(layer.tempo_mlp_left_stock is None for layer in tempo.decoder.layers)
    assert tempo.config is config
    tempo.load_state_dict(stock.state_dict())
    batch = mu.batch("gpt")
    results = []
    for model in (stock, tempo):
        model.zero_grad(set_to_none=True)
        loss, logits = workload.loss("gpt", model, batch, return_logits=True)
        loss.backward()
        results.append((logits.detach(), mu.grads(model)))
    (s_logits, s_grads), (t_logits, t_grads) = results
    torch.testing.assert_close(t_logits, s_logits, rtol=1e-5, atol=1e-5)
    assert set(t_grads) == set(s_grads)
    for name in s_grads:
        torch.testing.assert_close(t_grads[name], s_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_initialize_swaps_the_fused_bias_gelu():
    """tempo_ds.initialize's swap of a stock-built model (the third way in) under
    bias_activation_fusion: the MLP row installs the fused Tempo bias-GELU (the decision the specs
    make, tempo_ds.megatron.mlp), counted and with no stock GELU left; the swapped model computes
    what it computed before, and a second swap finds nothing to do."""
    from tempo_ds.deepspeed.apply import swap_model
    from tempo_ds.deepspeed.config import TempoConfig

    config = mu.tiny_config(bias_activation_fusion=True)
    stock = mu.build("gpt", "stock", config)
    model = mu.build("gpt", "stock", config)
    report = swap_model(model, TempoConfig(attention="stock"), log=False)
    assert report.swapped["gelu"] == config.num_layers and not report.left_stock("gelu")
    assert _tempo_forms(model) == [("fused", "tanh")] * config.num_layers
    assert "gelu" not in swap_model(model, TempoConfig(attention="stock"), log=False).swapped
    batch = mu.batch("gpt")
    out = []
    for m in (stock, model):
        loss, logits = workload.loss("gpt", m, batch, return_logits=True)
        loss.backward()
        out.append((logits.detach(), mu.grads(m)))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
