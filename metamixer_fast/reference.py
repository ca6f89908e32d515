"""Pure-PyTorch reference implementations: the oracle for every kernel.

This module holds the one copy of the maths of each op (DESIGN.md section 2). Kernels, tests
and benchmarks are measured against it; nothing here is tuned for speed beyond avoiding
[K, K, B, C] temporaries. Inputs are assumed valid: argument checking lives in
``metamixer_fast.ops``.

Backward passes are obtained by differentiating these functions with autograd
(``mixed_kd_loss_backward`` and ``mix_backward``), so no second copy of any formula exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MODES = ("pairwise", "ensemble")

__all__ = [
    "MODES",
    "default_peer_matrix",
    "mix",
    "mix2",
    "mix_backward",
    "mixed_kd_loss",
    "mixed_kd_loss_backward",
    "row_stats",
    "stack_logits",
]


def stack_logits(logits: Tensor | Sequence[Tensor]) -> Tensor:
    """Return the logits as one [K, B, C] tensor (a copy only when given K separate tensors)."""
    if isinstance(logits, Tensor):
        return logits
    if len(logits) == 1:
        return logits[0]
    return torch.stack(list(logits))


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss outputs are float32, or float64 when the logits are float64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_peer_matrix(k: int, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """A[k, j] = 1/(K-1) for j != k, 0 on the diagonal: each peer's target is the mean of the others."""
    a = torch.full((k, k), 1.0 / (k - 1), device=device, dtype=dtype)
    return a.fill_diagonal_(0.0)


def _kl_rows(log_target: Tensor, log_student: Tensor) -> Tensor:
    """KL(target || student) summed over the last dim, with 0 log 0 = 0 (masked classes).

    The ``where`` sits on the log-difference, not on the product, so that a -inf - -inf in an
    untaken branch never turns into a NaN gradient.
    """
    target = log_target.exp()
    diff = torch.where(target > 0, log_target - log_student, torch.zeros_like(log_student))
    return (target * diff).sum(-1)


def _ensemble_logits(z: Tensor, a: Tensor) -> Tensor:
    """E[k] = sum_j A[k, j] z_j, skipping A[k, j] == 0 so a masked (-inf) logit of an
    excluded peer contributes nothing instead of 0 * -inf = NaN."""
    k_peers = z.shape[0]
    ens = torch.zeros_like(z)
    for j in range(k_peers):
        coeff = a[:, j].view(k_peers, 1, 1)
        ens = ens + torch.where(coeff != 0, coeff * z[j], torch.zeros_like(ens))
    return ens


