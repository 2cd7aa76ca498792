"""The moe section: which layers are MoE, the expert pools, the routing graph (routes, each with a
router from routers.py), the balancing regime and dispatch. DeepSeekMoE's shared experts (Dai et
al. 2024) are a `dense` route over a shared pool beside a `topk` route over the routed pool.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator

from moebuild.schemas.base import Activation, ExpertCount, FFNWidth, SpecModel, TokenSelector, up_to
from moebuild.schemas.routers import CorrectionBiasSpec, RouterSpec

LayerIndex = up_to(1_023, low=0)


class FirstKDenseSpec(SpecModel):
    """Dense FFN in the first k layers, MoE in all the others (DeepSeekMoE first_k_dense_replace)."""

    first_k_dense: LayerIndex
    """How many leading layers keep their dense FFN."""


LayerPattern = Union[Literal["all", "every_other", "first_half", "second_half"], FirstKDenseSpec, list[LayerIndex]]


class PoolSpec(SpecModel):
    """A named set of identically shaped experts, stored stacked (transformers-5 layout)."""

    num_experts: ExpertCount
    """Number of experts in the pool."""
    intermediate_size: FFNWidth
    """Hidden width of each expert."""
    activation: Activation = "silu"
    """Expert activation."""
    gated: bool = True
    """true = SwiGLU-style gate/up projections; false = fc1/fc2 (Phi-2)."""
    bias: bool = False
    """Biases on the expert projections (Phi-2 experts have them)."""
    init: Literal["random", "upcycle"] = "random"
    """random = normal init; upcycle = every expert a copy of the layer's dense FFN (MoE-LLaVA)."""


class RouteSpec(SpecModel):
    """One edge of the routing graph: these tokens, through this router, to this pool."""

    tokens: TokenSelector = "all"
    """Which tokens take this route."""
    pool: str
    """Name of the expert pool (a key of moe.pools)."""
    router: RouterSpec
    """How the tokens pick experts of the pool."""
    causal: bool = True
    """true: on a route over text, refuse routers whose routing of a token depends on other tokens of the call (expert_choice, soft, dynamic_topk, capacity by_score or with several choices per token), which let a causal LM see later tokens in training; false: accept them here (MoE-LLaVA's DeepSpeed capacity does this)."""


class _BalancingTerm(SpecModel):
    coef: NonNegativeFloat
    """Weight of the term in the loss (summed over MoE layers)."""
    tokens: TokenSelector = "all"
    """Which tokens the statistics are taken over (padding never counts)."""


class SwitchAuxSpec(_BalancingTerm):
    """Switch aux loss E * sum_e f_e * P_e, f_e = share of tokens whose top-1 is e; 1.0 when balanced."""

    type: Literal["switch_aux"]
    """Selects this kind: switch_aux."""


class LoadBalanceSpec(_BalancingTerm):
    """GShard/Mixtral load balance E * sum_e f_e * P_e, f_e = share of the top-k assignments; 1.0 when balanced."""

    type: Literal["load_balance"]
    """Selects this kind: load_balance."""


class ZLossSpec(_BalancingTerm):
    """Router z-loss mean(logsumexp(logits)^2) (ST-MoE): keeps router logits small."""

    type: Literal["z_loss"]
    """Selects this kind: z_loss."""
    coef: NonNegativeFloat = 0.001
    """Weight of the term in the loss (summed over MoE layers)."""


class SeqAuxSpec(_BalancingTerm):
    """DeepSeek sequence-wise balance loss: per sequence sum_e f_e * P_e (f_e = E * share of the sequence's assignments, P_e = mean normalised score), averaged over sequences; 1.0 when balanced."""

    type: Literal["seq_aux"]
    """Selects this kind: seq_aux."""


class EntropySpec(_BalancingTerm):
    """Mean entropy of each token's normalised router scores; with coef > 0 it sharpens routing."""

    type: Literal["entropy"]
    """Selects this kind: entropy."""


class AuxFreeBiasSpec(SpecModel):
    """Aux-loss-free balancing (DeepSeek-V3): after each optimiser step (model.update_balancing() or BalancingCallback), every router with bias: true moves its correction bias by rate * sign(mean load - load_e). Adds nothing to the loss."""

    type: Literal["aux_free_bias"]
    """Selects this kind: aux_free_bias."""
    rate: PositiveFloat = 0.001
    """Update speed gamma."""
    tokens: TokenSelector = "all"
    """Which tokens the loads are counted over (padding never counts)."""


