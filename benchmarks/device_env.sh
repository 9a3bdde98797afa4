# Sourced by gpu_bench.sh (from the repo root): the Python, import path, eval
# bundle and commit they use, also on an offline GPU machine that got .device_carry/ from
# benchmarks/device_prepare.sh. Sets REPO, CARRY, PY, COMMIT, PYTHONPATH and, when one is found,
# NANOCHAT_EVAL_BUNDLE (../shared/data/eval_bundle, else the carried copy).
REPO=$(pwd)
CARRY=$REPO/.device_carry
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ -d "$CARRY/whl" ] && ! "$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('rustbpe') and u.find_spec('bible')))"; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}  # the repo's nanochat, installed or not
if [ -z "${NANOCHAT_EVAL_BUNDLE:-}" ]; then
  for b in "$REPO/../shared/data/eval_bundle" "$CARRY/data/eval_bundle"; do
    [ -d "$b" ] && { export NANOCHAT_EVAL_BUNDLE=$b; break; }
  done
fi
COMMIT=$(git rev-parse HEAD 2>/dev/null || cat "$CARRY/commit" 2>/dev/null || echo unknown)
