"""tempo_ds.initialize through the trainer and through the DeepSpeed engine, on CPU with 2 gloo ranks.

One `torchrun --nproc_per_node 2` job (this file run as a script) does every run in sequence, so
the ~30 s of process start, imports and DeepSpeed setup is paid once; the tests read its results.

- ZeRO 0/1/2/3 x TP 1/2, tiny GPT, dropout 0, configs/ds_config_gpt2_constant_lr.json (plain SGD
  at a constant lr; Adam's normalised step turns the rounding of near-zero gradients into moves of
  about lr): after TRAIN_STEPS optimizer steps, the parameters of "tempo": true and "tempo": false
  runs are as close to the stock ZeRO-0 run as the stock runs of the other stages are, within 2x
  (the rounding scale, measured, not typed in), while training moved them far more than that. The gathered gradients of the first step under ZeRO 2 and 3 obey the same rule.
- With dropout 0.1, "tempo": true runs give the same loss trajectory under every ZeRO stage (the
  dropout masks depend on the seed only), and it is not the dropout-free trajectory.
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
# The ZeRO runs: optimizer steps, batch geometry and seed. With TP 1 the two ranks are DP 2.
TRAIN_STEPS = 5
SEQ, VOCAB, SEED = 32, 256, 1234
GRAD_STAGES = (2, 3)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO_CONFIG = os.path.join(ROOT, "configs", "ds_config_gpt2_constant_lr.json")


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


def _gathered(model, grads_of=None):
    """{name: fp64 CPU copy} of this rank's parameters (ZeRO-3 gathers them first), or, with
    grads_of=True, of their gradients as DeepSpeed assembles them after backward (a collective
    under ZeRO 2/3: every rank calls it for every parameter, in the same order)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    params = list(model.named_parameters())
    if grads_of:
        # clone: for a float64 gradient .double() is the gradient itself, which zero_grad clears
        return {n: safe_get_full_grad(p).detach().double().cpu().clone() for n, p in params}
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().double().cpu().clone() for n, p in params}


def _zero_run(tp, stage, tempo, dropout):
    """TRAIN_STEPS steps of a tiny GPT through tempo_ds.initialize with the constant-lr config:
    {losses, initial and final parameters, first step's gradients (this rank's shard), the names
    of the Tempo module types in the model}."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import tempo_ds
    from tempo_ds import workload
    from tempo_ds.deepspeed.config import load_ds_config
    from tempo_ds.deepspeed.mpu import MegatronMPU

    config = load_ds_config(ZERO_CONFIG)
    assert "scheduler" not in config and not config.get("gradient_clipping"), "a constant-lr config"
    config.update(tempo=tempo, zero_optimization={"stage": stage})
    with workload.launcher_env(), workload.distributed(tp=tp) as device:
        workload.reseed(SEED, 0)
        torch.manual_seed(SEED)
        model_config = workload.model_config(workload.shape_of("gpt", "tiny"), tp=tp, dropout=dropout,
                                             dtype=workload.DTYPES["fp32"])
        model = workload.build_model("gpt", model_config, spec="tempo" if tempo else "stock",
                                     vocab_size=VOCAB, seq_length=SEQ, device=device)
        initial = _gathered(model)
        engine, *_ = tempo_ds.initialize(model=model, model_parameters=model.parameters(), config=config,
                                         mpu=MegatronMPU())
        micro_batch = config["train_micro_batch_size_per_gpu"]
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        losses, grads = [], None
        for step in range(TRAIN_STEPS):
            workload.reseed(SEED, step)
            batch = workload.make_batch("gpt", micro_batch, SEQ, VOCAB, seed=SEED + 100 * step + dp_rank,
                                        device=device)
            loss = workload.loss("gpt", engine, batch)
            engine.backward(loss)
            if step == 0:
                grads = _gathered(model, grads_of=True)
            engine.step()
            total = loss.detach().double()
            dist.all_reduce(total, group=ps.get_data_parallel_group())
            losses.append(total.item() / dp)
        final = _gathered(model)
    names = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Tempo")})
    return dict(losses=losses, initial=initial, final=final, grads=grads, tempo_modules=names)


def _first_step_grads_fp64(tp):
    """The first step's gradients of the stock model in float64 (DeepSpeed refuses float64
    gradients, so without an engine): backward, then averaged over the data-parallel group as
    DeepSpeed averages them. Same initial weights and batch as _zero_run."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from tempo_ds import workload

    with workload.launcher_env(), workload.distributed(tp=tp) as device:
        workload.reseed(SEED, 0)
        torch.manual_seed(SEED)
        model_config = workload.model_config(workload.shape_of("gpt", "tiny"), tp=tp, dropout=0.0,
                                             dtype=workload.DTYPES["fp64"])
        model = workload.build_model("gpt", model_config, spec="stock", vocab_size=VOCAB, seq_length=SEQ,
                                     device=device)
        micro_batch = load_json(ZERO_CONFIG)["train_micro_batch_size_per_gpu"]
        batch = workload.make_batch("gpt", micro_batch, SEQ, VOCAB, seed=SEED + ps.get_data_parallel_rank(),
                                    device=device)
        workload.loss("gpt", model, batch).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
            p.grad /= ps.get_data_parallel_world_size()
        return _gathered(model, grads_of=True)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def _max_diff(a, b):
    """max |a - b| over every tensor of two {name: tensor} dicts, the max over all ranks (each
    holds its tensor-parallel shard)."""
    import torch
    import torch.distributed as dist
    assert a.keys() == b.keys()
    m = torch.tensor(max((a[n] - b[n]).abs().max().item() for n in a), dtype=torch.float64)
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m.item()


