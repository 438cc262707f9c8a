#!/usr/bin/env bash
# The fast path's benchmarks in one command on one GPU, next to PyTorch measured in the
# same command: GEMM TFLOP/s at 4096 and 8192 (ours, Burn's matmul, PyTorch's matmul), the
# weight-gradient GEMM in the forms with and without gradient-accumulation fusion, and
# a GPT-2 774M bf16 8 x 1024 training step (tokens/s, model TFLOP/s, peak GPU memory, the
# activations one micro-batch holds for its backward) with selective recompute, with
# everything stored, with full recompute, with the fused kernels' plain-Burn references, as four micro-batches
# of 2 with and without gradient-accumulation fusion (and with it but without GEMM
# groups), and in PyTorch eager (HF transformers): as one batch of 8, as four
# micro-batches of 2, with bf16 parameters, and (TORCH_COMPILE=1) compiled.
#
#   cargo build --release --features cuda
#   benches/gpu_step.sh [path/to/burn-megatron]      # logs under $OUT (default bench-out)
#
# STEPS (default 8) sets the training steps per run; the medians skip the first two.
# Each part runs under its own time limit (LIMIT seconds, default 300), so that a part that
# stalls leaves the others their results.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/burn-megatron}
OUT=${OUT:-bench-out}
STEPS=${STEPS:-8}
LIMIT=${LIMIT:-300}
mkdir -p "$OUT"
source benches/gpu_env.sh
cat "$OUT/gpu_state.csv"

# Peak GPU memory (MiB) while a command runs, from nvidia-smi every 200 ms.
with_peak_memory() {
    local log=$1
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$log.mem" 2>/dev/null &
    local smi=$!
    "$@" > "$log" 2>&1
    local rc=$?
    kill $smi 2>/dev/null
    wait $smi 2>/dev/null
    echo "$(sort -n "$log.mem" | tail -1)" > "$log.peak"
    return $rc
}

echo "== GPT-2 774M bf16 8 x 1024"
TORCH=(python3 benches/torch_gpt2.py --layers 36 --hidden 1280 --heads 20 --precision bf16 --steps "$STEPS")
timeout "$LIMIT" "${TORCH[@]}" > "$OUT/torch_gpt2.log" 2>&1 || echo "PyTorch failed: see $OUT/torch_gpt2.log"
# PyTorch as four micro-batches of 2 (next to ours below), with bf16 parameters (no fp32
# master weights), and with TORCH_COMPILE=1 compiled (minutes of compiling).
timeout "$LIMIT" "${TORCH[@]}" --micro-batch 2 > "$OUT/torch_gpt2_accumulating.log" 2>&1 \
    || echo "PyTorch, four micro-batches failed: see $OUT/torch_gpt2_accumulating.log"
timeout "$LIMIT" "${TORCH[@]}" --bf16-weights > "$OUT/torch_gpt2_bf16_weights.log" 2>&1 \
    || echo "PyTorch, bf16 weights failed: see $OUT/torch_gpt2_bf16_weights.log"
if [ "${TORCH_COMPILE:-0}" = 1 ]; then
    timeout "$LIMIT" "${TORCH[@]}" --compile > "$OUT/torch_gpt2_compiled.log" 2>&1 \
        || echo "PyTorch compiled failed: see $OUT/torch_gpt2_compiled.log"
fi
STEP=(train --device cuda --precision bf16 --tp 1 --dp 1 --preset gpt2-774m --seq-length 1024
    --global-batch-size 8 --steps "$STEPS" --log-interval 1 --eval-interval 100000 --eval-iters 1)
TRAIN=("${STEP[@]}" --micro-batch-size 8)
with_peak_memory "$OUT/selective.log" timeout "$LIMIT" "$BIN" "${TRAIN[@]}" \
    || echo "selective recompute failed: see $OUT/selective.log"
with_peak_memory "$OUT/store_all.log" timeout "$LIMIT" "$BIN" "${TRAIN[@]}" --recompute-granularity none \
    || echo "storing everything failed: see $OUT/store_all.log"
with_peak_memory "$OUT/full.log" timeout "$LIMIT" "$BIN" "${TRAIN[@]}" --recompute-granularity full \
    || echo "full recompute failed: see $OUT/full.log"
# The fused kernels' plain-Burn references in their place (#8: the step with and without them).
with_peak_memory "$OUT/reference_kernels.log" timeout "$LIMIT" "$BIN" "${TRAIN[@]}" --reference-kernels \
    || echo "the reference kernels failed: see $OUT/reference_kernels.log"
