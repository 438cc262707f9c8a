#!/usr/bin/env bash
# Where the GEMM gap at 4096^3 comes from: the same bf16 product timed and traced
# (benches/kernel_trace, the last 60 ms: 400 products of each) for ours (`bench ops --parts
# speed`; Burn's matmul runs before it) and for PyTorch's matmul, one
# after the other on one GPU. Equal kernel times with lower TFLOP/s mean the time goes
# between the kernels (the hand-off around each of our GEMMs); a slower kernel of ours
# means another algorithm, or a kernel sharing the GPU with it (the hand-off's one-thread
# wait on cubecl's stream spins while the GEMM runs). Found with it on an H200: the same
# cuBLASLt kernel took 218 us for us and 170 us for PyTorch, 175 us for us with
# BURN_MEGATRON_HOST_SYNC=1 (no waiting kernel): the waiting kernel held back a cluster of
# the persistent GEMM, which cuBLASLt is now planned around (4 multiprocessors left out).
#
#   cargo build --release --features cuda && benches/kernel_trace/build.sh
#   benches/gemm_trace.sh [path/to/burn-megatron] [dir of libkernel_trace.so]
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/burn-megatron}
TRACE=$(cd "${2:-target/kernel_trace}" && pwd)/libkernel_trace.so
OUT=${OUT:-bench-out}
SIZE=${SIZE:-4096}
mkdir -p "$OUT"
source benches/gpu_env.sh
traced() {
    CUDA_INJECTION64_PATH="$TRACE" KERNEL_TRACE_NO_DRIVER=1 KERNEL_TRACE_LAST_S=0.06 KERNEL_TRACE_TOP=6 \
        KERNEL_TRACE_OUT="$OUT/gemm_trace_$1.txt" "${@:2}" > "$OUT/gemm_trace_$1.log" 2>&1 \
        || echo "$1 failed: see $OUT/gemm_trace_$1.log"
}
traced ours timeout 300 "$BIN" bench ops --parts speed --dtypes bf16 --sizes "$SIZE" --iters 400
traced torch timeout 300 python3 - "$SIZE" <<'PY'
import sys, time, torch
size = int(sys.argv[1])
a = torch.randn(size, size, device="cuda").bfloat16()
b = torch.randn(size, size, device="cuda").bfloat16()
for _ in range(3):
    a @ b
torch.cuda.synchronize()
started = time.perf_counter()
for _ in range(400):
    a @ b
torch.cuda.synchronize()
print(f"bf16 {size}^3: {2 * size**3 / ((time.perf_counter() - started) / 400) / 1e12:.1f} TFLOP/s")
PY
for side in ours torch; do
    echo "== $side"
    grep -E "^$SIZE\^3 +bf16|^bf16 $SIZE" "$OUT/gemm_trace_$side.log"
    head -8 "$OUT/gemm_trace_$side.txt"
done
