#!/usr/bin/env bash
# Builds libkernel_trace.so (see trace.c; default output dir target/kernel_trace) against CUPTI 13 and the
# CUDA 13 headers (runtime, crt) from NVIDIA's PyPI wheels; copies libcupti next to it so that the GPU
# machine needs nothing else. Usage: benches/kernel_trace/build.sh [output dir]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../target/kernel_trace}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pip download --quiet --no-deps --dest "$work" "nvidia-cuda-cupti==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*"
for wheel in "$work"/*.whl; do unzip -qo "$wheel" -d "$work"; done
cuda="$work/nvidia/cu13"
mkdir -p "$out"
cp "$cuda/lib/libcupti.so.13" "$out/"
gcc -O2 -shared -fPIC -o "$out/libkernel_trace.so" "$here/trace.c" \
    -I"$cuda/include" -L"$out" -l:libcupti.so.13 -Wl,-rpath,'$ORIGIN' -lpthread
echo "built $out/libkernel_trace.so (run with CUDA_INJECTION64_PATH=$out/libkernel_trace.so)"
