"""Shared helpers for tests that build megatron-core models (through tempo_ds.workload) on CPU:
tiny sizes, multi-process runs, and gathering tensor-parallel shards. A test module that builds
models in this process uses conftest's `megatron_world` fixture for the process group."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tempo_ds import workload
from tempo_ds.megatron.parallel import free_local_port

# Small enough for seconds on 2 shared cores, large enough for 2 heads per TP rank at TP=2.
TINY = workload.Shape(num_layers=2, hidden_size=64, num_attention_heads=4)
VOCAB = 128
SEQ = 32
BATCH = 2


# Where the tests' models and batches live: the GPU when there is one (the GPU run exercises
# Megatron's CUDA RNG tracker and the CUDA kernels), else the CPU under cpu_patches().
DEVICE = torch.device("cuda") if torch.cuda.is_available() else None


def tiny_config(**overrides):
    """workload.model_config of the TINY shape; `overrides` are its arguments or config fields."""
    return workload.model_config(TINY, **overrides)


def build(arch, spec, config, seed=0, attention="auto", vocab_size=VOCAB):
    """Model with weights drawn from `seed` (same seed, same weights for either spec); the
    vocabulary is padded to a multiple of 128 x TP (workload.padded_vocab_size)."""
    torch.manual_seed(seed)
    return workload.build_model(arch, config, spec=spec, attention=attention, vocab_size=vocab_size,
                                seq_length=SEQ, device=DEVICE)


def batch(arch, seed=0):
    return workload.make_batch(arch, BATCH, SEQ, VOCAB, seed=seed, device=DEVICE)


def reseed(seed):
    """Seed the default generator and megatron's RNG tracker (dropout draws from both)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def full_param(param, tensor=None, group=None):
    """`tensor` (default: the parameter) all-gathered along the parameter's tensor-parallel
    partition dim; unpartitioned parameters come back as they are."""
    tensor = param.detach() if tensor is None else tensor
    if not getattr(param, "tensor_model_parallel", False):
        return tensor.clone()
    from megatron.core import parallel_state
    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def _worker(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from tempo_ds.megatron import cpu_patches
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with cpu_patches():
            fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size, *args):
    """Run fn(rank, world_size, *args) in `world_size` fresh processes joined by gloo.
    fn must be importable (module level); an exception in any rank fails the call."""
    mp.spawn(_worker, args=(world_size, free_local_port(), fn, args), nprocs=world_size, join=True)