BalancingSpec = Annotated[Union[SwitchAuxSpec, LoadBalanceSpec, SeqAuxSpec, EntropySpec, ZLossSpec, AuxFreeBiasSpec], Field(discriminator="type")]


class DispatchSpec(SpecModel):
    """How tokens reach their experts' weights."""

    backend: Literal["auto", "triton", "torch", "eager"] = "auto"
    """auto = the sort-based torch path (Triton becomes the CUDA default once verified on a GPU); triton = the Triton kernels, opt-in; eager = the per-expert reference loop."""


class ParallelSpec(SpecModel):
    """How the MoE layers are spread over processes (torch.distributed; launch with torchrun)."""

    expert_parallel: up_to(65_536) = 1
    """Expert-parallel ranks N: rank r holds experts [r*E/N, (r+1)*E/N) of every pool not in `replicate`, and tokens travel to their experts' ranks by all-to-all; 1 = every expert in this process. Those pools' num_experts must be divisible by N, and the world size a multiple of N: world / N groups of N consecutive ranks side by side (EP x DP), balancing statistics over the whole world."""
    replicate: list[str] = Field(default=[], max_length=64)
    """Pools every rank holds whole, as the non-expert weights (DeepSeek-MoE's shared experts: every token uses them, so sending tokens away would only cost)."""


def indivisible_pools(pools: dict, expert_parallel: int, replicate=()) -> list[str]:
    """The message for each sharded pool whose experts cannot be split evenly over `expert_parallel` ranks."""
    return [f"moe.pools.{name}.num_experts={pool.num_experts} is not divisible by expert_parallel={expert_parallel} "
            f"(each rank holds num_experts / expert_parallel experts of every pool not in moe.parallel.replicate)"
            for name, pool in pools.items() if name not in replicate and pool.num_experts % expert_parallel]


class MoESpec(SpecModel):
    """Which layers are MoE, their expert pools, the routing graph and the balancing regime."""

    layers: LayerPattern = "all"
    """Layers whose FFN becomes an MoE layer: all | every_other (0, 2, ...) | first_half | second_half | {first_k_dense: k} | [indices]."""
    pools: dict[str, PoolSpec] = Field(min_length=1, max_length=64)
    """Named expert pools."""
    routes: list[RouteSpec] = Field(min_length=1, max_length=64)
    """The routing graph; a token matched by several routes gets the sum of their outputs."""
    balancing: list[BalancingSpec] = Field(default=[], max_length=32)
    """Balancing terms added to the loss, each over its tokens."""
    dispatch: DispatchSpec = DispatchSpec()
    """Expert dispatch backend."""
    parallel: ParallelSpec = ParallelSpec()
    """Expert parallelism across processes."""

    @model_validator(mode="after")
    def _experts_split_over_ranks(self):
        problems = indivisible_pools(self.pools, self.parallel.expert_parallel, self.parallel.replicate)
        problems += [f"moe.parallel.replicate names {name!r}, not a pool ({', '.join(self.pools)})"
                     for name in self.parallel.replicate if name not in self.pools]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _aux_free_bias_needs_a_bias(self):
        bias_terms = [term for term in self.balancing if term.type == "aux_free_bias"]
        if len(bias_terms) > 1:
            raise ValueError("at most one aux_free_bias term")
        rates = {rate for rate, _ in self.router_bias_updates()}
        if rates and bias_terms:
            raise ValueError("give the bias update rate once: bias: {update_rate} on routers, or an aux_free_bias term")
        if bias_terms and not any(getattr(route.router, "bias", False) is True for route in self.routes):
            raise ValueError("aux_free_bias needs a route whose router has bias: true")
        if len(rates) > 1:
            raise ValueError(f"routers' bias update_rate values must agree, got {sorted(rates)}")
        return self

    def router_bias_updates(self) -> list[tuple[float, str]]:
        """(update rate, route tokens) of every router spelling its own bias update, `bias: {update_rate}`."""
        return [(route.router.bias.update_rate, route.tokens) for route in self.routes
                if isinstance(getattr(route.router, "bias", None), CorrectionBiasSpec)]


def moe_layer_indices(layers: LayerPattern, num_layers: int) -> list[int]:
    """The decoder layers a layer pattern turns into MoE layers."""
    if isinstance(layers, list):
        return sorted(set(layers))
    if isinstance(layers, FirstKDenseSpec):
        return list(range(layers.first_k_dense, num_layers))
    return {
        "all": list(range(num_layers)),
        "every_other": list(range(0, num_layers, 2)),
        "first_half": list(range(num_layers // 2)),
        "second_half": list(range(num_layers // 2, num_layers)),
    }[layers]
