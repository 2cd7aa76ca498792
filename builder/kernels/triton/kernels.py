"""Triton kernels of the expert dispatch; launched by `triton/dispatch.py`, checked against `torch_sorted.py`.

Follows scattermoe (Tan et al. 2024, "Scattered Mixture-of-Experts Implementation",
github.com/shawntan/scattermoe `kernels/ops.py`): a grouped GEMM whose rows are read through the
sorted token index, so the permutation into expert order is fused into the first projection's
loads and never materialised; and a per-expert X^T @ Y kernel for the weight gradients. The
expert-to-block table follows vLLM's `moe_align_block_size`: each expert's rows split into
BLOCK_M blocks, computed once per forward and reused by every launch.

- `grouped_mm_kernel`: Y[r] = epilogue(X[src(r)] * scale(r) @ B_e), e the expert of row r's
  block; epilogue 0 = + bias, 1 = activation (gated: act(gate) * up, the gate and up columns
  computed side by side), 2 = activation backward (reads H, writes dH and the recomputed
  activation).
- `grouped_xty_kernel`: dW[e] = L_e^T @ R_e over the rows of expert e, plus the bias gradient
  (column sums of L_e).
- `combine_kernel`: y[t] = sum_k w[t, k] * Y[pos(t, k)], the deterministic un-permute
  (no atomics: torchtitan #1974).
- `slot_dot_kernel`: d gate weight of a slot = <grad of its token, its expert output>.

fp32 dots use input_precision="ieee" (no TF32), so fp32 results match torch's default matmul.

Legend: T tokens, K slots per token, A = T*K slot rows in expert order, E experts.
"""

import triton
import triton.language as tl

# Activation ids (constexpr); names as transformers' ACT2FN.
ACTIVATION_IDS = {"silu": 0, "gelu": 1, "gelu_new": 2, "gelu_pytorch_tanh": 2, "quick_gelu": 3, "relu": 4}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:  # tanh(z) = 2 sigmoid(2z) - 1: no tanh in core triton.language
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * z)
    elif ACT == 3:
        y = x * tl.sigmoid(1.702 * x)
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        d = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 3:
        s = tl.sigmoid(1.702 * x)
        d = s + 1.702 * x * s * (1.0 - s)
    else:
        d = (x > 0).to(tl.float32)
    return d


@triton.jit
def _block_rows(block_expert, block_start, block_end, BLOCK_M: tl.constexpr):
    """(expert, row offsets, row mask) of this program's block; expert < 0 = unused block."""
    pid_b = tl.program_id(0)
    e = tl.load(block_expert + pid_b)
    start = tl.load(block_start + pid_b)
    end = tl.load(block_end + pid_b)
    rows = start + tl.arange(0, BLOCK_M)
    return e, rows, rows < end


