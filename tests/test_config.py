"""The "tempo" key of ds_config: accepted forms, and one test per kind of mistake.

Mistakes must fail in tempo_ds.initialize before DeepSpeed starts (DeepSpeed itself ignores an
unknown top-level key), with a message that names the field and lists the accepted values.
"""
import json

import pytest
from torch import nn

from tempo_ds.deepspeed.config import TempoConfig, TempoConfigError, load_ds_config, split_config


def test_absent_and_false_disable():
    assert not TempoConfig.parse(None).enabled
    assert not TempoConfig.parse(False).enabled
    assert TempoConfig.parse(False).kinds == frozenset()


def test_true_enables_everything():
    cfg = TempoConfig.parse(True)
    assert cfg == TempoConfig()
    assert cfg.kinds == {"gelu", "layernorm", "rmsnorm", "dropout", "attention", "loss"}


def test_object_fields():
    cfg = TempoConfig.parse({"gelu": False, "attention": "stock", "build": "prebuilt"})
    assert cfg.enabled and not cfg.gelu and cfg.build == "prebuilt"
    assert cfg.kinds == {"layernorm", "rmsnorm", "dropout", "loss"}
    assert TempoConfig.parse({"loss": False}).kinds == {"gelu", "layernorm", "rmsnorm", "dropout", "attention"}
    assert not TempoConfig.parse({"enabled": False}).kinds


def test_wrong_top_level_type():
    with pytest.raises(TempoConfigError, match=r'"tempo" must be true, false or an object.*gelu'):
        TempoConfig.parse("yes")
    with pytest.raises(TempoConfigError, match='"tempo" must be'):
        TempoConfig.parse(1)


def test_unknown_field_lists_accepted_fields():
    with pytest.raises(TempoConfigError, match=r"unknown field\(s\) 'gleu'.*accepted fields: enabled, gelu"):
        TempoConfig.parse({"gleu": True})


def test_bool_field_wrong_type():
    with pytest.raises(TempoConfigError, match=r'"tempo.layernorm" must be true or false; got \'yes\''):
        TempoConfig.parse({"layernorm": "yes"})
    with pytest.raises(TempoConfigError, match='"tempo.dropout"'):
        TempoConfig.parse({"dropout": 1})


def test_choice_field_wrong_value():
    with pytest.raises(TempoConfigError, match=r"\"tempo.attention\" must be one of 'auto', 'tempo', 'flash', 'stock'; got 'fast'"):
        TempoConfig.parse({"attention": "fast"})


def test_choice_field_wrong_type():
    with pytest.raises(TempoConfigError, match=r"\"tempo.build\" must be one of 'jit', 'prebuilt'; got True"):
        TempoConfig.parse({"build": True})


def test_split_strips_only_tempo(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"tempo": {"gelu": False}, "train_micro_batch_size_per_gpu": 2}))
    tempo, rest = split_config(load_ds_config(str(path)))
    assert not tempo.gelu and rest == {"train_micro_batch_size_per_gpu": 2}


@pytest.mark.parametrize("where", ["config", "config_params", "args"])
def test_initialize_fails_before_deepspeed(where):
    import argparse

    import tempo_ds
    bad = {"train_micro_batch_size_per_gpu": 1, "tempo": {"attention": "fast"}}
    kwargs = {"args": argparse.Namespace(deepspeed_config=bad)} if where == "args" else {where: bad}
    # No process group exists here: reaching deepspeed.initialize would fail differently.
    with pytest.raises(TempoConfigError, match="tempo.attention"):
        tempo_ds.initialize(model=nn.Linear(2, 2), **kwargs)


def test_prebuilt_missing_is_a_clear_error():
    from tempo_ds.deepspeed.apply import prepare_ops
    from tempo_ds.op_builder import FAMILIES
    if all(cpu().prebuilt() is not None for cpu, _ in FAMILIES.values()):
        pytest.skip("the ops are prebuilt in this installation")
    with pytest.raises(RuntimeError, match=r'"tempo.build": "prebuilt" but op tempo_\w+ is not prebuilt'):
        prepare_ops(TempoConfig(build="prebuilt"), "cpu")


