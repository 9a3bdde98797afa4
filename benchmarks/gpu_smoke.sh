#!/usr/bin/env bash
# GPU smoke test of pretraining, < 10 minutes on one H100:
#   1. a tokenizer and prepared shards from a small local text file (only if the base dir has none)
#   2. run A: depth 12, compiled, bf16, 30 steps of 131,072 tokens, checkpoints every 10, val bpb,
#      CORE on a few examples per task and samples at the end
#   3. run B: the same flags, SIGKILLed in the middle of step 16, resumed from its step-10 checkpoint;
#      its losses must match run A's (within 1%: GPU kernels are not bitwise deterministic)
#   4. tok/s, MFU and peak memory of run A, and of a few depth-20 steps (synthetic tokens, 32K vocab)
#
#   bash benchmarks/gpu_smoke.sh                 # on the GPU machine
#   SMOKE_CPU=1 bash benchmarks/gpu_smoke.sh     # the same logic at toy size on CPU (a minute or two)
#
# On an offline GPU machine with its own PyTorch (the `device` tool), first run
# `bash benchmarks/device_prepare.sh` on a networked machine and carry the .device_carry/ folder it
# fills: its wheels are installed to /tmp/site and its text / eval bundle are used by default.
# A summary (smoke_summary.md: date, GPU, PyTorch, commit, every figure) and the logs are written to
# the base dir and, when $OUT is set, copied there.
#
# Environment: NANOCHAT_BASE_DIR (default: a fresh temporary dir), SMOKE_TEXT (text used when the base
# dir has no data; default ../shared/data/text/c4/c4_en_train_first1000.jsonl, else the carried copy),
# NANOCHAT_EVAL_BUNDLE (CORE bundle; default ../shared/data/eval_bundle or the carried copy),
# PYTHON (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh  # REPO, CARRY, PY, COMMIT, PYTHONPATH, NANOCHAT_EVAL_BUNDLE
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$(mktemp -d)/nanochat}
first_of() { for f in "$@"; do [ -e "$f" ] && { echo "$f"; return; }; done; echo "$1"; }
SMOKE_TEXT=${SMOKE_TEXT:-$(first_of "$REPO/../shared/data/text/c4/c4_en_train_first1000.jsonl" \
                                    "$CARRY/data/c4_en_train_first1000.jsonl")}
