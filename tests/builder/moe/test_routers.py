"""Routers on hand-made logits: the router weight is the identity, so logits_TE == x_TD."""

import math

import pytest
import torch
from torch.nn import functional as F

from moebuild.moe.routers.base import Capacity
from moebuild.moe.routers.topk import DenseRouter, TopKRouter

LOGITS_TE = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 1.0], [-2.0, 0.0, 0.1, 0.2]])


def identity_router(E, top_k, **kwargs):
    router = TopKRouter(E, E, top_k, **kwargs)
    router.weight.data = torch.eye(E)
    return router


def softmax_row(row):
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def test_softmax_then_topk():
    routing = identity_router(4, 2).eval().route(LOGITS_TE)
    p = [softmax_row(row) for row in LOGITS_TE.tolist()]
    want_ids = [[0, 1], [2, 3], [3, 2]]
    want_weights = [[p[t][e] for e in ids] for t, ids in enumerate(want_ids)]
    assert routing.ids_TK.tolist() == want_ids and routing.topk_ids_TK.tolist() == want_ids
    torch.testing.assert_close(routing.weights_TK, torch.tensor(want_weights))
    torch.testing.assert_close(routing.logits_TE, LOGITS_TE)
    torch.testing.assert_close(routing.probs_TE, torch.tensor(p))
    assert routing.weights_TK.dtype == torch.float32 and routing.ids_TK.dtype == torch.int64
    assert routing.capacity is None


def test_sigmoid_normalized_and_scaled():
    routing = identity_router(4, 2, score="sigmoid", normalize=True, scale=2.5).eval().route(LOGITS_TE)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    a, b = sig(2.0), sig(1.0)
    torch.testing.assert_close(routing.weights_TK[0], torch.tensor([2.5 * a / (a + b), 2.5 * b / (a + b)]))
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.full((3,), 2.5))


def test_scale_applies_without_normalize():
    plain = identity_router(4, 2).eval().route(LOGITS_TE)
    scaled = identity_router(4, 2, scale=16.0).eval().route(LOGITS_TE)
    torch.testing.assert_close(scaled.weights_TK, 16.0 * plain.weights_TK)


# Choices (first, second): token 0 -> (1, 0), token 1 -> (0, 2), token 2 -> (0, 1).
CAPACITY_LOGITS_TE = torch.tensor([[2.0, 3.0, 0.0], [3.0, 0.0, 2.0], [3.0, 2.0, 0.0]])


def test_capacity_fills_first_choices_before_second_choices():
    # C = ceil(T * K * cf / E) = ceil(3 * 2 * 0.5 / 3) = 1 slot per expert.
    router = identity_router(3, 2, capacity=Capacity(train=0.5))
    routing = router.train().route(CAPACITY_LOGITS_TE)
    assert routing.capacity == 1
    # Rank-major: firsts t0->1, t1->0 kept, t2->0 dropped; seconds t0->0 dropped (e0 full),
    # t1->2 kept, t2->1 dropped (e1 full). Token-major order would have kept t0->0 instead of t1->0.
    assert routing.ids_TK.tolist() == [[1, -1], [0, 2], [-1, -1]]
    assert routing.topk_ids_TK.tolist() == [[1, 0], [0, 2], [0, 1]]
    probs_TE = CAPACITY_LOGITS_TE.softmax(-1)
    want_TK = probs_TE.gather(1, routing.topk_ids_TK) * (routing.ids_TK >= 0)  # no renormalisation
    torch.testing.assert_close(routing.weights_TK, want_TK)


def test_min_capacity_and_eval_factor():
    router = identity_router(3, 2, capacity=Capacity(train=0.5, min=2))
    routing = router.train().route(CAPACITY_LOGITS_TE)
    assert routing.capacity == 2
    assert routing.ids_TK.tolist() == [[1, -1], [0, 2], [0, 1]]
    routing = router.eval().route(CAPACITY_LOGITS_TE)
    assert routing.capacity is None and routing.ids_TK.tolist() == [[1, 0], [0, 2], [0, 1]]


@pytest.mark.parametrize("noise", ["gaussian", "gumbel"])
def test_selection_noise_is_training_only_and_weights_use_clean_scores(noise):
    torch.manual_seed(0)
    x_TD = torch.randn(64, 8)
    router = identity_router(8, 2, noise=noise, noise_std=3.0)
    clean = router.eval().route(x_TD)
    assert torch.equal(clean.ids_TK, x_TD.topk(2, dim=-1).indices)
    noisy = router.train().route(x_TD)
    assert not torch.equal(noisy.ids_TK, clean.ids_TK)
    torch.testing.assert_close(noisy.probs_TE, clean.probs_TE)
    torch.testing.assert_close(noisy.weights_TK, clean.probs_TE.gather(1, noisy.ids_TK))


