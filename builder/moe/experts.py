"""A pool of identical expert MLPs stored as stacked tensors in the transformers 5 layout.

Gated (SwiGLU-style, transformers' `MixtralExperts` / `Qwen2MoeExperts`): `gate_up_proj`
[E, 2I, D] whose first I rows are the gate and last I rows the up projection (the order of
`.chunk(2, dim=-1)` in `MixtralExperts.forward`), and `down_proj` [E, D, I].
Non-gated (Phi-2 style fc1/fc2): `up_proj` [E, I, D] and `down_proj` [E, D, I].
With bias=True: `gate_up_proj_bias` [E, 2I] or `up_proj_bias` [E, I], and `down_proj_bias` [E, D].

Routing is decided outside (scattermoe's `forward(x, expert_p, expert_idxs)`): the pool receives
each token's K expert ids and gate weights and hands them to a dispatch backend.

Under expert parallelism (`parallel`, moebuild/parallel/) the pool holds only its rank's
L = E / N experts, [rank * L, (rank + 1) * L), under the same tensor names; ids stay global and
the forward sends rows to the experts' ranks. Without it (N = 1) nothing changes.

Legend: T tokens, D hidden, K slots per token, E experts, I intermediate, N rows of one expert.
"""

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from moebuild.kernels.reference import ExpertWeights
from moebuild.moe.dispatch import check_backend, get_dispatch
from moebuild.parallel.expert import ExpertParallel, expert_parallel_dispatch


class ExpertPool(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        gated: bool = True,
        bias: bool = False,
        backend: str = "torch",
        upcycle: bool = False,
        init_std: float = 0.02,
        parallel: ExpertParallel | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.parallel = parallel
        self.num_local_experts = num_experts // parallel.size if parallel is not None else num_experts
        self.first_expert = parallel.rank * self.num_local_experts if parallel is not None else 0
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gated = gated
        self.activation = activation
        self.backend = check_backend(backend)
        self.upcycle = upcycle  # initialised with every expert a copy of one FFN (see vlm.init_custom_weights)
        self.init_std = init_std
        self.act_fn = ACT2FN[activation]
        factory = {"device": device, "dtype": dtype}
        E, D, I = self.num_local_experts, hidden_size, intermediate_size
        self.in_name = "gate_up_proj" if gated else "up_proj"
        in_rows = 2 * I if gated else I
        self.register_parameter(self.in_name, nn.Parameter(torch.empty(E, in_rows, D, **factory)))
        self.down_proj = nn.Parameter(torch.empty(E, D, I, **factory))
        in_bias = nn.Parameter(torch.empty(E, in_rows, **factory)) if bias else None
        self.register_parameter(f"{self.in_name}_bias", in_bias)
        out_bias = nn.Parameter(torch.empty(E, D, **factory)) if bias else None
        self.register_parameter("down_proj_bias", out_bias)
        self.reset_parameters()

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, backend: str = "auto",
                  parallel: ExpertParallel | None = None) -> "ExpertPool":
        return cls(node.num_experts, hidden_size, node.intermediate_size, activation=node.activation, gated=node.gated,
                   bias=node.bias, backend=backend, upcycle=node.init == "upcycle", parallel=parallel)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights and zero biases, as transformers' `_init_weights`."""
        for name, param in self.named_parameters(recurse=False):
            if name.endswith("_bias"):
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, std=self.init_std)

    def split(self) -> list[ExpertWeights]:
        """Per-expert views, taken with one `unbind` per tensor (see kernels/reference.py)."""
        E = self.num_local_experts
        in_bias = getattr(self, f"{self.in_name}_bias")
        b_in = in_bias.unbind(0) if in_bias is not None else [None] * E
        b_out = self.down_proj_bias.unbind(0) if self.down_proj_bias is not None else [None] * E
        w_in = getattr(self, self.in_name).unbind(0)
        return [ExpertWeights(*ws) for ws in zip(w_in, b_in, self.down_proj.unbind(0), b_out)]

    def stacked(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(w_in [E, R, D], b_in [E, R] or None, w_out [E, D, I], b_out [E, D] or None); R = 2I gated else I."""
        w_in, b_in = getattr(self, self.in_name), getattr(self, f"{self.in_name}_bias")
        return w_in, b_in, self.down_proj, self.down_proj_bias

    def mlp(self, x_ND: Tensor, expert: ExpertWeights) -> Tensor:
        h_NI = F.linear(x_ND, expert.w_in, expert.b_in)
        if self.gated:
            gate_NI, up_NI = h_NI.chunk(2, dim=-1)
            h_NI = self.act_fn(gate_NI) * up_NI
        else:
            h_NI = self.act_fn(h_NI)
        return F.linear(h_NI, expert.w_out, expert.b_out)

    def forward(self, x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, dense: bool = False) -> Tensor:
        """Sum over each token's K slots of gate weight * expert output; id -1 = dropped slot.

        `dense`: the caller vouches that every token takes every expert, in order, none dropped (a
        dense route: `ids_TK` is arange(E) on every row). A one-expert pool then runs, when no
        gradient is wanted, as one MLP over the rows as they are: nothing to sort, gather or scatter,
        and no reading of the ids to find that out."""
        if dense and self.num_local_experts == 1 and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x_TD.device.type):
            expert, = self.split()
            return self.mlp(x_TD, expert).mul_(weights_TK.to(x_TD.dtype))
        dispatch = get_dispatch(self.backend, x_TD.device)
        if self.parallel is not None:
            return expert_parallel_dispatch(x_TD, weights_TK, ids_TK, self, dispatch)
        return dispatch(x_TD, weights_TK, ids_TK, self)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, gated={self.gated}, "
            f"backend={self.backend!r}"
            + ("" if self.parallel is None else f", experts [{self.first_expert}, "
               f"{self.first_expert + self.num_local_experts}) of {self.parallel.size} ranks")
        )
