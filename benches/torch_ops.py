"""PyTorch's matmul TFLOP/s at the sizes `burn-megatron bench ops` timed, printed next to
ours: `python3 benches/torch_ops.py ours.jsonl` (the file `bench ops --output` wrote)."""
import json
import sys
import time

import torch

DTYPES = {"f32": (torch.float32, False), "tf32": (torch.float32, True),
          "bf16": (torch.bfloat16, False), "f16": (torch.float16, False)}


def tflops(size, dtype, tf32, iters=20):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(size, size, device="cuda").to(dtype)
    b = torch.randn(size, size, device="cuda").to(dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 / ((time.perf_counter() - started) / iters) / 1e12


def main():
    ours = [json.loads(line) for line in open(sys.argv[1]) if '"kind": "gemm"' in line]
    print(f"{'gemm':<8} {'dtype':>6} {'ours':>10} {'Burn':>10} {'PyTorch':>10} {'ours/PyTorch':>13}  (TFLOP/s)")
    for row in ours:
        dtype, tf32 = DTYPES[row["dtype"]]
        torch_tflops = tflops(row["size"], dtype, tf32)
        print(f"{row['size']:>5}^3 {row['dtype']:>6} {row['ours_tflops']:>10.1f} {row['burn_tflops']:>10.1f} "
              f"{torch_tflops:>10.1f} {row['ours_tflops'] / torch_tflops:>12.0%}")


if __name__ == "__main__":
    main()
