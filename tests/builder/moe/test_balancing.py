"""Balancing terms against their written-out formulas, the balanced value, and transformers."""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moebuild.moe.balancing import (
    Entropy,
    LoadBalance,
    SeqAux,
    SwitchAux,
    ZLoss,
    load_balance,
    switch_aux,
    z_loss,
)
from moebuild.moe.batch import RouteBatch
from moebuild.moe.routers.base import Routing

# 4 tokens, 3 experts, top-2.
PROBS_TE = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.1, 0.2]])
TOPK_TK = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
MASK_T = torch.tensor([True, True, False, True])


def test_switch_aux_formula():
    # counted tokens 0, 1, 3: first choices 0, 1, 0 -> f = (2/3, 1/3, 0)
    P = [(0.5 + 0.1 + 0.7) / 3, (0.3 + 0.6 + 0.1) / 3, (0.2 + 0.3 + 0.2) / 3]
    want = 3 * (2 / 3 * P[0] + 1 / 3 * P[1])
    torch.testing.assert_close(switch_aux(PROBS_TE, TOPK_TK, MASK_T), torch.tensor(want))


def test_load_balance_formula():
    # counted assignments (6): expert 0 x2, expert 1 x2, expert 2 x2 -> f = 1/3 each
    P = [(0.5 + 0.1 + 0.7) / 3, (0.3 + 0.6 + 0.1) / 3, (0.2 + 0.3 + 0.2) / 3]
    want = 3 * sum(p / 3 for p in P)
    torch.testing.assert_close(load_balance(PROBS_TE, TOPK_TK, MASK_T), torch.tensor(want))


def test_z_loss_formula():
    logits_TE = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 0.5]])
    mask_T = torch.tensor([True, True, False])
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits_TE.tolist()]
    want = (lse[0] ** 2 + lse[1] ** 2) / 2
    torch.testing.assert_close(z_loss(logits_TE, mask_T), torch.tensor(want))
    # all-zero logits score (ln E)^2
    torch.testing.assert_close(z_loss(torch.zeros(5, 3), torch.ones(5, dtype=torch.bool)), torch.tensor(math.log(3) ** 2))


@pytest.mark.parametrize("fn", [switch_aux, load_balance])
def test_balanced_router_scores_one(fn):
    E, K = 4, 2
    probs_TE = torch.full((8, E), 1 / E)
    topk_TK = torch.tensor([[t % E, (t + 1) % E] for t in range(8)])
    torch.testing.assert_close(fn(probs_TE, topk_TK[:, :K], torch.ones(8, dtype=torch.bool)), torch.tensor(1.0))


@pytest.mark.parametrize("fn", [switch_aux, load_balance])
def test_collapsed_router_scores_E(fn):
    E = 4
    probs_TE = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(6, E)
    topk_TK = torch.tensor([[0]] * 6)
    torch.testing.assert_close(fn(probs_TE, topk_TK, torch.ones(6, dtype=torch.bool)), torch.tensor(float(E)))


@pytest.mark.parametrize("term", [SwitchAux, LoadBalance, SeqAux, Entropy, ZLoss], ids=lambda t: t.name)
def test_no_counted_token_gives_zero_not_nan(term):
    routing = Routing(PROBS_TE.gather(1, TOPK_TK), TOPK_TK, TOPK_TK, PROBS_TE.log(), PROBS_TE)
    batch = RouteBatch.of(torch.zeros(4, 1), seq_T=torch.tensor([0, 0, 1, 1]))
    assert term(1.0).value(routing, torch.zeros(4, dtype=torch.bool), batch).item() == 0.0


