"""What per-expert dispatch pays in matmul rate alone: each expert's matmuls on its own rows
against the dense equivalent's on all tokens, on this machine's BLAS.

Times, interleaved in rounds in one process, the six matmuls of a SwiGLU layer's forward and
backward (gate/up, down; d activation, d W_out, d W_in, d x):
- per expert, on each expert's rows of the bench's fixed routing (plus the shared expert's on
  every token), writing into buffers allocated once, so no gather, activation, scatter or fresh
  memory is counted: the best case for the experts;
- for the dense equivalent (K*I + S wide) on all T tokens.
The ratio of the totals estimates what any per-expert dispatch (moebuild's torch backend,
transformers' grouped_mm on CPU, which also loops over experts) pays in matmul rate alone, before
gathers, activations and memory. An estimate, not a bound: it runs on one thread (the bench on
two), its dense side is one fused gate/up matmul into a warm buffer (the bench's dense layer
allocates its outputs), and on the project's VM one run moves by 5-10%.

    python benchmarks/gemm_floor.py --config a --tokens 2048 [--rounds 5 --threads 1]
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from moebuild.bench import MoEConfig, fixed_routing

CONFIGS = {"a": MoEConfig(8, 2, 1024, 2816), "b": MoEConfig(64, 6, 1024, 512, 1024)}
KINDS = ("gate/up", "down", "d act", "d W_out", "d W_in", "d x")


def swiglu_matmuls(rows: int, hidden: int, width: int) -> list[Callable[[], Tensor]]:
    """The six matmuls of one SwiGLU FFN, forward and backward, on `rows` rows, in KINDS order."""
    x, dy = torch.randn(rows, hidden), torch.randn(rows, hidden)
    h, a = torch.randn(rows, 2 * width), torch.randn(rows, width)
    w_in, w_out = torch.randn(2 * width, hidden), torch.randn(hidden, width)
    out = {k: torch.empty(shape) for k, shape in zip(KINDS, [(rows, 2 * width), (rows, hidden), (rows, width),
                                                              (hidden, width), (2 * width, hidden), (rows, hidden)])}
    return [
        lambda: torch.mm(x, w_in.t(), out=out["gate/up"]),
        lambda: torch.mm(a, w_out.t(), out=out["down"]),
        lambda: torch.mm(dy, w_out, out=out["d act"]),
        lambda: torch.mm(dy.t(), a, out=out["d W_out"]),
        lambda: torch.mm(h.t(), x, out=out["d W_in"]),
        lambda: torch.mm(h, w_in, out=out["d x"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="a")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    _, ids_TK = fixed_routing(args.tokens, cfg, torch.device("cpu"))
    counts = torch.bincount(ids_TK.reshape(-1), minlength=cfg.experts).tolist()
    experts = [swiglu_matmuls(n, cfg.hidden, cfg.intermediate) for n in counts if n]
    if cfg.shared:
        experts.append(swiglu_matmuls(args.tokens, cfg.hidden, cfg.shared))
    layouts = {"experts": experts, "dense": [swiglu_matmuls(args.tokens, cfg.hidden, cfg.dense_width)]}
    samples = {(name, kind): [] for name in layouts for kind in KINDS}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in (list(layouts) if round_ % 2 else list(layouts)[::-1]):
            for i, kind in enumerate(KINDS):
                start = time.perf_counter()
                for matmuls in layouts[name]:
                    matmuls[i]()
                if round_:
                    samples[(name, kind)].append(time.perf_counter() - start)
    ms = {key: statistics.median(s) * 1e3 for key, s in samples.items()}
    print(f"config {args.config}: {cfg}, {args.tokens} tokens, {args.threads} thread(s), median of {args.rounds}")
    print(f"{'matmul':10} {'experts ms':>11} {'dense ms':>9} {'ratio':>6}")
    for kind in KINDS:
        print(f"{kind:10} {ms[('experts', kind)]:11.1f} {ms[('dense', kind)]:9.1f} "
              f"{ms[('experts', kind)] / ms[('dense', kind)]:6.2f}")
    fwd = [sum(ms[(name, kind)] for kind in KINDS[:2]) for name in layouts]
    total = [sum(ms[(name, kind)] for kind in KINDS) for name in layouts]
    print(f"{'forward':10} {fwd[0]:11.1f} {fwd[1]:9.1f} {fwd[0] / fwd[1]:6.2f}")
    print(f"{'fwd+bwd':10} {total[0]:11.1f} {total[1]:9.1f} {total[0] / total[1]:6.2f}")


if __name__ == "__main__":
    main()
