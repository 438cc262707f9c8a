#!/usr/bin/env bash
# The fused kernels' benchmark in one command on one GPU (#8):
#   - every kernel and gradient against its plain-Burn reference on fresh random inputs
#     (f32, bf16, f16; shapes that are not multiples of the block size), under CubeCL's
#     validate mode (any access outside an array reported, by kernel);
#   - each kernel's bandwidth (bytes read + written over the device's time) in bf16 at
#     TOKENS x HIDDEN (default 8192 x 1280, GPT-2 774M's micro-batch of 8 x 1024), as a
#     share of COPY GB/s (default the H200's 4300), next to the unfused Burn ops;
#   - the same bandwidths at 32768 x 1280 and 8192 x 4096 (SIZES);
#   - PyTorch's eager ops doing the same work on the same GPU at TOKENS x HIDDEN, their
#     device time from a CUDA graph (`benches/torch_kernels.py`; skipped without torch);
#   - the GPT-2 774M bf16 8 x 1024 training step with the fused kernels and with their
#     plain-Burn references (`--reference-kernels`).
#
#   cargo build --release --features cuda
#   benches/gpu_kernels.sh [path/to/burn-megatron]      # logs under $OUT (default bench-out)
#
# STEPS (default 6) sets the training steps per run; the medians skip the first two.
# Each part runs under its own time limit (LIMIT seconds, default 300).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/release/burn-megatron}")
OUT=$(realpath -m "${OUT:-bench-out}")
STEPS=${STEPS:-6}
LIMIT=${LIMIT:-300}
TOKENS=${TOKENS:-8192}
HIDDEN=${HIDDEN:-1280}
COPY=${COPY:-4300}
mkdir -p "$OUT"
source benches/gpu_env.sh
cat "$OUT/gpu_state.csv"

# The checks run under CubeCL's validate mode (a cubecl.toml in the working directory):
# every kernel launched without bounds checks reports any access outside its arrays.
VALIDATE_DIR=$(mktemp -d)
printf '[compilation]\ncheck_mode = "validate"\n' > "$VALIDATE_DIR/cubecl.toml"
(cd "$VALIDATE_DIR" && timeout "$LIMIT" "$BIN" bench kernels --parts checks \
    --output "$OUT/kernel_checks.jsonl" > "$OUT/kernel_checks.log" 2>&1) \
    || echo "kernel checks failed: see $OUT/kernel_checks.log"
echo "kernel checks: $(grep -cE ' ok$' "$OUT/kernel_checks.log") passed, $(grep -c FAILED "$OUT/kernel_checks.log") failed"
grep FAILED "$OUT/kernel_checks.log" | head -20
echo "accesses outside an array (CubeCL validate mode), by kernel:"
grep VALIDATION "$OUT/kernel_checks.log" | sed -E 's/^\[VALIDATION ([^]]+)\].*/\1/' | sort | uniq -c

timeout "$LIMIT" "$BIN" bench kernels --parts bandwidth --dtypes bf16 --tokens "$TOKENS" \
    --hidden "$HIDDEN" --copy-bandwidth "$COPY" --output "$OUT/bandwidth.jsonl" \
    > "$OUT/bandwidth.log" 2>&1 || echo "bandwidth failed: see $OUT/bandwidth.log"
python3 benches/torch_kernels.py "$OUT/bandwidth.jsonl" "$TOKENS" "$HIDDEN" > "$OUT/torch_kernels.log" 2>&1 \
    || echo "PyTorch's ops were not timed: see $OUT/torch_kernels.log"
# The same table at more sizes (SIZES: "tokens x hidden" pairs; the unfused ops once each).
SIZES=${SIZES:-"32768x1280 8192x4096"}
for size in $SIZES; do
    timeout "$LIMIT" "$BIN" bench kernels --parts bandwidth --dtypes bf16 --tokens "${size%x*}" \
        --hidden "${size#*x}" --copy-bandwidth "$COPY" --unfused-iters 1 \
        > "$OUT/bandwidth_$size.log" 2>&1 || echo "bandwidth at $size failed: see $OUT/bandwidth_$size.log"
done

STEP=(train --device cuda --precision bf16 --tp 1 --dp 1 --preset gpt2-774m --seq-length 1024
    --global-batch-size 8 --micro-batch-size 8 --steps "$STEPS" --log-interval 1
    --eval-interval 100000 --eval-iters 1)
timeout "$LIMIT" "$BIN" "${STEP[@]}" > "$OUT/step_fused.log" 2>&1 \
    || echo "the step with the fused kernels failed: see $OUT/step_fused.log"
timeout "$LIMIT" "$BIN" "${STEP[@]}" --reference-kernels > "$OUT/step_reference.log" 2>&1 \
    || echo "the step with the references failed: see $OUT/step_reference.log"

echo
sed -n '/^kernel .*fused GB\/s/,$p' "$OUT/bandwidth.log"
echo
echo "next to PyTorch's eager ops (bf16, $TOKENS x $HIDDEN, the device's time):"
cat "$OUT/torch_kernels.log"
for size in $SIZES; do
    echo
    echo "at $size tokens x hidden (% of $COPY GB/s):"
    # "name  dtype  MB  fused  Burn  N%  ..." -> "name N%"
    sed -nE 's/^(.{30}) +[a-z0-9]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +([0-9]+%).*/\1 \2/p' "$OUT/bandwidth_$size.log"
done
# "throughput (...): N tokens/s, X model TFLOP/s ..." -> "N X"
rate() { sed -n 's/^throughput[^:]*: \([0-9.]*\) tokens\/s, \([0-9.]*\) model TFLOP\/s.*/\1 \2/p' "$1"; }
# "step      1/N | loss X | ..." -> "X"
first_loss() { sed -n 's/^step  *1\/.*| loss \([0-9.eE+-]*\) |.*/\1/p' "$1" | head -1; }
printf '\n%-44s %12s %10s %12s %12s\n' "GPT-2 774M bf16 8 x 1024, one step" "tokens/s" "TFLOP/s" "ms a step" "step-1 loss"
for run in fused:"with the fused kernels" reference:"with their plain-Burn references"; do
    read -r tokens tflops <<< "$(rate "$OUT/step_${run%%:*}.log")"
    ms=$([ -n "${tokens:-}" ] && python3 -c "print(f'{8192 / $tokens * 1e3:.1f}')" || echo -)
    printf '%-44s %12s %10s %12s %12s\n' "${run#*:}" "${tokens:-failed}" "${tflops:--}" "$ms" "$(first_loss "$OUT/step_${run%%:*}.log")"
done