def test_jitter_multiplies_the_input_in_training_only():
    torch.manual_seed(0)
    x_TD = torch.randn(32, 8)
    router = identity_router(8, 2, noise="jitter")
    assert router.noise_std == 0.01
    torch.testing.assert_close(router.eval().route(x_TD).logits_TE, x_TD)
    jittered = router.train().route(x_TD).logits_TE  # identity weight: logits are the jittered input
    ratio = jittered / x_TD
    assert not torch.allclose(jittered, x_TD)
    assert ratio.min() >= 0.99 - 1e-6 and ratio.max() <= 1.01 + 1e-6


def test_router_dtype_sets_logit_precision():
    torch.manual_seed(0)
    router = TopKRouter(16, 4, 2, router_dtype=torch.bfloat16)
    x_TD = torch.randn(5, 16)
    routing = router.route(x_TD)
    want = F.linear(x_TD.bfloat16(), router.weight.bfloat16()).float()
    assert torch.equal(routing.logits_TE, want)
    assert routing.probs_TE.dtype == routing.weights_TK.dtype == torch.float32


def test_layout_init_and_meta():
    router = TopKRouter(32, 6, 2, device="meta")
    assert router.weight.is_meta and router.weight.shape == (6, 32)
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="unknown score"):
        TopKRouter(8, 4, 2, score="tanh")


def test_dense_router_sends_every_token_to_every_expert():
    routing = DenseRouter(3).route(torch.randn(4, 8))
    assert routing.ids_TK.tolist() == [[0, 1, 2]] * 4
    assert torch.equal(routing.weights_TK, torch.ones(4, 3))
    assert routing.probs_TE is None and not DenseRouter.balanced and TopKRouter.balanced


def test_topk_softmax_order_differs_unless_normalised():
    softmax_topk = identity_router(4, 2).eval().route(LOGITS_TE)
    topk_softmax = identity_router(4, 2, order="topk_softmax").eval().route(LOGITS_TE)
    assert torch.equal(softmax_topk.ids_TK, topk_softmax.ids_TK)
    # token 0 keeps logits 2.0 and 1.0: softmax over those two only
    a, b = math.exp(2.0), math.exp(1.0)
    torch.testing.assert_close(topk_softmax.weights_TK[0], torch.tensor([a / (a + b), b / (a + b)]))
    assert not torch.allclose(softmax_topk.weights_TK, topk_softmax.weights_TK)
    normalised = identity_router(4, 2, normalize=True).eval().route(LOGITS_TE)
    torch.testing.assert_close(normalised.weights_TK, topk_softmax.weights_TK)
    with pytest.raises(ValueError, match="topk_softmax"):
        TopKRouter(4, 4, 2, score="sigmoid", order="topk_softmax")


def test_correction_bias_shifts_selection_not_weights():
    router = identity_router(4, 2, score="sigmoid", correction_bias=True)
    assert "e_score_correction_bias" in dict(router.named_buffers()) and len(list(router.parameters())) == 1
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    routing = router.eval().route(LOGITS_TE)
    # token 0: sigmoid [.88, .73, .5, .27] + bias [0, 0, 0, 1] -> picks 3 (1.27) and 0 (.88)
    assert routing.ids_TK[0].tolist() == [3, 0]
    sig = torch.sigmoid(LOGITS_TE)
    torch.testing.assert_close(routing.weights_TK, sig.gather(1, routing.ids_TK))  # unbiased scores


def test_group_limited_selection():
    # 6 experts in 3 groups of 2; group score = sum of its 2 scores; keep the best 1 group.
    logits_TE = torch.tensor([[0.9, 0.0, 0.8, 0.7, 0.1, 0.1]])
    router = identity_router(6, 2, score="sigmoid", num_groups=3, top_groups=1)
    routing = router.eval().route(logits_TE)
    # group sums of sigmoid: g0 = s(.9)+s(0), g1 = s(.8)+s(.7) (largest), g2 = 2 s(.1)
    assert sorted(routing.ids_TK[0].tolist()) == [2, 3]  # ungrouped top-2 would be experts 0 and 2
    with pytest.raises(ValueError, match="groups"):
        TopKRouter(6, 6, 2, num_groups=4)


