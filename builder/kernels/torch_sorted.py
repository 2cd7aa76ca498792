"""Sort-based expert dispatch in pure PyTorch: the fast CPU path, as custom ops with a hand-written backward.

The shape of scattermoe's `ParallelExperts` and torchtitan's `GroupedExperts`: sort the (token,
slot) assignments by expert once (`ops.sort_by_expert`), use the same order and counts for both
projections and for the backward, run each expert on its contiguous slice, then sum each token's
K weighted outputs. Registered through `ops.define_experts_op`, so `torch.compile` sees one
opaque op and autograd one node for the whole pool.

Choices (the measurements behind each are in BENCHMARKS.md, "Why the CPU path is built this way"):
- Per-expert `mm` on 2-D views of the stacked weights, not `F.grouped_mm` (no faster on CPU, and
  it needs aligned strides and contiguous gradients); the weights are never indexed through autograd.
- One custom op for the whole pool with a hand-written backward: the matmuls write with `out=`
  into one [A, .] buffer and the weight gradients straight into one [E, ...] tensor.
- Experts spread over single-threaded workers (`run_experts`) rather than every thread on each
  expert's small matmuls.
- The backward keeps only the pre-activation `h_AR`, recomputes the activation per expert and
  gathers the input again; everything per row happens inside the expert's task while its rows are
  in cache; the gate-weight gradient <dy, y> is computed as <dy W_out, a>, so expert outputs are
  not kept.
- Without autograd (inference) the sorted op runs only where its workers pay: a token or two take
  `few_tokens_forward`, and calls reading under WORKER_MIN_BYTES of expert weights `grouped_forward`
  (`_grouped_pays` has the measurements).

Legend: T tokens, D hidden, K slots per token, E experts, I intermediate, R = 2I gated else I,
A = T*K slots, N rows of one expert.
"""

import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.activations import ACT2FN

from moebuild.kernels.memory import empty_huge, empty_huge_like, zeros_huge_like
from moebuild.kernels.ops import define_experts_op, pool_dispatch, sort_by_expert


