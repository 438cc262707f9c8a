"""PyTorch's NCCL collectives, measured like `burn-megatron bench collectives`.

Run under torchrun on the same GPUs:
    torchrun --nproc-per-node 4 benches/torch_collectives.py --output torch.jsonl
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--min-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-bytes", type=int, default=1 << 30)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    rows = []
    size = args.min_bytes
    while size <= args.max_bytes:
        count = size // 4 // ranks * ranks
        mine = torch.ones(count, device="cuda")
        gathered = torch.empty(count * ranks, device="cuda")
        scattered = torch.empty(count // ranks, device="cuda")
        n = float(ranks)
        ops = [
            ("all_reduce", lambda: dist.all_reduce(mine), count * 4, 2 * (n - 1) / n),
            ("all_gather", lambda: dist.all_gather_into_tensor(gathered, mine), count * 4 * ranks, (n - 1) / n),
            ("reduce_scatter", lambda: dist.reduce_scatter_tensor(scattered, mine), count * 4, (n - 1) / n),
        ]
        for name, run, moved, factor in ops:
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            dist.barrier()
            started = time.perf_counter()
            for _ in range(args.iters):
                run()
            torch.cuda.synchronize()
            seconds = torch.tensor([(time.perf_counter() - started) / args.iters], device="cuda")
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            seconds = seconds.item()
            algbw = moved / seconds / 1e9
            rows.append({"op": name, "bytes": moved, "ranks": ranks, "time_us": seconds * 1e6,
                         "algbw_gbps": algbw, "busbw_gbps": algbw * factor})
        size *= 4
    if rank == 0:
        with open(args.output, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
