"""Model states per rank: parameters, gradients and optimizer state under ZeRO, DP and TP.

Counted for the launch configs' optimizer (Adam(W): two fp32 moments per parameter):
  bf16/fp16 (mixed precision)  2 B parameter + 2 B gradient + 12 B optimizer (fp32 master copy,
                               exp_avg, exp_avg_sq);
  fp32                         4 B parameter + 4 B gradient + 8 B optimizer.
ZeRO-1 divides the optimizer state by DP, ZeRO-2 also the gradients, ZeRO-3 also the parameters.
Under tensor parallelism the count is the parameters one rank holds (the planner counts them on
the rank's model, tempo_ds.plan.scale.Scaled): the sharded weights divided by TP, the replicated
norms and row-parallel biases whole.

At the step's peak (the start of backward) the gradients of this step are not made yet; the walk
counts them as backward makes them, so `at_peak` leaves them out.

DeepSpeed's estimators (estimate_zero2/zero3_model_states_mem_needs) are shown beside ours where
they apply (ZeRO 1-3). They assume fp16 parameters and gradients plus 16 B of fp32 state per
parameter, i.e. an fp32 gradient copy; with bf16 and ZeRO-1 on one GPU (the launch configs) the
engine holds 16 B per parameter (measured: 5,780,513,792 B for 354,871,296 parameters on the H100,
16.3 B), so theirs (20 B) is an upper bound there. ZeRO-0 has no DeepSpeed estimator.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class States:
    """Bytes per rank: params, grads, optimizer; `deepspeed` DeepSpeed's estimate (None: none)."""
    params: int
    grads: int
    optimizer: int
    deepspeed: object = None

    @property
    def total(self):
        return self.params + self.grads + self.optimizer

    @property
    def at_peak(self):
        """What is alive when backward starts: all but this step's gradients."""
        return self.params + self.optimizer


def model_states(n_params, *, bf16=True, zero_stage=0, dp=1):
    """States per rank of a model whose tensor-parallel rank holds `n_params` parameters (module
    docstring), under ZeRO `zero_stage` over `dp` data-parallel ranks."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage!r}: expected 0, 1, 2 or 3")
    if not isinstance(dp, int) or dp < 1:
        raise ValueError(f"dp={dp!r}: expected an integer >= 1")
    n = n_params
    p_bytes, g_bytes, o_bytes = (2, 2, 12) if bf16 else (4, 4, 8)
    params = n * p_bytes / (dp if zero_stage >= 3 else 1)
    grads = n * g_bytes / (dp if zero_stage >= 2 else 1)
    optimizer = n * o_bytes / (dp if zero_stage >= 1 else 1)
    return States(int(params), int(grads), int(optimizer), _deepspeed_estimate(int(n), zero_stage, dp))


def _deepspeed_estimate(n, zero_stage, dp):
    """DeepSpeed's own GPU figure for the stage (no offload), or None for ZeRO-0."""
    if zero_stage == 0:
        return None
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        if zero_stage in (1, 2):
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
            return int(estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=dp, cpu_offload=False)[1])
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        # the largest layer is not known here: the embedding-sized bound of one layer is left at 0
        return int(estimate_zero3_model_states_mem_needs(n, 0, num_gpus_per_node=dp, cpu_offload=False,
                                                         cpu_offload_params=False)[1])
