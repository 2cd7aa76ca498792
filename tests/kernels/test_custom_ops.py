"""The dispatch custom ops: torch.library's own consistency checks (schema, fake kernel,
autograd registration) and a fullgraph torch.compile of a layer that calls them.

Legend: T tokens, D hidden, K slots per token.
"""

import pytest
import torch

from moebuild.kernels.torch_sorted import sorted_experts
from moebuild.moe.experts import ExpertPool

from .test_dispatch import make_case


@pytest.mark.parametrize("case", ["basic", "dropped_slots", "gated_bias", "fc_gelu_bias"])
def test_opcheck_sorted_experts(case):
    pool, x_TD, weights_TK, ids_TK = make_case(case)
    w_in, b_in, w_out, b_out = (t.detach().requires_grad_() if t is not None else None for t in pool.stacked())
    args = (x_TD.requires_grad_(), weights_TK.requires_grad_(), ids_TK, w_in, b_in, w_out, b_out, pool.gated, pool.activation)
    # The sorted buffers' rows of dropped slots are never written: compare only the output there.
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(sorted_experts, args, test_utils=tests)


class TwoPoolLayer(torch.nn.Module):
    """A routed pool plus a shared one, as the MoE layer composes them."""

    def __init__(self):
        super().__init__()
        self.routed = ExpertPool(4, 16, 8, backend="torch")
        self.shared = ExpertPool(1, 16, 8, backend="torch")

    def forward(self, x_TD, weights_TK, ids_TK):
        ones_T1 = torch.ones_like(weights_TK[:, :1])
        return self.routed(x_TD, weights_TK, ids_TK) + self.shared(x_TD, ones_T1, torch.zeros_like(ids_TK[:, :1]))


def test_torch_compile_fullgraph_traces_the_custom_op():
    torch.manual_seed(0)
    layer = TwoPoolLayer()
    x_TD = torch.randn(10, 16, requires_grad=True)
    weights_TK, ids_TK = torch.randn(10, 4).softmax(-1).topk(2, dim=-1)
    want = layer(x_TD, weights_TK, ids_TK)
    (want_dx,) = torch.autograd.grad(want.square().sum(), x_TD)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x_TD, weights_TK, ids_TK)
    (got_dx,) = torch.autograd.grad(got.square().sum(), x_TD)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_dx, want_dx)


def test_backward_gets_no_zero_filled_gradients_for_the_saved_buffers():
    """Only y_TD is differentiable: autograd must not materialize a zero gradient the size of the
    pre-activation buffer h_AR (A x 2I) for the backward to ignore."""
    pool, x_TD, weights_TK, ids_TK = make_case("basic")
    A, R = ids_TK.numel(), 2 * pool.intermediate_size
    w_in, b_in, w_out, b_out = pool.stacked()
    outputs = sorted_experts(x_TD.requires_grad_(), weights_TK, ids_TK, w_in, b_in, w_out, b_out,
                             pool.gated, pool.activation)
    assert outputs[3].shape == (A, R) and not outputs[3].requires_grad
    # The profiler sees only this thread; the "basic" case is too small for the expert workers,
    # and autograd's fill would run here anyway.
    with torch.profiler.profile(record_shapes=True) as prof:
        outputs[0].sum().backward()
    filled = [e.input_shapes[0] for e in prof.events() if e.name in ("aten::fill_", "aten::zero_")]
    assert [A, R] not in filled
    assert x_TD.grad is not None


class _NoGradient(torch.autograd.Function):
    """Passes its input through and gives it no gradient (None), as some custom functions do."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def test_backward_with_no_incoming_gradient_gives_none():
    pool, x_TD, weights_TK, ids_TK = make_case("basic")
    x_TD.requires_grad_()
    w_in, b_in, w_out, b_out = pool.stacked()
    y_TD = sorted_experts(x_TD, weights_TK, ids_TK, w_in, b_in, w_out, b_out, pool.gated, pool.activation)[0]
    (_NoGradient.apply(y_TD).sum() + x_TD.sum()).backward()
    torch.testing.assert_close(x_TD.grad, torch.ones_like(x_TD))  # only the direct path's gradient
    assert w_in.grad is None