def expert_spans(counts_E: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert with rows, in sorted order."""
    spans, start = [], 0
    for e, count in enumerate(counts_E.tolist()):
        if count:
            spans.append((e, start, start + count))
        start += count
    return spans


def _quick_gelu_backward(grad: Tensor, x: Tensor, out: Tensor) -> Tensor:
    s = torch.sigmoid(1.702 * x)
    return torch.mul(grad, s * (1 + 1.702 * x * (1 - s)), out=out)


def _gelu_tanh_backward(grad: Tensor, x: Tensor, out: Tensor) -> Tensor:
    return torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="tanh", grad_input=out)


# d activation(x) / dx as a function of (incoming gradient, x), written into `out`, which may be
# the incoming gradient itself. Autograd cannot be used inside a custom op (it runs below the
# autograd dispatch key), so each derivative is written out; the ATen backward kernels are single
# fused passes, and their out variants spare a buffer and a copy per expert.
ACTIVATION_BACKWARD = {
    "silu": lambda grad, x, out: torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out),
    "gelu": lambda grad, x, out: torch.ops.aten.gelu_backward.grad_input(grad, x, approximate="none", grad_input=out),
    "gelu_new": _gelu_tanh_backward,
    "gelu_pytorch_tanh": _gelu_tanh_backward,
    "quick_gelu": _quick_gelu_backward,
    "relu": lambda grad, x, out: torch.mul(grad, x > 0, out=out),
}


@functools.cache
def _activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    # ACT2FN builds a new module on every lookup (~6 us), and a module call costs a few us more than
    # its forward: this runs per expert, and a decode step is mostly such overheads.
    return ACT2FN[name].forward


def activate(h_NR: Tensor, gated: bool, activation: str) -> Tensor:
    act = _activation_fn(activation)
    if not gated:
        return act(h_NR)
    gate_NI, up_NI = h_NR.chunk(2, dim=-1)
    return act(gate_NI) * up_NI


def activate_backward(h_NR: Tensor, grad_NI: Tensor, gated: bool, activation: str) -> tuple[Tensor, Tensor]:
    """(activation output recomputed from h, gradient of h)."""
    act, act_backward = _activation_fn(activation), ACTIVATION_BACKWARD[activation]
    if not gated:
        return act(h_NR), act_backward(grad_NI, h_NR, torch.empty_like(h_NR))
    gate_NI, up_NI = h_NR.chunk(2, dim=-1)
    act_NI = act(gate_NI)
    grad_NR = torch.empty_like(h_NR)
    grad_gate_NI, grad_up_NI = grad_NR.chunk(2, dim=-1)
    torch.mul(grad_NI, act_NI, out=grad_up_NI)
    act_backward(torch.mul(grad_NI, up_NI, out=grad_gate_NI), gate_NI, grad_gate_NI)
    return act_NI.mul_(up_NI), grad_NR


# One pool of single-threaded workers per intra-op thread count, made on first use and joined at
# exit. Per-call workers measured 10-15 ms slower per fwd+bwd (config A, 32 tokens: 97-109 ms
# against 85-91 ms), a thread's first torch call being slow.
_WORKERS: dict[int, ThreadPoolExecutor] = {}
# The experts go to the worker threads from this many rows in all, or, with fewer (decode), from
# this many bytes of expert weights to read (with a row or two per expert, each expert's work is
# streaming its weights once, and two threads stream twice as fast).
WORKER_MIN_ROWS, WORKER_MIN_BYTES = 64, 160 << 20


def workers_pay(rows: int, experts: int, w_in_ERD: Tensor, w_out_EDI: Tensor) -> bool:
    """Whether `run_experts` spreads `experts` experts with `rows` rows in all over its workers: on
    CPU only (GPU kernels are asynchronous already, and a worker thread would launch them outside
    the caller's stream)."""
    threads = torch.get_num_threads()
    if w_in_ERD.device.type != "cpu" or threads == 1 or experts < 2 * threads:
        return False
    expert_bytes = (math.prod(w_in_ERD.shape[1:]) + math.prod(w_out_EDI.shape[1:])) * w_in_ERD.element_size()
    return rows >= WORKER_MIN_ROWS or experts * expert_bytes >= WORKER_MIN_BYTES


def run_experts(expert: Callable[[int, int, int], None], spans: list[tuple[int, int, int]],
                w_in_ERD: Tensor, w_out_EDI: Tensor) -> None:
    """Run `expert(e, start, end)` for every span: one expert per CPU thread rather than every
    thread on each expert's small matmuls.

    Measured on the 2-core CPU with other processes on the cores (config B experts, 2048 tokens,
    forward): 2 threads inside each mm 1376-2578 ms, experts over 2 single-threaded workers
    894-1066 ms. Each matmul's parallel region ends at a barrier that waits for a preempted
    thread; the workers take experts from a queue (largest first) and never wait on each other.
    The caller's intra-op threads are set to 1 for the loop and restored after: left at 2, its
    OpenMP team spins beside the workers (config A, 32 tokens, fwd+bwd: 152 ms instead of 88).
    The loop stays plain where `workers_pay` says so: on one thread, with fewer experts than twice the threads, or with little
    work (config B, 1 token, forward: 10.1 ms with the workers, 6.6 ms without). `w_in_ERD` and
    `w_out_EDI`: the pool's weights, for their size and device.
    """
    if not workers_pay(spans[-1][2] if spans else 0, len(spans), w_in_ERD, w_out_EDI):
        for span in spans:
            expert(*span)
        return
    threads = torch.get_num_threads()
    if threads not in _WORKERS:
        _WORKERS[threads] = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
    torch.set_num_threads(1)
    try:
        largest_first = sorted(spans, key=lambda span: span[1] - span[2])
        for future in [_WORKERS[threads].submit(_without_grad, expert, *span) for span in largest_first]:
            future.result()
    finally:
        torch.set_num_threads(threads)


def _without_grad(expert: Callable[[int, int, int], None], *span: int) -> None:
    # A worker thread does not inherit the op's below-autograd dispatch state.
    with torch.no_grad():
        expert(*span)


def _linear_into(out: Tensor, x: Tensor, w_t: Tensor, b: Tensor | None) -> None:
    if b is None:
        torch.mm(x, w_t, out=out)
    else:
        torch.addmm(b, x, w_t, out=out)


def _kept_slots(order_A: Tensor, kept: int, weights_TK: Tensor, dtype: torch.dtype):
    """(slot_A, tok_A, gate_A1) of the `kept` slots in expert order: the slots, their tokens, and their
    gate weights as a column in `dtype`."""
    slot_A = order_A[:kept]
    return slot_A, slot_A // weights_TK.shape[1], weights_TK.reshape(-1)[slot_A, None].to(dtype)


def _spans_and_kept(counts_E: Tensor) -> tuple[list[tuple[int, int, int]], int]:
    spans = expert_spans(counts_E)
    return spans, spans[-1][2] if spans else 0


def sorted_forward(
    x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, w_in_ERD: Tensor, b_in_ER: Tensor | None,
    w_out_EDI: Tensor, b_out_ED: Tensor | None, gated: bool, activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, K = ids_TK.shape
    D, R = x_TD.shape[1], w_in_ERD.shape[1]
    order_A, counts_E = sort_by_expert(ids_TK, w_in_ERD.shape[0])
    spans, kept = _spans_and_kept(counts_E)
    slot_A, tok_A, gate_A1 = _kept_slots(order_A, kept, weights_TK, x_TD.dtype)
    h_AR = empty_huge((T * K, R), x_TD)
    h_AR[kept:] = 0  # dropped slots' rows: never read, zeroed to keep the op deterministic
    weighted_AD = empty_huge((kept, D), x_TD)

    def expert(e: int, start: int, end: int) -> None:
        h_NR = h_AR[start:end]
        x_ND = x_TD.index_select(0, tok_A[start:end])
        _linear_into(h_NR, x_ND, w_in_ERD[e].t(), None if b_in_ER is None else b_in_ER[e])
        a_NI = activate(h_NR, gated, activation)
        y_ND = weighted_AD[start:end]  # the down projection writes in place, then takes its gate
        _linear_into(y_ND, a_NI, w_out_EDI[e].t(), None if b_out_ED is None else b_out_ED[e])
        y_ND.mul_(gate_A1[start:end])

    run_experts(expert, spans, w_in_ERD, w_out_EDI)
    y_TD = zeros_huge_like(x_TD).index_add_(0, tok_A, weighted_AD)
    return y_TD, order_A, counts_E, h_AR, x_TD.new_empty(0, D)  # no expert outputs kept


def sorted_backward(
    grad_TD: Tensor, x_TD: Tensor, weights_TK: Tensor, w_in_ERD: Tensor, b_in_ER: Tensor | None,
    w_out_EDI: Tensor, b_out_ED: Tensor | None, order_A: Tensor, counts_E: Tensor, h_AR: Tensor,
    _y_AD: Tensor, gated: bool, activation: str,  # the 0-row y_AD of sorted_forward: nothing kept
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    D = x_TD.shape[1]
    spans, kept = _spans_and_kept(counts_E)
    slot_A, tok_A, gate_A1 = _kept_slots(order_A, kept, weights_TK, x_TD.dtype)
    dx_AD = empty_huge((kept, D), x_TD)
    dgate_A = x_TD.new_empty(kept)
    empty = [e for e, count in enumerate(counts_E.tolist()) if not count]
    dw_in, dw_out = _zeros_where_empty(w_in_ERD, empty), _zeros_where_empty(w_out_EDI, empty)
    db_in, db_out = _bias_grad(b_in_ER, empty, x_TD), _bias_grad(b_out_ED, empty, x_TD)

    def expert(e: int, start: int, end: int) -> None:
        rows, gate_N1 = tok_A[start:end], gate_A1[start:end]
        dy_ND = grad_TD.index_select(0, rows)
        da_NI = dy_ND @ w_out_EDI[e]  # of the unweighted output; the gate scales everything below
        a_NI, dh_NR = activate_backward(h_AR[start:end], da_NI, gated, activation)
        # d gate = <dy, expert output> = <dy W_out, a> (+ <dy, b_out>): no expert output kept.
        torch.linalg.vecdot(da_NI, a_NI, out=dgate_A[start:end])
        if b_out_ED is not None:
            dgate_A[start:end] += dy_ND @ b_out_ED[e]
            torch.mm(gate_N1.t(), dy_ND, out=db_out[e][None])
        dh_NR.mul_(gate_N1)
        torch.mm(dy_ND.t(), a_NI.mul_(gate_N1), out=dw_out[e])
        torch.mm(dh_NR.t(), x_TD.index_select(0, rows), out=dw_in[e])
        torch.mm(dh_NR, w_in_ERD[e], out=dx_AD[start:end])
        if b_in_ER is not None:
            torch.sum(dh_NR, dim=0, out=db_in[e])

    run_experts(expert, spans, w_in_ERD, w_out_EDI)
    dweights_A = weights_TK.new_zeros(weights_TK.numel())  # dropped slots get 0
    dweights_A[slot_A] = dgate_A.to(weights_TK.dtype)
    dx_TD = zeros_huge_like(x_TD).index_add_(0, tok_A, dx_AD)
    return dx_TD, dweights_A.view_as(weights_TK), dw_in, db_in, dw_out, db_out


def _zeros_where_empty(w_E: Tensor, empty: list[int]) -> Tensor:
    """A gradient of `w_E`, zero for the experts without rows and uninitialised for the rest, which
    the expert loop overwrites (a masked fill over the whole tensor cost 25 ms a call at config B)."""
    grad_E = empty_huge_like(w_E)
    for e in empty:
        grad_E[e].zero_()
    return grad_E


def _bias_grad(b_E: Tensor | None, empty: list[int], x_TD: Tensor) -> Tensor:
    return _zeros_where_empty(b_E, empty) if b_E is not None else x_TD.new_empty(0)


def few_tokens_forward(x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, pool) -> Tensor:
    """A few tokens without autograd (decode steps): experts grouped from the ids as Python lists.

    With a row or two per expert there is nothing for the sort to batch, and what is left is the
    per-op cost, which this path cuts to ~9 ops per expert (the sorted op, built to save tensors
    for its backward, spends ~15 per expert plus ~25 fixed). Forward, interleaved, median of 20,
    this path / the sorted op / transformers grouped_mm: config B 1 token 4.1 / 4.9 / 4.3 ms,
    2 tokens 8.7 / 9.3 / 8.7, 4 tokens 14.9 / 15.2 / 13.9, 8 tokens 27.9 / 26.4 / 24.2; config A
    1 token 5.0 / 5.8 / 5.5. From 3-4 tokens on, `grouped_forward` or the sorted op's workers are faster.
    """
    w_in, b_in, w_out, b_out = pool.stacked()
    slots: dict[int, tuple[list[int], list[float]]] = {}
    for t, (ids_K, weights_K) in enumerate(zip(ids_TK.tolist(), weights_TK.tolist())):
        for e, gate in zip(ids_K, weights_K):
            if e >= 0:  # not dropped
                rows, gates = slots.setdefault(e, ([], []))
                rows.append(t)
                gates.append(gate)
    y_TD = torch.zeros_like(x_TD)
    x_rows, y_rows = x_TD.unbind(0), y_TD.unbind(0)
    for e, (rows, gates) in slots.items():
        if len(rows) == 1:  # one vector: matrix-vector products, the gate and the sum inside addmv_
            t, gate = rows[0], gates[0]
            h_R = torch.mv(w_in[e], x_rows[t]) if b_in is None else torch.addmv(b_in[e], w_in[e], x_rows[t])
            y_rows[t].addmv_(w_out[e], activate(h_R, pool.gated, pool.activation), alpha=gate)
            if b_out is not None:
                y_rows[t].add_(b_out[e], alpha=gate)
            continue
        x_ND = x_TD[rows]
        a_NI = activate(F.linear(x_ND, w_in[e], None if b_in is None else b_in[e]), pool.gated, pool.activation)
        y_ND = F.linear(a_NI, w_out[e], None if b_out is None else b_out[e])
        y_TD.index_add_(0, torch.tensor(rows, device=x_TD.device), y_ND * y_ND.new_tensor(gates)[:, None])
    return y_TD


def grouped_forward(x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, pool) -> Tensor:
    """Inference calls whose experts are too small for the sorted op's workers (no autograd): each
    projection is one `F.grouped_mm` over the expert-sorted rows, so no Python runs per expert.

    Where the sorted op would run its experts on one thread, its per-expert Python (~15 ops each)
    costs more than the matmuls save; where its workers run, they win by streaming the weights on
    both cores. Forward, interleaved, median of 20-30, this path / the sorted op with its workers:
    config B (64 experts of 6.3 MB) 3 tokens 12.2 / 13.2 ms, 4 tokens 15.1 / 15.7, 5 tokens 17.8 /
    17.7, 6 tokens 27.2 / 24.6, 10 tokens 36.9 / 30.5; config A (8 of 34.6 MB) 3 tokens 17.5 /
    15.7, 6 tokens 35.7 / 27.4, 16 tokens 75.7 / 55.4: the crossover is at 150-200 MB of expert
    weights, whatever the expert size (`WORKER_MIN_BYTES`). On big inputs grouped_mm is no faster
    than the loop (cpu-dispatch-notes.md finding 2). Needs `grouped_fits`.
    """
    w_in, b_in, w_out, b_out = pool.stacked()
    order_A, counts_E = sort_by_expert(ids_TK, w_in.shape[0])
    offs_E = counts_E.cumsum(0, dtype=torch.int32)
    kept = int(offs_E[-1]) if len(offs_E) else 0  # no expert spans needed: one read, no per-expert loop
    if kept == 0:  # every slot dropped (or a pool without experts)
        return torch.zeros_like(x_TD)
    slot_A, tok_A, gate_A1 = _kept_slots(order_A, kept, weights_TK, x_TD.dtype)
    h_AR = F.grouped_mm(x_TD[tok_A], w_in.transpose(1, 2), offs=offs_E)
    if b_in is not None:
        h_AR += b_in.repeat_interleave(counts_E, dim=0)
    y_AD = F.grouped_mm(activate(h_AR, pool.gated, pool.activation), w_out.transpose(1, 2), offs=offs_E)
    if b_out is not None:
        y_AD += b_out.repeat_interleave(counts_E, dim=0)
    return torch.zeros_like(x_TD).index_add_(0, tok_A, y_AD.mul_(gate_A1))


def grouped_fits(x_TD: Tensor, pool) -> bool:
    """Whether `grouped_forward` runs: CPU grouped_mm wants fp32 or bf16 and row strides that are
    multiples of 16 bytes (hidden and intermediate sizes)."""
    size = x_TD.element_size()
    return (x_TD.device.type == "cpu" and x_TD.dtype in (torch.float32, torch.bfloat16)
            and x_TD.shape[1] * size % 16 == 0 and pool.intermediate_size * size % 16 == 0)


sorted_experts = define_experts_op("sorted_experts", sorted_forward, sorted_backward, keeps_expert_outputs=False)
_sorted_op_dispatch = pool_dispatch(sorted_experts)


# Without autograd, up to FEW_TOKENS tokens take few_tokens_forward; then grouped_forward, unless
# the experts the call touches are so big that streaming their weights on every core (the sorted
# op's workers) wins; whenever gradients are needed, the sorted op.
FEW_TOKENS = 2


def _grouped_pays(ids_TK: Tensor, pool) -> bool:
    """Whether grouped_forward beats the sorted op without autograd: by the bytes of expert weights
    the call reads, the one size the crossover follows. Forward, interleaved, medians of 5-7 on 2
    threads, sorted op / grouped_forward ms (experts x hidden x intermediate, weights read, tokens):
    16x512x256 (24 MB) 128 tokens 12.5 / 7.2, 512 20.3 / 16.0; 32x512x256 (48 MB) 128 17.1 / 10.9,
    2048 97 / 99; 16x1024x512 (96 MB) 512 62.9 / 58.9; 8x1024x1408 (132 MB) 512 79.7 / 91.3;
    64x1024x512 (384 MB) 128 53.4 / 60.6, 2048 688 / 1345. Decode steps cross at 150-200 MB too
    (`grouped_forward`): WORKER_MIN_BYTES."""
    w_in, _, w_out, _ = pool.stacked()
    touched = ids_TK[ids_TK >= 0].unique().numel()
    expert_bytes = (math.prod(w_in.shape[1:]) + math.prod(w_out.shape[1:])) * w_in.element_size()
    return touched * expert_bytes < WORKER_MIN_BYTES


def sorted_dispatch(x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, pool) -> Tensor:
    """The torch backend: the sorted custom op, or a lighter path for eager decode steps."""
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and x_TD.device.type != "meta":
        # The light paths read the ids on the host, and compute in the input's dtype as the op
        # does, whatever autocast says (a custom op is not autocast-aware).
        with torch.autocast(x_TD.device.type, enabled=False):
            if x_TD.shape[0] <= FEW_TOKENS:
                return few_tokens_forward(x_TD, weights_TK, ids_TK, pool)
            if grouped_fits(x_TD, pool) and _grouped_pays(ids_TK, pool):
                return grouped_forward(x_TD, weights_TK, ids_TK, pool)
    return _sorted_op_dispatch(x_TD, weights_TK, ids_TK, pool)