def _max_abs(a):
    """max |a| over every tensor of a {name: tensor} dict and every rank."""
    return _max_diff(a, {n: t * 0 for n, t in a.items()})


def _zero_results():
    """The figures the ZeRO tests judge, per TP: every run's distance from the stock ZeRO-0 run
    (parameters after TRAIN_STEPS, first-step gradients), how far training moved the parameters,
    and the dropout-0.1 loss trajectories of the Tempo runs. The rounding scale is what the stock
    runs themselves spread across ZeRO stages (their reductions sum in other orders)."""
    out = {}
    for tp in TPS:
        ref = _zero_run(tp, 0, False, 0.0)
        grads64 = _first_step_grads_fp64(tp)
        r = out[f"tp{tp}"] = {"moved": _max_diff(ref["final"], ref["initial"]), "scale": _max_abs(ref["final"]),
                              "grad_scale": _max_abs(grads64), "ref_losses": ref["losses"],
                              "runs": {}, "dropout": {}}
        for stage in STAGES:
            finals = {}
            for tempo in ("off", "on"):
                run = ref if (stage, tempo) == (0, "off") else _zero_run(tp, stage, tempo == "on", 0.0)
                finals[tempo] = run["final"]
                r["runs"][f"zero{stage}-{tempo}"] = {
                    "losses": run["losses"], "tempo_modules": run["tempo_modules"],
                    "initial_err": _max_diff(run["initial"], ref["initial"]),
                    "param_err": _max_diff(run["final"], ref["final"]),
                    "grad_err": _max_diff(run["grads"], grads64)}
            r["runs"][f"zero{stage}-on"]["vs_off"] = _max_diff(finals["on"], finals["off"])
        for stage in STAGES:
            r["dropout"][f"zero{stage}"] = _zero_run(tp, stage, True, 0.1)["losses"]
    return out


