#!/usr/bin/env bash
"""":
# This file is both a bash script and a Python script (docs/launch.md explains why).
#
# Bash half: `bash launch/train_gpt2.sh [trainer options]` starts the DeepSpeed launcher on this same
# file, which runs the Python half below once per rank. NUM_GPUS sets the number of ranks (default:
# the visible GPUs, or 2 CPU ranks on gloo without a GPU); DS_LAUNCHER_ARGS adds launcher options
# such as --hostfile or --master_port. `--micro-batch auto` takes the largest micro-batch that
# tempo_ds.plan predicts fits the visible GPU (torch.cuda.mem_get_info) and prints what it chose
# and why; without a GPU it says so and keeps the config's micro-batch (docs/plan.md).
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
fi
exec deepspeed ${DS_LAUNCHER_ARGS:-} --num_gpus "$NUM_GPUS" "$script" "$@"
"""  # " (for bash: closes the quote opened above; for Python: ends the string)
# Python half: the DeepSpeed launcher runs its script argument as `python -u <script> --local_rank=N
# [options]`, both from the bash half above and when `deepspeed launch/train_gpt2.sh` is typed
# directly. The options are tempo_ds.training.train's (python -m tempo_ds.training.train --help).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tempo_ds.training.train import main  # noqa: E402

main(["--model", "gpt2", *sys.argv[1:]])
