#!/usr/bin/env bash
# nanochat speedrun: set up everything on a fresh machine, then run the whole pipeline
# (data -> tokenizer -> pretraining -> evaluation -> report card).
#
#   bash speedrun.sh                      # GPU recipe on CUDA machines, the CPU demo otherwise
#     CPU demo on a quiet 2-core Xeon: ~2 min with AMX, ~3.5 min with AVX-512 (no AMX), ~4.7 min with
#     AVX2 only; longer while other work shares the cores (benchmarks/results/cpu_dtype.md)
#   NANOCHAT_PRESET=cpu bash speedrun.sh  # force a preset: gpu | cpu | ci
#
# Knobs (environment): NANOCHAT_PRESET, NANOCHAT_DEPTH, NANOCHAT_DATA (climbmix | fineweb-edu |
# embedded | path), WANDB_RUN (wandb run name; default: no wandb), NANOCHAT_BASE_DIR (artifacts,
# default ~/.cache/nanochat), NANOCHAT_EVAL_BUNDLE (a local DCLM eval bundle), NANOCHAT_VENV.
# Safe to re-run: finished stages are skipped, an interrupted training run resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${NANOCHAT_VENV:-.venv}
# Threads: no OMP_NUM_THREADS here. Each stage's `--threads auto` uses every core and fewer while other
# processes keep some busy (nanochat/cpu_threads.py); a count fixed to every core (an exported
# OMP_NUM_THREADS=$(nproc)) made steps several times slower while other work shared the cores.
# Set NANOCHAT_THREADS=N to fix the count on purpose.

if [ ! -x "$VENV/bin/python" ]; then
  echo "[speedrun] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.9"          # CUDA build from PyPI
  else
    python -m pip install -q "torch==2.13.0"       # the CPU build (pinned: a range would pull CUDA wheels)
  fi
fi
if ! python -c "import nanochat, tiktoken, rustbpe, pyarrow" 2>/dev/null || [ pyproject.toml -nt "$VENV/.nanochat-installed" ]; then
  python -m pip install -q -e . && touch "$VENV/.nanochat-installed"
fi
exec python -m scripts.speedrun "$@"