@triton.jit
def grouped_mm_kernel(
    X, src_rows, row_scale, B, bias, Y, H,
    block_expert, block_start, block_end,
    N, KDIM, N_UP,
    stride_xm, stride_be, stride_bk, stride_bn, stride_bias_e, stride_ym, stride_hm,
    GATHER: tl.constexpr, SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, rows, row_mask = _block_rows(block_expert, block_start, block_end, BLOCK_M)
    if e < 0:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    src = tl.load(src_rows + rows, mask=row_mask, other=0) if GATHER else rows
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_ptrs = B + e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    for k0 in range(0, KDIM, BLOCK_K):
        k_mask = k0 + ks < KDIM
        x = tl.load(X + src[:, None] * stride_xm + (k0 + ks)[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b_mask = k_mask[:, None] & col_mask[None, :]
        acc += tl.dot(x, tl.load(b_ptrs + k0 * stride_bk, mask=b_mask, other=0.0), input_precision="ieee")
        if GATED and EPILOGUE == 1:
            acc_up += tl.dot(x, tl.load(b_ptrs + k0 * stride_bk + N_UP * stride_bn, mask=b_mask, other=0.0),
                             input_precision="ieee")
    if SCALE:
        acc *= tl.load(row_scale + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if EPILOGUE == 0:
        if HAS_BIAS:
            acc += tl.load(bias + e * stride_bias_e + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == 1:
        _forward_epilogue(acc, acc_up, bias, e, stride_bias_e, cols, col_mask, rows, out_mask,
                          Y, stride_ym, H, stride_hm, N_UP, HAS_BIAS, GATED, ACT)
    else:
        _backward_epilogue(acc, cols, rows, out_mask, Y, stride_ym, H, stride_hm, N_UP, GATED, ACT)


@triton.jit
def _forward_epilogue(acc, acc_up, bias, e, stride_bias_e, cols, col_mask, rows, out_mask,
                      Y, stride_ym, H, stride_hm, N_UP, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                      ACT: tl.constexpr):
    """H = the pre-activation (saved for the backward), Y = act(gate) * up, or act(h) ungated."""
    if HAS_BIAS:
        acc += tl.load(bias + e * stride_bias_e + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias + e * stride_bias_e + N_UP + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    h_ptrs = H + rows[:, None] * stride_hm + cols[None, :]
    # Round to the storage dtype first, so the activation sees exactly what the backward reloads.
    gate = acc.to(H.dtype.element_ty)
    tl.store(h_ptrs, gate, mask=out_mask)
    y = _act(gate.to(tl.float32), ACT)
    if GATED:
        up = acc_up.to(H.dtype.element_ty)
        tl.store(h_ptrs + N_UP, up, mask=out_mask)
        y = y * up.to(tl.float32)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=out_mask)


@triton.jit
def _backward_epilogue(d_act, cols, rows, out_mask, Y, stride_ym, H, stride_hm, N_UP,
                       GATED: tl.constexpr, ACT: tl.constexpr):
    """From d_act = dL/d(activation output) and the saved H, write Y = dL/dH (gate and up columns)."""
    h_ptrs = H + rows[:, None] * stride_hm + cols[None, :]
    gate = tl.load(h_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    dh_ptrs = Y + rows[:, None] * stride_ym + cols[None, :]
    if GATED:
        up = tl.load(h_ptrs + N_UP, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(dh_ptrs, (d_act * up * _act_grad(gate, ACT)).to(Y.dtype.element_ty), mask=out_mask)
        tl.store(dh_ptrs + N_UP, (d_act * _act(gate, ACT)).to(Y.dtype.element_ty), mask=out_mask)
    else:
        tl.store(dh_ptrs, (d_act * _act_grad(gate, ACT)).to(Y.dtype.element_ty), mask=out_mask)


@triton.jit
def activation_kernel(H, OUT, kept_rows, N_UP, stride_hm, stride_om,
                      GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT = act(gate) * up (or act(h)): the activation recomputed from H for the weight gradient,
    over the kept rows only (the rows of dropped slots hold no values)."""
    M = tl.load(kept_rows)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N_UP)[None, :]
    h_ptrs = H + rows[:, None] * stride_hm + cols[None, :]
    y = _act(tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32), ACT)
    if GATED:
        y = y * tl.load(h_ptrs + N_UP, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def grouped_xty_kernel(
    L, l_src, l_scale, R, r_src, DW, DB, offsets,
    P, Q, stride_lm, stride_rm, stride_we, stride_wp, stride_be,
    L_GATHER: tl.constexpr, L_SCALE: tl.constexpr, R_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """DW[e] = sum over rows r of expert e of L[r]^T R[r] ([P, Q]); DB[e] = sum of L[r] (one program per P tile)."""
    e = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = tl.load(offsets + e)
    end = tl.load(offsets + e + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        l_rows = tl.load(l_src + rows, mask=row_mask, other=0) if L_GATHER else rows
        r_rows = tl.load(r_src + rows, mask=row_mask, other=0) if R_GATHER else rows
        lt = tl.load(L + l_rows[None, :] * stride_lm + ps[:, None], mask=row_mask[None, :] & (ps < P)[:, None], other=0.0)
        if L_SCALE:
            lt = (lt.to(tl.float32) * tl.load(l_scale + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]).to(lt.dtype)
        r = tl.load(R + r_rows[:, None] * stride_rm + qs[None, :], mask=row_mask[:, None] & (qs < Q)[None, :], other=0.0)
        acc += tl.dot(lt, r, input_precision="ieee")
        if HAS_BIAS:
            bias_acc += tl.sum(lt.to(tl.float32), axis=1)
    out_mask = (ps < P)[:, None] & (qs < Q)[None, :]
    tl.store(DW + e * stride_we + ps[:, None] * stride_wp + qs[None, :], acc.to(DW.dtype.element_ty), mask=out_mask)
    if HAS_BIAS and tl.program_id(2) == 0:
        tl.store(DB + e * stride_be + ps, bias_acc.to(DB.dtype.element_ty), mask=ps < P)


@triton.jit
def combine_kernel(Y, pos, weights, OUT, D, K, stride_ym, stride_om,
                   HAS_WEIGHTS: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[t] = sum over kept slots k of weights[t, k] * Y[pos[t, k]] (pos < 0: dropped), in fp32."""
    t = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(0, K):
        p = tl.load(pos + t * K + k)
        if p >= 0:
            y = tl.load(Y + p * stride_ym + ds, mask=d_mask, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                y = y * tl.load(weights + t * K + k).to(tl.float32)
            acc += y
    tl.store(OUT + t * stride_om + ds, acc.to(OUT.dtype.element_ty), mask=d_mask)


@triton.jit
def slot_dot_kernel(G, Y, pos, DW, D, K, stride_gm, stride_ym, BLOCK_D: tl.constexpr):
    """DW[t, k] = <G[t], Y[pos[t, k]]>, 0 for a dropped slot; one program per slot."""
    slot = tl.program_id(0)
    p = tl.load(pos + slot)
    t = slot // K
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if p >= 0:
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            g = tl.load(G + t * stride_gm + ds, mask=ds < D, other=0.0).to(tl.float32)
            acc += g * tl.load(Y + p * stride_ym + ds, mask=ds < D, other=0.0).to(tl.float32)
    tl.store(DW + slot, tl.sum(acc, axis=0).to(DW.dtype.element_ty))
