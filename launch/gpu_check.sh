#!/usr/bin/env bash
# The GPU evidence in one call (docs/gpu.md): under 8 minutes on one H100.
#
#   bash launch/fetch_gpu_wheels.sh             # here, once: deepspeed + megatron-core wheels in .whl/
#   bash launch/gpu_check.sh [OUTDIR]           # there: OUTDIR, else $OUT, else results/gpu_check
#   TEMPO_GPU_CHECK_TINY=1 bash launch/gpu_check.sh /tmp/gpucheck    # the same path, CPU-sized
#   TEMPO_GPU_CHECK_STAGES="build gpu-tests bench-ops" bash launch/gpu_check.sh   # some stages only
#
# The ops are built into build/torch_extensions (git-ignored) unless TORCH_EXTENSIONS_DIR is set,
# so a second call on a machine that is still warm finds them built.
#
# Stages, each with a time limit taken from what is left of TEMPO_GPU_CHECK_SECONDS (default 460):
#   0 wheels  install .whl/*.whl into a private folder unless deepspeed and megatron.core import
#   1 build   the CUDA ops (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16): python -m tempo_ds.report --load
#   2 tests   python -m pytest -q -m gpu
#   3 ops     python -m tempo_ds.bench ops; opt-in stage bench-ops-fp32: GELU and the norms in fp32
#   4 train   python -m tempo_ds.bench train: GPT-2 345M s=1024 and BERT-Large s=512, every
#             variant, without and with a 16 GiB budget (the budget runs take stock and
#             tempo-flash first: the pair the +16% target compares)
# A stage that fails or runs out of time is recorded in summary.txt and the next one still runs;
# the train benchmark writes its JSON after every variant, so a cut run keeps what it measured.
# Everything lands in OUTDIR; when OUTDIR is $OUT (a device machine's return folder, which brings
# back at most 8 files), the results folder is packed into gpu_check_results.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${1:-${OUT:-results/gpu_check}}"
tiny="${TEMPO_GPU_CHECK_TINY:-0}"
deadline="${TEMPO_GPU_CHECK_SECONDS:-460}"
results="$out/results"
mkdir -p "$results"
summary="$out/summary.txt"
: > "$summary"
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}"
stages="${TEMPO_GPU_CHECK_STAGES:-build gpu-tests bench-ops train-gpt2 train-bert train-gpt2-16GiB train-bert-16GiB}"
start=$SECONDS

note() { echo "$*" | tee -a "$summary"; }

# stage NAME CAP_SECONDS COMMAND...: run under min(CAP, time left) and record the outcome.
stage() {
  local name=$1 cap=$2 left limit t0 rc
  shift 2
  case " $stages " in *" $name "*) ;; *) return ;; esac
  left=$(( deadline - (SECONDS - start) ))
  limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    note "$name: SKIPPED (no time left)"
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  t0=$SECONDS
  timeout --kill-after=15 "$limit" "$@"
  rc=$?
  case $rc in
    0) note "$name: ok ($(( SECONDS - t0 ))s)" ;;
    124|137) note "$name: TIMED OUT after ${limit}s (partial results kept)" ;;
    *) note "$name: FAILED with status $rc ($(( SECONDS - t0 ))s)" ;;
  esac
}

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$( [ "$tiny" = 1 ] && echo ' TINY (CPU-sized)')"

# -- 0: wheels --------------------------------------------------------------------------------------
if python3 -c "import deepspeed, megatron.core" 2>/dev/null; then
  note "wheels: deepspeed and megatron-core already importable, nothing installed"
elif ls .whl/*.whl >/dev/null 2>&1; then
  site=/tmp/tempo_site
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$site" .whl/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
    note "wheels: installed $(ls .whl/*.whl | wc -l) wheels into $site"
  else
    note "wheels: FAILED to install .whl/*.whl"
  fi
else
  note "wheels: deepspeed/megatron-core missing and no .whl/ (run launch/fetch_gpu_wheels.sh first)"
fi
python3 - <<'EOF' | tee "$results/machine.json"
import json
from tempo_ds.bench.machine import machine_info
print(json.dumps(machine_info(), indent=1))
EOF

# -- 1-3: build, tests, ops benchmark ---------------------------------------------------------------
stage build 200 python3 -m tempo_ds.report --load --parallel
stage gpu-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8
if [ "$tiny" = 1 ]; then
  stage bench-ops 60 python3 -m tempo_ds.bench ops --reps 2 --json "$results/bench_ops.json"
  stage bench-ops-fp32 60 python3 -m tempo_ds.bench ops --only gelu norm --dtype fp32 --reps 2 \
    --json "$results/bench_ops_fp32.json"
else
  stage bench-ops 150 python3 -m tempo_ds.bench ops --json "$results/bench_ops.json"
  # fp32 tensors: GELU's backward inverts per element in fp64 (no derivative table)
  stage bench-ops-fp32 60 python3 -m tempo_ds.bench ops --only gelu norm --dtype fp32 \
    --json "$results/bench_ops_fp32.json"
fi

# -- 4: train benchmark -----------------------------------------------------------------------------
# The pair the targets compare (stock, tempo-flash) first: the first H100 run (2026-11-26), in the
# default order, spent its 170 s on stock and the two recomputation variants.
order=(stock tempo-flash tempo selective full)
budget_order=("${order[@]}")
if [ "$tiny" = 1 ]; then
  # CPU-sized: one step per point, the search capped at 2, a short sequence.
  size=(--steps 1 --warmup-steps 0 --max-micro-batch 2 --seq-length 32)
  budget_order=(stock tempo-flash)
  gpt_budget_mb=() bert_budget_mb=()
else
  size=()
  # Under 16 GiB the stock 345M model holds only a couple of samples at s=1024.
  gpt_budget_mb=(--common-micro-batch 2) bert_budget_mb=(--common-micro-batch 8)
fi
# (timeout runs programs, not shell functions: the command is spelled out as an array)
train=(python3 -m tempo_ds.bench train --out "$results" "${size[@]}")
stage train-gpt2 170 "${train[@]}" --model gpt2 --variants "${order[@]}"
stage train-bert 130 "${train[@]}" --model bert --variants "${order[@]}"
stage train-gpt2-16GiB 110 "${train[@]}" --model gpt2 --memory-budget 16GiB --variants "${budget_order[@]}" "${gpt_budget_mb[@]}"
stage train-bert-16GiB 90 "${train[@]}" --model bert --memory-budget 16GiB --variants "${budget_order[@]}" "${bert_budget_mb[@]}"

note "total $(( SECONDS - start ))s; results in $results"
if [ -n "${OUT:-}" ] && [ "$(cd "$out" && pwd)" = "$(cd "$OUT" && pwd)" ]; then
  tar czf "$out/gpu_check_results.tar.gz" -C "$out" results && rm -rf "$results"
  note "packed into $out/gpu_check_results.tar.gz"
fi
