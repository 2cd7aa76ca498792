"""Expert parallelism over torch.distributed: each of N ranks holds E/N experts of every pool.

The layout of DeepSpeed-MoE / GShard expert parallelism, with dropless uneven splits as in
torchtitan's expert-parallel `all_to_all_single`:
- routers run replicated, each rank on its own tokens (so capacity is computed over each rank's
  local tokens, as DeepSpeed does: C = max(ceil(T_local * K * cf / E), min));
- the kept (token, slot) assignments are sorted by expert, hence by the rank holding it; split
  sizes are exchanged first (`all_to_all_single` on counts), then token rows travel to their
  experts' ranks, run through the pool's own grouped dispatch on its local experts with weight 1,
  come back the same way, and are combined with their gate weights where the token lives. The
  backward is the reverse exchange (`AllToAll`).
- routing statistics that are sums over tokens (balancing terms, LTDR's mean variance, aux-free
  loads) are summed over the group by `ExpertParallel.reduce`, differentiably
  (`AllReduce`, whose backward sums the gradients of every rank, as
  `torch.distributed.nn.functional.all_reduce` does; that one is deprecated in torch 2.13).

Loss convention: every rank adds the same (group-wide) aux losses to its local loss. With the
replicated (non-expert) gradients averaged over ranks, as DDP / FSDP2 do, those are the
gradients of mean-over-ranks(local LM loss) + aux; the expert gradients arrive summed over the
ranks' tokens, so `average_expert_grads(model)` divides them by N to match.

Legend: T tokens of this rank, D hidden, K slots per token, A kept assignments sent, M rows
received, N ranks, E experts of a pool, L = E / N local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moebuild.spec.errors import BuildError


@dataclass(frozen=True)
class ExpertParallel:
    """The process group experts are spread over, and this process's place in it."""

    size: int
    rank: int
    group: dist.ProcessGroup | None = None  # None: the default (world) group

    @classmethod
    def join(cls, size: int, source: str = "moe.parallel.expert_parallel") -> ExpertParallel | None:
        """The group for `size` ranks (None for 1); the world must be exactly that group."""
        if size == 1:
            return None
        if not dist.is_available() or not dist.is_initialized():
            raise BuildError(f"{source}={size} needs torch.distributed initialised with {size} processes "
                             f"(launch with torchrun --nproc-per-node {size}, then dist.init_process_group)")
        world = dist.get_world_size()
        if world != size:
            raise BuildError(f"{source}={size} but the world size is {world}: launch {size} processes "
                             f"(torchrun --nproc-per-node {size}) or pass expert_parallel={world}")
        return cls(size, dist.get_rank())

    def reduce(self, t: Tensor) -> Tensor:
        """The sum of `t` over the group; differentiable where `t` needs a gradient."""
        if t.requires_grad:
            return AllReduce.apply(t, self.group)
        out = t.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def all_reduce_(self, t: Tensor) -> None:
        dist.all_reduce(t, group=self.group)


def local_sum(t: Tensor) -> Tensor:
    """The single-process `reduce`: the statistics of this process's tokens are the whole batch's."""
    return t


class AllReduce(torch.autograd.Function):
    """The sum over the group; each rank's input gradient is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class AllToAll(torch.autograd.Function):
    """`dist.all_to_all_single` with uneven splits; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x_AD: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out_MD = x_AD.new_empty(sum(recv), *x_AD.shape[1:])
        dist.all_to_all_single(out_MD, x_AD.contiguous(), recv, send, group=group)
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD: Tensor):
        grad_AD = grad_MD.new_empty(sum(ctx.send), *grad_MD.shape[1:])
        dist.all_to_all_single(grad_AD, grad_MD.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return grad_AD, None, None, None


def exchange_counts(send_N: Tensor, group) -> list[int]:
    """Rows this rank will receive from each rank, given the rows it sends to each."""
    recv_N = torch.empty_like(send_N)
    dist.all_to_all_single(recv_N, send_N, group=group)
    return recv_N.tolist()


def expert_parallel_dispatch(x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, pool, dispatch) -> Tensor:
    """`pool(x_TD, weights_TK, ids_TK)` with the pool's experts spread over `pool.parallel`;
    `dispatch` is the backend run on the local experts (global ids in `ids_TK`, -1 = dropped)."""
    ep: ExpertParallel = pool.parallel
    T, K = ids_TK.shape
    L = pool.num_local_experts
    ids_A = ids_TK.reshape(-1)
    order_A = torch.argsort(torch.where(ids_A < 0, pool.num_experts, ids_A), stable=True)
    order_A = order_A[: int((ids_A >= 0).sum())]  # kept slots, in expert (hence rank) order
    expert_A = ids_A[order_A]
    token_A = order_A // K
    send = torch.bincount(expert_A // L, minlength=ep.size).tolist()
    recv = exchange_counts(torch.tensor(send, dtype=torch.long), ep.group)
    # rows and their ids among the receiving rank's L experts (ids need no gradient)
    x_MD = AllToAll.apply(x_TD[token_A], send, recv, ep.group)
    local_M = torch.empty(sum(recv), dtype=torch.long, device=ids_TK.device)
    dist.all_to_all_single(local_M, (expert_A % L).contiguous(), recv, send, group=ep.group)
    ones_M1 = torch.ones(local_M.shape[0], 1, dtype=weights_TK.dtype, device=x_TD.device)
    y_MD = dispatch(x_MD, ones_M1, local_M[:, None], pool)
    y_AD = AllToAll.apply(y_MD, recv, send, ep.group)
    gate_A1 = weights_TK.reshape(-1)[order_A, None].to(y_AD.dtype)
    return torch.zeros_like(x_TD).index_add(0, token_A, y_AD * gate_A1)


def average_gradients(model: torch.nn.Module) -> None:
    """Data parallelism over the expert-parallel group, after backward: every replicated gradient
    averaged over the ranks (what DDP does) and the expert gradients divided by N. One all-reduce
    per tensor: for small models and examples; large ones want DDP / FSDP2 buckets (see README)."""
    from moebuild.moe.experts import ExpertPool

    ep = next((m.parallel for m in model.modules() if isinstance(m, ExpertPool) and m.parallel is not None), None)
    if ep is None:
        return
    experts = {id(p) for m in model.modules() if isinstance(m, ExpertPool) and m.parallel is not None
               for p in m.parameters(recurse=False)}
    for param in model.parameters():
        if param.grad is None:
            continue
        if id(param) not in experts:
            dist.all_reduce(param.grad, group=ep.group)
        param.grad.div_(ep.size)


def average_expert_grads(model: torch.nn.Module) -> None:
    """Divide expert-parallel pools' gradients by N (see the loss convention above); call after backward."""
    from moebuild.moe.experts import ExpertPool

    for module in model.modules():
        if isinstance(module, ExpertPool) and module.parallel is not None:
            for param in module.parameters(recurse=False):
                if param.grad is not None:
                    param.grad.div_(module.parallel.size)
