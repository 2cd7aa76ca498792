"""The MoE layer: a routing graph of routes (tokens -> router -> expert pool) plus a balancing
regime, composed as torchtune's `MoE(experts=, router=, shared_expert=)` receives its parts.

Every route selects tokens by modality, routes them and adds its pool's weighted output; a token
matched by several routes gets the sum, which is how DeepSeek-MoE's shared experts (a dense
route) compose with routed ones. Padding goes through the experts of dropless routes; the
attention mask removes it from balancing terms, router statistics, expert capacity (sized and
filled by real tokens only) and the choices of routers that compare tokens (expert_choice, soft,
dynamic_topk), all of which read the route's `RouteBatch` (moe/batch.py). The
layer returns only the MoE output: the caller adds it to the residual stream, which is also the
path a token dropped by capacity keeps.

Aux-loss-free balancing: in training forwards outside autograd's backward (so activation
checkpointing, reentrant or not, counts each token once: torchtitan #1593), the layer adds each
biased router's selections over the term's tokens to the router's pending load;
`update_balancing()` (after the optimiser step) moves the biases and advances top-k curricula.

Expert parallelism (`parallel`, moebuild/parallel/): the pools hold their rank's experts and send
tokens there; the routers run here on this rank's tokens; every statistic the balancing terms and
batch-comparing routers sum over tokens is summed over the group (`LayerCall.reduce`), and the
aux-free loads are summed before each bias update, so every rank moves the same bias.

Legend: B batch, S sequence, T = B*S tokens (R: tokens of one route), D hidden, E experts,
K slots per token.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moebuild.moe.balancing import BalancingTerm, BiasBalancing
from moebuild.moe.batch import IMAGE, TEXT, LayerCall, RouteBatch
from moebuild.moe.experts import ExpertPool
from moebuild.moe.routers.base import Router, Routing
from moebuild.moe.stats import route_stats
from moebuild.parallel.expert import ExpertParallel, local_sum

SELECTORS: dict[str, Callable[[Tensor], Tensor]] = {
    "all": lambda modality_T: torch.ones_like(modality_T, dtype=torch.bool),
    "text": lambda modality_T: modality_T == TEXT,
    "image": lambda modality_T: modality_T == IMAGE,
}


class Route(nn.Module):
    """The tokens one router sends to one named pool."""

    def __init__(self, router: Router, pool: str, tokens: str = "all", name: str | None = None):
        super().__init__()
        if tokens not in SELECTORS:
            raise ValueError(f"unknown token selector {tokens!r}; choose from {', '.join(SELECTORS)}")
        self.router = router
        self.pool = pool
        self.tokens = tokens
        self.name = name or f"{tokens}->{pool}"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, tokens={self.tokens!r}, pool={self.pool!r}"


@dataclass
class MoELayerOutput:
    hidden_states: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # coef applied, summed over routes
    router_stats: dict[str, dict[str, dict[str, Tensor]]] = field(default_factory=dict)  # route -> group -> stat


def _counting_load() -> bool:
    """Outside autograd's backward: a checkpoint's recompute runs inside it and must not recount."""
    return torch._C._current_graph_task_id() == -1


class MoELayer(nn.Module):
    def __init__(self, routes: list[Route], balancing: list[BalancingTerm | BiasBalancing], pools: dict[str, ExpertPool],
                 parallel: ExpertParallel | None = None):
        super().__init__()
        self.parallel = parallel
        self._reduce = local_sum if parallel is None else parallel.reduce
        names = [route.name for route in routes]
        if len(set(names)) != len(names):
            raise ValueError(f"route names must be unique, got {names}")
        for route in routes:
            if route.pool not in pools:
                raise ValueError(f"route {route.name!r} names pool {route.pool!r}, not in {sorted(pools)}")
        self.routes = nn.ModuleList(routes)
        self.pools = nn.ModuleDict(pools)
        self.balancing = [term for term in balancing if isinstance(term, BalancingTerm)]
        self.bias_balancing = [term for term in balancing if isinstance(term, BiasBalancing)]
        if len(self.bias_balancing) > 1:
            raise ValueError("at most one aux_free_bias term per layer")

    def forward(
        self, x_BSD: Tensor, modality_BS: Tensor | None = None, attention_mask_BS: Tensor | None = None,
        output_router_stats: bool = True, output_aux_losses: bool = True,
    ) -> MoELayerOutput:
        """`output_router_stats=False` leaves `router_stats` empty: the statistics cost ~20 small ops
        per route and modality, as much as the experts' own work in a small decode step.
        `output_aux_losses=False` leaves `aux_losses` empty and computes no balancing term
        (generation: 7% of a micro-preset generate went to terms nobody read)."""
        B, S, D = x_BSD.shape
        call = LayerCall.of(x_BSD, modality_BS, None if attention_mask_BS is None else attention_mask_BS.bool(),
                            self._reduce)
        y_TD = None  # the first route over all tokens gives it; a route over some tokens needs zeros under it
        terms = self.balancing if output_aux_losses else []
        aux = {term.name: torch.zeros((), device=x_BSD.device) for term in terms}
        stats = {}
        for route in self.routes:
            # a route over all tokens takes them as they are: no `nonzero` (a host sync on GPU), gather or scatter
            index_R = None if route.tokens == "all" else SELECTORS[route.tokens](call.modality_BS.reshape(-1)).nonzero().squeeze(1)
            batch = call.route(index_R)
            routing = route.router(batch)
            pool = self.pools[route.pool]
            y_RD = routing.apply(pool, batch.x_RD).to(x_BSD.dtype)
            if index_R is None:
                y_TD = y_RD if y_TD is None else y_TD + y_RD
            else:
                y_TD = (torch.zeros_like(call.x_TD) if y_TD is None else y_TD).index_add(0, index_R, y_RD)
            if route.router.balanced:
                for term in terms:
                    mask_R = batch.valid_R & SELECTORS[term.tokens](batch.modality_R)
                    aux[term.name] = aux[term.name] + term.coef * term.value(routing, mask_R, batch)
            self._count_load(route.router, routing, batch)
            if output_router_stats:
                stats[route.name] = route_stats(routing, pool.num_experts, batch.valid_R, batch.modality_R, route.tokens,
                                               self._reduce)
        if y_TD is None:  # no routes
            y_TD = torch.zeros_like(call.x_TD)
        return MoELayerOutput(y_TD.view(B, S, D), aux, stats)

    def _count_load(self, router: Router, routing: Routing, batch: RouteBatch) -> None:
        if self.training and self.bias_balancing and router.has_correction_bias and _counting_load():
            mask_R = batch.valid_R & SELECTORS[self.bias_balancing[0].tokens](batch.modality_R)
            router.count_load(routing.topk_ids_TK[mask_R])

    @torch.no_grad()
    def update_balancing(self) -> None:
        """Call after each optimiser step: aux-free bias updates from the counted loads, curriculum steps."""
        rate = self.bias_balancing[0].rate if self.bias_balancing else 0.0
        for route in self.routes:
            if self.parallel is not None and route.router.has_correction_bias:
                self.parallel.all_reduce_(route.router.pending_load_E)
            route.router.update_balancing(rate)
