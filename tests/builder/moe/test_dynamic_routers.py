"""threshold (top-p) and dynamic_topk (LTDR) on hand-made logits (identity router weight)."""

import pytest
import torch

from moebuild.moe.routers.dynamic import DynamicTopKRouter, ThresholdRouter


def identity(cls, E, *args, **kwargs):
    router = cls(E, E, *args, **kwargs)
    router.weight.data = torch.eye(E)
    return router


def test_threshold_takes_the_smallest_set_reaching_p():
    probs_TE = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.4, 0.4, 0.1, 0.1]])
    router = identity(ThresholdRouter, 4, 0.7, 3)
    routing = router.route(probs_TE.log())  # softmax(log p) = p
    # t0: .5 < .7, .8 >= .7 -> 2 experts; t1: .7 >= .7 -> 1; t2: capped at max_experts 3; t3: .4, .8 -> 2
    assert (routing.ids_TK >= 0).sum(-1).tolist() == [2, 1, 3, 2]
    assert routing.ids_TK[0].tolist() == [0, 1, -1]
    torch.testing.assert_close(routing.weights_TK[0], torch.tensor([0.5, 0.3, 0.0]))
    normalised = identity(ThresholdRouter, 4, 0.7, 3, normalize=True).route(probs_TE.log())
    torch.testing.assert_close(normalised.weights_TK[0], torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0]))
    assert torch.equal(routing.topk_ids_TK, routing.ids_TK)  # nothing is dropped, slots are empty
    with pytest.raises(ValueError, match="max_experts"):
        ThresholdRouter(4, 4, 0.5, 5)


def test_dynamic_topk_gives_tail_tokens_more_experts():
    probs_TE = torch.tensor([
        [0.97, 0.01, 0.01, 0.01],  # very peaked: highest variance -> tail
        [0.4, 0.3, 0.2, 0.1],
        [0.25, 0.25, 0.25, 0.25],
        [0.3, 0.3, 0.2, 0.2],
        [0.05, 0.05, 0.05, 0.85],  # padding: excluded from the mean and never a tail
    ])
    router = identity(DynamicTopKRouter, 4, 2, 4, normalize=True)
    routing = router.route(probs_TE.log(), valid_T=torch.tensor([True, True, True, True, False]))
    rpv = probs_TE.var(dim=-1, unbiased=False)
    mean = rpv[:4].mean()
    assert rpv[0] > mean and (rpv[1:4] < mean).all() and rpv[4] > mean
    assert routing.tail_T.tolist() == [True, False, False, False, False]
    assert (routing.ids_TK >= 0).sum(-1).tolist() == [4, 2, 2, 2, 2]
    assert routing.ids_TK[1].tolist() == [0, 1, -1, -1]
    torch.testing.assert_close(routing.weights_TK[1], torch.tensor([0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0]))
    torch.testing.assert_close(routing.weights_TK[0].sum(), torch.tensor(1.0))
    # the same holds in eval: LTDR routes dynamically at inference
    assert torch.equal(router.eval().route(probs_TE.log(), valid_T=torch.tensor([True, True, True, True, False])).ids_TK, routing.ids_TK)
    with pytest.raises(ValueError, match="tail_top_k"):
        DynamicTopKRouter(4, 4, 3, 2)
