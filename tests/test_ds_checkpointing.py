"""DeepSpeed's activation checkpointing with Tempo: a tiny Megatron GPT (Tempo spec, dropout 0.1,
TP 2 over 2 gloo ranks on CPU) whose layers run through deepspeed.checkpointing.checkpoint,
configured by tempo_ds.initialize from the ds_config's "activation_checkpointing" section.

- Every combination of partition_activations, cpu_checkpointing and contiguous_memory_optimization
  that runs gives gradients bit-identical to the same model without checkpointing: the dropout
  seeds drawn while recomputing are those of the first forward, attention dropout included (it
  draws inside Megatron's RNG tracker, which DeepSpeed restores only through
  tempo_ds.deepspeed.engine.use_megatron_rng_tracker; without it the gradients differ).
- What each combination keeps: SavedTensorLedger counts what autograd saves (nothing inside a
  checkpointed layer), and the checkpoints' own holdings (DeepSpeed keeps them on its autograd
  node, out of the ledger's sight) are counted from the graph: the layer inputs, 1/TP of them
  when partitioned, on the CPU with cpu_checkpointing.

One `torchrun --nproc_per_node 2` job (this file as a script with an output path) does every run;
run as `python tests/test_ds_checkpointing.py` it launches that job and prints the bytes per
combination (docs/activation_checkpointing.md).
"""
import json
import os
import subprocess
import sys

import pytest

from tempo_ds.megatron.parallel import free_local_port

TP, SEQ, MICRO_BATCH, VOCAB, SEED, DROPOUT = 2, 32, 2, 256, 1234, 0.1
LAYERS = 2  # the tiny GPT's
# name -> the "activation_checkpointing" section (None: the layers are not checkpointed)
COMBOS = {
    "none": None,
    "checkpoint": {},
    "partition": {"partition_activations": True},
    "partition+contiguous": {"partition_activations": True, "contiguous_memory_optimization": True,
                             "number_checkpoints": LAYERS},
    "partition+cpu": {"partition_activations": True, "cpu_checkpointing": True},
    "partition+cpu+contiguous": {"partition_activations": True, "cpu_checkpointing": True,
                                 "contiguous_memory_optimization": True, "number_checkpoints": LAYERS},
    "cpu": {"cpu_checkpointing": True},
}
# checkpointed as "checkpoint", with DeepSpeed's own RNG tracker restored instead of Megatron's
UNTRACKED = "checkpoint, DeepSpeed's tracker"


# -- the worker (runs under torchrun) -------------------------------------------------------------
def checkpoint_layers(model):
    """Run each transformer layer of a GPTModel through deepspeed.checkpointing.checkpoint (the
    parameters and their names stay as they are)."""
    import deepspeed
    for layer in model.decoder.layers:
        def checkpointed(*args, _forward=layer.forward, **kwargs):
            return deepspeed.checkpointing.checkpoint(_forward, *args, **kwargs)
        layer.forward = checkpointed


def held_by_checkpoints(loss):
    """{"<device>:<float|other>": bytes} that DeepSpeed's checkpoints in loss's graph keep for
    backward, by storage. DeepSpeed keeps a checkpoint's inputs on its autograd node
    (deepspeed_saved_tensors; a partitioned or CPU copy in their `saved_data`), not through
    save_for_backward, so saved-tensor hooks (the ledger) never see them."""
    import torch
    held, storages, seen, stack = {}, set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in getattr(node, "deepspeed_saved_tensors", None) or ():
            if not torch.is_tensor(t):
                continue
            data = getattr(t, "saved_data", None)
            data = t if data is None else data
            storage = data.untyped_storage()
            if (data.device, storage.data_ptr()) in storages:
                continue
            storages.add((data.device, storage.data_ptr()))
            key = f"{data.device.type}:{'float' if data.is_floating_point() else 'other'}"
            held[key] = held.get(key, 0) + storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return held