# Four micro-batches of 2 a step, with and without gradient-accumulation fusion.
with_peak_memory "$OUT/accumulating.log" timeout "$LIMIT" "$BIN" "${STEP[@]}" --micro-batch-size 2 \
    --gradient-accumulation-fusion false \
    || echo "four micro-batches failed: see $OUT/accumulating.log"
with_peak_memory "$OUT/accumulating_fused.log" timeout "$LIMIT" "$BIN" "${STEP[@]}" --micro-batch-size 2 \
    --gradient-accumulation-fusion || echo "four micro-batches, fused failed: see $OUT/accumulating_fused.log"
# The same without GEMM groups (each GEMM its own hand-off): what the groups save.
BURN_MEGATRON_NO_GEMM_GROUPS=1 with_peak_memory "$OUT/accumulating_fused_no_groups.log" timeout "$LIMIT" "$BIN" \
    "${STEP[@]}" --micro-batch-size 2 --gradient-accumulation-fusion \
    || echo "four micro-batches, fused, no GEMM groups failed: see $OUT/accumulating_fused_no_groups.log"

# "throughput (...): N tokens/s, X model TFLOP/s ..." -> "N X"
ours() { sed -n 's/^throughput[^:]*: \([0-9.]*\) tokens\/s, \([0-9.]*\) model TFLOP\/s.*/\1 \2/p' "$1"; }
# "torch ... median N tokens/s, X model TFLOP/s, peak memory G GiB ..." -> "N X G"
torch() { sed -n 's/.*median \([0-9.]*\) tokens\/s, \([0-9.]*\) model TFLOP\/s, peak memory \([0-9.]*\) GiB.*/\1 \2 \3/p' "$1" 2>/dev/null; }
# "activation memory: X MiB held after one micro-batch's forward ..." -> "X"
activations() { sed -n 's/^activation memory: \([0-9.]*\) MiB.*/\1/p' "$1"; }
# "step      1/N | ... | grad norm X | ..." -> "X": every run starts from the same weights and
# batch, so the first step's gradient norms agree up to bf16 rounding (a run far from the
# others computes wrong gradients, as the GEMM groups once did).
first_norm() { sed -n 's/^step  *1\/.*| grad norm \([0-9.eE+-]*\) |.*/\1/p' "$1" | head -1; }
printf '\n%-34s %12s %12s %18s %18s %12s\n' "GPT-2 774M bf16 8 x 1024" "tokens/s" "TFLOP/s" "peak memory" "activations" "step-1 norm"
for run in selective store_all full reference_kernels accumulating accumulating_fused accumulating_fused_no_groups; do
    read -r rate tflops <<< "$(ours "$OUT/$run.log")"
    peak=$(cat "$OUT/$run.log.peak" 2>/dev/null)
    held=$(activations "$OUT/$run.log")
    printf '%-34s %12s %12s %14s MiB %14s MiB %12s\n' "ours, $run" "${rate:-failed}" "${tflops:--}" "${peak:--}" "${held:--}" "$(first_norm "$OUT/$run.log")"
done
for run in "torch_gpt2:PyTorch eager (autocast, AdamW)" "torch_gpt2_accumulating:PyTorch eager, 4 x 2" \
    "torch_gpt2_bf16_weights:PyTorch eager, bf16 weights" "torch_gpt2_compiled:PyTorch compiled"; do
    [ -f "$OUT/${run%%:*}.log" ] || continue
    read -r rate tflops gib <<< "$(torch "$OUT/${run%%:*}.log")"
    printf '%-34s %12s %12s %14s GiB (allocated)\n' "${run#*:}" "${rate:-failed}" "${tflops:--}" "${gib:--}"
done

echo
echo "== GEMMs"
timeout "$LIMIT" "$BIN" bench ops --device cuda --parts speed,weight-grad --output "$OUT/ops.jsonl" > "$OUT/ops.log" 2>&1 \
    || echo "bench ops failed: see $OUT/ops.log"
python3 benches/torch_ops.py "$OUT/ops.jsonl" 2>&1 | tee "$OUT/gemm_table.txt"
# The weight gradient without fusion (bf16) and with it (fp32, fresh and accumulated).
echo
sed -n '/^weight gradient/,/^added onto/p' "$OUT/ops.log"
