#!/usr/bin/env bash
# Every GPU figure of issue 19 from one script, meant for < 10 minutes on one H100/H200 without network.
# One Inductor cache is shared by all runs. Writes gpu.md (date, GPU, driver, torch, commit, each command
# and its figures) to the base dir, to $OUT when set, and (GPU runs only) to benchmarks/results/gpu.md.
#
#   tests  the cuda-marked tests (tests/test_cuda.py: backends, fp8, compiled step and optimizer)
#   d20    depth 20, record recipe (SSSL + value embeddings + residual scalars), bf16, compiled:
#          tok/s, MFU, peak memory for each attention backend available (sdpa, flex, fa4, fa3)
#   d24    depth 24 bf16 vs --fp8 on real text: tok/s and loss after the same steps
#   ref    the reference implementation (carried by device_prepare.sh) at depth 20 side by side: its
#          tok/s, its own MFU, and MFU by our formula (nanochat.sizing.flops_per_token, same peak)
#   d12    depth 12 compiled bf16 run A; run B SIGKILLed in step 16, resumed from step 10, same losses
#   auto   --device-batch-size auto at depth 20 (the probe's answer)
#   head   the LM head at depth 20: --fused-loss on (chunked, outside the graph) vs off (compiled plain)
#   core   CORE on a few examples per task through the compiled model (run A's checkpoint)
#   scope  depth 20 with --compile-scope blocks (each block compiled alone: what lets several GPUs
#          overlap gradient reductions with backward) vs the whole-model compile: tok/s, compile time
#
#   bash benchmarks/gpu_bench.sh                    # on the GPU machine (carry .device_carry)
#   GPU_BENCH_CPU=1 bash benchmarks/gpu_bench.sh    # the same logic at toy size on CPU (checks the script)
#   GPU_BENCH_ONLY=d20,d24 bash benchmarks/gpu_bench.sh   # a subset of the sections above
#
# Sections run in the order above while the time budget lasts (GPU_BENCH_BUDGET_S, default 570 s): a
# section whose estimate does not fit is recorded as skipped, so the script always finishes and reports.
# Environment: NANOCHAT_BASE_DIR (default: a fresh temporary dir), BENCH_TEXT (default: the carried or
# shared c4 sample), NANOCHAT_EVAL_BUNDLE, PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_env.sh  # REPO, CARRY, PY, COMMIT, PYTHONPATH, NANOCHAT_EVAL_BUNDLE
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$(mktemp -d)/nanochat}
mkdir -p "$NANOCHAT_BASE_DIR"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$NANOCHAT_BASE_DIR/inductor_cache}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
unset NANOCHAT_TEST_NAN_STEP NANOCHAT_TEST_HANG_STEP
CPU=${GPU_BENCH_CPU:-}
BUDGET=${GPU_BENCH_BUDGET_S:-570}
ONLY=",${GPU_BENCH_ONLY:-tests,d20,d24,ref,d12,auto,head,core,scope},"
T0=$(date +%s)
B=$NANOCHAT_BASE_DIR
CK=$B/base_checkpoints
RESULT=$B/gpu.md
first_of() { for f in "$@"; do [ -e "$f" ] && { echo "$f"; return; }; done; echo "$1"; }
BENCH_TEXT=${BENCH_TEXT:-$(first_of "$REPO/../shared/data/text/c4/c4_en_train_first1000.jsonl" "$CARRY/data/c4_en_train_first1000.jsonl")}
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[gpu_bench $(elapsed)s] $*"; }
md() { echo "$*" >> "$RESULT"; }
save_out() {
  [ -n "${OUT:-}" ] && { mkdir -p "$OUT"; cp "$RESULT" "$B"/*.log "$OUT"/ 2>/dev/null; }
  [ -z "$CPU" ] && [ -f "$RESULT" ] && cp "$RESULT" "$REPO/benchmarks/results/gpu.md" 2>/dev/null
  return 0
}
trap save_out EXIT
# want NAME SECONDS: run section NAME if it was asked for and its estimate fits in what is left
want() {
  [[ $ONLY == *,$1,* ]] || return 1
  local left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt "$2" ]; then
    say "skipping $1: needs ~$2 s, $left s left"; md "- **$1: skipped** (needs ~$2 s of the budget, $left s left)"; return 1
  fi
  say "section $1"; return 0
}
train() {  # LOGNAME, then base_train flags: runs, keeps the log, prints its figures (median after 3 steps)
  local name=$1; shift
  md ""; md "\`base_train $*\`"; md ""
  "$PY" -m scripts.base_train "$@" > "$B/$name.log" 2>&1
  local rc=$?
  md '```'
  grep -E "^  attention|^  dtype|^  tokens per step|^--device-batch-size|^first step|device batch size probe" "$B/$name.log" >> "$RESULT"
  if [ $rc -eq 0 ]; then
    "$PY" benchmarks/smoke_report.py throughput "$CK/$name" --skip $SKIP >> "$RESULT" 2>&1
  else
    echo "exit $rc:" >> "$RESULT"; grep -v "^  \|^    " "$B/$name.log" | tail -4 >> "$RESULT"
  fi
  md '```'
  return $rc
}
last_loss() { "$PY" -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(f\"{r[-1]['raw_loss']:.4f} at step {r[-1]['step']}\")" "$CK/$1/metrics.jsonl" 2>/dev/null || echo n/a; }

if [ -n "$CPU" ]; then
  export OMP_NUM_THREADS=1
  SKIP=1; VOCAB=512
  D20=(--device-type cpu --depth 2 --aspect-ratio 32 --head-dim 32 --max-seq-len 64 --vocab-size 512
       --device-batch-size 4 --total-batch-size 256 --num-iterations 4)
  D24=(--device-type cpu --depth 2 --aspect-ratio 32 --head-dim 32 --max-seq-len 64 --device-batch-size 4
       --total-batch-size 256 --num-iterations 4)
  D12=(--device-type cpu --depth 2 --aspect-ratio 32 --head-dim 32 --max-seq-len 64 --device-batch-size 4
       --total-batch-size 512 --num-iterations 6 --save-every 2 --warmup-steps 2 --eval-every -1 --eval-tokens 1024
       --core-metric-every -1 --core-metric-max-per-task 12 --sample-every -1 --weight-decay 0)
  HANG_STEP=3; RESUME_STEP=2; CORE_PER_TASK=12; REF_VOCAB=512
  REF=(--device-type=cpu --depth=2 --aspect-ratio=32 --head-dim=32 --max-seq-len=64 --device-batch-size=4
       --total-batch-size=256 --num-iterations=4)
  EST=(60 60 60 120 120 60 60 60 60)
else
  SKIP=3; VOCAB=8192
  D20=(--depth 20 --max-seq-len 2048 --vocab-size 32768 --device-batch-size 32 --total-batch-size 65536
       --num-iterations 10)
  D24=(--depth 24 --max-seq-len 2048 --device-batch-size 16 --total-batch-size 65536 --num-iterations 20)
  D12=(--depth 12 --max-seq-len 2048 --device-batch-size 32 --total-batch-size 131072 --num-iterations 20
       --save-every 10 --warmup-steps 5 --eval-every -1 --eval-tokens 524288 --core-metric-every 0
       --sample-every 0)
  HANG_STEP=15; RESUME_STEP=10; CORE_PER_TASK=16; REF_VOCAB=32768
  REF=(--depth=20 --max-seq-len=2048 --device-batch-size=32 --total-batch-size=65536 --num-iterations=10)
  EST=(120 90 200 150 150 90 90 60 90)  # tests, d20 per backend, d24, ref, d12, auto, head, core, scope (H100 guesses)
fi
RECIPE=(--window-pattern SSSL --value-embeds --resid-scalars --weight-decay 0 --warmup-steps 2)
QUIET=(--eval-every 0 --core-metric-every 0 --sample-every 0)

ENV_LINE=$("$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
DRIVER=$(nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || true)
{ echo "# GPU benchmarks $(date -u +'%Y-%m-%d %H:%M UTC')"; echo
  echo "- machine: $ENV_LINE | driver ${DRIVER:-n/a}"; echo "- commit: $COMMIT"
  echo "- command: ${CPU:+GPU_BENCH_CPU=1 }${GPU_BENCH_ONLY:+GPU_BENCH_ONLY=$GPU_BENCH_ONLY }bash benchmarks/gpu_bench.sh"
  echo "- MFU: FLOPs per token (6 x matmul params + attention over each layer's window) x tok/s / dense bf16 peak"
  [ -n "$CPU" ] && echo "- GPU_BENCH_CPU=1: toy sizes on CPU, a check of the script only (no figures to quote)"
  echo; } > "$RESULT"
say "base dir $B, budget ${BUDGET}s, $ENV_LINE"

prepare_data() {  # our tokenizer and shards from the benchmark text (once)
  if [ ! -f "$B/tokenizer/meta.json" ] || [ ! -d "$B/base_data" ]; then
    [ -f "$BENCH_TEXT" ] || { md "- no benchmark text (BENCH_TEXT=$BENCH_TEXT): sections on real text skipped"; return 1; }
    "$PY" -m nanochat.dataset prepare --input "$BENCH_TEXT" --force > "$B/prepare.log" 2>&1 \
      && "$PY" scripts/tok_train.py --input "$BENCH_TEXT" --vocab-size $VOCAB >> "$B/prepare.log" 2>&1 \
      || { md "- data preparation failed: $(tail -2 "$B/prepare.log")"; return 1; }
  fi
}

# --- tests ---------------------------------------------------------------------------------------
if want tests "${EST[0]}"; then
  md "## cuda-marked tests"; md ""; md '```'
  "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tail -15 >> "$RESULT"
  md '```'
fi

# --- depth 20, each attention backend ------------------------------------------------------------------
if [[ $ONLY == *,d20,* ]]; then
  md ""; md "## depth 20, bf16, compiled, record recipe: each attention backend (synthetic tokens)"
  for backend in sdpa flex fa4 fa3; do
    why=$("$PY" -c "import sys, torch; from nanochat.attention import unavailable_reason as u; d='cuda' if torch.cuda.is_available() else 'cpu'; print(u(sys.argv[1], d, torch.bfloat16 if d == 'cuda' else torch.float32) or '')" $backend)
    if [ -n "$why" ]; then md ""; md "- $backend: not available ($why)"; continue; fi
    want "d20" "${EST[1]}" || break
    train "d20_$backend" --synthetic-data "${D20[@]}" "${RECIPE[@]}" --attention $backend --fused-loss off \
      --model-tag "d20_$backend"
  done
fi

# --- depth 24, bf16 vs fp8 ----------------------------------------------------------------------------
if want d24 "${EST[2]}" && prepare_data; then
  md ""; md "## depth 24: bf16 vs --fp8, same data and steps (real text, our tokenizer)"
  train d24_bf16 "${D24[@]}" "${RECIPE[@]}" "${QUIET[@]}" --model-tag d24_bf16
  md "- bf16 loss $(last_loss d24_bf16)"
  train d24_fp8 "${D24[@]}" "${RECIPE[@]}" "${QUIET[@]}" --fp8 --model-tag d24_fp8
  md "- fp8 loss $(last_loss d24_fp8)"
  md ""; md '```'
  # time to GPT-2 (CORE > 0.2565) on 8 such GPUs: the record recipe (d24, 32K vocab, tokens:params 8) at the
  # FLOP rate each run achieved, perfect scaling across GPUs, no evaluation time
  "$PY" - "$CK/d24_bf16" "$CK/d24_fp8" >> "$RESULT" 2>&1 <<'EOF'
import json, statistics, sys
from pathlib import Path
from nanochat import sizing
from nanochat.run_dir import read_run_json
target = sizing.model_config(24, vocab_size=32768, window_pattern="SSSL", value_embeds=True, resid_scalars=True)
total_flops = sizing.flops_per_token(target) * 8 * sizing.count_params(target)["scaling"]
for d in map(Path, sys.argv[1:]):
    info = read_run_json(d)
    if not info or not (d / "metrics.jsonl").exists():
        continue
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()][3:]
    if not recs:
        continue
    flops_per_s = info["sizing"]["flops_per_token"] * statistics.median(r["tok_per_sec"] for r in recs)
    print(f"{d.name}: time-to-GPT-2 estimate on 8 GPUs {total_flops / (8 * flops_per_s) / 3600:.2f} h "
          f"({total_flops:.3g} FLOPs at 8 x {flops_per_s / 1e12:.0f} TFLOP/s; linear scaling, no evals)")
EOF
  md '```'
fi

# --- the reference at depth 20 -----------------------------------------------------------------------
if want ref "${EST[3]}"; then
  md ""; md "## reference implementation, depth 20, side by side"
  REFSRC=$CARRY/reference
  if [ ! -f "$REFSRC/scripts/base_train.py" ] || [ ! -f "$BENCH_TEXT" ]; then
    md "- skipped: no carried reference ($REFSRC; run benchmarks/device_prepare.sh) or no text"
  else
    RB=$B/reference_base; RS=/tmp/ref_site_$$; mkdir -p "$RB/base_data_climbmix" "$RS/wandb"
    # the reference imports wandb at module level and never calls it with --run dummy
    echo "# inert stand-in: the reference with --run dummy only imports wandb" > "$RS/wandb/__init__.py"
    ls "$CARRY"/whl_ref/*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps --target "$RS" "$CARRY"/whl_ref/*.whl 2>/dev/null
    # its data: parquet shards with a "text" column (the last one is its validation split)
    "$PY" - "$BENCH_TEXT" "$RB/base_data_climbmix" <<'EOF'
import json, sys
import pyarrow as pa, pyarrow.parquet as pq
src, dst = sys.argv[1], sys.argv[2]
lines = open(src).read().splitlines()
texts = [json.loads(l)["text"] if l.lstrip().startswith("{") else l for l in lines if l.strip()]
half = max(1, len(texts) - max(1, len(texts) // 10))
pq.write_table(pa.table({"text": texts[:half] * 4}), f"{dst}/shard_00000.parquet")
pq.write_table(pa.table({"text": texts[half:]}), f"{dst}/shard_00001.parquet")
EOF
    # its own package first (and run from its folder): our repo leaves the import path
    OTHERS=$(echo "${PYTHONPATH:-}" | tr ':' '\n' | grep -vxF "$REPO" | paste -sd: -)
    # (at toy size on CPU its unconditional torch.compile would take minutes: eager there)
    REFPY=(env PYTHONPATH="$REFSRC:$RS${OTHERS:+:$OTHERS}" NANOCHAT_BASE_DIR="$RB" ${CPU:+TORCHDYNAMO_DISABLE=1} "$PY")
    (cd "$REFSRC" && "${REFPY[@]}" -m scripts.tok_train --vocab-size $REF_VOCAB --max-chars 50000000) > "$B/ref_tok.log" 2>&1
    (cd "$REFSRC" && "${REFPY[@]}" -m scripts.base_train "${REF[@]}" --window-pattern=SSSL --run=dummy \
       --eval-every=-1 --core-metric-every=-1 --sample-every=-1 --warmup-steps=2) > "$B/ref_d20.log" 2>&1
    rc=$?
    md ""; md "\`reference scripts.base_train ${REF[*]} --window-pattern=SSSL\` (commit $(cat "$CARRY/reference_commit" 2>/dev/null))"; md ""; md '```'
    grep -iE "flash attention|fa3|sdpa|vocab size" "$B/ref_d20.log" | head -4 >> "$RESULT"
    "$PY" - "$B/ref_d20.log" $SKIP $rc "${REF[@]}" >> "$RESULT" 2>&1 <<'EOF'
import re, statistics, sys
log, skip, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
flags = dict(a.lstrip("-").split("=", 1) for a in sys.argv[4:])
text = open(log).read()
tok = [float(m.replace(",", "")) for m in re.findall(r"tok/sec: ([\d,]+)", text)]
mfu = [float(m) for m in re.findall(r"mfu: ([\d.]+)", text)]
vocab = re.search(r"[Vv]ocab size: ([\d,]+)", text)
if rc != 0 or len(tok) <= skip:
    print(f"reference run failed (exit {rc}):", *text.splitlines()[-6:], sep="\n  ")
    sys.exit(0)
import torch
from nanochat import sizing
from nanochat.common import get_peak_flops
V = int(vocab.group(1).replace(",", "")) if vocab else 32768
cfg = sizing.model_config(int(flags["depth"]), max_seq_len=int(flags["max-seq-len"]), vocab_size=V,
                          window_pattern="SSSL", value_embeds=True, resid_scalars=True)
t = statistics.median(tok[skip:])
peak = get_peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
ours = f"{100 * sizing.flops_per_token(cfg) * t / peak:.2f}%" if peak else "n/a"
print(f"reference: {t:,.0f} tok/s (median after {skip} steps), its own MFU {statistics.median(mfu[skip:]) if mfu else 'n/a'}%,"
      f" MFU by our formula {ours} (vocab {V}; its short window is half the context, ours a quarter)")
EOF
    md '```'
    rm -rf "$RB/base_checkpoints" "$RS"
  fi
fi

# --- depth 12: compiled run, SIGKILL, exact resume ------------------------------------------------
if want d12 "${EST[4]}" && prepare_data; then
  md ""; md "## depth 12: compiled bf16 run, SIGKILL in step $((HANG_STEP + 1)), resume from step $RESUME_STEP"
  rm -rf "$CK/d12_a" "$CK/d12_b"
  train d12_a "${D12[@]}" --model-tag d12_a
  NANOCHAT_TEST_HANG_STEP=$HANG_STEP "$PY" -m scripts.base_train "${D12[@]}" --model-tag d12_b > "$B/d12_b.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 1200); do
    grep -q "hanging at step" "$B/d12_b.log" && break
    kill -0 $PID 2>/dev/null || break
    sleep 0.5
  done
  kill -9 $PID 2>/dev/null; wait $PID 2>/dev/null
  "$PY" -m scripts.base_train "${D12[@]}" --model-tag d12_b --resume latest >> "$B/d12_b.log" 2>&1
  md '```'
  "$PY" benchmarks/smoke_report.py compare "$CK/d12_a" "$CK/d12_b" >> "$RESULT" 2>&1
  grep -E "^resumed" "$B/d12_b.log" >> "$RESULT"
  md '```'
fi

# --- --device-batch-size auto ---------------------------------------------------------------------------
if want auto "${EST[5]}"; then
  md ""; md "## --device-batch-size auto, depth 20 (record recipe, --attention auto)"
  AUTO=("${D20[@]}")
  for i in "${!AUTO[@]}"; do [ "${AUTO[$i]}" = "--device-batch-size" ] && AUTO[$((i + 1))]=auto; done
  train d20_auto --synthetic-data "${AUTO[@]}" "${RECIPE[@]}" --num-iterations 4 --model-tag d20_auto
fi

# --- the LM head: fused (chunked, eager) vs the compiled plain path -------------------------------------------
if want head "${EST[6]}"; then
  md ""; md "## LM head at depth 20: --fused-loss on (vs the d20 runs above, --fused-loss off)"
  train d20_fused --synthetic-data "${D20[@]}" "${RECIPE[@]}" --fused-loss on --model-tag d20_fused
fi

# --- CORE through the compiled model ----------------------------------------------------------------------
if want core "${EST[7]}"; then
  md ""; md "## CORE, $CORE_PER_TASK examples per task, through the compiled model (run d12_a)"; md ""; md '```'
  if [ -z "${NANOCHAT_EVAL_BUNDLE:-}" ] || [ ! -d "$CK/d12_a" ]; then
    echo "skipped: no eval bundle or no d12_a checkpoint" >> "$RESULT"
  else
    "$PY" - "$CK/d12_a" $CORE_PER_TASK >> "$RESULT" 2>&1 <<'EOF'
import sys, time
import torch
from nanochat import checkpoint_manager as ckpt
from nanochat.core_eval import evaluate_core
from nanochat.tokenizer import get_tokenizer
folder, per_task = sys.argv[1], int(sys.argv[2])
device = "cuda" if torch.cuda.is_available() else "cpu"
step = ckpt.find_last_step(folder)
meta = ckpt.load_meta(folder, step)
model = ckpt.build_model(meta["model_config"], device)
state, _, _ = ckpt.load_checkpoint(folder, step, device=device)
ckpt.load_state_into(model, state)
model.eval()
model.before_compile()
compiled = torch.compile(model, dynamic=True) if device == "cuda" else model
t0 = time.time()
out = evaluate_core(compiled, get_tokenizer(), device, max_per_task=per_task, verbose=False)
print(f"CORE {out['core']:.4f} at step {step} ({per_task} per task, {'compiled' if device == 'cuda' else 'eager'}), "
      f"{time.time() - t0:.1f} s including compilation")
EOF
  fi
  md '```'
fi

# --- regional compilation ---------------------------------------------------------------------------------
if want scope "${EST[8]}"; then
  md ""; md "## depth 20, --compile-scope blocks (vs the whole-model d20 runs above; first step = compile time)"
  COMPILE=(--compile); [ -n "$CPU" ] && COMPILE=()  # (the CPU check of the script stays eager: Inductor takes minutes there)
  train d20_blocks --synthetic-data "${D20[@]}" "${RECIPE[@]}" --fused-loss off "${COMPILE[@]}" --compile-scope blocks \
    --model-tag d20_blocks
fi

md ""; md "total wall time $(elapsed) s (budget $BUDGET s)"
say "done: $RESULT"
cat "$RESULT"
