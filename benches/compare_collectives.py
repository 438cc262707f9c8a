"""Prints burn-megatron's and PyTorch's collective bus bandwidth side by side.

    python3 benches/compare_collectives.py ours.jsonl torch.jsonl
"""
import json
import sys


def rows(path):
    with open(path) as f:
        return {(r["op"], r["bytes"]): r for r in map(json.loads, f)}


ours, torch = rows(sys.argv[1]), rows(sys.argv[2])
print(f"{'operation':<15} {'bytes':>12} {'ours GB/s':>10} {'torch GB/s':>11} {'ratio':>6}  check")
for key in sorted(ours, key=lambda k: (k[0], k[1])):
    mine, theirs = ours[key], torch.get(key)
    ratio = mine["busbw_gbps"] / theirs["busbw_gbps"] if theirs else float("nan")
    theirs_bw = theirs["busbw_gbps"] if theirs else float("nan")
    print(f"{key[0]:<15} {key[1]:>12} {mine['busbw_gbps']:>10.1f} {theirs_bw:>11.1f} {ratio:>6.3f}  "
          f"{'ok' if mine['checked'] else 'WRONG'}")
