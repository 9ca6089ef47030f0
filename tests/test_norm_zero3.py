"""The norms' default recoverability policy under DeepSpeed ZeRO-3 on CPU (one gloo process).

ZeRO-3 frees a parameter after its module's forward and gathers it again, into new storage
(on a GPU at another address), before the next use, so a verdict kept per parameter state
(tensor, data pointer, version) cannot be trusted there. The default policy keeps
none. One process (this file run as a script) trains the same model at ZeRO-0 and at ZeRO-3 with
every parameter partitioned; after 4 steps the LayerNorm's gamma is zeroed (through
GatheredParameters at stage 3), and it trains 2 steps more. The tests read its results.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest

STEPS, ZERO_AT = 6, 4


# -- the worker (runs as a script) ---------------------------------------------------------------
def _model():
    import torch
    from torch import nn

    from tempo_ds.modules import TempoLayerNorm, TempoRMSNorm
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), TempoLayerNorm(32), nn.GELU(), nn.Linear(32, 32),
                         TempoRMSNorm(32), nn.Linear(32, 1))


def _run(stage):
    import deepspeed
    import torch

    model = _model()
    norm = model[1]
    sizes = []
    # after the forward, before ZeRO-3's own hook (registered later) frees the gathered gamma
    norm.register_forward_hook(lambda m, args, out: sizes.append(m.weight.numel()))
    config = {"train_micro_batch_size_per_gpu": 4,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    gen = torch.Generator().manual_seed(1)
    losses, warned, gammas = [], [], []
    for step in range(STEPS):
        if step == ZERO_AT:
            with deepspeed.zero.GatheredParameters([norm.weight], modifier_rank=0, enabled=stage == 3):
                norm.weight.data[::3].zero_()
                edited = norm.weight.detach().clone()
            if stage == 3:
                # the optimizer's own fp32 partition of gamma, which the edit above does not reach
                deepspeed.utils.safe_set_full_fp32_param(norm.weight, edited)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = engine(torch.randn(4, 16, generator=gen)).square().mean()
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
        warned.append([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
        with deepspeed.zero.GatheredParameters([norm.weight], enabled=stage == 3):
            gammas.append(norm.weight.detach().clone().tolist())
    return {"losses": losses, "warned": warned, "gammas": gammas, "gathered": sorted(set(sizes)),
            "partitioned": norm.weight.numel() == 0}


def worker(out_path):
    import deepspeed

    from tempo_ds.ops import norm as norm_ops
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for stage in (0, 3):
        norm_ops._inexact_warned = False  # the warning is once per process: once per run here
        results[stage] = _run(stage)
    with open(out_path, "w") as f:
        json.dump(results, f)
    # Everything is written. Interpreter teardown with DeepSpeed's CPU communication threads alive
    # aborted once in CI (2026-12-02: "terminate called without an active exception", exit -6,
    # after the same test had passed on the same tree): leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- the tests --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tempo_ds.megatron.parallel import free_local_port
    folder = tmp_path_factory.mktemp("norm_zero3")
    out = folder / "results.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_local_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    with open(out) as f:
        return {int(k): v for k, v in json.load(f).items()}


@pytest.mark.slow
def test_zero3_partitions_and_regathers_the_norm(results):
    """At stage 3 the norm's gamma is partitioned between uses (empty outside the forward) and
    gathered whole for each forward; at stage 0 it is never partitioned."""
    assert results[3]["partitioned"] and results[3]["gathered"] == [32]
    assert not results[0]["partitioned"]


@pytest.mark.slow
def test_zero3_trains_like_zero0_before_and_after_a_zeroed_gamma(results):
    """The same losses at ZeRO-0 and ZeRO-3 at every step, finite after gamma[::3] is zeroed,
    and gamma moved before the edit (so the runs really train the norm)."""
    zero0, zero3 = results[0], results[3]
    assert zero3["losses"] == pytest.approx(zero0["losses"], rel=1e-5, abs=1e-6)
    assert all(abs(loss) < float("inf") for loss in zero3["losses"])
    assert zero3["gammas"][0] != zero3["gammas"][ZERO_AT - 1]
    assert zero3["gammas"][-1] == pytest.approx(zero0["gammas"][-1], rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_zeroed_gamma_warns_after_its_step(results, stage):
    """Nothing warns before the edit, and the optimizer step after it warns once, counting the 11
    zeroed features of its one backward."""
    run = results[stage]
    assert run["warned"][:ZERO_AT] == [[]] * ZERO_AT
    assert len(run["warned"][ZERO_AT]) == 1 and "11 feature(s)" in run["warned"][ZERO_AT][0]
    assert run["warned"][ZERO_AT + 1:] == [[]] * (STEPS - ZERO_AT - 1)


if __name__ == "__main__":
    worker(sys.argv[1])
