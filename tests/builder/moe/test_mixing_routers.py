"""expert_choice and soft routers against written-out formulas, per sequence and without padding."""

import math

import torch

from moebuild.moe.experts import ExpertPool
from moebuild.moe.routers.expert_choice import ExpertChoiceRouter
from moebuild.moe.routers.soft import SoftRouter


def test_expert_choice_experts_pick_their_best_tokens():
    router = ExpertChoiceRouter(3, 3, capacity_factor=1.0)
    router.weight.data = torch.eye(3)
    logits_TE = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 3.0, 0.5], [0.0, 0.0, 4.0], [9.0, 9.0, 9.0]])
    routing = router.route(logits_TE, valid_T=torch.tensor([True, True, True, True, False]))
    # n = 4 real tokens, C = ceil(4 * 1.0 / 3) = 2 tokens per expert, chosen by softmax-over-experts score
    probs_TE = logits_TE.softmax(-1)
    assert routing.capacity == 2
    for e in range(3):
        want = set(probs_TE[:4, e].topk(2).indices.tolist())
        assert set((routing.ids_TK[:, e] == e).nonzero().squeeze(1).tolist()) == want
    assert (routing.ids_TK[4] == -1).all()  # padding is never picked
    torch.testing.assert_close(routing.weights_TK, probs_TE * (routing.ids_TK >= 0))


def soft_reference(router, pool, x_TD, seq, valid):
    """Soft MoE written out per sequence: slot inputs, expert per slot, token outputs."""
    E, P = router.num_experts, router.slots_per_expert
    y = torch.zeros_like(x_TD)
    logits_TS = x_TD @ router.weight.t()
    for b in set(seq):
        idx = [t for t in range(len(seq)) if seq[t] == b and valid[t]]
        L = logits_TS[idx]
        dispatch, combine = L.softmax(dim=0), L.softmax(dim=1)
        slots = dispatch.t() @ x_TD[idx]
        outs = torch.stack([pool(slots[s:s + 1], torch.ones(1, 1), torch.tensor([[s // P]]))[0] for s in range(E * P)])
        y[idx] = combine @ outs
    return y


def test_soft_moe_mixes_tokens_of_one_sequence_only():
    torch.manual_seed(0)
    D, E, P = 6, 3, 2
    router, pool = SoftRouter(D, E, slots_per_expert=P), ExpertPool(E, D, 8)
    router.weight.data.normal_(0, 1.0)
    x_TD = torch.randn(7, D)
    seq, valid = [0, 0, 0, 1, 1, 1, 1], [True, True, True, True, True, True, False]
    known = {"valid_T": torch.tensor(valid), "seq_T": torch.tensor(seq)}
    routing = router.route(x_TD, **known)
    y_TD = routing.apply(pool, x_TD)
    want = soft_reference(router, pool, x_TD, seq, valid)
    torch.testing.assert_close(y_TD[:6], want[:6], rtol=1e-5, atol=1e-5)
    # combine mass per expert sums to 1 over experts; padding takes part in no slot
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(7))
    assert routing.dispatch_TS[6].abs().max() == 0
    torch.testing.assert_close(routing.dispatch_TS[:3].sum(0), torch.ones(E * P))
    # a later token changes an earlier token's output (not causal, as documented)
    x2 = x_TD.clone()
    x2[2] += 1.0
    assert not torch.allclose(router.route(x2, **known).apply(pool, x2)[0], y_TD[0])
    assert math.isfinite(y_TD.sum().item())
