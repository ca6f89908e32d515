"""Triton kernels for ``metamixer::mixed_kd_loss`` (DESIGN.md section 2.1) and its backward.

What they compute, per row b of K peers' logits z_k = Z[k, b, :] (C classes), with
s_k = softmax(z_k), p_k = softmax(z_k / T), lse1_k = logsumexp(z_k), lseT_k = logsumexp(z_k / T):

    ce_b[k] = sum_m W[b,m] ((1 - eps) (lse1_k - z_k[L[b,m]]) + eps (lse1_k - mean_c z_k))
              (the eps term only when eps > 0)
    pairwise: kd_b[k] = T^2/(K-1) sum_{j != k} KL(p_j || p_k), with
              KL(p_j || p_k) = sum_c p_j,c (z_j,c - z_k,c) / T - (lseT_j - lseT_k)
    ensemble: E_k = sum_{j: A[k,j] != 0} A[k,j] z_j,  q_k = softmax(E_k / T),
              kd_b[k] = T^2 (sum_c q_k,c (E_k,c - z_k,c) / T - (lseE_k - lseT_k))
    ce[k] = mean_b ce_b[k], kd[k] = mean_b kd_b[k]; every term with p_j,c = 0 (q_k,c = 0) is
    skipped, so a -inf (masked) logit gives 0 log 0 = 0; a NaN logit gives NaN.

Forward: one pass over Z. Each row's K peers are one [K_PAD, BLOCK_C] tile per chunk of
classes, reduced with an online softmax (flash-attention style running max and rescaled sums):
per peer the max, sum exp(z - m), sum exp((z - m)/T); pairwise the K x K sums
U[j,k] = sum_c exp(d_j,c/T) (d_j,c - d_k,c), d = z - m (each peer's running max); ensemble the
running max/sum of E/T and V[k] = sum_c exp(dE_k,c/T) (dE_k,c - d_k,c), dE = E - mE. Then
KL(p_j || p_k) = U[j,k]/(T S_j) - log(S_j/S_k) (S = sum exp(d/T)) and the ensemble's
V[k]/(T SE_k) - log(SE_k/S_k): the (m_j - m_k)/T of lseT_j - lseT_k cancels the one inside the
sums exactly and is never formed, so a per-peer constant offset of the logits (to which softmax
is blind) costs no precision. When a running max moves, every old term's bracket moves by the
same constant: U += (dm_j - dm_k) S_j (V likewise) besides the usual exp rescaling.
Label logits are gathered (M loads).
When C fits one chunk, ROWS rows share a program (packed); otherwise one row per program walks
the chunks. Writes per-row losses [K, B] x 2 (averaged by the launcher) and row_stats [K, B, 3]
= (lse1, lseT, lseE or 0), float64 for every logits dtype: each is summed in float64 from the
exact running max and the small ACC log-sum (an fp32 lse ~ 1000 would be rounded to ulp(1000)).
Bytes: reads K*B*C*sizeof(Z) + B*M*(8 + sizeof(W)); writes 2*K*B*sizeof(out) + 3*K*B*8.

Backward: dZ[k,b,c] for upstream g_ce[k], g_kd[k], rebuilt from row_stats:
    g_ce/B (Wsum s_k,c - (1-eps) sum_m W_m [c = L_m] - eps Wsum / C)
  + pairwise: T g_kd[k] / (B (K-1)) (K p_k,c - sum_j p_j,c)
      not detached, + T/(B (K-1)) p_k,c (D_k,c - sum_c' p_k,c' D_k,c'),
      D_k,c = sum_i g_kd[i] (log p_k,c - log p_i,c)
  + ensemble: T g_kd[k] / B (p_k,c - q_k,c)
      not detached, + T/B sum_i A[i,k] g_kd[i] q_i,c (log q_i,c - log p_i,c - KL_i)
The softmaxes are rebuilt around a per-(peer, row) ACC anchor a = lse1 (see _row_anchors):
log s = (z - a) - r1, log p = (z - a)/T - rT, log q = sum_j A[k,j] (z_j - a_j)/T - rE, with the
small residuals r taken from the float64 stats in float64, so no large lse is subtracted from a
large logit in fp32 (logits ~ 1000 or T = 1e-3 stay within fp32 rounding of the reference).
Detached: one pass over Z: reads K*B*C elements of Z and 3*K*B row stats, writes K*B*C
elements of dZ. Not detached, the per-row scalars sum_c p D (pairwise) / KL_i (ensemble) need
the whole row first, so Z is read twice (for a row that fits one chunk, the second read is of
data the same program has just read).

Accumulation: float32 for fp16/bf16/fp32 logits, float64 for fp64 logits (so gradcheck is
accurate); the gradient is stored in the logits' dtype. T and eps travel as two float32 halves
(hi + lo) so the fp64 path sees them to double precision.
K separate [B, C] tensors are addressed through per-peer element offsets from the first
peer's pointer (K <= 8 scalar arguments): no stacking copy, no host sync.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

from metamixer_fast._checks import check_mixed_kd_loss_values, check_peer_matrix_values

from ._flag import assert_ok, ok_flag

try:  # the package must import without triton; the kernels below need it
    import triton
    import triton.language as tl

    from ._cast import cast_out, soft_bf16
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

MAX_PEERS = 8

__all__ = ["MAX_PEERS", "launch_config", "mixed_kd_loss_backward", "mixed_kd_loss_forward"]


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# ------------------------------------------------------------------------------ device helpers

@_jit
def _peer_offsets(kk, o0, o1, o2, o3, o4, o5, o6, o7):
    """[K_PAD] int64 element offsets of each peer's logits from the first peer's pointer."""
    off = tl.where(kk == 0, o0, 0).to(tl.int64)
    off += tl.where(kk == 1, o1, 0).to(tl.int64)
    off += tl.where(kk == 2, o2, 0).to(tl.int64)
    off += tl.where(kk == 3, o3, 0).to(tl.int64)
    off += tl.where(kk == 4, o4, 0).to(tl.int64)
    off += tl.where(kk == 5, o5, 0).to(tl.int64)
    off += tl.where(kk == 6, o6, 0).to(tl.int64)
    off += tl.where(kk == 7, o7, 0).to(tl.int64)
    return off


@_jit
def _split_scalar(hi, lo, ACC: tl.constexpr):
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@_jit
def _load_tile(base, cols, kmask, C, stride_c, ACC: tl.constexpr):
    """[K_PAD, BLOCK_C] logits of one row (masked peers/classes read as -inf)."""
    cmask = cols < C
    mask = kmask[:, None] & cmask[None, :]
    z = tl.load(base[:, None] + cols[None, :].to(tl.int64) * stride_c, mask=mask,
                other=float("-inf"))
    return z.to(ACC), mask, cmask


@_jit
def _ensemble_logits(a2, z, cmask):
    """E[k, c] = sum_{j: A[k,j] != 0} A[k,j] z[j, c]; -inf outside the C classes."""
    terms = tl.where(a2[:, :, None] != 0, a2[:, :, None] * z[None, :, :], 0.0)
    e = tl.sum(terms, axis=1)
    return tl.where(cmask[None, :], e, float("-inf"))


@_jit
def _weight_sum_bad(wsum, w_ptr, M):
    """|wsum - 1| > max(1e-3, M eps(weights' dtype)): the rule of _checks.weight_sum_tolerance
    (which derives it), so a row normalised in bf16 (off by up to ~0.008) passes here as on the
    other backends. The dtype is the pointer's, known when the kernel is compiled: no argument."""
    if w_ptr.dtype.element_ty == tl.bfloat16:
        eps = 0.0078125  # 2^-7
    elif w_ptr.dtype.element_ty == tl.float16:
        eps = 0.0009765625  # 2^-10
    elif w_ptr.dtype.element_ty == tl.float32:
        eps = 1.1920928955078125e-07  # 2^-23
    else:
        eps = 2.220446049250313e-16  # 2^-52
    off = tl.abs(wsum - 1)
    return (off > 1e-3) & (off > M * eps)


@_jit
def _safe_max(m):
    """The running max, with -inf (nothing seen yet / padded peer) replaced by 0 for exponents."""
    return tl.where(m == float("-inf"), 0.0, m)


# ------------------------------------------------------------------------------------ forward

@_jit
def _mixed_kd_loss_fwd_kernel(
    z_ptr, o0, o1, o2, o3, o4, o5, o6, o7, stride_b, stride_c,
    lab_ptr, lab_sb, lab_sm, w_ptr, w_sb, w_sm, M,
    a_ptr, stats_ptr, ce_ptr, kd_ptr, ok_ptr,
    B, C, t_hi, t_lo, eps_hi, eps_lo,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ENSEMBLE: tl.constexpr, HAS_EPS: tl.constexpr, ACC: tl.constexpr,
):
    """ok_ptr: the value-check flag (kernels/_flag.py), set to 0 for a row with a label
    outside [0, C), a weight negative or not finite, or weights not summing to 1."""
    pid = tl.program_id(0)
    t = _split_scalar(t_hi, t_lo, ACC)
    eps = _split_scalar(eps_hi, eps_lo, ACC)
    kk = tl.arange(0, K_PAD)
    kmask = kk < K
    cc = tl.arange(0, BLOCK_C)
    offs = _peer_offsets(kk, o0, o1, o2, o3, o4, o5, o6, o7)
    pair = kmask[:, None] & kmask[None, :] & (kk[:, None] != kk[None, :])
    if ENSEMBLE:
        a2 = tl.load(a_ptr + kk[:, None] * K + kk[None, :], mask=kmask[:, None] & kmask[None, :],
                     other=0.0).to(ACC)
    else:
        a2 = tl.zeros([K_PAD, K_PAD], ACC)
    for r in range(ROWS):
        row = pid * ROWS + r
        if row < B:
            base = z_ptr + offs + row.to(tl.int64) * stride_b
            m = tl.full([K_PAD], float("-inf"), ACC)
            s1 = tl.zeros([K_PAD], ACC)
            st = tl.zeros([K_PAD], ACC)
            zsum = tl.zeros([K_PAD], ACC)
            u = tl.zeros([K_PAD, K_PAD], ACC)
            me = tl.full([K_PAD], float("-inf"), ACC)
            se = tl.zeros([K_PAD], ACC)
            v = tl.zeros([K_PAD], ACC)
            for c0 in range(0, C, BLOCK_C):
                z, mask, cmask = _load_tile(base, c0 + cc, kmask, C, stride_c, ACC)
                m_new = tl.maximum(m, tl.max(z, axis=1))
                ms = _safe_max(m_new)
                # dm = m_old - m_new (<= 0): every old bracket (d_j - d_k) of U (V) moves by
                # dm_j - dm_k when the maxima move; where m_old = -inf the old sums are 0.
                dm = _safe_max(m) - ms
                d = z - ms[:, None]
                et = tl.exp(d / t)
                s1 = s1 * tl.exp(m - ms) + tl.sum(tl.exp(d), axis=1)
                st_old = st * tl.exp((m - ms) / t)  # the old S_T, rescaled to the new max
                st = st_old + tl.sum(et, axis=1)
                if HAS_EPS:
                    zsum += tl.sum(tl.where(mask, z, 0.0), axis=1)
                if ENSEMBLE:
                    # E from d = z - m plus sum_j A[k,j] m_j: z is dead after d (registers).
                    em = tl.sum(tl.where(a2 != 0, a2 * ms[None, :], 0.0), axis=1)
                    e = _ensemble_logits(a2, d, cmask) + em[:, None]
                    me_new = tl.maximum(me, tl.max(e, axis=1))
                    mes = _safe_max(me_new)
                    dme = _safe_max(me) - mes
                    de = e - mes[:, None]
                    ee = tl.exp(de / t)
                    se_old = se * tl.exp((me - mes) / t)
                    se = se_old + tl.sum(ee, axis=1)
                    # V[k] = sum_c exp(dE_k,c / T) (dE_k,c - d_k,c), dE = E - mE, d = z - m.
                    v = (v * tl.exp((me - mes) / t) + (dme - dm) * se_old
                         + tl.sum(tl.where(ee > 0, ee * (de - d), 0.0), axis=1))
                    me = me_new
                else:
                    # U[j, k] = sum_c exp(d_j,c / T) (d_j,c - d_k,c), d = z - (running max),
                    # zero where p_j = 0: the peers' maxima (offsets) never enter it.
                    ej = et[:, None, :]
                    du = tl.where(ej > 0, ej * (d[:, None, :] - d[None, :, :]), 0.0)
                    u = (u * tl.exp((m - ms) / t)[:, None]
                         + (dm[:, None] - dm[None, :]) * st_old[:, None] + tl.sum(du, axis=2))
                m = m_new
            ms = _safe_max(m)
            # The row stats leave in float64, summed there from the exact max and the small
            # log-sum: an ACC sum would round lse ~ 1000 to ulp(1000) (kernel docstring).
            t64 = _split_scalar(t_hi, t_lo, tl.float64)
            lse1 = ms.to(tl.float64) + tl.log(s1).to(tl.float64)
            lset = ms.to(tl.float64) / t64 + tl.log(st).to(tl.float64)
            # Cross-entropy from M gathered label logits.
            ce = tl.zeros([K_PAD], ACC)
            wsum = tl.zeros([], ACC)
            nbad = tl.zeros([], tl.int32)
            for i in range(M):
                lab = tl.load(lab_ptr + row * lab_sb + i * lab_sm)
                w = tl.load(w_ptr + row * w_sb + i * w_sm).to(ACC)
                lab_ok = (lab >= 0) & (lab < C)
                nbad += (~(lab_ok & (w >= 0) & (w < float("inf")))).to(tl.int32)
                wsum += w
                # a label out of range reads class 0 instead (the flag reports it)
                zl = tl.load(base + tl.where(lab_ok, lab, 0) * stride_c, mask=kmask,
                             other=0.0).to(ACC)
                # (max - z) + log(sum) keeps large common offsets of the logits out of the
                # rounding of lse1 - z.
                term = (ms - zl) + tl.log(s1)
                if HAS_EPS:
                    term = (1 - eps) * term + eps * ((ms - zsum / C) + tl.log(s1))
                ce += tl.where(w != 0, w * term, 0.0)  # 0 log 0 = 0: zero weight, masked class
            nbad += _weight_sum_bad(wsum, w_ptr, M).to(tl.int32)
            if nbad > 0:
                tl.store(ok_ptr, 0)
            # The KLs in max-relative coordinates: the (m_j - m_k) / T of the lse difference
            # cancels the one inside U (V) exactly, so it is never formed (a per-peer offset of
            # the logits would otherwise cancel in float arithmetic, losing precision).
            if ENSEMBLE:
                lsee = _safe_max(me).to(tl.float64) / t64 + tl.log(se).to(tl.float64)
                kl = v / (t * se) - tl.log(se / st)
                kd = t * t * kl
            else:
                lsee = tl.zeros([K_PAD], tl.float64)
                # KL(p_j || p_k) = U[j,k] / (T S_j) - log(S_j / S_k), j along axis 0 (one log of
                # the ratio: log S_j - log S_k would add two roundings of log S ~ log C).
                kl = u / (t * st)[:, None] - tl.log(st[:, None] / st[None, :])
                kd = t * t / (K - 1) * tl.sum(tl.where(pair, kl, 0.0), axis=0)
            out = kk * B + row
            tl.store(stats_ptr + out * 3, lse1, mask=kmask)
            tl.store(stats_ptr + out * 3 + 1, lset, mask=kmask)
            tl.store(stats_ptr + out * 3 + 2, lsee, mask=kmask)
            tl.store(ce_ptr + out, ce, mask=kmask)
            tl.store(kd_ptr + out, kd, mask=kmask)


# ----------------------------------------------------------------------------------- backward

@_jit
def _row_anchors(sp, kmask, a2, t64, inv_t64, ENSEMBLE: tl.constexpr, ACC: tl.constexpr):
    """(a, r1, rt, re) [K_PAD] of one row from its float64 stats (lse1, lseT, lseE): an ACC
    anchor a = lse1 near the logits and small residuals taken in float64, then rounded:
    r1 = lse1 - a, rt = lseT - a / T and re = lseE - sum_j A[k,j] a_j / T, so that with
    zd = z - a (exact-ish, small)
        log s = zd - r1,   log p = zd / T - rt,   log q = sum_j A[k,j] zd_j / T - re
    and no large lse is subtracted from a large z in ACC (an fp32 lse ~ 1000 alone carries
    ulp(1000) = 6e-5 into every softmax). Where lse1 is not finite the anchor is 0: the old
    unanchored forms, NaN/inf alike."""
    lse1 = tl.load(sp, mask=kmask, other=0.0).to(tl.float64)
    lset = tl.load(sp + 1, mask=kmask, other=0.0).to(tl.float64)
    a = tl.where(tl.abs(lse1) < float("inf"), lse1, 0.0).to(ACC)
    a64 = a.to(tl.float64)
    if ENSEMBLE:
        lsee = tl.load(sp + 2, mask=kmask, other=0.0).to(tl.float64)
        ea = tl.sum(a2.to(tl.float64) * a64[None, :], axis=1)  # the anchors are finite
        re = (lsee - ea * inv_t64).to(ACC)
    else:
        re = tl.zeros([a.shape[0]], ACC)
    return a, (lse1 - a64).to(ACC), (lset - a64 * inv_t64).to(ACC), re


@_jit
def _pairwise_d(lp, gkd, kmask):
    """D[k, c] = sum_i g_kd[i] (log p_k,c - log p_i,c) (masked peers contribute 0)."""
    gsum = tl.sum(gkd, axis=0)
    lsum = tl.sum(tl.where(kmask[:, None], gkd[:, None] * lp, 0.0), axis=0)
    return gsum * lp - lsum[None, :]


@_jit
def _ensemble_q(a2, zd, cmask, re, lp, t):
    """(q, log q - log p) of the ensemble targets for one tile, from the anchored logits zd."""
    lq = _ensemble_logits(a2, zd, cmask) / t - re[:, None]
    return tl.exp(lq), lq - lp


@_jit
def _mixed_kd_loss_bwd_kernel(
    gce_ptr, gce_s, gkd_ptr, gkd_s,
    z_ptr, o0, o1, o2, o3, o4, o5, o6, o7, stride_b, stride_c,
    dz_ptr, d0, d1, d2, d3, d4, d5, d6, d7, dstride_b, dstride_c,
    lab_ptr, lab_sb, lab_sm, w_ptr, w_sb, w_sm, M,
    a_ptr, stats_ptr,
    B, C, t_hi, t_lo, eps_hi, eps_lo,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    ENSEMBLE: tl.constexpr, DETACH: tl.constexpr, ACC: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    t = _split_scalar(t_hi, t_lo, ACC)
    t64 = _split_scalar(t_hi, t_lo, tl.float64)
    inv_t64 = 1.0 / t64
    eps = _split_scalar(eps_hi, eps_lo, ACC)
    kk = tl.arange(0, K_PAD)
    kmask = kk < K
    cc = tl.arange(0, BLOCK_C)
    offs = _peer_offsets(kk, o0, o1, o2, o3, o4, o5, o6, o7)
    doffs = _peer_offsets(kk, d0, d1, d2, d3, d4, d5, d6, d7)
    gce = tl.load(gce_ptr + kk * gce_s, mask=kmask, other=0.0).to(ACC)
    gkd = tl.load(gkd_ptr + kk * gkd_s, mask=kmask, other=0.0).to(ACC)
    if ENSEMBLE:
        a2 = tl.load(a_ptr + kk[:, None] * K + kk[None, :], mask=kmask[:, None] & kmask[None, :],
                     other=0.0).to(ACC)
        kscale = gkd * t / B
    else:
        a2 = tl.zeros([K_PAD, K_PAD], ACC)
        kscale = gkd * t / (B * (K - 1))
    cscale = gce / B
    for r in range(ROWS):
        row = pid * ROWS + r
        if row < B:
            base = z_ptr + offs + row.to(tl.int64) * stride_b
            dbase = dz_ptr + doffs + row.to(tl.int64) * dstride_b
            anc, r1, rt, re = _row_anchors(stats_ptr + (kk * B + row) * 3, kmask, a2, t64,
                                           inv_t64, ENSEMBLE, ACC)
            wsum = tl.zeros([], ACC)
            for i in range(M):
                wsum += tl.load(w_ptr + row * w_sb + i * w_sm).to(ACC)
            # Not detached: the per-row scalars of the target-side gradient need the whole row.
            rowdot = tl.zeros([K_PAD], ACC)
            if not DETACH:
                for c0 in range(0, C, BLOCK_C):
                    z, mask, cmask = _load_tile(base, c0 + cc, kmask, C, stride_c, ACC)
                    zd = z - anc[:, None]
                    lp = zd / t - rt[:, None]
                    if ENSEMBLE:
                        q, lqp = _ensemble_q(a2, zd, cmask, re, lp, t)
                        rowdot += tl.sum(tl.where(q > 0, q * lqp, 0.0), axis=1)
                    else:
                        p = tl.exp(lp)
                        dd = _pairwise_d(lp, gkd, kmask)
                        rowdot += tl.sum(tl.where(p > 0, p * dd, 0.0), axis=1)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cc
                z, mask, cmask = _load_tile(base, cols, kmask, C, stride_c, ACC)
                zd = z - anc[:, None]
                s = tl.exp(zd - r1[:, None])
                lp = zd / t - rt[:, None]
                p = tl.exp(lp)
                onehot = tl.zeros([BLOCK_C], ACC)
                for i in range(M):
                    lab = tl.load(lab_ptr + row * lab_sb + i * lab_sm)
                    w = tl.load(w_ptr + row * w_sb + i * w_sm).to(ACC)
                    onehot += tl.where(cols == lab, w, 0.0)
                g = cscale[:, None] * (wsum * s - (1 - eps) * onehot[None, :] - eps * wsum / C)
                if ENSEMBLE:
                    q, lqp = _ensemble_q(a2, zd, cmask, re, lp, t)
                    g += kscale[:, None] * (p - q)
                    if not DETACH:
                        f = tl.where(kmask[:, None] & (q > 0),
                                     gkd[:, None] * q * (lqp - rowdot[:, None]), 0.0)
                        back = tl.where(a2[:, :, None] != 0, a2[:, :, None] * f[:, None, :], 0.0)
                        g += (t / B) * tl.sum(back, axis=0)
                else:
                    g += kscale[:, None] * (K * p - tl.sum(p, axis=0)[None, :])
                    if not DETACH:
                        dd = _pairwise_d(lp, gkd, kmask)
                        g += (t / (B * (K - 1))) * tl.where(p > 0, p * (dd - rowdot[:, None]), 0.0)
                tl.store(dbase[:, None] + cols[None, :].to(tl.int64) * dstride_c,
                         cast_out(g, dz_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


# ----------------------------------------------------------------------------------- launchers

def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def launch_config(k: int, c: int, ensemble: bool, backward: bool) -> tuple[int, int, int, int]:
    """(K_PAD, BLOCK_C, ROWS, num_warps) for K peers and C classes.

    The largest live tensor decides: the forward holds a [K_PAD, K_PAD, BLOCK_C] product (the
    pairwise U sums or the ensemble mixing), as does the ensemble backward; the pairwise
    backward only [K_PAD, BLOCK_C] tiles. Capping it keeps registers free of spills (see
    tests/test_triton_aot.py). When the whole row fits one chunk, ROWS rows share a program so
    small C still gives each program a few thousand elements.
    """
    k_pad = max(2, _next_pow2(k))
    cube = ensemble or not backward
    cap = 8192 // (k_pad * k_pad) if cube else 4096 // k_pad
    c_pow = max(16, _next_pow2(c))
    block_c = min(c_pow, cap)
    rows = max(1, min(16, cap // c_pow)) if c_pow <= cap else 1
    live = k_pad * block_c * (k_pad if cube else 1)
    return k_pad, block_c, rows, 8 if live >= 4096 else 4


def _split(x: float) -> tuple[float, float]:
    """x as float32 hi + lo, so the float64 kernels see it to double precision."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


def _masked_lanes_quiet():
    """Under TRITON_INTERPRET=1 the kernels run on numpy, which warns about the inf - inf and
    0 / 0 its masked-out lanes (padded peers and classes) compute before ``tl.where`` drops them;
    on a GPU those lanes cost nothing and say nothing. Silence exactly that, only there."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(invalid="ignore", divide="ignore", over="ignore")


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _peers(logits: Sequence[Tensor]) -> tuple[list[Tensor], list[int], int, int]:
    """(tensors to keep alive, per-peer element offsets from the first one's pointer, stride_b,
    stride_c): K peers addressed from one base pointer, without stacking them.

    Separate peers with different strides are made contiguous (a copy only in that case); the
    first returned tensor is the base pointer the kernels get.
    """
    if len(logits) == 1:
        z = logits[0]
        return [z], [k * z.stride(0) for k in range(z.shape[0])], z.stride(1), z.stride(2)
    if len(logits) > MAX_PEERS:
        raise ValueError(f"mixed_kd_loss: the Triton kernel takes at most {MAX_PEERS} peers, got "
                         f"K={len(logits)}; set METAMIXER_BACKEND=reference for more")
    peers = list(logits)
    if any(p.stride() != peers[0].stride() for p in peers):
        peers = [p.contiguous() for p in peers]
    size = peers[0].element_size()
    deltas = [p.data_ptr() - peers[0].data_ptr() for p in peers]
    if any(d % size for d in deltas):  # allocations are element-aligned; guard anyway
        z = torch.stack(peers)
        return [z], [k * z.stride(0) for k in range(len(peers))], z.stride(1), z.stride(2)
    return peers, [d // size for d in deltas], peers[0].stride(0), peers[0].stride(1)


def _pad8(offsets: list[int]) -> list[int]:
    if len(offsets) > MAX_PEERS:
        raise ValueError(f"mixed_kd_loss: the Triton kernel takes at most {MAX_PEERS} peers, got "
                         f"K={len(offsets)}; set METAMIXER_BACKEND=reference for more")
    return offsets + [0] * (MAX_PEERS - len(offsets))


def _peer_matrix(mode: str, peer_matrix: Tensor | None, k: int, like: Tensor,
                 dtype: torch.dtype) -> Tensor:
    if mode != "ensemble":
        return like  # never read
    if peer_matrix is None:
        a = torch.full((k, k), 1.0 / (k - 1), device=like.device, dtype=dtype)
        return a.fill_diagonal_(0.0)
    return peer_matrix.to(device=like.device, dtype=dtype).contiguous()


def mixed_kd_loss_forward(logits: list[Tensor], labels: Tensor, weights: Tensor,
                          temperature: float, label_smoothing: float, mode: str,
                          peer_matrix: Tensor | None, detach_targets: bool
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(ce[K], kd[K], row_stats[K, B, 3]) for the ``triton`` backend of metamixer::mixed_kd_loss."""
    del detach_targets  # the forward value does not depend on it
    keep, offsets, sb, sc = _peers(logits)
    base = keep[0]
    k, (b, c) = len(offsets), logits[-1].shape[-2:]
    out_dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    stats = torch.empty(k, b, 3, device=base.device, dtype=torch.float64)
    ce_rows = torch.empty(k, b, device=base.device, dtype=out_dtype)
    kd_rows = torch.empty(k, b, device=base.device, dtype=out_dtype)
    a = _peer_matrix(mode, peer_matrix, k, ce_rows, out_dtype)

    def explain() -> None:
        check_mixed_kd_loss_values(labels, weights, c, peer_matrix)

    if weights.dtype != out_dtype:  # the kernel sees them cast: check them as given
        explain()
    elif peer_matrix is not None:
        check_peer_matrix_values(peer_matrix)
    ok = ok_flag(base.device)
    k_pad, block_c, rows, warps = launch_config(k, c, mode == "ensemble", False)
    with _masked_lanes_quiet():
        _mixed_kd_loss_fwd_kernel[(triton.cdiv(b, rows),)](
            base, *_pad8(offsets), sb, sc,
            labels, labels.stride(0), labels.stride(1), weights, weights.stride(0),
            weights.stride(1), labels.shape[1],
            a, stats, ce_rows, kd_rows, ok,
            b, c, *_split(temperature), *_split(label_smoothing),
            K=k, K_PAD=k_pad, BLOCK_C=block_c, ROWS=rows, ENSEMBLE=mode == "ensemble",
            HAS_EPS=label_smoothing > 0, ACC=_acc(base.dtype), num_warps=warps)
    assert_ok(ok, f"mixed_kd_loss: a label is outside [0, {c}), a weight negative or not finite, "
                  f"or a row of weights does not sum to 1; the same call on CPU tensors names which",
              explain)
    return ce_rows.mean(1), kd_rows.mean(1), stats


mixed_kd_loss_forward.checks_values = True  # type: ignore[attr-defined]  (see kernels/_flag.py)


def mixed_kd_loss_backward(grad_ce: Tensor, grad_kd: Tensor, logits: list[Tensor],
                           labels: Tensor, weights: Tensor, row_stats: Tensor,
                           temperature: float, label_smoothing: float, mode: str,
                           peer_matrix: Tensor | None, detach_targets: bool) -> list[Tensor]:
    """dZ in the form of ``logits`` (one [K, B, C] tensor or K [B, C] tensors), logits' dtype."""
    keep, offsets, sb, sc = _peers(logits)
    base = keep[0]
    k, (b, c) = len(offsets), logits[-1].shape[-2:]
    wanted = [torch.empty_like(z) for z in logits]  # the layouts the fake promises
    mixed = any(g.stride() != wanted[0].stride() for g in wanted)  # peers of mixed layouts
    grads = [torch.empty(z.shape, dtype=z.dtype, device=z.device) for z in logits] if mixed else wanted
    gkeep, goffsets, gsb, gsc = _peers(grads)
    gbase = gkeep[0]
    out_dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    stats = row_stats.to(torch.float64).contiguous()  # float64 on every backend already
    a = _peer_matrix(mode, peer_matrix, k, stats, out_dtype)
    k_pad, block_c, rows, warps = launch_config(k, c, mode == "ensemble", True)
    with _masked_lanes_quiet():
        _mixed_kd_loss_bwd_kernel[(triton.cdiv(b, rows),)](
            grad_ce, grad_ce.stride(0), grad_kd, grad_kd.stride(0),
            base, *_pad8(offsets), sb, sc,
            gbase, *_pad8(goffsets), gsb, gsc,
            labels, labels.stride(0), labels.stride(1), weights, weights.stride(0),
            weights.stride(1), labels.shape[1],
            a, stats, b, c, *_split(temperature), *_split(label_smoothing),
            K=k, K_PAD=k_pad, BLOCK_C=block_c, ROWS=rows, ENSEMBLE=mode == "ensemble",
            DETACH=bool(detach_targets), ACC=_acc(base.dtype), SOFT_BF16=soft_bf16(gbase.dtype),
            num_warps=warps)
    if len(grads) > 1 and gbase is not grads[0]:  # _peers had to stack them (never in practice)
        for grad, part in zip(grads, gbase.unbind(0)):
            grad.copy_(part)
    if mixed:  # computed in one layout; handed back in each peer's own
        for want, grad in zip(wanted, grads):
            want.copy_(grad)
    return wanted

