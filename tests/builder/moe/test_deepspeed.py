"""deepspeed_top2 (MoE-LLaVA's DeepSpeed 0.9.5 `top2gating`) on a worked example.

The router weight is the identity (logits == x) and the Gumbel noise is written out, so every
selection, drop and gate value below follows by hand from seed-systems.md's description.
"""

import math

import torch

from moebuild.moe.balancing import SwitchAux, switch_aux
from moebuild.moe.experts import ExpertPool
from moebuild.moe.layer import MoELayer, Route
from moebuild.moe.routers.base import Capacity
from moebuild.moe.routers.deepspeed import DeepSpeedTop2Router

LOGITS_TE = torch.tensor([[2.0, 1.0, 0.0], [1.5, 0.0, 1.0], [3.0, 0.5, 0.0], [0.0, 2.0, 1.0]])
GUMBEL_TE = torch.tensor([[0.0, -1.0, 0.5], [0.0, 0.8, 0.1], [0.0, 0.2, 0.9], [0.3, 0.0, -0.5]])
# logits + noise, first choice (the clean argmax) excluded:
#   t0: first 0; [-, 0.0, 0.5] -> second 2 (without noise it would be 1)
#   t1: first 0; [-, 0.8, 1.1] -> second 2
#   t2: first 0; [-, 0.7, 0.9] -> second 2 (without noise it would be 1)
#   t3: first 1; [0.3, -, 0.5] -> second 2
# Training capacity: max(ceil(2 * 4 * 0.75 / 3), 0) = 2 slots per expert. Slots in token order,
# first choices first: e0 <- t0, t1 (t2 dropped); e1 <- t3; then seconds: e2 <- t0, t1 (t2, t3 dropped).
WANT_TOPK = [[0, 2], [0, 2], [0, 2], [1, 2]]
WANT_IDS = [[0, 2], [0, 2], [-1, -1], [1, -1]]


def softmax_row(row):
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def worked_router(capacity=Capacity(train=0.75, eval=2.0, min=0)):
    router = DeepSpeedTop2Router(3, 3, capacity)
    router.weight.data = torch.eye(3)
    router.sample_gumbel = lambda logits_TE: GUMBEL_TE
    return router


def test_worked_example_selection_drops_and_gates():
    routing = worked_router().train().route(LOGITS_TE)
    g = [softmax_row(row) for row in LOGITS_TE.tolist()]
    assert routing.capacity == 2
    assert routing.topk_ids_TK.tolist() == WANT_TOPK
    assert routing.ids_TK.tolist() == WANT_IDS
    want_weights = [
        [g[0][0] / (g[0][0] + g[0][2]), g[0][2] / (g[0][0] + g[0][2])],
        [g[1][0] / (g[1][0] + g[1][2]), g[1][2] / (g[1][0] + g[1][2])],
        [0.0, 0.0],  # both dropped: output 0, the residual passes
        [1.0, 0.0],  # a lone kept choice gets 1.0
    ]
    torch.testing.assert_close(routing.weights_TK, torch.tensor(want_weights))
    torch.testing.assert_close(routing.probs_TE, torch.tensor(g))
    # DeepSpeed's l_aux = mean(me * ce) * E * E, me = mean gates, ce = top-1 shares before dropping
    me = [sum(row[e] for row in g) / 4 for e in range(3)]
    ce = [3 / 4, 1 / 4, 0.0]
    want_aux = sum(m * c for m, c in zip(me, ce)) / 3 * 3 * 3
    aux = switch_aux(routing.probs_TE, routing.topk_ids_TK, torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(aux, torch.tensor(want_aux))


def test_evaluation_keeps_the_noise_and_switches_the_capacity_factor():
    routing = worked_router().eval().route(LOGITS_TE)
    assert routing.capacity == math.ceil(2 * 4 * 2.0 / 3)  # 6: nothing dropped
    assert routing.ids_TK.tolist() == WANT_TOPK  # Gumbel second choice at evaluation too
    g = [softmax_row(row) for row in LOGITS_TE.tolist()]
    torch.testing.assert_close(routing.weights_TK[3], torch.tensor([g[3][1], g[3][2]]) / (g[3][1] + g[3][2]))


def test_eval_noise_off_takes_the_second_best_logit():
    router = worked_router()
    router.eval_noise = False
    routing = router.eval().route(LOGITS_TE)
    # Without noise the second choices are t0: 1, t1: 2, t2: 1, t3: 2 (the comments above).
    assert routing.ids_TK.tolist() == [[0, 1], [0, 2], [0, 1], [1, 2]]
    assert router.train().route(LOGITS_TE).topk_ids_TK.tolist() == WANT_TOPK  # training keeps the noise


def test_min_capacity_and_dropless():
    routing = worked_router(Capacity(train=0.75, eval=2.0, min=3)).train().route(LOGITS_TE)
    assert routing.capacity == 3 and routing.ids_TK.tolist() == [[0, 2], [0, 2], [0, 2], [1, -1]]
    dropless = worked_router(None).train().route(LOGITS_TE)
    assert dropless.capacity is None and dropless.ids_TK.tolist() == WANT_TOPK


def test_real_gumbel_noise_is_seeded_by_torch():
    router = DeepSpeedTop2Router(8, 4, None)
    x_TD = torch.randn(64, 8)
    torch.manual_seed(3)
    a = router.eval().route(x_TD).ids_TK
    torch.manual_seed(3)
    b = router.route(x_TD).ids_TK
    assert torch.equal(a, b) and (a[:, 0] != a[:, 1]).all()
    assert torch.equal(a[:, 0], router.logits(x_TD).argmax(-1))


def test_dropped_token_gets_zero_moe_output_in_the_layer():
    torch.manual_seed(0)
    pool = ExpertPool(3, 3, 5)
    layer = MoELayer([Route(worked_router(), "experts")], [SwitchAux(0.01)], {"experts": pool}).train()
    out = layer(LOGITS_TE[None])
    assert out.hidden_states[0, 2].abs().max() == 0  # t2: both choices dropped, only the residual remains
    assert out.hidden_states[0, 3].abs().min() > 0
    stats = out.router_stats["all->experts"]["all"]
    assert stats["dropped_fraction"].item() == 3 / 8 and stats["load"].tolist() == [2, 1, 2]
