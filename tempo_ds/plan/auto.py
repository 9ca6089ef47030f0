"""`--micro-batch auto` of the trainer (launch/train_gpt2.sh, launch/train_bert.sh): the plan's
largest micro-batch for the visible GPU.

The trainer's run maps to a plan variant: "tempo" off -> stock; on with attention "tempo" ->
tempo; otherwise tempo-flash (the Tempo spec). The GPU's memory is torch.cuda.mem_get_info()'s
total, or what is free plus the context if other processes hold part of it. Without a GPU there is
no card to plan for: auto then keeps the config's micro-batch and says so.
"""
import os

import torch


def _variant_name(tempo):
    if not tempo.enabled:
        return "stock"
    return "tempo" if tempo.attention == "tempo" else "tempo-flash"


def auto_micro_batch(model, size, seq_length, tempo, zero_stage, bf16, tp=1, vocab_size=None, dropout=0.1,
                     say=print):
    """The micro-batch for `--micro-batch auto`, or None (keep the config's) without a GPU; says
    what it chose and why through `say`. `tempo` is the run's TempoConfig."""
    if not torch.cuda.is_available():
        say("tempo_ds: --micro-batch auto plans for the visible GPU's memory and there is no GPU: "
            "keeping the config's train_micro_batch_size_per_gpu")
        return None
    from . import constants
    from .estimate import estimate

    free, total = torch.cuda.mem_get_info()
    const = constants.DEFAULT
    memory = total if free + const.context >= total else free + const.context
    dp = max(1, int(os.environ.get("WORLD_SIZE", "1")) // tp)
    name = _variant_name(tempo)
    plan = estimate(model=model, size=size, seq_length=seq_length, vocab_size=vocab_size, gpu_memory=memory,
                    bf16=bf16, dropout=dropout, zero_stage=zero_stage, dp=dp, tp=tp, variants=[name],
                    max_positions=seq_length)
    v = plan.variants[0]
    if v.largest_micro_batch < 1:
        raise SystemExit(f"tempo_ds: --micro-batch auto: {plan.recommendation}")
    say(f"tempo_ds: --micro-batch auto -> {v.largest_micro_batch}: the largest that fits {memory / 2**30:.1f} GiB "
        f"({'free' if memory != total else 'total'} on {torch.cuda.get_device_name()}) for {model} {size} s={seq_length} "
        f"as plan variant {name}, ZeRO-{zero_stage} dp={dp} tp={tp}: predicted peak "
        f"{v.peak_at_largest / 2**30:.1f} GiB (python -m tempo_ds.plan; constants of {const.card})")
    return v.largest_micro_batch
