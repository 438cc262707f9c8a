#!/usr/bin/env bash
# The GPU's correctness checks and kernel bandwidths in one command on one GPU:
#   - thread ranks: tp 2 x pp 2 (four threads sharing the GPU; plain, with the distributed
#     optimizer, with gradient-accumulation fusion, with full recompute) and one GPU rank
#     with fusion, against one rank on the CPU, same small GPT, 5 steps; one GPU rank in
#     bf16 (one micro-batch of 8 and four of 2) against the same CPU rank within bf16's
#     tolerance;
#   - every fused kernel and gradient against its reference (f32, bf16, f16);
#   - every GEMM path and core attention against their references (bench ops);
#   - each kernel's bandwidth at 8192 and 32768 tokens (bf16), with the host's share.
#
#   cargo build --release --features cuda
#   benches/gpu_checks.sh [path/to/burn-megatron]      # logs under $OUT (default bench-out)
#
# Each part runs under its own time limit (LIMIT seconds, default 300).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/burn-megatron}
OUT=${OUT:-bench-out}
LIMIT=${LIMIT:-300}
mkdir -p "$OUT"
source benches/gpu_env.sh
cat "$OUT/gpu_state.csv"

ONE_BATCH=(train --steps 5 --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32
    --global-batch-size 8 --log-interval 1 --eval-interval 1000 --dp 1)
SMALL=("${ONE_BATCH[@]}" --micro-batch-size 2)
timeout "$LIMIT" "$BIN" "${SMALL[@]}" --device cpu --tp 1 --pp 1 --metrics "$OUT/cpu_one_rank.jsonl" \
    > "$OUT/cpu_one_rank.log" 2>&1 || echo "the CPU reference failed: see $OUT/cpu_one_rank.log"
for run in 1 2 3; do
    timeout "$LIMIT" "$BIN" "${SMALL[@]}" --device cuda --tp 2 --pp 2 --gradient-accumulation-fusion false \
        --metrics "$OUT/tp2pp2_$run.jsonl" \
        > "$OUT/tp2pp2_$run.log" 2>&1 || echo "tp 2 x pp 2 run $run failed: see $OUT/tp2pp2_$run.log"
done
timeout "$LIMIT" "$BIN" "${SMALL[@]}" --device cuda --tp 2 --pp 2 --use-distributed-optimizer --gradient-accumulation-fusion false \
    --metrics "$OUT/tp2pp2_distributed.jsonl" > "$OUT/tp2pp2_distributed.log" 2>&1 \
    || echo "tp 2 x pp 2 with the distributed optimizer failed: see $OUT/tp2pp2_distributed.log"
timeout "$LIMIT" "$BIN" "${SMALL[@]}" --device cuda --tp 2 --pp 2 --gradient-accumulation-fusion \
    --metrics "$OUT/tp2pp2_fusion.jsonl" > "$OUT/tp2pp2_fusion.log" 2>&1 \
    || echo "tp 2 x pp 2 with gradient-accumulation fusion failed: see $OUT/tp2pp2_fusion.log"
timeout "$LIMIT" "$BIN" "${SMALL[@]}" --device cuda --tp 2 --pp 2 --recompute-granularity full \
    --metrics "$OUT/tp2pp2_full_recompute.jsonl" > "$OUT/tp2pp2_full_recompute.log" 2>&1 \
    || echo "tp 2 x pp 2 with full recompute failed: see $OUT/tp2pp2_full_recompute.log"
timeout "$LIMIT" "$BIN" "${SMALL[@]}" --device cuda --tp 1 --pp 1 --gradient-accumulation-fusion \
    --metrics "$OUT/one_gpu_fusion.jsonl" > "$OUT/one_gpu_fusion.log" 2>&1 \
    || echo "one GPU with gradient-accumulation fusion failed: see $OUT/one_gpu_fusion.log"