@pytest.mark.parametrize("with_mask", [False, True])
def test_load_balance_is_transformers_mixtral_loss_over_k(with_mask):
    """transformers divides the top-k counts by the token count, not by tokens * K."""
    torch.manual_seed(0)
    B, S, E, K = 3, 7, 6, 2
    logits_TE = torch.randn(B * S, E)
    attention_mask_BS = torch.ones(B, S, dtype=torch.long)
    if with_mask:
        attention_mask_BS[0, 5:] = 0
        attention_mask_BS[2, :3] = 0
    probs_TE = logits_TE.softmax(-1)
    topk_TK = probs_TE.topk(K, dim=-1).indices
    ours = load_balance(probs_TE, topk_TK, attention_mask_BS.reshape(-1).bool())
    theirs = load_balancing_loss_func((logits_TE,), E, K, attention_mask_BS if with_mask else None)
    torch.testing.assert_close(K * ours, theirs)


def test_gradient_flows_through_the_mean_probabilities_only():
    logits_TE = torch.randn(10, 4, requires_grad=True)
    probs_TE = logits_TE.softmax(-1)
    loss = load_balance(probs_TE, probs_TE.topk(2, dim=-1).indices, torch.ones(10, dtype=torch.bool))
    loss.backward()
    assert logits_TE.grad.abs().sum() > 0


def test_seq_aux_formula_per_sequence_then_averaged():
    from moebuild.moe.balancing import seq_aux

    seq_T = torch.tensor([0, 0, 1, 1])
    # sequence 0: tokens 0, 1 (both counted); sequence 1: token 3 only (token 2 masked)
    # seq 0: assignments e0, e1, e1, e2 -> f = 3 * (1/4, 2/4, 1/4); P = mean of rows 0, 1
    P0 = [(0.5 + 0.1) / 2, (0.3 + 0.6) / 2, (0.2 + 0.3) / 2]
    l0 = sum(f * p for f, p in zip([3 / 4, 6 / 4, 3 / 4], P0))
    # seq 1: token 3 picks e0, e2 -> f = 3 * (1/2, 0, 1/2); P = row 3
    l1 = sum(f * p for f, p in zip([3 / 2, 0.0, 3 / 2], [0.7, 0.1, 0.2]))
    torch.testing.assert_close(seq_aux(PROBS_TE, TOPK_TK, MASK_T, seq_T, 2), torch.tensor((l0 + l1) / 2))
    # balanced: every sequence uniform scores and even counts -> 1.0
    uniform = torch.full((6, 3), 1 / 3)
    even = torch.tensor([[0, 1], [2, 0], [1, 2]] * 2)
    ones = torch.ones(6, dtype=torch.bool)
    torch.testing.assert_close(seq_aux(uniform, even, ones, torch.tensor([0, 0, 0, 1, 1, 1]), 2), torch.tensor(1.0))


def test_seq_aux_normalises_sigmoid_scores():
    from moebuild.moe.balancing import seq_aux

    sig_TE = torch.tensor([[0.9, 0.9, 0.2], [0.5, 0.1, 0.4]])
    ids_TK = torch.tensor([[0], [2]])
    ones = torch.ones(2, dtype=torch.bool)
    norm = sig_TE / sig_TE.sum(-1, keepdim=True)
    want = sum(f * p for f, p in zip([1.5, 0.0, 1.5], norm.mean(0).tolist()))
    torch.testing.assert_close(seq_aux(sig_TE, ids_TK, ones, torch.zeros(2, dtype=torch.long), 1), torch.tensor(want))


def test_entropy_formula():
    from moebuild.moe.balancing import entropy

    h = [-sum(p * math.log(p) for p in row) for row in PROBS_TE.tolist()]
    want = (h[0] + h[1] + h[3]) / 3
    torch.testing.assert_close(entropy(PROBS_TE, MASK_T), torch.tensor(want))
    torch.testing.assert_close(entropy(torch.full((2, 4), 0.25), torch.ones(2, dtype=torch.bool)), torch.tensor(math.log(4)))


def test_variable_k_counts_only_filled_slots():
    ids_TK = torch.tensor([[0, -1, -1], [1, 2, -1]])
    probs_TE = torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.5, 0.3]])
    # 3 filled assignments: f = (1/3, 1/3, 1/3)
    want = 3 * sum(p / 3 for p in probs_TE.mean(0).tolist())
    torch.testing.assert_close(load_balance(probs_TE, ids_TK, torch.ones(2, dtype=torch.bool)), torch.tensor(want))
