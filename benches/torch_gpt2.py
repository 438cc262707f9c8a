"""HF transformers GPT-2 training throughput in PyTorch eager, the reference for
`burn-megatron train` on the same GPU: `python3 benches/torch_gpt2.py --layers 36
--hidden 1280 --heads 20 --precision bf16` (GPT-2 774M). bf16 runs under autocast with
fp32 parameters and AdamW, as a PyTorch user would train; dropout off."""
import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="split each step's batch into micro-batches of this size whose "
                             "gradients accumulate (default: one micro-batch of --batch)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--bf16-weights", action="store_true",
                        help="keep the parameters (and AdamW's state) in bf16 and run without "
                             "autocast: faster, but no fp32 master weights (not Megatron's "
                             "mixed precision, which ours follows)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    config = GPT2Config(n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                        n_head=args.heads, vocab_size=50257, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).cuda()
    if args.bf16_weights:
        model = model.to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    step_model = torch.compile(model) if args.compile else model
    autocast = args.precision == "bf16" and not args.bf16_weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, 50257, (args.batch, args.seq), device="cuda")
    micro = args.micro_batch or args.batch
    if args.batch % micro:
        parser.error(f"--batch {args.batch} is not a multiple of --micro-batch {micro}")
    rates = []
    for step in range(args.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for part in tokens.split(micro):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = step_model(part, labels=part).loss
            (loss * (micro / args.batch)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        rates.append(args.batch * args.seq / (time.perf_counter() - started))
    rate = sorted(rates[2:])[len(rates[2:]) // 2]
    flops = 6 * params + 12 * args.layers * args.hidden * args.seq
    mode = ("compiled" if args.compile else "eager") + (", bf16 weights" if args.bf16_weights else "")
    if micro != args.batch:
        mode += f", {args.batch // micro} micro-batches of {micro}"
    print(f"torch {mode} GPT-2 {params / 1e6:.0f}M {args.precision} {args.batch}x{args.seq}: "
          f"median {rate:.0f} tokens/s, {rate * flops / 1e12:.0f} model TFLOP/s, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
