"""Train a few steps of an expert-parallel micro model and save it: each of N processes holds E/N
experts of every MoE pool and its own share of the batch.

    torchrun --nproc-per-node 2 examples/expert_parallel.py out/ep-micro            # CPU, gloo
    torchrun --nproc-per-node 4 examples/expert_parallel.py out/ep-micro --cuda     # one GPU each, NCCL

The saved directory is what a single process writes, so it loads anywhere:
`moebuild.MoEVLMForConditionalGeneration.from_pretrained("out/ep-micro")`, or on N' ranks with
`expert_parallel=N'`.
"""

import argparse
import os

import torch
import torch.distributed as dist

import moebuild
from moebuild.parallel import average_gradients


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--preset", default="micro-moe-llava")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # every rank: the same replicated weights, and its slice of the experts the single process would draw
    model = moebuild.build(args.preset, seed=0, device=device, expert_parallel=world).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1000 + rank)  # this rank's share of the batch (fixed: memorised)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=generator).to(device)
    for step in range(args.steps):
        out = model(input_ids=input_ids, labels=input_ids)
        optimizer.zero_grad()
        out.loss.backward()
        average_gradients(model)  # replicated weights averaged as DDP would; expert gradients / N
        optimizer.step()
        model.update_balancing()  # aux-free biases move by loads summed over every rank
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        if rank == 0:
            print(f"step {step}: loss {loss.item() / world:.4f} (mean over {world} ranks)", flush=True)
    model.save_pretrained(args.output)  # every rank calls; rank 0 writes the single-process files
    if rank == 0:
        print(f"saved {args.output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
