"""Independent per-element float64 computations (plain loops over Python floats).

Written without torch ops and without sharing code or formulas' vectorized form with
metamixer_fast.reference, so that the two can check each other. Only for small shapes.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def _log_softmax(row: list[float], scale: float) -> list[float]:
    scaled = [scale * v for v in row]
    m = max(scaled)
    if m == NEG_INF:
        return [NEG_INF] * len(row)
    total = 0.0
    for v in scaled:
        total += math.exp(v - m)
    lse = m + math.log(total)
    return [v - lse for v in scaled]


def _kl(log_t: list[float], log_s: list[float]) -> float:
    total = 0.0
    for lt, ls in zip(log_t, log_s):
        t = math.exp(lt)
        if t > 0:
            total += t * (lt - ls)
    return total


def naive_mixed_kd_loss(z: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                        temperature: float, eps: float, mode: str,
                        peer_matrix: torch.Tensor | None) -> tuple[list[float], list[float]]:
    zl = z.double().tolist()
    lab, wts = labels.tolist(), weights.double().tolist()
    k_peers, batch, classes = len(zl), len(zl[0]), len(zl[0][0])
    if peer_matrix is None:
        a = [[0.0 if j == k else 1.0 / (k_peers - 1) for j in range(k_peers)] for k in range(k_peers)]
    else:
        a = peer_matrix.double().tolist()
    ce, kd = [0.0] * k_peers, [0.0] * k_peers
    for k in range(k_peers):
        for b in range(batch):
            ls = _log_softmax(zl[k][b], 1.0)
            for m in range(len(lab[b])):
                term = -ls[lab[b][m]] * (1 - eps)
                if eps > 0:
                    smooth = 0.0
                    for c in range(classes):
                        smooth += -ls[c]
                    term += eps * smooth / classes
                if wts[b][m] != 0:  # 0 log 0 = 0 (a masked class's term is inf)
                    ce[k] += wts[b][m] * term / batch
            lp_k = _log_softmax(zl[k][b], 1.0 / temperature)
            if mode == "pairwise":
                for j in range(k_peers):
                    if j != k:
                        lp_j = _log_softmax(zl[j][b], 1.0 / temperature)
                        kd[k] += _kl(lp_j, lp_k) / (k_peers - 1) / batch
            else:
                ens = []
                for c in range(classes):
                    v = 0.0
                    for j in range(k_peers):
                        if a[k][j] != 0:
                            v += a[k][j] * zl[j][b][c]
                    ens.append(v)
                kd[k] += _kl(_log_softmax(ens, 1.0 / temperature), lp_k) / batch
        kd[k] *= temperature * temperature
    return ce, kd


def naive_mix(x: torch.Tensor, src: torch.Tensor, w: torch.Tensor,
              box: torch.Tensor | None) -> torch.Tensor:
    """Element by element: out[i, p] = x[i, p] outside box_i, w x[i, p] + (1 - w) x[src_i, p] in it."""
    n = x.shape[0]
    flat = x.reshape(n, -1).double().tolist()
    out = [row[:] for row in flat]
    shape = x.shape
    for i in range(n):
        wi = float(w[i])
        s = int(src[i])
        for p in range(len(flat[i])):
            if box is not None:
                hw = shape[-1] * shape[-2]
                y, xx = (p % hw) // shape[-1], p % shape[-1]
                y0, y1, x0, x1 = (int(v) for v in box[i])
                if not (y0 <= y < y1 and x0 <= xx < x1):
                    continue
            v = wi * flat[i][p] + (1 - wi) * flat[s][p]
            out[i][p] = v
    result = torch.tensor(out, dtype=torch.float64).reshape(shape)
    if x.dtype == torch.uint8:
        result = result.round().clamp(0, 255)
    return result
