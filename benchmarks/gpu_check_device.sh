#!/usr/bin/env bash
# Ready-made device run of benchmarks/gpu_check.py on a lent GPU machine (no network there).
#
#   here:  benchmarks/gpu_check_device.sh prepare   # wheels the device image lacks -> .whl/, the real
#                                                   # Aperio slide -> .devdata/ (both git-ignored locally)
#   there: bash benchmarks/gpu_check_device.sh run  # install the wheels, build gpfm-engine for sm_90,
#                                                   # run the check; report + log land in $OUT
#
# Device tool call: command "bash benchmarks/gpu_check_device.sh run", carry [".whl", ".devdata"],
# timeout_s 600. Then append $OUT/gpu_check.md to benchmarks/RESULTS.md here.
# The device image (see the device notes) has torch, torchvision, tifffile, h5py, cupy, pybind11,
# scikit-build-core, cmake, ninja and nvcc, but not imagecodecs, openslide or nvImageCodec; DALI's
# wheel (199 MB) exceeds what a call can carry, so the check reports it as not installed there.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(imagecodecs openslide-python openslide-bin "nvidia-nvimgcodec-cu13>=0.9,<0.10" nvidia-nvjpeg)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
           manylinux_2_5_x86_64)

prepare() {
  for pattern in /.whl/ /.devdata/; do
    grep -qxF "$pattern" .git/info/exclude 2>/dev/null || echo "$pattern" >> .git/info/exclude
  done
  mkdir -p .whl
  local args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl -q)
  for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
  for w in "${WHEELS[@]}"; do python3 -m pip download "${args[@]}" "$w"; done
  local data="${GPFM_TEST_DATA:-../shared/data}"
  if [ -f "$data/wsi/aperio/CMU-1-Small-Region.svs" ]; then
    mkdir -p .devdata/wsi/aperio
    cp "$data/wsi/aperio/CMU-1-Small-Region.svs" .devdata/wsi/aperio/
  fi
  # A call carries at most 64 MiB: the working tree (tracked + untracked, not ignored) plus .whl and .devdata.
  local tree carry
  tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | xargs -d '\n' du -cb 2>/dev/null | tail -1 | cut -f1)
  carry=$(du -cb .whl .devdata | tail -1 | cut -f1)
  if [ $((tree + carry)) -gt $((62 << 20)) ]; then
    # the largest optional wheel goes first: the check then reports nvImageCodec as not installed
    # and the GPU decode rows come from nvJPEG (torchvision, in the device image)
    echo "$(( (tree + carry) >> 20 )) MiB would not travel: dropping the nvImageCodec wheel" >&2
    rm -f .whl/nvidia_nvimgcodec*.whl
    carry=$(du -cb .whl .devdata | tail -1 | cut -f1)
  fi
  echo "travels: $(( (tree + carry) >> 20 )) MiB of 64 (tree $((tree >> 20)) MiB, wheels + data $((carry >> 20)) MiB)"
}

run() {
  local out="${OUT:-/tmp/gpu-check-out}"
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv,noheader | tee "$out/nvidia-smi.txt" || true
  local t0=$SECONDS
  GPFM_CUDA=ON python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    -Cbuild-dir=/tmp/gpfm-build -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 -e . 2>&1 | tail -20 | tee "$out/build.log"
  echo "build: $((SECONDS - t0)) s" | tee -a "$out/build.log"
  python3 benchmarks/gpu_check.py --data .devdata --results "$out/gpu_check.md" -v "$@" 2>&1 | tee "$out/gpu_check.log"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  prepare) prepare ;;
  run) run "$@" ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
