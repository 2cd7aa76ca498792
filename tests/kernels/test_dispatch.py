"""Every dispatch backend against a literal per-token loop, and against each other in the backward
(the megablocks equivalence ladder: grouped == per-expert loop == per-token loop)."""

import pytest
import torch

from moebuild.kernels import torch_sorted
from moebuild.moe.dispatch import BACKENDS, get_dispatch, runs_on
from moebuild.moe.experts import ExpertPool


def per_token_loop(x_TD, weights_TK, ids_TK, pool):
    """y_t = sum over kept slots k of weights[t, k] * expert_{ids[t, k]}(x_t), one token at a time."""
    w_in = pool.gate_up_proj if pool.gated else pool.up_proj
    b_in = pool.gate_up_proj_bias if pool.gated else pool.up_proj_bias
    I = pool.intermediate_size
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[t])
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e < 0:
                continue
            h = w_in[e] @ x_TD[t] + (b_in[e] if b_in is not None else 0)
            h = pool.act_fn(h[:I]) * h[I:] if pool.gated else pool.act_fn(h)
            out = pool.down_proj[e] @ h + (pool.down_proj_bias[e] if pool.down_proj_bias is not None else 0)
            y_D = y_D + weights_TK[t, k] * out
        rows.append(y_D)
    return torch.stack(rows) if rows else torch.zeros_like(x_TD)


def random_ids(T, K, E, generator):
    """Distinct experts per token, as a top-k router gives."""
    return torch.rand(T, E, generator=generator).topk(K, dim=-1).indices


CPU_BACKENDS = sorted(name for name in BACKENDS if runs_on(name, torch.device("cpu")))

# name: (T, E, K, pool kwargs, how ids are made)
CASES = {
    "basic": (13, 4, 2, {}, "random"),
    "empty_experts": (9, 8, 2, {}, "low_experts"),
    "all_on_one_expert": (7, 5, 1, {}, "one_expert"),
    "k1": (11, 4, 1, {}, "random"),
    "e1": (6, 1, 1, {}, "random"),
    "one_token": (1, 4, 3, {}, "random"),
    "no_tokens": (0, 4, 2, {}, "random"),
    "dropped_slots": (16, 4, 2, {}, "dropped"),
    "all_dropped": (5, 4, 2, {}, "all_dropped"),
    "gated_bias": (10, 3, 2, {"bias": True}, "dropped"),
    "fc_gelu_bias": (10, 3, 2, {"gated": False, "bias": True, "activation": "gelu_new"}, "dropped"),
    "fc_relu": (8, 4, 2, {"gated": False, "activation": "relu"}, "random"),
    # >= 64 rows over >= 4 experts: the torch backend's worker-thread path (torch_sorted.run_experts)
    "many_rows": (40, 6, 2, {"bias": True}, "random"),
}


def make_case(name, seed=0):
    T, E, K, pool_kwargs, ids_kind = CASES[name]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pool = ExpertPool(E, 12, 10, **pool_kwargs)
    for p in pool.parameters():  # non-zero biases so their gradients are checked too
        p.data.normal_(0, 0.3, generator=g)
    x_TD = torch.randn(T, 12, generator=g)
    weights_TK = torch.rand(T, K, generator=g)
    ids_TK = random_ids(T, K, E, g)
    if ids_kind == "low_experts":
        ids_TK = random_ids(T, K, 3, g)  # experts 3..7 get nothing
    elif ids_kind == "one_expert":
        ids_TK = torch.full((T, K), 2)
    elif ids_kind == "dropped":
        ids_TK = ids_TK.masked_fill(torch.rand(T, K, generator=g) < 0.3, -1)
    elif ids_kind == "all_dropped":
        ids_TK = torch.full((T, K), -1)
    return pool, x_TD, weights_TK, ids_TK