def mixed_kd_loss(
    logits: Tensor | Sequence[Tensor],
    labels: Tensor,
    weights: Tensor,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
    mode: str = "pairwise",
    peer_matrix: Tensor | None = None,
    detach_targets: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-peer cross-entropy and distillation losses (DESIGN.md section 2.1).

    Shapes: logits [K, B, C] (or K tensors [B, C]), labels [B, M] int64, weights [B, M].
    With s_k = softmax(z_k) and p_k = softmax(z_k / T):

    - ce[k] = mean_b sum_m W[b, m] * ((1 - eps) * -log s_kb[L[b, m]] + eps * mean_c -log s_kb[c])
    - pairwise: kd[k] = T^2 mean_b 1/(K-1) sum_{j != k} KL(p_jb || p_kb)
    - ensemble: kd[k] = T^2 mean_b KL(softmax(sum_j A[k, j] z_jb / T) || p_kb)

    The arithmetic runs in the logits' dtype (so a bf16 run is the "reference in bf16" of the
    test policy); the results are returned as float32 (float64 for float64 logits).
    Label smoothing spreads eps uniformly over all C classes, as
    ``torch.nn.functional.cross_entropy`` does, so eps > 0 with a -inf logit gives ce = inf.
    """
    z = stack_logits(logits)
    k_peers, _, _ = z.shape
    out_dtype = output_dtype(z.dtype)
    w = weights.to(z.dtype)

    log_s = torch.log_softmax(z, dim=-1)
    index = labels.unsqueeze(0).expand(k_peers, -1, -1)
    nll = -log_s.gather(-1, index)  # [K, B, M]
    per_label = nll if label_smoothing == 0 else (
        (1 - label_smoothing) * nll - label_smoothing * log_s.mean(-1, keepdim=True))
    # 0 log 0 = 0 for labels too: a zero-weight label on a masked class (-inf logit) adds 0,
    # not 0 * inf = NaN (a mixed target's unused columns may name any class)
    ce = torch.where(w != 0, per_label * w, 0).sum(-1).mean(-1)

    t = temperature
    log_p = torch.log_softmax(z / t, dim=-1)
    targets = z.detach() if detach_targets else z
    if mode == "pairwise":
        log_t = log_p.detach() if detach_targets else log_p
        kl_sum = torch.zeros_like(log_p[..., 0])  # [K, B]
        peer = torch.arange(k_peers, device=z.device).view(k_peers, 1)
        for j in range(k_peers):
            kl_j = _kl_rows(log_t[j], log_p)  # KL(p_j || p_k) for every k: [K, B]
            kl_sum = kl_sum + torch.where(peer == j, torch.zeros_like(kl_j), kl_j)
        kd = kl_sum.mean(-1) * (t * t / (k_peers - 1))
    elif mode == "ensemble":
        a = default_peer_matrix(k_peers, z.device, z.dtype) if peer_matrix is None else peer_matrix
        log_q = torch.log_softmax(_ensemble_logits(targets, a.to(z.dtype)) / t, dim=-1)
        kd = _kl_rows(log_q, log_p).mean(-1) * (t * t)
    else:
        raise ValueError(f"mixed_kd_loss: mode must be one of {MODES}, got {mode!r}")
    return ce.to(out_dtype), kd.to(out_dtype)


def row_stats(
    logits: Tensor | Sequence[Tensor],
    temperature: float,
    mode: str,
    peer_matrix: Tensor | None,
) -> Tensor:
    """Per-row log-sum-exps the fused backward reuses: [K, B, 3] float64 =
    (logsumexp(z), logsumexp(z / T), logsumexp(E / T) for the ensemble target E, else 0).
    Float64 whatever the logits' dtype: a backward rebuilds its softmaxes from them, and an lse
    of ~1000 in fp32 would carry a rounding of ~6e-5 into every probability."""
    z = stack_logits(logits).detach()
    out_dtype = torch.float64
    zf = z.to(out_dtype)
    lse1 = torch.logsumexp(zf, dim=-1)
    lse_t = torch.logsumexp(zf / temperature, dim=-1)
    if mode == "ensemble":
        k_peers = z.shape[0]
        a = default_peer_matrix(k_peers, z.device, out_dtype) if peer_matrix is None else peer_matrix
        lse_e = torch.logsumexp(_ensemble_logits(zf, a.to(out_dtype)) / temperature, dim=-1)
    else:
        lse_e = torch.zeros_like(lse1)
    return torch.stack([lse1, lse_t, lse_e], dim=-1)


def mixed_kd_loss_backward(
    grad_ce: Tensor,
    grad_kd: Tensor,
    logits: Tensor | Sequence[Tensor],
    labels: Tensor,
    weights: Tensor,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
    mode: str = "pairwise",
    peer_matrix: Tensor | None = None,
    detach_targets: bool = True,
) -> Tensor:
    """dZ [K, B, C] (logits dtype) for upstream gradients grad_ce[K], grad_kd[K].

    Obtained with ``torch.func.vjp`` of ``mixed_kd_loss`` (plain autograd is unavailable
    inside an op body, which runs below the autograd dispatch key).
    """
    z = stack_logits(logits).detach()

    def loss(zz: Tensor) -> tuple[Tensor, Tensor]:
        return mixed_kd_loss(zz, labels, weights, temperature, label_smoothing, mode,
                             peer_matrix, detach_targets)

    # (torch annotates vjp's result as a pair or, with has_aux, a triple)
    (ce, kd), pullback = torch.func.vjp(loss, z)  # type: ignore[misc]
    (dz,) = pullback((grad_ce.to(ce.dtype), grad_kd.to(kd.dtype)))
    return dz


def _box_mask(x: Tensor, box: Tensor | None) -> Tensor | None:
    """Boolean [N, 1, H, W] mask of each sample's half-open box (y0, y1, x0, x1); None = all."""
    if box is None or x.dim() == 2:
        return None
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    box = box.to(device=x.device, dtype=torch.int64)
    in_y = (ys >= box[:, 0:1]) & (ys < box[:, 1:2])  # [N, H]
    in_x = (xs >= box[:, 2:3]) & (xs < box[:, 3:4])  # [N, W]
    return in_y[:, None, :, None] & in_x[:, None, None, :]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Mixing arithmetic runs in float32 for uint8/fp16/bf16 and in the input dtype otherwise."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def mix(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None = None) -> Tensor:
    """Region and blend mixing (DESIGN.md section 2.2).

    out[i, p] = x[i, p] outside box_i and w_i x[i, p] + (1 - w_i) x[src_i, p] inside it.
    Shapes: x [N, C, H, W] or [N, D]; src [N] int64; w [N]; box [N, 4] (y0, y1, x0, x1),
    half-open, or None for the whole sample. The blend is computed in float32 for
    uint8/fp16/bf16 (uint8 rounds half to even), so a pure copy (w = 0 or 1) is exact.
    """
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    wv = w.to(ct).view(-1, *([1] * (x.dim() - 1)))
    blended = wv * xf + (1 - wv) * xf[src]
    mask = _box_mask(x, box)
    out = blended if mask is None else torch.where(mask, blended, xf)
    if x.dtype == torch.uint8:
        out = out.round().clamp(0, 255)
    return out.to(x.dtype)


def mix2(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, src2: Tensor, w2: Tensor) -> Tensor:
    """Local then global mixing in one op: ``mix(mix(x, src, w, box), src2, w2)``, the
    intermediate rounded to x's dtype exactly as two separate calls would round it."""
    return mix(mix(x, src, w, box), src2, w2, None)


def mix_backward(grad: Tensor, x: Tensor, src: Tensor, w: Tensor,
                 box: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dx, dw) of ``mix`` by autograd: dx scatter-adds (1 - w_j) grad_j into x[src_j] inside
    box_j; dw_i = sum over box_i of grad_i * (x_i - x[src_i])."""
    out, pullback = torch.func.vjp(  # type: ignore[misc]  # a pair without has_aux
        lambda xx, ww: mix(xx, src, ww, box), x.detach(), w.detach())
    dx, dw = pullback(grad.to(out.dtype))
    return dx, dw