# bf16 on one GPU (rows of the padded GPT-2 vocabulary, 50304 bf16, are pitched in cubecl's
# layout), as one micro-batch of 8 (GEMM groups, no fusion) and as four of 2 (fusion on by
# default), against the fp32 CPU rank within bf16's tolerance: GEMM groups once gave
# garbage LM-head gradients there that the fp32 runs above could not show.
timeout "$LIMIT" "$BIN" "${ONE_BATCH[@]}" --device cuda --tp 1 --pp 1 --precision bf16 --micro-batch-size 8 \
    --metrics "$OUT/one_gpu_bf16.jsonl" > "$OUT/one_gpu_bf16.log" 2>&1 \
    || echo "one GPU in bf16 failed: see $OUT/one_gpu_bf16.log"
timeout "$LIMIT" "$BIN" "${SMALL[@]}" --device cuda --tp 1 --pp 1 --precision bf16 \
    --metrics "$OUT/one_gpu_bf16_accumulating.jsonl" > "$OUT/one_gpu_bf16_accumulating.log" 2>&1 \
    || echo "one GPU in bf16, four micro-batches failed: see $OUT/one_gpu_bf16_accumulating.log"

timeout "$LIMIT" "$BIN" bench kernels --parts checks --output "$OUT/kernel_checks.jsonl" \
    > "$OUT/kernel_checks.log" 2>&1 || echo "kernel checks failed: see $OUT/kernel_checks.log"
timeout "$LIMIT" "$BIN" bench ops --parts gemm,attention --output "$OUT/op_checks.jsonl" \
    > "$OUT/op_checks.log" 2>&1 || echo "op checks failed: see $OUT/op_checks.log"
for tokens in 8192 32768; do
    timeout "$LIMIT" "$BIN" bench kernels --parts bandwidth --dtypes bf16 --tokens "$tokens" \
        > "$OUT/bandwidth_$tokens.log" 2>&1 || echo "bandwidth at $tokens tokens failed: see $OUT/bandwidth_$tokens.log"
done

echo
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def rows(name):
    path = out / name
    return [json.loads(line) for line in path.open()] if path.exists() else []
reference = rows("cpu_one_rank.jsonl")
print(f"{'GPU runs vs one CPU rank (fp32)':<34} {'steps':>6} {'loss rel. diff':>15} {'grad norm rel. diff':>20}  limits")
# fp32 runs: the CPU's values up to summation order; bf16 runs: within bf16's rounding
# (limits set wide of it, far below the factor 2 to 600 of the broken GEMM groups).
fp32, bf16 = (1e-5, 1e-3), (2e-2, 1e-1)
for name, (loss_limit, norm_limit) in [("tp2pp2_1", fp32), ("tp2pp2_2", fp32), ("tp2pp2_3", fp32),
                                       ("tp2pp2_distributed", fp32), ("tp2pp2_fusion", fp32),
                                       ("tp2pp2_full_recompute", fp32),
                                       ("one_gpu_fusion", fp32), ("one_gpu_bf16", bf16),
                                       ("one_gpu_bf16_accumulating", bf16)]:
    got = rows(f"{name}.jsonl")
    pairs = list(zip(got, reference))
    if not pairs:
        print(f"{name:<34} {'failed':>6}")
        continue
    loss = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in pairs)
    norm = max(abs(a["grad_norm"] - b["grad_norm"]) / abs(b["grad_norm"]) for a, b in pairs)
    verdict = "ok" if loss <= loss_limit and norm <= norm_limit else "FAILED"
    print(f"{name:<34} {len(pairs):>6} {loss:>15.2e} {norm:>20.2e}  {loss_limit:.0e} / {norm_limit:.0e} {verdict}")
for name in ["kernel_checks.jsonl", "op_checks.jsonl"]:
    checks = [r for r in rows(name) if r.get("kind") == "check"]
    failed = [r for r in checks if not r.get("ok", True)]
    print(f"{name:<34} {len(checks):>6} checks, {len(failed)} failed" if checks else f"{name:<34} {'failed':>6}")
PY
for tokens in 8192 32768; do
    echo; echo "bandwidth, bf16, $tokens tokens:"
    if grep -q '^(device' "$OUT/bandwidth_$tokens.log"; then
        sed -n '/^kernel /,/^(device/p' "$OUT/bandwidth_$tokens.log"
    else
        echo "failed: see $OUT/bandwidth_$tokens.log"
    fi
done
