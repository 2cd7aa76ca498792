"""The Triton dispatch backend: launchers of `triton/kernels.py`, registered as custom ops via `ops.py`.

Imported on first use of the "triton" backend only (moebuild.moe.dispatch), so `import moebuild`
never imports triton. Forward: sort once (`ops.sort_by_expert`), build the block table once
(`routing_meta`), then gate/up grouped GEMM reading tokens through the sort (no permuted copy)
with the activation fused, down grouped GEMM, weighted combine. Backward: gate-weight gradient,
d activation (the gather, the gate weight and the activation backward fused into one grouped
GEMM), the weight and bias gradients per expert, dx grouped GEMM, un-weighted combine.

Kernels are looked up on the `triton.kernels` module at call time, and block sizes chosen then,
so a test can reload that module under `TRITON_INTERPRET=1` (read by `triton.jit` when it
decorates) and run everything on CPU tensors.

Legend: T tokens, D hidden, K slots per token, E experts, I intermediate, R = 2I gated else I,
A = T*K slot rows (expert order, dropped slots last).
"""

import os
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from moebuild.kernels.ops import define_experts_op, pool_dispatch, sort_by_expert
from moebuild.kernels.triton import kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks() -> dict[str, int]:
    """Tile sizes: the smallest tl.dot allows under the interpreter (speed), GPU defaults otherwise.
    Not tuned on a GPU yet (none was available): see BENCHMARKS.md."""
    if _interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}


class RoutingMeta(NamedTuple):
    tok_A: Tensor  # token of each sorted row
    pos_A: Tensor  # row in expert order of each flattened slot, -1 if dropped
    offsets_E1: Tensor  # first row of each expert, then the number of kept rows
    block_expert: Tensor  # expert of each BLOCK_M block of rows, -1 for unused blocks
    block_start: Tensor
    block_end: Tensor


