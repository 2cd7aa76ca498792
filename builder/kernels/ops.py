"""Expert dispatch as a pair of `torch.library.custom_op`s (forward, backward) with fake kernels.

The shape of scattermoe's `kernels/ops.py` and transformers' `grouped_mm_fallback`: each backend
supplies a forward and a backward implementation over the pool's stacked tensors; this module
registers them as opaque custom ops, with fake (meta) implementations so `torch.compile` traces
a layer that calls them (fullgraph, no graph break on the data-dependent expert loop), and links
them with `register_autograd`.

Every forward returns the same tensors, whose shapes depend only on the inputs' shapes: the sorted
buffers have one row per slot (A = T*K), dropped slots (id -1) sorted last and never read (the
torch backend zeroes those rows; the Triton one leaves them unset). A backend whose backward
needs no expert outputs (the torch one recomputes the gate-weight gradient from `h_AR`) returns a
0-row `y_AD` and says so when it registers (`keeps_expert_outputs=False`).

    forward(x_TD, weights_TK, ids_TK, w_in_ERD, b_in_ER, w_out_EDI, b_out_ED, gated, activation)
        -> y_TD, order_A (slots in expert order), counts_E, h_AR (pre-activation), y_AD (expert
           outputs in expert order, before the gate weight; 0 rows if the backward needs none)
    backward(grad_TD, x_TD, weights_TK, w_in_ERD, b_in_ER, w_out_EDI, b_out_ED,
             order_A, counts_E, h_AR, y_AD, gated, activation)
        -> dx_TD, dweights_TK, dw_in, db_in, dw_out, db_out (a bias gradient is empty when the
           pool has no bias, as a custom op cannot return None)

Legend: T tokens, D hidden, K slots per token, E experts, I intermediate, R = 2I gated else I,
A = T*K slots.
"""

from collections.abc import Callable

import torch
from torch import Tensor


def _forward_fake(keeps_expert_outputs: bool) -> Callable:
    def fake(x_TD, weights_TK, ids_TK, w_in_ERD, b_in_ER, w_out_EDI, b_out_ED, gated, activation):
        A, R = ids_TK.numel(), w_in_ERD.shape[1]
        return (
            torch.empty_like(x_TD),
            ids_TK.new_empty(A, dtype=torch.int64),
            ids_TK.new_empty(w_in_ERD.shape[0], dtype=torch.int64),
            x_TD.new_empty(A, R),
            x_TD.new_empty(A if keeps_expert_outputs else 0, x_TD.shape[1]),
        )

    return fake


def _backward_fake(grad_TD, x_TD, weights_TK, w_in_ERD, b_in_ER, w_out_EDI, b_out_ED,
                   order_A, counts_E, h_AR, y_AD, gated, activation):
    def bias_grad(b):
        return torch.empty_like(b) if b is not None else x_TD.new_empty(0)

    return (
        torch.empty_like(x_TD),
        torch.empty_like(weights_TK),
        torch.empty_like(w_in_ERD),
        bias_grad(b_in_ER),
        torch.empty_like(w_out_EDI),
        bias_grad(b_out_ED),
    )


def _setup_context(ctx, inputs, output):
    x_TD, weights_TK, _, w_in_ERD, b_in_ER, w_out_EDI, b_out_ED, gated, activation = inputs
    _, order_A, counts_E, h_AR, y_AD = output
    ctx.save_for_backward(x_TD, weights_TK, w_in_ERD, b_in_ER, w_out_EDI, b_out_ED, order_A, counts_E, h_AR, y_AD)
    # Only y_TD has a gradient. Autograd would otherwise hand the backward a zero-filled gradient for
    # each of the other outputs (h_AR is A x 2I floats: 53 ms of fill a step at config A, 2048 tokens).
    ctx.mark_non_differentiable(h_AR, y_AD)
    ctx.set_materialize_grads(False)
    ctx.gated, ctx.activation = gated, activation


def define_experts_op(name: str, forward: Callable, backward: Callable, keeps_expert_outputs: bool = True):
    """Register `moebuild::<name>` and `moebuild::<name>_backward`; returns the forward op."""
    backward_op = torch.library.custom_op(f"moebuild::{name}_backward", backward, mutates_args=())
    backward_op.register_fake(_backward_fake)
    forward_op = torch.library.custom_op(f"moebuild::{name}", forward, mutates_args=())
    forward_op.register_fake(_forward_fake(keeps_expert_outputs))

    def grads(ctx, grad_TD, *_):
        if grad_TD is None:  # grads are not materialised, and a function downstream returned None
            return (None,) * 9
        saved = ctx.saved_tensors
        dx, dweights, dw_in, db_in, dw_out, db_out = backward_op(
            grad_TD.contiguous(), *saved, ctx.gated, ctx.activation
        )
        has_b_in, has_b_out = saved[3] is not None, saved[5] is not None
        return (dx, dweights, None, dw_in, db_in if has_b_in else None, dw_out,
                db_out if has_b_out else None, None, None)

    forward_op.register_autograd(grads, setup_context=_setup_context)
    return forward_op


def pool_dispatch(op) -> Callable[..., Tensor]:
    """A dispatch backend `fn(x_TD, weights_TK, ids_TK, pool) -> y_TD` calling the custom op."""

    def dispatch(x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, pool) -> Tensor:
        w_in, b_in, w_out, b_out = pool.stacked()
        return op(x_TD, weights_TK, ids_TK, w_in, b_in, w_out, b_out, pool.gated, pool.activation)[0]

    return dispatch


def sort_by_expert(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Slots in expert order and the number of slots per expert: (order_A, counts_E).

    `order_A` indexes the flattened [T*K] slots; dropped slots (id -1) sort last, after every
    kept slot, so the kept ones are `order_A[:counts_E.sum()]`. The stable sort keeps tokens in
    their original order inside each expert.
    """
    ids_A = ids_TK.reshape(-1)
    key_A = torch.where(ids_A < 0, num_experts, ids_A)
    order_A = torch.argsort(key_A, stable=True)
    counts_E = torch.bincount(key_A, minlength=num_experts + 1)[:num_experts]
    return order_A, counts_E
