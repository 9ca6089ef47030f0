"""DeepSpeed's "mpu" protocol over megatron.core.parallel_state.

deepspeed.initialize(mpu=parallel_state) fails: DeepSpeed asks for get_model_parallel_* and
megatron-core names them get_tensor_model_parallel_*. The adapter maps one set of names onto the
other through a table. With no pipeline parallelism (the only layout the trainer uses), DeepSpeed's
"model parallel" group is the tensor-parallel group.
"""
from megatron.core import parallel_state

# DeepSpeed's name -> parallel_state's function. Sequence-parallel names stay absent on purpose:
# DeepSpeed treats their presence as Ulysses sequence parallelism.
_NAMES = {
    "get_model_parallel_rank": "get_tensor_model_parallel_rank",
    "get_model_parallel_world_size": "get_tensor_model_parallel_world_size",
    "get_model_parallel_group": "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_rank": "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size": "get_tensor_model_parallel_world_size",
    "get_tensor_model_parallel_group": "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_src_rank": "get_tensor_model_parallel_src_rank",
    "get_data_parallel_rank": "get_data_parallel_rank",
    "get_data_parallel_world_size": "get_data_parallel_world_size",
    "get_data_parallel_group": "get_data_parallel_group",
    "get_pipeline_model_parallel_rank": "get_pipeline_model_parallel_rank",
    "get_pipeline_model_parallel_world_size": "get_pipeline_model_parallel_world_size",
    "get_pipeline_model_parallel_group": "get_pipeline_model_parallel_group",
}


class MegatronMPU:
    """An object with the mpu methods DeepSpeed calls, answered by megatron.core.parallel_state.

    Create it after parallel_state.initialize_model_parallel(); pass it as
    deepspeed.initialize(..., mpu=MegatronMPU()).
    """

    def __init__(self, state=parallel_state):
        if not state.model_parallel_is_initialized():
            raise RuntimeError("MegatronMPU: call parallel_state.initialize_model_parallel() first")
        if state.get_pipeline_model_parallel_world_size() != 1:
            raise NotImplementedError(
                "MegatronMPU maps DeepSpeed's model-parallel group to the tensor-parallel group; "
                "pipeline parallelism is not supported")
        for ds_name, ps_name in _NAMES.items():
            setattr(self, ds_name, getattr(state, ps_name))

    def get_data_parallel_group_ranks(self):
        import torch.distributed as dist
        return dist.get_process_group_ranks(self.get_data_parallel_group())


def megatron_mpu():
    """A MegatronMPU for the current parallel_state, or None when it is not initialized (a plain
    PyTorch model needs no mpu)."""
    return MegatronMPU() if parallel_state.model_parallel_is_initialized() else None