def routing_meta(order_A: Tensor, counts_E: Tensor, K: int, block_m: int) -> RoutingMeta:
    """Everything the kernels need to find their rows, computed once per forward without a host sync.

    The number of blocks is bounded by cdiv(A, BLOCK_M) + E (each expert wastes at most one
    partial block), so the grid size never depends on the routing.
    """
    A, E = order_A.numel(), counts_E.numel()
    offsets_E1 = torch.zeros(E + 1, dtype=torch.int64, device=counts_E.device)
    offsets_E1[1:] = counts_E.cumsum(0)
    rows_A = torch.arange(A, device=order_A.device)
    pos_A = torch.empty_like(order_A)
    pos_A[order_A] = rows_A
    pos_A = torch.where(pos_A < offsets_E1[-1], pos_A, -1)
    blocks_E = (counts_E + block_m - 1) // block_m
    last_block_E = blocks_E.cumsum(0)
    b = torch.arange(triton.cdiv(A, block_m) + E, device=order_A.device)
    e_B = torch.searchsorted(last_block_E, b, right=True)
    e_safe = e_B.clamp(max=E - 1)
    start = offsets_E1[e_safe] + (b - (last_block_E[e_safe] - blocks_E[e_safe])) * block_m
    return RoutingMeta(order_A // K, pos_A, offsets_E1, torch.where(e_B < E, e_B, -1), start, offsets_E1[e_safe + 1])


def _or(t: Tensor | None, fallback: Tensor) -> Tensor:
    return t if t is not None else fallback


def _grouped_mm(x, meta, w_E, w_strides, out, *, n, kdim, gather=False, scale=None, bias=None,
                h=None, n_up=0, epilogue=0, gated=False, act=0):
    """out[r] = epilogue(x[src(r)] * scale[r] @ B_e); B_e[k, n] = w_E[e] read with w_strides (k, n)."""
    blocks = _blocks()
    grid = (meta.block_expert.numel(), triton.cdiv(n, blocks["BLOCK_N"]))
    kernels.grouped_mm_kernel[grid](  # an absent optional tensor is passed as `out`, never read
        x, meta.tok_A, _or(scale, out), w_E, _or(bias, out), out, _or(h, out),
        meta.block_expert, meta.block_start, meta.block_end,
        n, kdim, n_up,
        x.stride(0), w_E.stride(0), *w_strides, bias.stride(0) if bias is not None else 0, out.stride(0),
        h.stride(0) if h is not None else 0,
        GATHER=gather, SCALE=scale is not None, HAS_BIAS=bias is not None,
        EPILOGUE=epilogue, GATED=gated, ACT=act, **blocks,
    )
    return out


def _grouped_xty(left, right, meta, dw_E, db_E, *, left_gather=False, left_scale=None, right_gather=False):
    """dw_E[e] = left_e^T @ right_e and db_E[e] = column sums of left_e, over the rows of expert e."""
    P, Q = dw_E.shape[1:]
    b = _blocks()
    grid = (dw_E.shape[0], triton.cdiv(P, b["BLOCK_N"]), triton.cdiv(Q, b["BLOCK_N"]))
    kernels.grouped_xty_kernel[grid](
        left, meta.tok_A, _or(left_scale, dw_E), right, meta.tok_A, dw_E, _or(db_E, dw_E), meta.offsets_E1,
        P, Q, left.stride(0), right.stride(0), dw_E.stride(0), dw_E.stride(1), db_E.stride(0) if db_E is not None else 0,
        L_GATHER=left_gather, L_SCALE=left_scale is not None, R_GATHER=right_gather, HAS_BIAS=db_E is not None,
        BLOCK_M=b["BLOCK_M"], BLOCK_P=b["BLOCK_N"], BLOCK_Q=b["BLOCK_N"],
    )


def _combine(y_AD: Tensor, meta: RoutingMeta, weights_TK: Tensor | None, T: int, K: int) -> Tensor:
    out_TD = y_AD.new_empty(T, y_AD.shape[1])
    D = y_AD.shape[1]
    block_d = min(1024, triton.next_power_of_2(D))
    kernels.combine_kernel[(T, triton.cdiv(D, block_d))](
        y_AD, meta.pos_A, _or(weights_TK, y_AD), out_TD, D, K, y_AD.stride(0), out_TD.stride(0),
        HAS_WEIGHTS=weights_TK is not None, BLOCK_D=block_d,
    )
    return out_TD


def _activation_id(activation: str) -> int:
    if activation not in kernels.ACTIVATION_IDS:
        raise NotImplementedError(f"the triton backend has no activation {activation!r}; use backend 'torch'")
    return kernels.ACTIVATION_IDS[activation]


def triton_forward(
    x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, w_in_ERD: Tensor, b_in_ER: Tensor | None,
    w_out_EDI: Tensor, b_out_ED: Tensor | None, gated: bool, activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, K = ids_TK.shape
    E, R, D = w_in_ERD.shape
    I = w_out_EDI.shape[2]
    act = _activation_id(activation)
    order_A, counts_E = sort_by_expert(ids_TK, E)
    x_TD = x_TD.contiguous()
    h_AR, y_AD = x_TD.new_empty(T * K, R), x_TD.new_empty(T * K, D)
    if T * K == 0:
        return torch.zeros_like(x_TD), order_A, counts_E, h_AR, y_AD
    meta = routing_meta(order_A, counts_E, K, _blocks()["BLOCK_M"])
    act_AI = _grouped_mm(x_TD, meta, w_in_ERD, (w_in_ERD.stride(2), w_in_ERD.stride(1)), x_TD.new_empty(T * K, I),
                         n=I, kdim=D, gather=True, bias=b_in_ER, h=h_AR, n_up=I if gated else 0,
                         epilogue=1, gated=gated, act=act)
    _grouped_mm(act_AI, meta, w_out_EDI, (w_out_EDI.stride(2), w_out_EDI.stride(1)), y_AD,
                n=D, kdim=I, bias=b_out_ED)
    return _combine(y_AD, meta, weights_TK.contiguous(), T, K), order_A, counts_E, h_AR, y_AD


def triton_backward(
    grad_TD: Tensor, x_TD: Tensor, weights_TK: Tensor, w_in_ERD: Tensor, b_in_ER: Tensor | None,
    w_out_EDI: Tensor, b_out_ED: Tensor | None, order_A: Tensor, counts_E: Tensor, h_AR: Tensor,
    y_AD: Tensor, gated: bool, activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, K = weights_TK.shape
    E, R, D = w_in_ERD.shape
    I = w_out_EDI.shape[2]
    act = _activation_id(activation)
    # Every kernel below writes all of its output (an expert without rows writes zeros).
    empty = torch.zeros_like if T * K == 0 else torch.empty_like
    grads = [empty(t) if t is not None else x_TD.new_empty(0) for t in (x_TD, weights_TK, w_in_ERD, b_in_ER, w_out_EDI, b_out_ED)]
    if T * K == 0:
        return tuple(grads)
    _, dweights_TK, dw_in, db_in, dw_out, db_out = grads
    x_TD = x_TD.contiguous()
    b = _blocks()
    meta = routing_meta(order_A, counts_E, K, b["BLOCK_M"])
    kernels.slot_dot_kernel[(T * K,)](grad_TD, y_AD, meta.pos_A, dweights_TK, D, K, grad_TD.stride(0),
                                      y_AD.stride(0), BLOCK_D=min(1024, triton.next_power_of_2(D)))
    gate_A = weights_TK.reshape(-1)[order_A].contiguous()  # gate weight of each sorted row
    dh_AR = _grouped_mm(grad_TD, meta, w_out_EDI, (w_out_EDI.stride(1), w_out_EDI.stride(2)), torch.empty_like(h_AR),
                        n=I, kdim=D, gather=True, scale=gate_A, h=h_AR, n_up=I if gated else 0,
                        epilogue=2, gated=gated, act=act)
    act_AI = x_TD.new_empty(T * K, I)
    kernels.activation_kernel[(triton.cdiv(T * K, b["BLOCK_M"]), triton.cdiv(I, b["BLOCK_N"]))](
        h_AR, act_AI, meta.offsets_E1[-1:], I, h_AR.stride(0), act_AI.stride(0),
        GATED=gated, ACT=act, BLOCK_M=b["BLOCK_M"], BLOCK_N=b["BLOCK_N"])
    _grouped_xty(grad_TD, act_AI, meta, dw_out, db_out if b_out_ED is not None else None,
                 left_gather=True, left_scale=gate_A)
    _grouped_xty(dh_AR, x_TD, meta, dw_in, db_in if b_in_ER is not None else None, right_gather=True)
    dx_AD = _grouped_mm(dh_AR, meta, w_in_ERD, (w_in_ERD.stride(1), w_in_ERD.stride(2)), torch.empty_like(y_AD),
                        n=D, kdim=R)
    return _combine(dx_AD, meta, None, T, K), dweights_TK, dw_in, db_in, dw_out, db_out


triton_experts = define_experts_op("triton_experts", triton_forward, triton_backward)
triton_dispatch = pool_dispatch(triton_experts)