unset NANOCHAT_TEST_NAN_STEP NANOCHAT_TEST_HANG_STEP
T0=$(date +%s)
say() { echo "[smoke $(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$NANOCHAT_BASE_DIR"
SUMMARY=$NANOCHAT_BASE_DIR/smoke_summary.md
save_out() {  # logs and summary back to the caller (the device tool's $OUT), whatever happened
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$NANOCHAT_BASE_DIR"/smoke_*.log "$NANOCHAT_BASE_DIR"/smoke_*.txt "$SUMMARY" "$OUT"/ 2>/dev/null || true
  fi
}
trap save_out EXIT

if [ -n "${SMOKE_CPU:-}" ]; then
  export OMP_NUM_THREADS=1
  VOCAB=512
  RUN=(--device-type cpu --depth 2 --aspect-ratio 32 --head-dim 32 --max-seq-len 64 --device-batch-size 4
       --total-batch-size 512 --num-iterations 6 --save-every 2 --warmup-steps 2 --eval-every 3 --eval-tokens 1024
       --core-metric-every -1 --core-metric-max-per-task 12 --sample-every -1 --weight-decay 0)
  HANG_STEP=3; RESUME_STEP=2
  BIG=(--device-type cpu --synthetic-data --depth 3 --aspect-ratio 32 --head-dim 32 --max-seq-len 64
       --device-batch-size 4 --total-batch-size 256 --num-iterations 4 --model-tag smoke_big)
  SKIP=1
else
  VOCAB=8192
  RUN=(--depth 12 --max-seq-len 2048 --device-batch-size 32 --total-batch-size 131072 --num-iterations 30
       --save-every 10 --warmup-steps 5 --eval-every 15 --eval-tokens 524288 --core-metric-every -1
       --core-metric-max-per-task 16 --sample-every -1)
  HANG_STEP=15; RESUME_STEP=10
  BIG=(--synthetic-data --vocab-size 32768 --depth 20 --max-seq-len 2048 --device-batch-size 32
       --total-batch-size 524288 --num-iterations 8 --model-tag smoke_big)
  SKIP=3
fi
CKPT=$NANOCHAT_BASE_DIR/base_checkpoints
rm -rf "$CKPT/smoke_a" "$CKPT/smoke_b" "$CKPT/smoke_big"  # runs of an earlier smoke test in the same base dir
say "base dir $NANOCHAT_BASE_DIR"
ENV_LINE=$("$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
echo "$ENV_LINE"
{ echo "# GPU smoke test $(date -u +'%Y-%m-%d %H:%M UTC')"; echo
  echo "- machine: $ENV_LINE"; echo "- commit: $COMMIT"; echo "- command: ${SMOKE_CPU:+SMOKE_CPU=1 }bash benchmarks/gpu_smoke.sh"
  echo; } > "$SUMMARY"

# 1. data and tokenizer
if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/meta.json" ] || [ ! -d "$NANOCHAT_BASE_DIR/base_data" ]; then
  [ -f "$SMOKE_TEXT" ] || { echo "SMOKE_TEXT=$SMOKE_TEXT not found: point it at a .txt/.jsonl/.parquet file"; exit 1; }
  say "preparing data and a $VOCAB-token tokenizer from $SMOKE_TEXT"
  "$PY" -m nanochat.dataset prepare --input "$SMOKE_TEXT" --force
  "$PY" scripts/tok_train.py --input "$SMOKE_TEXT" --vocab-size $VOCAB
fi

# 2. run A, uninterrupted
say "run A"
"$PY" scripts/base_train.py "${RUN[@]}" --model-tag smoke_a 2>&1 | tee "$NANOCHAT_BASE_DIR/smoke_a.log" | grep -v "^  " || true
grep -q "^done: step" "$NANOCHAT_BASE_DIR/smoke_a.log" || { echo "run A failed"; exit 1; }

# 3. run B: SIGKILL mid-step, then resume
say "run B (killed in step $((HANG_STEP + 1)), then resumed from step $RESUME_STEP)"
LOG_B=$NANOCHAT_BASE_DIR/smoke_b.log
NANOCHAT_TEST_HANG_STEP=$HANG_STEP "$PY" scripts/base_train.py "${RUN[@]}" --model-tag smoke_b > "$LOG_B" 2>&1 &
PID=$!
for _ in $(seq 1 1200); do
  grep -q "hanging at step" "$LOG_B" && break
  kill -0 $PID 2>/dev/null || { cat "$LOG_B"; echo "run B ended before the kill"; exit 1; }
  sleep 0.5
done
kill -9 $PID; wait $PID 2>/dev/null || true
say "killed run B; checkpoints: $(ls "$CKPT/smoke_b" | grep meta_ | tr '\n' ' ')"
"$PY" scripts/base_train.py "${RUN[@]}" --model-tag smoke_b --resume latest 2>&1 | tee -a "$LOG_B" | grep -E "resumed|step 0*$((RESUME_STEP + 1))/|^done" || true
grep -q "^done: step" "$LOG_B" || { echo "resumed run B failed"; exit 1; }

# 4. figures
say "depth-20 throughput (synthetic tokens)"
"$PY" scripts/base_train.py "${BIG[@]}" 2>&1 | tee "$NANOCHAT_BASE_DIR/smoke_big.log" \
  | grep -E "^step|^done|parameters|FLOPs per token|tokens per step" || true
say "results"
{
  echo '```'
  "$PY" benchmarks/smoke_report.py compare "$CKPT/smoke_a" "$CKPT/smoke_b" | tee "$NANOCHAT_BASE_DIR/smoke_resume.txt" || true
  "$PY" benchmarks/smoke_report.py evals "$CKPT/smoke_a"
  grep -E "CORE|WARNING" "$NANOCHAT_BASE_DIR/smoke_a.log" | tail -2 || true
  "$PY" benchmarks/smoke_report.py throughput "$CKPT/smoke_a" --skip $SKIP
  "$PY" benchmarks/smoke_report.py throughput "$CKPT/smoke_big" --skip $SKIP
  echo "total wall time $(( $(date +%s) - T0 )) s"
  echo '```'
} | tee -a "$SUMMARY"
say "done; summary in $SUMMARY"
grep -q "resume check ok" "$NANOCHAT_BASE_DIR/smoke_resume.txt"