def test_same_signature_as_deepspeed():
    """deepspeed.initialize's parameters, in order with their defaults, plus the keyword-only
    `tempo` (a TempoConfig parsed already)."""
    import inspect

    import deepspeed

    import tempo_ds
    ours = inspect.signature(tempo_ds.initialize).parameters
    theirs = inspect.signature(deepspeed.initialize).parameters
    shared = [p for p in ours.values() if p.kind != p.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in shared] == [(p.name, p.default) for p in theirs.values()]
    assert [(p.name, p.default) for p in ours.values() if p.kind == p.KEYWORD_ONLY] == [("tempo", None)]


def test_import_tempo_ds_stays_light():
    import subprocess
    import sys
    code = "import sys, tempo_ds; assert 'deepspeed' not in sys.modules and 'megatron' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_explicit_null_is_refused():
    from tempo_ds.deepspeed.config import tempo_entry
    assert not tempo_entry({"train_micro_batch_size_per_gpu": 1}).enabled  # absent: off
    with pytest.raises(TempoConfigError, match='"tempo" must be .* got null'):
        tempo_entry({"tempo": None})
    with pytest.raises(TempoConfigError, match="got null"):
        split_config({"tempo": None})


@pytest.mark.parametrize("fields", [("deepspeed_config",), ("deepscale_config",)])
def test_config_given_twice_is_refused_before_any_swap(fields):
    """As DeepSpeed: one config, from config=/config_params= or from args (deepscale_config is
    its deprecated name for deepspeed_config); both at once raise, here before the model is
    touched."""
    import argparse

    import tempo_ds
    from tempo_ds.deepspeed.engine import read_tempo_config
    on = {"train_micro_batch_size_per_gpu": 1, "tempo": True}
    args = argparse.Namespace(**{name: on for name in fields})
    assert read_tempo_config(args=args).enabled  # the deprecated name is read too
    model = nn.Sequential(nn.Linear(2, 2), nn.GELU())
    with pytest.raises(ValueError, match=f"args.{fields[0]} and as config="):
        tempo_ds.initialize(args=args, model=model, config={"train_micro_batch_size_per_gpu": 1})
    assert isinstance(model[1], nn.GELU)
    both = argparse.Namespace(deepspeed_config=on, deepscale_config=on)
    with pytest.raises(ValueError, match="both set"):
        tempo_ds.initialize(args=both, model=model)


@pytest.mark.parametrize("config,dp,expected", [
    ({"train_micro_batch_size_per_gpu": 4}, 2, (4, 1)),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (4, 3)),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, 2, (8, 4)),
    ({"train_batch_size": 64, "gradient_accumulation_steps": 4}, 2, (8, 4)),
    ({"train_batch_size": 64}, 2, (32, 1)),
])
def test_trainer_batch_geometry_follows_deepspeed(config, dp, expected):
    from tempo_ds.training.train import batch_geometry
    assert batch_geometry(config, dp) == expected


def test_trainer_micro_batch_override_keeps_the_accumulation(tmp_path):
    from tempo_ds.training.train import build_ds_config, parse_args
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8,
                                "gradient_accumulation_steps": 4}))
    args = parse_args(["--config", str(path)])
    assert build_ds_config(args, on_cpu=True)["train_batch_size"] == 64  # untouched without override
    args = parse_args(["--config", str(path), "--micro-batch", "2"])
    overridden = build_ds_config(args, on_cpu=True)
    assert "train_batch_size" not in overridden
    assert (overridden["train_micro_batch_size_per_gpu"], overridden["gradient_accumulation_steps"]) == (2, 4)
    path.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ValueError, match="without gradient_accumulation_steps"):
        build_ds_config(parse_args(["--config", str(path), "--micro-batch", "2"]), on_cpu=True)


