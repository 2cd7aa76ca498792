"""CPU timing of the dispatch backends against a dense SwiGLU of the same activated FLOPs.

Default config (cpu-dispatch-notes.md config A): hidden 1024, 8 experts top-2, SwiGLU 2816,
2048 tokens; the dense baseline is one SwiGLU of K * I = 5632 over every token. Routing is
fixed (a random top-k) so every backend computes the same thing. Median of --repeats, fp32.

    python benchmarks/dispatch_cpu.py [--tokens 2048] [--experts 8] [--top-k 2] ...
"""

import argparse
import statistics
import time

import torch

from moebuild.moe.dispatch import BACKENDS
from moebuild.moe.experts import ExpertPool


def median_seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timings(run, x_TD: torch.Tensor, repeats: int) -> tuple[float, float]:
    def forward():
        with torch.no_grad():
            run(x_TD)

    def forward_backward():
        x_TD.grad = None
        run(x_TD).backward(torch.ones_like(x_TD))

    return median_seconds(forward, repeats), median_seconds(forward_backward, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    D, E, K, I = args.hidden, args.experts, args.top_k, args.intermediate
    pool = ExpertPool(E, D, I)
    dense = ExpertPool(1, D, K * I)
    x_TD = torch.randn(args.tokens, D, requires_grad=True)
    weights_TK, ids_TK = torch.randn(args.tokens, E).softmax(-1).topk(K, dim=-1)
    runs = {name: (lambda x, fn=fn: fn(x, weights_TK, ids_TK, pool)) for name, fn in BACKENDS.items()}
    runs["dense"] = lambda x: dense.mlp(x, dense.split()[0])
    print(f"hidden {D}, {E} experts top-{K}, I={I}, {args.tokens} tokens, {torch.get_num_threads()} threads")
    print(f"{'impl':8} {'fwd s':>8} {'fwd+bwd s':>10} {'fwd/dense':>10} {'f+b/dense':>10}")
    results = {name: timings(run, x_TD, args.repeats) for name, run in runs.items()}
    base_f, base_fb = results["dense"]
    for name, (f, fb) in results.items():
        print(f"{name:8} {f:8.3f} {fb:10.3f} {f / base_f:10.2f} {fb / base_fb:10.2f}")


if __name__ == "__main__":
    main()
