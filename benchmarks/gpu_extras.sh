#!/usr/bin/env bash
# The GPU figures that gpu_smoke.sh does not take, one command (< 10 min on one H100):
#   - optimizer step vs forward+backward at depth 12 (the < 10% target), bf16 and compiled Polar Express
#   - CORE evaluation: batched + shared-prefix vs one example per forward, at depth 12
#   - training tok/s and MFU at depth 12 and depth 20 (bench_train: compiled bf16, synthetic tokens)
# Results go to gpu_extras.md (date, GPU, PyTorch, commit, commands, outputs), copied to $OUT when set.
#
#   bash benchmarks/gpu_extras.sh                  # on the GPU machine (carry .device_carry, see device_prepare.sh)
#   EXTRAS_CPU=1 bash benchmarks/gpu_extras.sh     # the same commands at toy size on CPU (checks the script)
#   EXTRAS_ONLY=optim,core bash benchmarks/gpu_extras.sh   # a subset (optim, core, train), e.g. to split
#                                                          # the work across two 10-minute device calls
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh  # REPO, CARRY, PY, COMMIT, PYTHONPATH, NANOCHAT_EVAL_BUNDLE
BUNDLE=${NANOCHAT_EVAL_BUNDLE:-}
RESULT=${TMPDIR:-/tmp}/gpu_extras.md
ENV_LINE=$("$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
{ echo "# GPU extras $(date -u +'%Y-%m-%d %H:%M UTC')"; echo
  echo "- machine: $ENV_LINE"; echo "- commit: $COMMIT"; echo; } > "$RESULT"

if [ -n "${EXTRAS_CPU:-}" ]; then
  OPTIM=(--depth 2 --device cpu --batch-size 2 --seq-len 64 --orth-dtype fp32)
  OPTIM_C=()
  CORE=(--depth 2 --max-seq-len 256 --per-task 11 --tasks hellaswag_zeroshot,copa --device cpu --repeats 1)
  TRAIN12=(--depth 2 --max-seq-len 64 --device-batch-size 2 --total-batch-size 128 --vocab-size 512 --steps 4)
  TRAIN20=(--depth 3 --max-seq-len 64 --device-batch-size 2 --total-batch-size 128 --vocab-size 512 --steps 4)
else
  OPTIM=(--depth 12 --device cuda --batch-size 32 --seq-len 2048)
  OPTIM_C=(--compile)
  CORE=(--depth 12 --per-task 32 --device cuda)
  TRAIN12=(--depth 12 --max-seq-len 2048 --device-batch-size 32 --total-batch-size 524288 --steps 12 --skip 4)
  TRAIN20=(--depth 20 --max-seq-len 2048 --device-batch-size 32 --total-batch-size 524288 --steps 10 --skip 4)
fi

section() {  # title, then the command: its output is appended to the result file (and shown)
  local title=$1; shift
  echo "[extras] $title: $*"
  { echo "## $title"; echo; echo '```'; echo "\$ $*"; } >> "$RESULT"
  "$@" 2>&1 | tee -a "$RESULT"
  echo "(exit ${PIPESTATUS[0]})" >> "$RESULT"
  { echo '```'; echo; } >> "$RESULT"
  [ -n "${OUT:-}" ] && mkdir -p "$OUT" && cp "$RESULT" "$OUT"/
}

ONLY=",${EXTRAS_ONLY:-optim,core,train},"
if [[ $ONLY == *,optim,* ]]; then
  section "optimizer step vs forward+backward, depth 12" "$PY" benchmarks/bench_optim.py "${OPTIM[@]}"
  [ ${#OPTIM_C[@]} -gt 0 ] && section "same, compiled orthogonalisation" "$PY" benchmarks/bench_optim.py "${OPTIM[@]}" "${OPTIM_C[@]}"
fi
if [[ $ONLY == *,core,* ]]; then
  if [ -n "$BUNDLE" ]; then
    section "CORE evaluation speed" "$PY" benchmarks/bench_core.py --eval-bundle "$BUNDLE" "${CORE[@]}"
  else
    echo "no eval bundle (NANOCHAT_EVAL_BUNDLE, ../shared/data/eval_bundle or .device_carry/data/eval_bundle): CORE speed skipped" | tee -a "$RESULT"
  fi
fi
if [[ $ONLY == *,train,* ]]; then
  section "training throughput, depth 12" "$PY" benchmarks/bench_train.py "${TRAIN12[@]}"
  section "training throughput, depth 20" "$PY" benchmarks/bench_train.py "${TRAIN20[@]}"
fi
echo "[extras] done: $RESULT"