class _TwoRankMPU:
    """The one mpu method the sequence-parallel check reads: a tensor-parallel group of two."""

    @staticmethod
    def get_tensor_model_parallel_world_size():
        return 2


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sequence_parallel_under_zero_2_and_3_is_refused(stage, caplog):
    """DeepSpeed does not sum the norm gradients that sequence parallelism leaves partial on each
    tensor-parallel rank: ZeRO-2/3 (which reduce during backward) are refused before anything is
    built, ZeRO-1 warns with the call that sums them."""
    import logging

    import tempo_ds
    model = nn.LayerNorm(4)
    for p in model.parameters():
        p.sequence_parallel = True
    config = {"train_micro_batch_size_per_gpu": 1, "tempo": True, "zero_optimization": {"stage": stage}}
    if stage >= 2:
        with pytest.raises(ValueError, match=f"ZeRO stage {stage}"):
            tempo_ds.initialize(model=model, config=config, mpu=_TwoRankMPU())
        return
    from tempo_ds.deepspeed.engine import _check_sequence_parallel
    with caplog.at_level(logging.WARNING, logger="tempo_ds"):
        _check_sequence_parallel(model, config, _TwoRankMPU())
    assert "allreduce_sequence_parallel_grads" in caplog.text


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """deepspeed.initialize and the op builds replaced for the test: the calls DeepSpeed would get
    are recorded, so initialize's own work runs in a second instead of DeepSpeed's ~30-80 s."""
    from tempo_ds.deepspeed import engine
    handed = []
    monkeypatch.setattr(engine.deepspeed, "initialize",
                        lambda **kwargs: handed.append(kwargs) or (kwargs["model"], None, None, None))
    monkeypatch.setattr(engine, "prepare_ops", lambda config, device_type: [])
    return handed


def test_tempo_is_parsed_once_per_process(monkeypatch, fake_deepspeed):
    """initialize parses "tempo" once and hands the TempoConfig down; a caller that parsed it
    (split_config, as the trainer does) passes it as tempo= and it is not parsed again; tempo=
    and a config key that disagree are refused before anything is swapped."""
    import tempo_ds
    from tempo_ds.modules import TempoGELU
    parsed = []
    parse = TempoConfig.parse.__func__
    monkeypatch.setattr(TempoConfig, "parse", classmethod(lambda cls, value: parsed.append(value) or parse(cls, value)))
    base = {"train_micro_batch_size_per_gpu": 1}

    model = nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Dropout(0.1))
    tempo_ds.initialize(model=model, config={**base, "tempo": {"dropout": False}})
    assert parsed == [{"dropout": False}] and fake_deepspeed[-1]["config"] == base
    assert isinstance(model[1], TempoGELU) and type(model[2]) is nn.Dropout
    assert model.tempo_config == TempoConfig(dropout=False)

    tempo, rest = split_config({**base, "tempo": True})
    assert len(parsed) == 2
    model = nn.Sequential(nn.Linear(2, 2), nn.GELU())
    tempo_ds.initialize(model=model, config=rest, tempo=tempo)
    assert len(parsed) == 2 and isinstance(model[1], TempoGELU) and fake_deepspeed[-1]["config"] == base

    tempo_ds.initialize(model=nn.Sequential(nn.GELU()), config={**base, "tempo": True}, tempo=tempo)
    assert fake_deepspeed[-1]["config"] == base  # agreeing: accepted, the key stripped
    model = nn.Sequential(nn.Linear(2, 2), nn.GELU())
    with pytest.raises(TempoConfigError, match=r'tempo=TempoConfig\(.*\) disagrees with the config\'s "tempo"'):
        tempo_ds.initialize(model=model, config={**base, "tempo": {"gelu": False}}, tempo=tempo)
    assert type(model[1]) is nn.GELU
    with pytest.raises(TypeError, match="tempo= must be a TempoConfig"):
        tempo_ds.initialize(model=model, config=base, tempo=True)


def test_initialize_prints_the_swap_report_by_default(tmp_path):
    """In a fresh process with no logging set up, tempo_ds.initialize prints its swap report on
    stderr: INFO for the kinds swapped cleanly, WARNING for attention left stock (no Tempo twin
    for nn.MultiheadAttention). Swapping a plain PyTorch model imports no Megatron."""
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "import deepspeed\n"
        "from torch import nn\n"
        "import tempo_ds\n"
        "from tempo_ds.deepspeed import engine\n"
        "deepspeed.initialize = lambda **kwargs: (kwargs['model'], None, None, None)\n"
        "engine.prepare_ops = lambda config, device_type: []\n"
        "model = nn.Sequential(nn.MultiheadAttention(4, 2), nn.LayerNorm(4), nn.GELU())\n"
        "tempo_ds.initialize(model=model, config={'train_micro_batch_size_per_gpu': 1, 'tempo': True})\n"
        "assert 'megatron' not in sys.modules\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert "INFO tempo_ds: swap gelu: swapped 1, no stock ones left" in lines
    assert "INFO tempo_ds: swap layernorm: swapped 1, no stock ones left" in lines
    assert ("WARNING tempo_ds: swap attention: swapped 0, left 1 stock: nn.MultiheadAttention has no "
            "Tempo twin (1, e.g. 0)") in lines
