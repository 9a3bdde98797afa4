#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu_bench.py: sections, calls, budget) with the carried wheels, text and
# eval bundle of benchmarks/device_prepare.sh on an offline GPU machine (benchmarks/device_env.sh).
#
#   bash benchmarks/gpu_bench.sh --call 1          # d20 + the reference: the first call of a GPU window
#   bash benchmarks/gpu_bench.sh --call 2          # fp8, cuda tests, other attention backends
#   bash benchmarks/gpu_bench.sh --call 3          # auto batch, fused head, compile scope, resume, CORE
#   bash benchmarks/gpu_bench.sh --calls           # what each call runs and costs
#   GPU_BENCH_CPU=1 bash benchmarks/gpu_bench.sh   # toy sizes on CPU: checks the script
# GPU_BENCH_ONLY=d20,fp8 is the same as --sections d20,fp8. Results: $OUT/gpu.md (or <base>/out/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh  # REPO, CARRY, PY, COMMIT, PYTHONPATH, NANOCHAT_EVAL_BUNDLE
export NANOCHAT_COMMIT=$COMMIT
EXTRA=()
[ -n "${GPU_BENCH_ONLY:-}" ] && EXTRA=(--sections "$GPU_BENCH_ONLY")
exec "$PY" benchmarks/gpu_bench.py "${EXTRA[@]}" "$@"
