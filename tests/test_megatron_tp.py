"""Tensor and sequence parallelism with the Tempo spec: two gloo processes on CPU at TP=2 give the
loss and (gathered) gradients of the same model at TP=1."""
import pytest
import torch

from tempo_ds import workload

from . import megatron_utils as mu

pytest.importorskip("megatron.core")

# (arch, sequence_parallel, config fields); the stock local spec cannot do sequence parallelism at
# all (its torch norms assert), the Tempo spec marks its norm parameters like Megatron's fused norms
# do. The last case is the config as Megatron-LM makes it (bias-GELU fusion on): the fused Tempo
# bias-GELU, on a bias split over the TP ranks.
CASES = [("gpt", False, {}), ("gpt", True, {}), ("bert", False, {}), ("gpt", False, {"bias_activation_fusion": True})]


def _loss_and_grads(arch, sequence_parallel, tp, fields):
    """Build at the current parallel state, one forward/backward; gradients gathered to full."""
    from tempo_ds.megatron import allreduce_sequence_parallel_grads

    # megatron refuses sequence_parallel at TP=1; there it means nothing anyway
    config = mu.tiny_config(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel and tp > 1,
                            **fields)
    # 256 = 128 x TP at TP=2: padded alike at either size, so both build the same model
    model = mu.build(arch, "tempo", config, seed=3, vocab_size=256)
    if fields.get("bias_activation_fusion"):
        from tempo_ds.megatron import TempoMLP
        assert all(isinstance(layer.mlp, TempoMLP) for layer in model.decoder.layers)
    loss = workload.loss(arch, model, mu.batch(arch, seed=4))
    loss.backward()
    allreduce_sequence_parallel_grads(model)
    grads = {n: mu.full_param(p, p.grad) for n, p in model.named_parameters()}
    return loss.detach(), grads


def _tp_worker(rank, world_size, cases):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    for arch, sequence_parallel, fields in cases:
        results = {}
        for tp in (2, 1):
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
            model_parallel_cuda_manual_seed(5)
            results[tp] = _loss_and_grads(arch, sequence_parallel, tp, fields)
            parallel_state.destroy_model_parallel()
        (loss2, grads2), (loss1, grads1) = results[2], results[1]
        where = f"{arch} sequence_parallel={sequence_parallel} {fields} rank {rank}"
        torch.testing.assert_close(loss2, loss1, msg=lambda m: f"{where} loss: {m}")
        assert set(grads2) == set(grads1), where
        for name in grads1:
            torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{where} grad {name}: {m}")


def test_tensor_parallel_matches_single_rank():
    mu.spawn(_tp_worker, 2, CASES)