def _run(section, megatron_tracker=True):
    """One forward (counted) and backward of the tiny GPT with `section`: the gradients, the
    ledger's figures and the checkpoints' holdings, or the error it raised."""
    import torch
    from deepspeed.runtime.activation_checkpointing import checkpointing

    import tempo_ds
    from tempo_ds import workload
    from tempo_ds.deepspeed.engine import use_megatron_rng_tracker
    from tempo_ds.deepspeed.mpu import MegatronMPU
    from tempo_ds.memory import SavedTensorLedger

    with workload.launcher_env(), workload.distributed(tp=TP) as device:
        workload.reseed(SEED, 0)
        torch.manual_seed(SEED)
        config = workload.model_config(workload.shape_of("gpt", "tiny"), tp=TP, dropout=DROPOUT)
        model = workload.build_model("gpt", config, spec="tempo", vocab_size=VOCAB, seq_length=SEQ, device=device)
        # DeepSpeed's engine.backward needs an optimizer; no step is taken
        ds_config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "tempo": True,
                     "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True}
        if section is not None:
            ds_config["activation_checkpointing"] = section
            checkpoint_layers(model)
        # each run configures DeepSpeed's checkpointing afresh from its own section
        checkpointing.deepspeed_checkpointing_enabled = False
        engine, *_ = tempo_ds.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                         mpu=MegatronMPU())
        if not megatron_tracker:
            checkpointing.get_cuda_rng_tracker = lambda: checkpointing._CUDA_RNG_STATE_TRACKER
        workload.reseed(SEED, 1)
        batch = workload.make_batch("gpt", MICRO_BATCH, SEQ, VOCAB, seed=SEED, device=device)
        try:
            with SavedTensorLedger(model) as ledger:
                loss = workload.loss("gpt", engine, batch)
            report = ledger.report(loss)
            held = held_by_checkpoints(loss)
            engine.backward(loss)
        except Exception as e:  # a combination DeepSpeed cannot run here is reported, not hidden
            return {"error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            use_megatron_rng_tracker()
        layers = sum(v for k, v in report.by_module().items() if ".layers." in f".{k}.")
        return {"grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                "loss": loss.item(), "saved": report.total_bytes, "saved_in_layers": layers, "held": held,
                "hidden_bytes": SEQ * MICRO_BATCH * config.hidden_size * 4}


def worker(out_path):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    runs = {name: _run(section) for name, section in COMBOS.items()}
    runs[UNTRACKED] = _run(COMBOS["checkpoint"], megatron_tracker=False)
    if "error" in runs["none"]:
        raise RuntimeError(f"the run without checkpointing failed: {runs['none']['error']}")
    reference = runs["none"]["grads"]
    results = {}
    for name, run in runs.items():
        if "error" not in run:
            assert run["grads"].keys() == reference.keys()
            grads = run.pop("grads")
            diff = torch.tensor(max((grads[n] - g).abs().max().item() for n, g in reference.items()),
                                dtype=torch.float64)
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            run["grad_diff"] = diff.item()
        results[name] = run
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


# -- the tests --------------------------------------------------------------------------------------
def launch(out):
    """Run the worker job; the results it wrote."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(TP),
           "--master_port", str(free_local_port()), os.path.abspath(__file__), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ds_ckpt") / "results.json")


def _runnable():
    return [name for name in COMBOS if name != "none"]


@pytest.mark.slow
@pytest.mark.parametrize("name", _runnable())
def test_checkpointed_gradients_bit_identical(results, name):
    run = results[name]
    if "error" in run:
        pytest.xfail(f"DeepSpeed cannot run {name} on this accelerator: {run['error']}")
    assert run["loss"] == results["none"]["loss"]
    assert run["grad_diff"] == 0.0


@pytest.mark.slow
def test_deepspeeds_own_tracker_would_break_the_masks(results):
    """The check above can fail: restoring DeepSpeed's tracker instead of Megatron's, the attention
    dropout of the recomputation draws other seeds and the gradients differ."""
    run = results[UNTRACKED]
    assert run["loss"] == results["none"]["loss"]  # the forward is the same, only backward differs
    assert run["grad_diff"] > 0.0


@pytest.mark.slow
def test_ledger_shows_what_each_combination_keeps(results):
    none = results["none"]
    assert none["saved_in_layers"] > 0 and not none["held"]
    layer_inputs = LAYERS * none["hidden_bytes"]
    expected = {"checkpoint": layer_inputs, "partition": layer_inputs // TP,
                "partition+contiguous": layer_inputs // TP}
    for name in COMBOS:
        run = results[name]
        if name == "none" or "error" in run:
            continue
        # nothing saved inside a checkpointed layer; the rest of the model saves what it did
        assert run["saved_in_layers"] == 0, name
        assert run["saved"] == none["saved"] - none["saved_in_layers"], name
        floats = {k: v for k, v in run["held"].items() if k.endswith(":float")}
        # the layer inputs, 1/TP of them when partitioned; with cpu_checkpointing on the CPU
        assert sum(floats.values()) == expected.get(name.replace("+cpu", ""), layer_inputs), (name, floats)
        if "cpu" in name:
            assert set(floats) == {"cpu:float"}
        assert run["saved"] + sum(run["held"].values()) < none["saved"], name


def table(results):
    """The bytes each combination keeps, one line each (rank 0 of TP 2)."""
    lines = [f"{'combination':<28}{'autograd saves':>16}{'of it in layers':>17}{'checkpoints hold':>18}"
             f"  {'where':<12}{'grads vs none':>14}"]
    for name, run in results.items():
        if "error" in run:
            lines.append(f"{name:<28}  does not run here: {run['error'][:80]}")
            continue
        held = run["held"]
        where = ",".join(sorted({k.split(':')[0] for k in held})) or "-"
        same = "identical" if run["grad_diff"] == 0.0 else f"max {run['grad_diff']:.1e}"
        lines.append(f"{name:<28}{run['saved']:>16,}{run['saved_in_layers']:>17,}{sum(held.values()):>18,}"
                     f"  {where:<12}{same:>14}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        worker(sys.argv[1])
    else:
        import tempfile
        with tempfile.TemporaryDirectory() as folder:
            print(table(launch(os.path.join(folder, "results.json"))))
