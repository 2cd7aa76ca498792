"""The expert-parallel all-to-all path on CPU: gloo processes on one machine stand in for a node.

For each world size N, N processes each build the same stack of MoE layers (E experts, top-k,
every pool sharded E/N per rank), route their own T tokens and time, per layer, the forward and
the forward + backward of the expert-parallel layer. Reported per N and layer:
- bytes each token moves to other ranks in one forward (dispatch there and back, fp32 rows plus
  each row's int64 expert id) and in forward + backward, measured from the routing and checked
  against K * (N - 1) / N * (2 * D * 4 + 8) for uniform routing;
- time per layer (median over rounds, rank 0's clock after a barrier);
- load imbalance: the most rows any rank's experts receive over the mean, per layer.
Also the single-process layer on the same T tokens per process, for scale. gloo on a shared
2-core machine measures the path's overheads, not a network: with N > cores the processes take
turns, so times grow with N for reasons a real node does not have.

    python benchmarks/expert_parallel.py [--worlds 2 4 8 --tokens 256 --hidden 128 --rounds 5]
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moebuild


def moe_section(args, n: int) -> dict:
    return {
        "pools": {"experts": {"num_experts": args.experts, "intermediate_size": args.intermediate}},
        "routes": [{"pool": "experts", "router": {"type": "topk", "top_k": args.top_k}}],
        "balancing": [{"type": "load_balance", "coef": 0.01}],
        "parallel": {"expert_parallel": n},
    }


def layers(args, n: int) -> list:
    torch.manual_seed(0)
    built = [moebuild.build_module(moe_section(args, n), hidden_size=args.hidden) for _ in range(args.layers)]
    for layer in built:  # decisive routing, as a trained router's
        layer.routes[0].router.weight.data.normal_(0, 0.5)
    return built


def timed(fn, rounds: int, barrier: bool) -> float:
    times = []
    for _ in range(rounds + 1):
        if barrier:
            dist.barrier()
        start = time.perf_counter()
        fn()
        if barrier:
            dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def traffic(layer, x_BSD, rank: int, n: int, args) -> tuple[float, list[int]]:
    """(bytes per token sent to other ranks in one forward, rows each rank's experts receive from here)."""
    ids_TK = layer.routes[0].router.route(x_BSD.reshape(-1, args.hidden)).ids_TK
    dest_A = ids_TK[ids_TK >= 0] // (args.experts // n)
    per_rank = torch.bincount(dest_A, minlength=n)
    remote = int((dest_A != rank).sum())
    row_bytes = args.hidden * 4
    return remote * (2 * row_bytes + 8) / x_BSD.shape[0] / x_BSD.shape[1], per_rank.tolist()


def worker(rank: int, n: int, init: str, args, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=n)
    torch.manual_seed(100 + rank)
    x_BSD = torch.randn(1, args.tokens, args.hidden)
    report = []
    for i, layer in enumerate(layers(args, n)):
        x = x_BSD.clone().requires_grad_(True)
        fwd = timed(lambda: layer(x, output_router_stats=False), args.rounds, True)

        def step():
            out = layer(x, output_router_stats=False)
            (out.hidden_states.square().mean() + sum(out.aux_losses.values())).backward()

        both = timed(step, args.rounds, True)
        sent, rows = traffic(layer, x_BSD, rank, n, args)
        totals = [torch.zeros(n, dtype=torch.long) for _ in range(n)]
        dist.all_gather(totals, torch.tensor(rows))
        received = torch.stack(totals).sum(0).float()
        sent_all = torch.tensor([sent])
        dist.all_reduce(sent_all)
        report.append({"layer": i, "fwd_ms": fwd, "fwd_bwd_ms": both, "bytes_fwd": float(sent_all) / n,
                       "imbalance": float(received.max() / received.mean())})
    if rank == 0:
        results[n] = report
    dist.destroy_process_group()


def single_process(args) -> tuple[float, float]:
    torch.set_num_threads(1)
    layer = layers(args, 1)[0]
    x = torch.randn(1, args.tokens, args.hidden, requires_grad=True)

    def step():
        out = layer(x, output_router_stats=False)
        (out.hidden_states.square().mean() + sum(out.aux_losses.values())).backward()

    return timed(lambda: layer(x, output_router_stats=False), args.rounds, False), timed(step, args.rounds, False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per process")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    fwd, both = single_process(args)
    print(f"config: T={args.tokens} tokens per process, D={args.hidden}, I={args.intermediate}, "
          f"E={args.experts}, top-{args.top_k}, {args.layers} layers, fp32, gloo, {os.cpu_count()} CPUs")
    print(f"single process, one layer on T tokens: forward {fwd:.2f} ms, forward+backward {both:.2f} ms\n")
    print("| N | layer | forward ms | fwd+bwd ms | bytes/token fwd (measured) | uniform K(N-1)/N(8D+8) | "
          "fwd+bwd bytes/token | imbalance max/mean |")
    print("|---|---|---|---|---|---|---|---|")
    manager = mp.Manager()
    results = manager.dict()
    for n in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(worker, args=(n, os.path.join(tmp, "init"), args, results), nprocs=n)
        uniform = args.top_k * (n - 1) / n * (2 * args.hidden * 4 + 8)
        for row in results[n]:
            print(f"| {n} | {row['layer']} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} | {row['bytes_fwd']:.0f} | "
                  f"{uniform:.0f} | {2 * row['bytes_fwd']:.0f} | {row['imbalance']:.2f} |")


if __name__ == "__main__":
    main()
