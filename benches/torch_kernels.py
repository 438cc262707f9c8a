"""PyTorch's eager ops at the sizes `burn-megatron bench kernels --parts bandwidth` timed, next
to our fused kernels: `python3 benches/torch_kernels.py ours.jsonl [TOKENS HIDDEN VOCAB]` (the
file `--output` wrote, and the run's `--tokens`, `--hidden`, `--vocab`; defaults 8192 1280
50304).

Each op is captured 50 times in a CUDA graph and the graph replayed between two events, so
that its time is the device's alone (as ours: `burn_megatron::device_seconds`). The bytes are
ours (what the operation must read and write at least), so the GB/s compare the same work.
PyTorch runs the unfused ops eagerly (bias-GeLU as an add and a GeLU, bias-dropout-add as an
add, a dropout and an add, the masked softmax as a scale, a fill and a softmax), as a model
written with `torch.nn.functional` does without `torch.compile` or Apex."""
import json
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("PyTorch is not installed here: its ops were not timed")

CALLS = 50


def device_us(op):
    """Microseconds per call of `op` on the device, replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            op()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            op()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / CALLS


def ops(tokens, hidden, vocab):
    """Our kernel names and the PyTorch ops doing the same work, in bf16."""
    bf16 = torch.bfloat16
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=bf16)
    x, w, b, grad = rand(tokens, hidden), rand(hidden), rand(hidden), rand(tokens, hidden)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [hidden], w, b, 1e-5)
    up, up_bias, up_grad = rand(tokens, 4 * hidden), rand(4 * hidden), rand(tokens, 4 * hidden)
    residual = rand(tokens, hidden)
    keep = torch.rand(tokens, hidden, device="cuda") > 0.1
    seq = min(tokens, 1024)
    scores = rand(tokens // seq, max(hidden // 64, 1), seq, seq)
    causal = torch.ones(seq, seq, device="cuda", dtype=torch.bool).triu(1)
    probs = (scores * 0.125).masked_fill(causal, float("-inf")).softmax(-1)
    logits = rand(tokens, vocab)
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    log_probs = logits.log_softmax(-1)
    loss_grad = torch.ones(tokens, device="cuda", dtype=bf16)
    total_weight = torch.tensor(0.0, device="cuda", dtype=bf16)
    return {
        "copy (x + 0), tokens x h": lambda: x + 0,
        "layer_norm": lambda: F.layer_norm(x, [hidden], w, b, 1e-5),
        "layer_norm backward": lambda: torch.ops.aten.native_layer_norm_backward(
            grad, x, [hidden], mean, rstd, w, b, [True, True, True]),
        "bias_gelu_tanh": lambda: F.gelu(up + up_bias, approximate="tanh"),
        "bias_gelu_tanh backward": lambda: torch.ops.aten.gelu_backward(
            up_grad, up + up_bias, approximate="tanh"),
        "bias gradient (column sums)": lambda: up_grad.sum(0),
        "bias_dropout_add": lambda: F.dropout(x + b, 0.1, training=True) + residual,
        "dropout backward": lambda: torch.ops.aten.native_dropout_backward(grad, keep, 1 / 0.9),
        "softmax (causal)": lambda: (scores * 0.125).masked_fill(causal, float("-inf")).softmax(-1),
        "softmax backward": lambda: torch.ops.aten._softmax_backward_data(probs, probs, -1, bf16),
        "cross_entropy statistics": lambda: F.cross_entropy(logits, targets, reduction="none"),
        "cross_entropy backward": lambda: torch.ops.aten._log_softmax_backward_data(
            torch.ops.aten.nll_loss_backward(
                loss_grad, log_probs, targets, None, 0, -100, total_weight),
            log_probs, -1, bf16),
    }


def main():
    if not torch.cuda.is_available():
        sys.exit("PyTorch sees no CUDA device: its ops were not timed")
    ours = [json.loads(line) for line in open(sys.argv[1]) if '"kind": "bandwidth"' in line]
    tokens, hidden, vocab = (int(a) for a in (sys.argv[2:5] + ["8192", "1280", "50304"][len(sys.argv[2:5]):]))
    torch_ops = ops(tokens, hidden, vocab)
    print(f"{'kernel':<30} {'ours GB/s':>10} {'PyTorch GB/s':>13} {'ours us':>9} {'PyTorch us':>11} {'speed-up':>9}")
    for row in ours:
        op = torch_ops.get(row["kernel"])
        if op is None or row["dtype"] != "bf16":
            continue
        theirs = device_us(op)
        print(f"{row['kernel']:<30} {row['fused_gbps']:>10.0f} {row['bytes'] / theirs / 1e3:>13.0f} "
              f"{row['fused_us']:>9.1f} {theirs:>11.1f} {theirs / row['fused_us']:>8.1f}x")


if __name__ == "__main__":
    main()
