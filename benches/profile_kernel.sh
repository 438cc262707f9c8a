#!/usr/bin/env bash
# One of `bench kernels`'s kernels under Nsight Compute (ncu, in the GPU image's CUDA):
# duration, DRAM throughput, registers, occupancy and where its warps stall, at
# transformer size in bf16.
#
#   cargo build --release --features cuda
#   benches/profile_kernel.sh [path/to/burn-megatron] <kernel name regex> [launches to skip]
#
# `bench kernels` calls each kernel 104 times at TOKENS (default 8192): 3 untimed and 50
# timed from the host, one more and 50 timed on the device. The default skip of 10 lands
# on a forward (the GeLU's forward and backward are one kernel: skip 114 for the
# backward). The full report is written to $OUT/ncu_<regex>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/burn-megatron}
KERNEL=${2:?"name the kernel, for example norm_backward_f or bias_gelu_f"}
SKIP=${3:-10}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
source benches/gpu_env.sh
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
REPORT="$OUT/ncu_${KERNEL//[^A-Za-z0-9_]/_}.txt"
"$NCU" -k "regex:$KERNEL" -s "$SKIP" -c 1 --section LaunchStats --section Occupancy \
    --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
    "$BIN" bench kernels --parts bandwidth --dtypes bf16 --tokens "${TOKENS:-8192}" \
    > "$REPORT" 2>&1 || echo "ncu failed: see $REPORT"
grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Registers Per Thread|Grid Size|Block Size|Theoretical Occupancy|Achieved Occupancy|Warp Cycles Per Issued|Block Limit (Registers|Shared Mem)" "$REPORT"
grep -A3 "Est. .*Speedup" "$REPORT" | grep -v "^--" | head -24
