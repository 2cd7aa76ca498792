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

EP x DP: with a world of W = D * N processes, consecutive blocks of N ranks are expert-parallel
groups (tokens travel inside a block), and the D ranks holding the same experts are replicas.

Loss convention: every rank adds the same (world-wide) aux losses to its local loss. With the
replicated (non-expert) gradients averaged over the W ranks, as DDP / FSDP2 do, those are the
gradients of mean-over-ranks(local LM loss) + aux; the expert gradients arrive summed over the
group's tokens, so `average_expert_grads(model)` sums them over the replicas and divides by W.

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
    """Where this process sits: rank `rank` of an expert-parallel group of `size` ranks, the world
    made of world / size such groups side by side (EP x DP: consecutive ranks share a group).
    Statistics are reduced over the whole world, the data-parallel batch; tokens travel inside the
    group; the ranks holding the same experts (one per group) form `replica_group`."""

    size: int
    rank: int
    world: int
    group: dist.ProcessGroup | None = None  # None: the default (world) group, when size == world
    replica_group: dist.ProcessGroup | None = None  # None: no other rank holds these experts

    @classmethod
    def join(cls, size: int, source: str = "moe.parallel.expert_parallel") -> ExpertParallel | None:
        """The groups for `size` ranks (None for 1); the world must be a whole number of groups."""
        if size == 1:
            return None
        if not dist.is_available() or not dist.is_initialized():
            raise BuildError(f"{source}={size} needs torch.distributed initialised with {size} processes "
                             f"(launch with torchrun --nproc-per-node {size}, then dist.init_process_group)")
        world = dist.get_world_size()
        if world % size:
            raise BuildError(f"{source}={size} but the world size is {world}: launch a multiple of {size} "
                             f"processes (torchrun --nproc-per-node {size}) or pass expert_parallel={world}")
        rank = dist.get_rank()
        group, replica_group = _groups(size, world)[rank // size], None
        if world > size:
            replica_group = _groups(world // size, world, strided=True)[rank % size]
        return cls(size, rank % size, world, group, replica_group)

    def reduce(self, t: Tensor) -> Tensor:
        """The sum of `t` over the world; differentiable where `t` needs a gradient."""
        if t.requires_grad:
            return AllReduce.apply(t, None)
        out = t.clone()
        dist.all_reduce(out)
        return out

    def all_reduce_(self, t: Tensor) -> None:
        dist.all_reduce(t)


_GROUPS: dict[tuple[int, int, bool], list] = {}


def _groups(size: int, world: int, strided: bool = False) -> list:
    """The world split in groups of `size` ranks: consecutive ranks, or (strided) every world/size-th.
    Every rank creates every group, in the same order (`new_group` is collective), once per process."""
    if size == world:
        return [None]
    key = (size, world, strided)
    if key not in _GROUPS:
        count = world // size
        ranks = [list(range(i, world, count)) for i in range(count)] if strided else \
            [list(range(i * size, (i + 1) * size)) for i in range(count)]
        _GROUPS[key] = [dist.new_group(r) for r in ranks]
    return _GROUPS[key]


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


def _expert_grads(model: torch.nn.Module):
    """(ExpertParallel, the expert-parallel pools' parameters) of a model; (None, []) when it has none."""
    from moebuild.moe.experts import ExpertPool

    pools = [m for m in model.modules() if isinstance(m, ExpertPool) and m.parallel is not None]
    return (pools[0].parallel if pools else None), [p for m in pools for p in m.parameters(recurse=False)]


def average_expert_grads(model: torch.nn.Module) -> None:
    """Expert gradients as the mean over the world's ranks would have them (see the loss convention
    above): summed over the ranks holding the same experts, divided by the world size. Call after
    backward when something else (FSDP2, DDP) averages the replicated gradients."""
    ep, params = _expert_grads(model)
    for param in params:
        if param.grad is not None:
            if ep.replica_group is not None:
                dist.all_reduce(param.grad, group=ep.replica_group)
            param.grad.div_(ep.world)


def average_gradients(model: torch.nn.Module) -> None:
    """Data parallelism for an expert-parallel model, after backward: every replicated gradient
    averaged over the world (what DDP does), and `average_expert_grads`. One all-reduce per tensor:
    for small models and examples; large ones want FSDP2 (moebuild.parallel.fsdp) or DDP buckets."""
    ep, params = _expert_grads(model)
    if ep is None:
        return
    experts = {id(p) for p in params}
    for param in model.parameters():
        if param.grad is not None and id(param) not in experts:
            dist.all_reduce(param.grad)
            param.grad.div_(ep.world)
    average_expert_grads(model)
