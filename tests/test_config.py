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
    assert cfg.kinds == {"gelu", "layernorm", "rmsnorm", "dropout", "attention"}


def test_object_fields():
    cfg = TempoConfig.parse({"gelu": False, "attention": "stock", "build": "prebuilt"})
    assert cfg.enabled and not cfg.gelu and cfg.build == "prebuilt"
    assert cfg.kinds == {"layernorm", "rmsnorm", "dropout"}
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
    import inspect

    import deepspeed

    import tempo_ds
    ours = inspect.signature(tempo_ds.initialize).parameters
    theirs = inspect.signature(deepspeed.initialize).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]


def test_import_tempo_ds_stays_light():
    import subprocess
    import sys
    code = "import sys, tempo_ds; assert 'deepspeed' not in sys.modules and 'megatron' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
