#!/usr/bin/env bash
# The GPU's correctness checks and kernel bandwidths in one command on one GPU:
#   - thread ranks: tp 2 x pp 2 (four threads sharing the GPU; plain, with the distributed
#     optimizer, with gradient-accumulation fusion) and one GPU rank with fusion, against
#     one rank on the CPU, same small GPT, 5 steps;
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
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}

SMALL=(train --steps 5 --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32
    --micro-batch-size 2 --global-batch-size 8 --log-interval 1 --eval-interval 1000 --dp 1)
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
timeout "$LIMIT" "$BIN" "${SMALL[@]}" --device cuda --tp 1 --pp 1 --gradient-accumulation-fusion \
    --metrics "$OUT/one_gpu_fusion.jsonl" > "$OUT/one_gpu_fusion.log" 2>&1 \
    || echo "one GPU with gradient-accumulation fusion failed: see $OUT/one_gpu_fusion.log"

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
print(f"{'thread ranks vs one CPU rank':<34} {'steps':>6} {'loss rel. diff':>15} {'grad norm rel. diff':>20}")
for name in ["tp2pp2_1", "tp2pp2_2", "tp2pp2_3", "tp2pp2_distributed", "tp2pp2_fusion", "one_gpu_fusion"]:
    got = rows(f"{name}.jsonl")
    pairs = list(zip(got, reference))
    if not pairs:
        print(f"{name:<34} {'failed':>6}")
        continue
    loss = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in pairs)
    norm = max(abs(a["grad_norm"] - b["grad_norm"]) / abs(b["grad_norm"]) for a, b in pairs)
    print(f"{name:<34} {len(pairs):>6} {loss:>15.2e} {norm:>20.2e}")
for name in ["kernel_checks.jsonl", "op_checks.jsonl"]:
    checks = [r for r in rows(name) if r.get("kind") == "check"]
    failed = [r for r in checks if not r.get("ok", True)]
    print(f"{name:<34} {len(checks):>6} checks, {len(failed)} failed" if checks else f"{name:<34} {'failed':>6}")
PY
for tokens in 8192 32768; do
    echo; echo "bandwidth, bf16, $tokens tokens:"
    if grep -q '^(floor' "$OUT/bandwidth_$tokens.log"; then
        sed -n '/^kernel /,/^(floor/p' "$OUT/bandwidth_$tokens.log"
    else
        echo "failed: see $OUT/bandwidth_$tokens.log"
    fi
done
