"""Tensor/sequence-parallel helpers for training loops that do not use Megatron's DDP wrapper.

With sequence parallelism each tensor-parallel rank normalises a different slice of the sequence,
so a norm's weight/bias gradient on one rank covers only its slice. Megatron's
finalize_model_grads sums those gradients over the tensor-parallel group for parameters marked
`sequence_parallel=True` (the Tempo norms mark theirs); a plain loop, or DeepSpeed, does not, and
would train each rank's copy of the norm on a different part of the data.
"""
import socket

import torch
import torch.distributed as dist

__all__ = ["allreduce_sequence_parallel_grads", "free_local_port"]


def free_local_port():
    """A TCP port of 127.0.0.1 that is free now, for the rendezvous of a one-machine process
    group. Another process may take it before the group binds it; a failed bind raises there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allreduce_sequence_parallel_grads(model, group=None):
    """Sum `.grad` of every parameter marked sequence_parallel=True over the tensor-parallel group.

    Args:
        model: nn.Module whose gradients are ready (after backward).
        group: process group; defaults to megatron's tensor-model-parallel group.

    Returns the number of parameters reduced (0 when the group has one rank).
    """
    if group is None:
        from megatron.core import parallel_state
        group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return 0
    grads = [p.grad for p in model.parameters()
             if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if grads:
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)
    return len(grads)