@pytest.mark.parametrize("dropped_score, second", [("zero", {0, 1}), ("-inf", {3})])
def test_dropped_groups_score_zero_or_minus_infinity(dropped_score, second):
    # biased scores, 2 groups of 2, keep 1: g0 = (-.2, -.9), g1 = (.3, -.5); g1 is kept.
    # zero: g0's experts score 0.0, and one of them beats expert 3 (-.5); -inf: only g1's are selectable.
    router = identity_router(4, 2, score="sigmoid", num_groups=2, top_groups=1, correction_bias=True,
                             dropped_score=dropped_score)
    logits_TE = torch.zeros(1, 4)  # sigmoid 0.5 everywhere
    router.e_score_correction_bias.copy_(torch.tensor([-0.7, -1.4, -0.2, -1.0]))
    routing = router.eval().route(logits_TE)
    first, then = routing.ids_TK[0].tolist()
    assert first == 2 and then in second


def test_expert_dropout_training_only():
    torch.manual_seed(0)
    x_TD = torch.randn(2000, 4)
    router = identity_router(4, 1, expert_dropout=0.5)
    assert torch.equal(router.eval().route(x_TD).ids_TK, x_TD.argmax(-1, keepdim=True))
    train_ids = router.train().route(x_TD).ids_TK[:, 0]
    # the best expert survives dropout with probability 1/2; otherwise the best surviving one is taken
    share_best = (train_ids == x_TD.argmax(-1)).float().mean().item()
    assert 0.45 < share_best < 0.55
    empty = train_ids == -1  # all 4 dropped: probability 1/16, an empty slot with weight 0
    assert 0.03 < empty.float().mean().item() < 0.1


def test_topk_curriculum_raises_k_with_update_steps():
    router = identity_router(4, 3, curriculum=(1, 2))
    assert router.route(LOGITS_TE).ids_TK.shape == (3, 1)
    for want_k in (1, 1, 2, 2, 3, 3):  # k = min(3, 1 + step // 2)
        assert router.current_k() == want_k
        router.update_balancing()
    assert router.route(LOGITS_TE).ids_TK.shape == (3, 3) and int(router.step) == 6


def test_drop_by_score_keeps_each_experts_best_slots():
    # C = ceil(2 * 2 * 0.5 / 3) = 1. t0 = (e1 .525, e0 .475); t1 = (e0 .439, e1 .294).
    logits_TE = torch.tensor([[2.0, 2.1, -5.0], [1.0, 0.6, 0.5]])
    by_score = identity_router(3, 2, capacity=Capacity(train=0.5, policy="by_score")).train().route(logits_TE)
    by_position = identity_router(3, 2, capacity=Capacity(train=0.5)).train().route(logits_TE)
    assert by_score.topk_ids_TK.tolist() == [[1, 0], [0, 1]]
    # by score: e0 keeps t0's second choice (.475 > .439), e1 keeps t0 (.525 > .294)
    assert by_score.ids_TK.tolist() == [[1, 0], [-1, -1]]
    # by position: first choices first -> e0 keeps t1, e1 keeps t0
    assert by_position.ids_TK.tolist() == [[1, -1], [0, -1]]
    with pytest.raises(ValueError, match="drop policy"):
        Capacity(train=1.0, policy="random")


def test_dense_sigmoid_gate():
    router = DenseRouter(2, hidden_size=3, gate="sigmoid")
    x_TD = torch.randn(5, 3)
    routing = router.route(x_TD)
    want_T1 = torch.sigmoid(x_TD @ router.weight.t())
    torch.testing.assert_close(routing.weights_TK, want_T1.expand(5, 2))
    assert routing.ids_TK.tolist() == [[0, 1]] * 5


def test_expert_dropout_never_lets_a_dropped_group_in():
    torch.manual_seed(0)
    router = identity_router(8, 2, score="sigmoid", num_groups=4, top_groups=1, expert_dropout=0.5).train()
    x_TD = torch.randn(1000, 8)
    routing = router.route(x_TD)
    group_T = routing.logits_TE.sigmoid().view(1000, 4, 2).topk(2, dim=-1).values.sum(-1).argmax(-1)
    chosen = routing.topk_ids_TK
    assert ((chosen < 0) | (chosen // 2 == group_T[:, None])).all()
    assert (chosen < 0).any()  # dropout emptied some slots rather than reaching outside the group