def worker(out_path):
    import deepspeed

    import tempo_ds

    results = {"plain": {}}
    # Plain models first: DeepSpeed keeps the last mpu it was given in a module global, and after
    # the Megatron runs that mpu's groups are destroyed.
    results["plain"]["deepspeed"] = _plain_losses(deepspeed.initialize, False)
    results["plain"]["tempo_off"] = _plain_losses(tempo_ds.initialize, False)
    results["plain"]["tempo_on"] = _plain_losses(tempo_ds.initialize, True)

    results["zero"] = _zero_results()

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


def _rounding_bound(r, err, scale):
    """2x the largest `err` of the stock runs plus one fp32 rounding of the largest value: the
    rounding scale, measured in this run. For parameters `err` is the distance from stock ZeRO 0
    (the same training summed in other orders); for gradients, the distance from float64."""
    import torch
    spread = max(r["runs"][f"zero{stage}-off"][err] for stage in STAGES)
    return 2 * spread + torch.finfo(torch.float32).eps * r[scale]


@pytest.mark.slow
@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("stage", STAGES)
def test_zero_parameters_after_training_match_stock(results, tp, stage):
    """Parameters after TRAIN_STEPS SGD steps at a constant lr: Tempo at every ZeRO stage is as
    close to stock ZeRO 0 as the stock runs of the other stages are (within 2x), and training moved
    them by far more than that bound, so a wrong gradient would show."""
    r = results["zero"][f"tp{tp}"]
    off, on = r["runs"][f"zero{stage}-off"], r["runs"][f"zero{stage}-on"]
    assert not off["tempo_modules"] and "TempoCoreAttention" in on["tempo_modules"]
    assert len(on["losses"]) == TRAIN_STEPS
    assert off["initial_err"] == on["initial_err"] == 0.0  # one starting model
    bound = _rounding_bound(r, "param_err", "scale")
    assert r["moved"] > 100 * bound, (r["moved"], bound)
    assert off["param_err"] <= bound, (off["param_err"], bound)
    assert on["param_err"] <= bound, (on["param_err"], bound)


@pytest.mark.slow
@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("stage", GRAD_STAGES)
def test_zero_gathered_gradients_match_stock(results, tp, stage):
    """The first step's gradients as ZeRO 2/3 hold them (reduced over data parallelism and
    partitioned; gathered with safe_get_full_grad), Tempo and stock, are within 2x of stock's own
    distance from the float64 gradients."""
    r = results["zero"][f"tp{tp}"]
    bound = _rounding_bound(r, "grad_err", "grad_scale")
    assert r["grad_scale"] > 100 * bound
    for tempo in ("off", "on"):
        err = r["runs"][f"zero{stage}-{tempo}"]["grad_err"]
        assert err <= bound, (tempo, err, bound)


@pytest.mark.slow
@pytest.mark.parametrize("tp", TPS)
def test_tempo_dropout_trajectory_same_under_every_zero_stage(results, tp):
    """Dropout 0.1, "tempo": true: the masks come from seeds drawn from the reseeded generator,
    never from ZeRO's state, so every stage follows stage 0's loss trajectory (within 2x the spread
    of the dropout-free stock runs' losses across stages, or one fp32 rounding of the loss when
    they agree to the bit), and dropout really changed it."""
    import torch
    r = results["zero"][f"tp{tp}"]
    stock = [r["runs"][f"zero{stage}-off"]["losses"] for stage in STAGES]
    spread = max(abs(a - b) for run in stock for a, b in zip(run, stock[0]))
    spread = max(spread, torch.finfo(torch.float32).eps * max(abs(x) for x in stock[0]))
    reference = r["dropout"]["zero0"]
    assert len(reference) == TRAIN_STEPS
    for stage in STAGES[1:]:
        gap = max(abs(a - b) for a, b in zip(r["dropout"][f"zero{stage}"], reference))
        assert gap <= 2 * spread, (stage, gap, spread)
    effect = max(abs(a - b) for a, b in zip(reference, r["runs"]["zero0-on"]["losses"]))
    assert effect > 100 * spread, (effect, spread)


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
