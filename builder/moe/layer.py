"""The MoE layer: a routing graph of routes (tokens -> router -> expert pool) plus a balancing
regime, composed as torchtune's `MoE(experts=, router=, shared_expert=)` receives its parts.

Every route selects tokens by modality, routes them and adds its pool's weighted output; a token
matched by several routes gets the sum, which is how DeepSeek-MoE's shared experts (a dense
route) compose with routed ones. Padding goes through the experts of dropless routes; the
attention mask removes it from balancing terms, router statistics, expert capacity (sized and
filled by real tokens only) and the choices of routers that compare tokens (expert_choice, soft,
dynamic_topk), all of which read the route's `RouteTokens`. The
layer returns only the MoE output: the caller adds it to the residual stream, which is also the
path a token dropped by capacity keeps.

Aux-loss-free balancing: in training forwards outside autograd's backward (so activation
checkpointing, reentrant or not, counts each token once: torchtitan #1593), the layer adds each
biased router's selections over the term's tokens to the router's pending load;
`update_balancing()` (after the optimiser step) moves the biases and advances top-k curricula.

Legend: B batch, S sequence, T = B*S tokens (R: tokens of one route), D hidden, E experts,
K slots per token.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moebuild.moe.balancing import TERMS, TermFn
from moebuild.moe.context import RoutingContext
from moebuild.moe.experts import ExpertPool
from moebuild.moe.routing import IMAGE, TEXT, RouteTokens
from moebuild.moe.stats import route_stats

SELECTORS: dict[str, Callable[[Tensor], Tensor]] = {
    "all": lambda modality_T: torch.ones_like(modality_T, dtype=torch.bool),
    "text": lambda modality_T: modality_T == TEXT,
    "image": lambda modality_T: modality_T == IMAGE,
}


def _check_selector(tokens: str) -> str:
    if tokens not in SELECTORS:
        raise ValueError(f"unknown token selector {tokens!r}; choose from {', '.join(SELECTORS)}")
    return tokens


class Route(nn.Module):
    """The tokens one router sends to one named pool."""

    def __init__(self, router: nn.Module, pool: str, tokens: str = "all", name: str | None = None):
        super().__init__()
        self.router = router
        self.pool = pool
        self.tokens = _check_selector(tokens)
        self.name = name or f"{tokens}->{pool}"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, tokens={self.tokens!r}, pool={self.pool!r}"


@dataclass
class BalancingTerm:
    """One balancing term: `coef * fn(routing, mask_T, tokens)` over the tokens its selector names, for
    every route whose router is `balanced`. `fn` defaults to the term named in balancing.TERMS."""

    name: str
    coef: float
    tokens: str = "all"
    fn: TermFn | None = None

    def __post_init__(self):
        _check_selector(self.tokens)
        if self.fn is None:
            if self.name not in TERMS:
                raise ValueError(f"unknown balancing term {self.name!r}; choose from {', '.join(TERMS)}")
            self.fn = TERMS[self.name]


@dataclass
class BiasBalancing:
    """Aux-loss-free balancing (Wang et al. 2024): after each optimiser step, every router with a
    correction bias moves it by `rate * sign(mean load - load_e)`, loads counted over `tokens`."""

    rate: float
    tokens: str = "all"

    def __post_init__(self):
        _check_selector(self.tokens)


@dataclass
class MoELayerOutput:
    hidden_states: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # coef applied, summed over routes
    router_stats: dict[str, dict[str, dict[str, Tensor]]] = field(default_factory=dict)  # route -> group -> stat


def _counting_load() -> bool:
    """Outside autograd's backward: a checkpoint's recompute runs inside it and must not recount."""
    return torch._C._current_graph_task_id() == -1


class MoELayer(nn.Module):
    def __init__(self, routes: list[Route], balancing: list[BalancingTerm | BiasBalancing], pools: dict[str, ExpertPool]):
        super().__init__()
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
        output_router_stats: bool = True,
    ) -> MoELayerOutput:
        """`output_router_stats=False` leaves `router_stats` empty: the statistics cost ~20 small ops
        per route and modality, as much as the experts' own work in a small decode step."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        device = x_BSD.device
        modality_T = (
            modality_BS.reshape(-1) if modality_BS is not None else torch.full((B * S,), TEXT, device=device)
        )
        valid_T = (
            attention_mask_BS.reshape(-1).bool()
            if attention_mask_BS is not None
            else torch.ones(B * S, dtype=torch.bool, device=device)
        )
        seq_T = torch.arange(B, device=device).repeat_interleave(S)
        y_TD = torch.zeros_like(x_TD)
        aux = {term.name: torch.zeros((), device=device) for term in self.balancing}
        stats = {}
        context = None  # built once per call, and only if a router needs it
        for route in self.routes:
            if route.tokens == "all":  # as they are: no `nonzero` (a host sync on GPU), gather or scatter
                idx_R, x_RD, modality_R, tokens = None, x_TD, modality_T, RouteTokens(valid_T, seq_T, B)
            else:
                idx_R = SELECTORS[route.tokens](modality_T).nonzero().squeeze(1)
                x_RD, modality_R = x_TD[idx_R], modality_T[idx_R]
                tokens = RouteTokens(valid_T[idx_R], seq_T[idx_R], B)
            if getattr(route.router, "needs_context", False):  # sees other tokens: moe/context.py
                if context is None:
                    text_BS, image_BS = ((valid_T & (modality_T == m)).view(B, S) for m in (TEXT, IMAGE))
                    context = RoutingContext(x_BSD, modality_T.view(B, S), text_BS, image_BS)
                routing = route.router(x_RD, context, torch.arange(B * S, device=device) if idx_R is None else idx_R)
            else:
                routing = route.router(x_RD, tokens)
            pool = self.pools[route.pool]
            y_RD = routing.apply(pool, x_RD).to(y_TD.dtype)
            y_TD = y_TD + y_RD if idx_R is None else y_TD.index_add(0, idx_R, y_RD)
            if route.router.balanced:
                for term in self.balancing:
                    mask_R = tokens.valid_T & SELECTORS[term.tokens](modality_R)
                    aux[term.name] = aux[term.name] + term.coef * term.fn(routing, mask_R, tokens)
            self._count_load(route.router, routing, tokens.valid_T, modality_R)
            if output_router_stats:
                stats[route.name] = route_stats(routing, pool.num_experts, tokens.valid_T, modality_R, route.tokens)
        return MoELayerOutput(y_TD.view(B, S, D), aux, stats)

    def _count_load(self, router: nn.Module, routing, valid_R: Tensor, modality_R: Tensor) -> None:
        if not (self.training and self.bias_balancing and getattr(router, "has_correction_bias", False)):
            return
        if _counting_load():
            mask_R = valid_R & SELECTORS[self.bias_balancing[0].tokens](modality_R)
            router.count_load(routing.topk_ids_TK[mask_R])

    @torch.no_grad()
    def update_balancing(self) -> None:
        """Call after each optimiser step: aux-free bias updates from the counted loads, curriculum steps."""
        rate = self.bias_balancing[0].rate if self.bias_balancing else 0.0
        for route in self.routes:
            if hasattr(route.router, "update_balancing"):
                route.router.update_balancing(rate)