def output_and_grads(backend, pool, x_TD, weights_TK, ids_TK):
    pool.zero_grad()
    x_TD = x_TD.clone().requires_grad_()
    weights_TK = weights_TK.clone().requires_grad_()
    y_TD = backend(x_TD, weights_TK, ids_TK, pool)
    if y_TD.requires_grad:  # not when every slot is dropped
        y_TD.sum().backward()  # a stride-0 incoming gradient, the case grouped_mm rejects on CPU
    leaves = {"x": x_TD, "weights": weights_TK} | dict(pool.named_parameters())
    return y_TD.detach(), {n: t.grad if t.grad is not None else torch.zeros_like(t) for n, t in leaves.items()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_backend_matches_per_token_loop(backend, case):
    pool, x_TD, weights_TK, ids_TK = make_case(case)
    want, want_grads = output_and_grads(per_token_loop, pool, x_TD, weights_TK, ids_TK)
    got, got_grads = output_and_grads(BACKENDS[backend], pool, x_TD, weights_TK, ids_TK)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_backend_matches_eager(case):
    pool, x_TD, weights_TK, ids_TK = make_case(case, seed=1)
    want, want_grads = output_and_grads(BACKENDS["eager"], pool, x_TD, weights_TK, ids_TK)
    got, got_grads = output_and_grads(BACKENDS["torch"], pool, x_TD, weights_TK, ids_TK)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("case", ["dropped_slots", "gated_bias", "fc_gelu_bias", "many_rows"])
def test_backend_in_half_precision_close_to_fp32_eager(backend, dtype, bound, case):
    """Output and every gradient in bf16 / fp16, against the fp32 eager reference on the same
    rounded inputs: within a few units of the dtype's precision, relative to the largest value
    (worst seen: bf16 0.95e-2, fp16 0.11e-2)."""
    pool, x_TD, weights_TK, ids_TK = make_case(case)
    pool, x_TD = pool.to(dtype), x_TD.to(dtype)
    got, got_grads = output_and_grads(BACKENDS[backend], pool, x_TD, weights_TK, ids_TK)
    want, want_grads = output_and_grads(BACKENDS["eager"], pool.float(), x_TD.float(), weights_TK, ids_TK)
    assert got.dtype == dtype
    pairs = {"output": (got, want)} | {name: (got_grads[name], want_grads[name]) for name in want_grads}
    for name, (g, w) in pairs.items():
        diff, scale = float((g.float() - w).abs().max()), float(w.abs().max())
        assert diff <= bound * max(scale, 1e-3), (name, diff, scale)


def test_dropped_slot_contributes_nothing_whatever_its_weight():
    pool, x_TD, weights_TK, ids_TK = make_case("dropped_slots")
    heavy_TK = weights_TK.masked_fill(ids_TK < 0, 100.0)
    for backend in map(BACKENDS.get, CPU_BACKENDS):
        torch.testing.assert_close(backend(x_TD, heavy_TK, ids_TK, pool), backend(x_TD, weights_TK, ids_TK, pool))


def test_auto_backend_and_unknown_name():
    assert get_dispatch("auto", torch.device("cpu")) is BACKENDS["torch"]
    # Triton stays opt-in until verified natively on a GPU (no GPU was lent so far).
    assert get_dispatch("auto", torch.device("cuda")) is BACKENDS["torch"]
    assert get_dispatch("triton", torch.device("cuda")) is BACKENDS["triton"]
    with pytest.raises(ValueError, match="unknown dispatch backend 'cuda_magic'"):
        get_dispatch("cuda_magic", torch.device("cpu"))


@pytest.fixture
def two_threads():
    """Which path the torch backend takes depends on the intra-op thread count (`workers_pay`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _random_pool(E, I, generator, **pool_kwargs):
    pool = ExpertPool(E, 12, I, **pool_kwargs)
    for p in pool.parameters():  # non-zero biases too
        p.data.normal_(0, 0.3, generator=generator)
    return pool


def _no_grad_matches_loop(pool, x_TD, weights_TK, ids_TK):
    """The torch backend under no_grad (the decode paths) against the per-token loop; its output."""
    want = per_token_loop(x_TD, weights_TK, ids_TK, pool).detach()
    with torch.no_grad():
        got = BACKENDS["torch"](x_TD, weights_TK, ids_TK, pool)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return got


def _record_paths(monkeypatch) -> list[str]:
    taken = []
    for name in ("few_tokens_forward", "grouped_forward", "_sorted_op_dispatch"):
        def recorded(*args, _name=name, _fn=getattr(torch_sorted, name)):
            taken.append(_name)
            return _fn(*args)

        monkeypatch.setattr(torch_sorted, name, recorded)
    return taken


@pytest.mark.parametrize("ids", [[[4, -1, 1]], [[4, -1, 1], [1, 0, 4]], [[-1, -1, -1]]])
@pytest.mark.parametrize("pool_kwargs", [{}, {"bias": True}, {"gated": False, "bias": True, "activation": "gelu_new"}])
def test_torch_backend_decode_steps_match_per_token_loop(pool_kwargs, ids, monkeypatch):
    """One or two tokens under no_grad take torch_sorted.few_tokens_forward, never the sorted op; experts
    shared by several tokens, dropped slots and an all-dropped token included."""
    taken = _record_paths(monkeypatch)
    g = torch.Generator().manual_seed(3)
    pool = _random_pool(5, 10, g, **pool_kwargs)
    ids_TK = torch.tensor(ids)
    _no_grad_matches_loop(pool, torch.randn(len(ids), 12, generator=g), torch.rand(len(ids), 3, generator=g), ids_TK)
    assert taken == ["few_tokens_forward"]


@pytest.mark.parametrize("T, dense, drop, path", [(1, True, False, None), (40, True, False, None),
                                                  (40, False, False, "grouped_forward"),
                                                  (40, False, True, "grouped_forward"), (1, False, False, "few_tokens_forward")])
def test_dense_one_expert_pool_without_autograd_runs_on_the_rows(T, dense, drop, path, monkeypatch):
    """A shared expert (a dense route: every token's one slot on expert 0, as the route vouches) runs
    as one MLP on the rows, no dispatch path taken; without the route's word the ids are dispatched."""
    taken = _record_paths(monkeypatch)
    g = torch.Generator().manual_seed(5)
    pool = _random_pool(1, 8, g, bias=True)
    x_TD, weights_TK = torch.randn(T, 12, generator=g), torch.rand(T, 1, generator=g)
    ids_TK = torch.zeros(T, 1, dtype=torch.long)
    if drop:
        ids_TK[T // 2] = -1
    want = per_token_loop(x_TD, weights_TK, ids_TK, pool).detach()
    with torch.no_grad():
        got = pool(x_TD, weights_TK, ids_TK, dense=dense)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert taken == ([] if path is None else [path])


@pytest.mark.parametrize("pool_kwargs", [{}, {"bias": True}, {"gated": False, "bias": True, "activation": "gelu_new"}])
@pytest.mark.parametrize("T, I, path", [(9, 8, "grouped_forward"), (21, 8, "grouped_forward"),
                                        (9, 10, "_sorted_op_dispatch"), (40, 8, "grouped_forward"),
                                        (2, 8, "few_tokens_forward")])
def test_torch_backend_no_grad_batches_take_the_expected_path(pool_kwargs, T, I, path, monkeypatch, two_threads):
    """No-grad batches: up to 2 tokens the Python grouping, then one grouped_mm per projection
    while the experts hold less than WORKER_MIN_BYTES of weights, however many rows (40 x 3 slots
    less ~30% dropped are more than WORKER_MIN_ROWS), where its 16-byte strides fit (I=10 fp32 rows
    are 40 bytes: they do not)."""
    taken = _record_paths(monkeypatch)
    g = torch.Generator().manual_seed(4)
    pool = _random_pool(5, I, g, **pool_kwargs)
    x_TD, weights_TK = torch.randn(T, 12, generator=g), torch.rand(T, 3, generator=g)
    ids_TK = random_ids(T, 3, 5, g).masked_fill(torch.rand(T, 3, generator=g) < 0.3, -1)
    _no_grad_matches_loop(pool, x_TD, weights_TK, ids_TK)
    assert taken == [path]


def test_decode_with_enough_expert_weights_takes_the_sorted_op_on_its_workers(monkeypatch, two_threads):
    """A few rows over big experts (config A decode): the sorted op with its worker threads, once
    the experts with rows hold WORKER_MIN_BYTES of weights between them."""
    taken = _record_paths(monkeypatch)
    on_workers = []
    on_worker = torch_sorted._without_grad
    monkeypatch.setattr(torch_sorted, "_without_grad", lambda expert, *span: on_workers.append(span) or on_worker(expert, *span))
    g = torch.Generator().manual_seed(6)
    pool = _random_pool(5, 8, g)
    x_TD, weights_TK = torch.randn(4, 12, generator=g), torch.rand(4, 2, generator=g)
    ids_TK = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]])
    big_enough = 5 * (pool.gate_up_proj[0].numel() + pool.down_proj[0].numel()) * 4  # 5 experts, fp32
    monkeypatch.setattr(torch_sorted, "WORKER_MIN_BYTES", big_enough + 1)
    _no_grad_matches_loop(pool, x_TD, weights_TK, ids_TK)
    monkeypatch.setattr(torch_sorted, "WORKER_MIN_BYTES", big_enough)
    _no_grad_matches_loop(pool, x_TD, weights_TK, ids_TK)
    assert taken == ["grouped_forward", "_sorted_op_dispatch"]
    assert sorted(e for e, _, _ in on_workers) == [0, 1, 2, 3, 4]


