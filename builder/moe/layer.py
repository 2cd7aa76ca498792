"""The MoE layer: a routing graph of routes (tokens -> router -> expert pool) plus a balancing
regime, composed as torchtune's `MoE(experts=, router=, shared_expert=)` receives its parts.

Every route selects tokens by modality, routes them and adds its pool's weighted output; a token
matched by several routes gets the sum, which is how DeepSeek-MoE's shared experts (a dense
route) compose with routed ones. All tokens, padding included, go through the experts; the
attention mask only removes padding from balancing terms and router statistics. The layer
returns only the MoE output: the caller adds it to the residual stream, which is also the path
a token dropped by capacity keeps.

Legend: B batch, S sequence, T = B*S tokens (R: tokens of one route), D hidden, E experts,
K slots per token.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moebuild.moe.balancing import TERMS, TermFn
from moebuild.moe.experts import ExpertPool
from moebuild.moe.routers import Routing

TEXT, IMAGE = 0, 1

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
    """One balancing term: `coef * fn(routing, mask_T)` over the tokens its selector names, for
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
class MoELayerOutput:
    hidden_states: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # coef applied, summed over routes
    router_stats: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # per route name


@torch.no_grad()
def router_stats(routing: Routing, num_experts: int, mask_R: Tensor) -> dict[str, Tensor]:
    """Load after capacity, dropped fraction, experts per token and score entropy, non-padding only."""
    ids_RK, topk_RK = routing.ids_TK[mask_R], routing.topk_ids_TK[mask_R]
    kept_RK = ids_RK >= 0
    stats = {
        "load": torch.bincount(ids_RK[kept_RK], minlength=num_experts),
        "dropped_fraction": (~kept_RK).sum() / max(topk_RK.numel(), 1),
        "experts_per_token": kept_RK.sum(dim=-1).float().mean(),
    }
    if routing.probs_TE is not None:
        # Sigmoid scores do not sum to 1: take the entropy of the normalised scores.
        p_RE = routing.probs_TE[mask_R]
        p_RE = p_RE / p_RE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        stats["entropy"] = -(p_RE * p_RE.clamp_min(1e-20).log()).sum(dim=-1).mean()
    return stats


class MoELayer(nn.Module):
    def __init__(self, routes: list[Route], balancing: list[BalancingTerm], pools: dict[str, ExpertPool]):
        super().__init__()
        names = [route.name for route in routes]
        if len(set(names)) != len(names):
            raise ValueError(f"route names must be unique, got {names}")
        for route in routes:
            if route.pool not in pools:
                raise ValueError(f"route {route.name!r} names pool {route.pool!r}, not in {sorted(pools)}")
        self.routes = nn.ModuleList(routes)
        self.pools = nn.ModuleDict(pools)
        self.balancing = list(balancing)

    def forward(
        self, x_BSD: Tensor, modality_BS: Tensor | None = None, attention_mask_BS: Tensor | None = None
    ) -> MoELayerOutput:
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
        y_TD = torch.zeros_like(x_TD)
        aux = {term.name: torch.zeros((), device=device) for term in self.balancing}
        stats = {}
        for route in self.routes:
            idx_R = SELECTORS[route.tokens](modality_T).nonzero().squeeze(1)
            x_RD = x_TD[idx_R]
            routing = route.router(x_RD)
            pool = self.pools[route.pool]
            y_TD = y_TD.index_add(0, idx_R, pool(x_RD, routing.weights_TK, routing.ids_TK))
            valid_R, modality_R = valid_T[idx_R], modality_T[idx_R]
            if route.router.balanced:
                for term in self.balancing:
                    mask_R = valid_R & SELECTORS[term.tokens](modality_R)
                    aux[term.name] = aux[term.name] + term.coef * term.fn(routing, mask_R)
            stats[route.name] = router_stats(routing, pool.num_experts, valid_R)
        return MoELayerOutput(y_TD.view(B, S, D), aux, stats)
