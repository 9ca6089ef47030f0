"""tempo_ds.initialize through the trainer, on CPU with 2 gloo ranks.

One `torchrun --nproc_per_node 2` job (this file run as a script) does every run in sequence, so
the ~30 s of process start, imports and DeepSpeed setup is paid once; the tests read its results.

- ZeRO 0/1/2/3 x TP 1/2, tiny GPT, dropout 0: the losses with "tempo": true match "tempo": false
  at every step (within rounding), and the Tempo runs really use the Tempo spec.
- "tempo": false is deepspeed.initialize: a plain PyTorch model trains to bit-identical losses
  through both, and no module is swapped; with "tempo": true its modules are swapped, weights kept.
- Resume: 3 steps, save, resume to 6 == 6 steps uninterrupted (dropout 0.1, so RNG matters).
"""
import json
import os
import subprocess
import sys

import pytest

from tempo_ds.megatron.parallel import free_local_port

STEPS = 3
STAGES = (0, 1, 2, 3)
TPS = (1, 2)


# -- the worker (runs under torchrun) -------------------------------------------------------------
def _train(extra):
    from tempo_ds.training.train import parse_args, run
    args = parse_args(["--model", "gpt2", "--size", "tiny", "--seq-length", "32", "--micro-batch", "2",
                       "--log-interval", "1000", "--no-summary", *extra])
    return run(args)


def _plain_model():
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.0), nn.Linear(32, 1))


def _plain_losses(initialize, tempo):
    import torch
    model = _plain_model()
    config = {"train_micro_batch_size_per_gpu": 4, "tempo": tempo,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=config)
    gen = torch.Generator().manual_seed(int(os.environ["RANK"]))
    losses = []
    for _ in range(STEPS):
        x = torch.randn(4, 16, generator=gen)
        loss = engine(x).square().mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, sorted({type(m).__name__ for m in model.modules()})


def worker(out_path):
    import deepspeed

    import tempo_ds

    results = {"zero": {}, "plain": {}}
    # Plain models first: DeepSpeed keeps the last mpu it was given in a module global, and after
    # the Megatron runs that mpu's groups are destroyed.
    results["plain"]["deepspeed"] = _plain_losses(deepspeed.initialize, False)
    results["plain"]["tempo_off"] = _plain_losses(tempo_ds.initialize, False)
    results["plain"]["tempo_on"] = _plain_losses(tempo_ds.initialize, True)

    for tp in TPS:
        for stage in STAGES:
            for tempo in ("off", "on"):
                r = _train(["--steps", str(STEPS), "--tp", str(tp), "--zero-stage", str(stage),
                            "--dropout", "0", "--tempo", tempo])
                results["zero"][f"tp{tp}-zero{stage}-{tempo}"] = {"losses": r.losses, "spec": r.spec}

    folder = os.path.join(os.path.dirname(out_path), "ckpt")
    common = ["--dropout", "0.1", "--zero-stage", "1", "--tempo", "on"]
    full = _train(["--steps", "6", *common])
    first = _train(["--steps", "3", "--save", folder, *common])
    resumed = _train(["--steps", "6", "--load", folder, *common])
    results["resume"] = {"full": full.losses, "first": first.losses, "resumed": resumed.losses,
                         "start_step": resumed.start_step}
    if int(os.environ["RANK"]) == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


# -- the tests --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # imported here: this file also runs as a plain script under torchrun, outside the package
    folder = tmp_path_factory.mktemp("ds_train")
    out = folder / "results.json"
    env = dict(os.environ, TEMPO_DS_CACHE=str(folder / "cache"), OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_local_port()), os.path.abspath(__file__), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("stage", STAGES)
def test_tempo_matches_stock(results, tp, stage):
    off = results["zero"][f"tp{tp}-zero{stage}-off"]
    on = results["zero"][f"tp{tp}-zero{stage}-on"]
    assert off["spec"] == "stock" and on["spec"] == "tempo"
    assert len(on["losses"]) == STEPS
    assert on["losses"] == pytest.approx(off["losses"], rel=1e-4, abs=1e-5)
    # Every ZeRO stage trains the same model on the same data as stage 0. (TP 1 runs DP 2 and
    # TP 2 runs DP 1 on the two ranks, so their batches, and losses, differ.)
    if stage != 0:
        reference = results["zero"][f"tp{tp}-zero0-off"]["losses"]
        assert off["losses"] == pytest.approx(reference, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_tempo_false_is_deepspeed(results):
    ds_losses, ds_types = results["plain"]["deepspeed"]
    off_losses, off_types = results["plain"]["tempo_off"]
    assert off_losses == ds_losses  # bit-identical
    assert off_types == ds_types
    assert not any(t.startswith("Tempo") for t in off_types)


@pytest.mark.slow
def test_tempo_true_swaps_plain_model(results):
    on_losses, on_types = results["plain"]["tempo_on"]
    ds_losses, _ = results["plain"]["deepspeed"]
    assert {"TempoGELU", "TempoLayerNorm", "TempoDropout"} <= set(on_types)
    assert not {"GELU", "LayerNorm", "Dropout"} & set(on_types)
    assert on_losses == pytest.approx(ds_losses, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_resume_continues_trajectory(results):
    r = results["resume"]
    assert r["start_step"] == 3
    assert r["first"] == r["full"][:3]
    assert r["resumed"] == pytest.approx(r["full"][3:], rel=1e-6, abs=1e-7)


if __name__ == "__main__":
    worker(sys.argv[1])