def test_workers_only_for_cpu_weights(two_threads):
    """Off the CPU the experts stay on the calling thread, whatever their size: a worker thread
    would launch GPU kernels outside the caller's stream."""
    w_in_ERD, w_out_EDI = torch.empty(8, 64, 32), torch.empty(8, 32, 32)
    assert torch_sorted.workers_pay(100, 8, w_in_ERD, w_out_EDI)
    assert not torch_sorted.workers_pay(100, 8, w_in_ERD.to("meta"), w_out_EDI.to("meta"))


@pytest.mark.parametrize("T", [5, 20])
@pytest.mark.parametrize("grad", [True, False])
def test_torch_backend_pool_without_experts(T, grad):
    """Every slot dropped into a pool of no experts (the decode paths, and the op): zeros."""
    pool = ExpertPool(0, 12, 8)
    x_TD = torch.randn(T, 12, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y_TD = BACKENDS["torch"](x_TD, torch.rand(T, 2), torch.full((T, 2), -1), pool)
    assert torch.equal(y_TD.detach(), torch.zeros(T, 12))


def test_grouped_decode_path_with_every_slot_dropped():
    pool = ExpertPool(3, 12, 8)
    x_TD = torch.randn(6, 12)
    with torch.no_grad():
        y_TD = torch_sorted.grouped_forward(x_TD, torch.rand(6, 2), torch.full((6, 2), -1), pool)
    assert torch.equal(y_TD, torch.zeros_like(x_TD))


@pytest.mark.parametrize("E, ids", [(5, [[0, 1], [0, 2]]), (1, [[0], [0], [0]]), (5, [[0, 1]] * 9)])
def test_decode_paths_ignore_autocast_like_the_op(E, ids):
    """Under CPU bf16 autocast the light no-grad paths compute in the input dtype, as the custom op
    (not autocast-aware) does: same values, fp32 out."""
    g = torch.Generator().manual_seed(6)
    pool = _random_pool(E, 8, g)
    ids_TK = torch.tensor(ids)
    x_TD, weights_TK = torch.randn(len(ids), 12, generator=g), torch.rand(ids_TK.shape, generator=g)
    want = per_token_loop(x_TD, weights_TK, ids_TK, pool).detach()  # outside autocast: fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = BACKENDS["torch"](x_TD, weights_TK, ids_TK, pool)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_meta_tensors_take_the_op_and_its_fake():
    pool = ExpertPool(4, 12, 8, device="meta")
    with torch.no_grad():
        for T, K in ((1, 2), (6, 2)):
            y = BACKENDS["torch"](torch.empty(T, 12, device="meta"), torch.empty(T, K, device="meta"),
                                  torch.empty(T, K, dtype=torch.long, device="meta"), pool)
            assert y.shape == (T, 12) and y.device.type == "meta"


@pytest.mark.parametrize("activation", sorted(torch_sorted.ACTIVATION_BACKWARD))
@pytest.mark.parametrize("gated", [True, False])
def test_activation_backward_matches_autograd(activation, gated):
    """The written-out derivatives the torch backend's backward uses against autograd through
    transformers' ACT2FN modules. The gated form writes each derivative over its incoming
    gradient; the plain form is also checked that way."""
    g = torch.Generator().manual_seed(0)
    # float64, and rows wider than one vector register, so the vectorised loops run on the halves
    h_NR = (torch.randn(7, 42, generator=g, dtype=torch.float64) * 3).requires_grad_()
    a_NI = torch_sorted.activate(h_NR, gated, activation)
    grad_NI = torch.randn(a_NI.shape, generator=g, dtype=torch.float64)
    (want_dh,) = torch.autograd.grad(a_NI, h_NR, grad_NI)
    with torch.no_grad():
        got_a, got_dh = torch_sorted.activate_backward(h_NR, grad_NI, gated, activation)
        torch.testing.assert_close(got_a, a_NI)
        torch.testing.assert_close(got_dh, want_dh)
        if not gated:
            in_place = grad_NI.clone()
            torch_sorted.ACTIVATION_BACKWARD[activation](in_place, h_NR, in_place)
            torch.testing.assert_close(in_place, want_dh)
