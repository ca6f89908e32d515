"""Triton kernels of ``metamixer::mix`` (DESIGN.md section 2.2) and of the fused local + global
``metamixer::mix2`` (forward; its backward is built from mix and mix_backward), registered as
the ``triton`` backend.

Forward, per sample i and element p of the sample:
    out[i, p] = x[i, p]                              outside box_i
    out[i, p] = w_i x[i, p] + (1 - w_i) x[src_i, p]  inside box_i
Backward, for an upstream gradient g shaped like x:
    dx[k, p] = g[k, p] (p in box_k ? w_k : 1) + sum_{j : src_j = k, p in box_j} (1 - w_j) g[j, p]
    dw_i     = sum_{p in box_i} g[i, p] (x[i, p] - x[src_i, p])

Shapes and layout: every tensor is viewed as N samples of S = rows x row_len contiguous-ish
elements, the element at flat offset q of a sample lying on row (q // row_len) % rows and column
q % row_len, and a box covering rows [r0, r1) and columns [c0, c1) of every plane:
NCHW [N, C, H, W] -> rows H, row_len W, columns (x0, x1); channels_last -> rows H,
row_len W*C, columns (x0*C, x1*C); [N, D] -> one row of D. So x is read in place when it is
contiguous or channels_last (otherwise copied once into its ``mix_memory_format``), and the output
has that format (metamixer_fast/_layout.py). The row and column of an offset take two divisions
by runtime divisors; they are multiplications by magic numbers the host computes once per
shape (``divider``), a few instructions instead of a division's twenty, and each of a box's two
ranges is one unsigned comparison. For sm_90 that took 19 to 45 % of the box kernels' machine
instructions away where the row length is not a multiple of 16, and 5 to 24 % where it is (the
compiler then shared one division among 16 elements already): bench/triton_mix_sass.py counts
them. Not yet timed on a GPU.

Arithmetic: float32 for uint8/fp16/bf16 inputs, the input dtype for fp32/fp64, as three
separately rounded operations (w*a, (1-w)*b, their sum) like the eager reference; launches
pass ``enable_fp_fusion=False`` so the compiler does not contract them into an FMA. uint8
rounds half to even (adding and subtracting 1.5 * 2^23) and clamps to [0, 255].

Bytes moved: forward reads x_i and x_src_i inside box_i, writes out once. Backward (gather per
destination sample, so repeated partners never race and the result is deterministic) reads
g_k, x_k, x_src_k inside box_k, and g_j inside box_j for each j with src_j = k; writes dx and
one partial dw per block.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from metamixer_fast import _backend
from metamixer_fast._checks import check_mix2_values, check_mix_values
from metamixer_fast._layout import mix_memory_format, mix_output, mix_readable

from ._cast import cast_out, soft_bf16
from ._flag import assert_ok, ok_flag

BLOCK = 1024
NUM_WARPS = 4
# every launch's compile options: no FMA contraction (see above); tests compile with these
LAUNCH_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


@triton.jit
def _divide(n, divider):
    """n // d for int32 0 <= n < 2**31, with ``divider`` = divider(d): the high half of 2n times
    a 32-bit magic number, shifted (three instructions instead of a division's twenty)."""
    magic = (divider & 0xFFFFFFFF).to(tl.uint32)
    shift = ((divider >> 32) - 1).to(tl.uint32)
    return (tl.umulhi(n.to(tl.uint32) << 1, magic) >> shift).to(tl.int32)


@triton.jit
def _plane_coords(offs, rows, row_len, rows_div, row_len_div, HAS_BOX: tl.constexpr):
    """(row, column) of the flat offsets offs of a sample: row (offs // row_len) % rows of its
    plane, column offs % row_len (unused without a box: offs twice)."""
    if HAS_BOX:
        line = _divide(offs, row_len_div)
        return line - _divide(line, rows_div) * rows, offs - line * row_len
    else:
        return offs, offs


@triton.jit
def _in_box(box_ptr, i, r, c, col_scale, HAS_BOX: tl.constexpr):
    """Mask of the (row, column) positions r, c that lie inside box (y0, y1, x0, x1) of sample
    i, whose columns are scaled by col_scale (C for channels_last rows); all of them without a
    box. Each range is one unsigned comparison (r - y0 < y1 - y0)."""
    if HAS_BOX:
        r0 = tl.load(box_ptr + 4 * i).to(tl.int32)
        r1 = tl.load(box_ptr + 4 * i + 1).to(tl.int32)
        c0 = tl.load(box_ptr + 4 * i + 2).to(tl.int32) * col_scale
        c1 = tl.load(box_ptr + 4 * i + 3).to(tl.int32) * col_scale
        height = tl.maximum(r1 - r0, 0).to(tl.uint32)  # a bad box (flagged) covers nothing
        width = tl.maximum(c1 - c0, 0).to(tl.uint32)
        return ((r - r0).to(tl.uint32) < height) & ((c - c0).to(tl.uint32) < width)
    else:
        return r >= 0


@triton.jit
def _blend(a, b, w, IS_UINT8: tl.constexpr, SOFT_BF16: tl.constexpr):
    """w a + (1 - w) b in w's dtype, three roundings, stored back in a's dtype."""
    lhs = w * a.to(w.dtype)
    rhs = (1 - w) * b.to(w.dtype)
    blended = lhs + rhs
    if IS_UINT8:
        blended = (blended + 12582912.0) - 12582912.0
        blended = tl.minimum(tl.maximum(blended, 0.0), 255.0)
    return cast_out(blended, a.dtype, SOFT_BF16)


@triton.jit
def _mix_at(x_ptr, src_ptr, w_ptr, box_ptr, i, offs, r, c, valid, sample_size, col_scale,
            HAS_BOX: tl.constexpr, IS_UINT8: tl.constexpr, SOFT_BF16: tl.constexpr):
    """mix(x, src, w, box)[i] at the flat offsets offs (plane row r, column c) of sample i, in
    x's dtype. A partner out of range reads the sample itself (never out of bounds);
    _check_sample flags it."""
    inside = valid & _in_box(box_ptr, i, r, c, col_scale, HAS_BOX)
    s = tl.load(src_ptr + i)
    s = tl.where((s >= 0) & (s < tl.num_programs(1)), s, i)
    w = tl.load(w_ptr + i)  # already in the compute dtype
    a = tl.load(x_ptr + i * sample_size + offs, mask=valid)  # 64-bit sample base, 32-bit offs
    b = tl.load(x_ptr + s.to(tl.int64) * sample_size + offs, mask=inside, other=0)
    return tl.where(inside, _blend(a, b, w, IS_UINT8, SOFT_BF16), a)


@triton.jit
def _check_sample(ok_ptr, src_ptr, w_ptr, box_ptr, i, rows, row_len, col_scale,
                  HAS_BOX: tl.constexpr):
    """Store 0 into ok_ptr[0] unless src_i is in [0, N), w_i in [0, 1] (not NaN) and box_i
    inside the image: the value checks of the op, done where the values are read anyway
    (the launcher asserts the flag once, instead of a dozen small ops per call)."""
    s = tl.load(src_ptr + i)
    w = tl.load(w_ptr + i)
    good = (s >= 0) & (s < tl.num_programs(1)) & (w >= 0) & (w <= 1)
    if HAS_BOX:
        y0 = tl.load(box_ptr + 4 * i)
        y1 = tl.load(box_ptr + 4 * i + 1)
        x0 = tl.load(box_ptr + 4 * i + 2)
        x1 = tl.load(box_ptr + 4 * i + 3)
        width = row_len // col_scale
        good = good & (y0 >= 0) & (y0 <= y1) & (y1 <= rows) & (x0 >= 0) & (x0 <= x1) & (x1 <= width)
    if not good:
        tl.store(ok_ptr, 0)


@triton.jit
def _mix_fwd_kernel(x_ptr, out_ptr, src_ptr, w_ptr, box_ptr, ok_ptr, sample_size, rows, row_len,
                    col_scale, rows_div, row_len_div, HAS_BOX: tl.constexpr,
                    IS_UINT8: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (cdiv(S, BLOCK), N): one block of one sample per program."""
    i = tl.program_id(1).to(tl.int64)
    if tl.program_id(0) == 0:
        _check_sample(ok_ptr, src_ptr, w_ptr, box_ptr, i, rows, row_len, col_scale, HAS_BOX)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: a sample is < 2**31 elements
    valid = offs < sample_size
    r, c = _plane_coords(offs, rows, row_len, rows_div, row_len_div, HAS_BOX)
    out = _mix_at(x_ptr, src_ptr, w_ptr, box_ptr, i, offs, r, c, valid, sample_size, col_scale,
                  HAS_BOX, IS_UINT8, SOFT_BF16)
    tl.store(out_ptr + i * sample_size + offs, out, mask=valid)


@triton.jit
def _mix2_fwd_kernel(x_ptr, out_ptr, src_ptr, w_ptr, box_ptr, src2_ptr, w2_ptr, ok_ptr,
                     sample_size, rows, row_len, col_scale, rows_div, row_len_div,
                     HAS_BOX: tl.constexpr, IS_UINT8: tl.constexpr, SOFT_BF16: tl.constexpr,
                     BLOCK: tl.constexpr):
    """mix(mix(x, src, w, box), src2, w2) for one block of sample i: u_i and u_src2_i are
    formed in registers (rounded as a first call would store them), then blended with w2_i.
    Reads x_i, x_src2_i and their local partners inside the boxes; writes out once."""
    i = tl.program_id(1).to(tl.int64)
    if tl.program_id(0) == 0:
        _check_sample(ok_ptr, src_ptr, w_ptr, box_ptr, i, rows, row_len, col_scale, HAS_BOX)
        _check_sample(ok_ptr, src2_ptr, w2_ptr, box_ptr, i, rows, row_len, col_scale, False)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < sample_size
    k = tl.load(src2_ptr + i).to(tl.int64)
    k = tl.where((k >= 0) & (k < tl.num_programs(1)), k, i)
    r, c = _plane_coords(offs, rows, row_len, rows_div, row_len_div, HAS_BOX)
    ua = _mix_at(x_ptr, src_ptr, w_ptr, box_ptr, i, offs, r, c, valid, sample_size, col_scale,
                 HAS_BOX, IS_UINT8, SOFT_BF16)
    ub = _mix_at(x_ptr, src_ptr, w_ptr, box_ptr, k, offs, r, c, valid, sample_size, col_scale,
                 HAS_BOX, IS_UINT8, SOFT_BF16)
    out = _blend(ua, ub, tl.load(w2_ptr + i), IS_UINT8, SOFT_BF16)
    tl.store(out_ptr + i * sample_size + offs, out, mask=valid)


@triton.jit
def _mix_bwd_kernel(g_ptr, x_ptr, src_ptr, w_ptr, box_ptr, inv_offsets_ptr, inv_list_ptr,
                    dx_ptr, dw_part_ptr, sample_size, rows, row_len, col_scale, rows_div,
                    row_len_div, HAS_BOX: tl.constexpr, SOFT_BF16: tl.constexpr, NEED_DW: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Grid (cdiv(S, BLOCK), N): dx for one block of destination sample k, plus with NEED_DW
    that block's share of dw_k (written to dw_part[k, block]); without it x is never read."""
    k = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(0)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < sample_size
    r, c = _plane_coords(offs, rows, row_len, rows_div, row_len_div, HAS_BOX)
    inside = valid & _in_box(box_ptr, k, r, c, col_scale, HAS_BOX)
    wk = tl.load(w_ptr + k)
    g = tl.load(g_ptr + k * sample_size + offs, mask=valid, other=0).to(wk.dtype)
    acc = tl.where(inside, g * wk, g)
    start = tl.load(inv_offsets_ptr + k)
    end = tl.load(inv_offsets_ptr + k + 1)
    for t in range(start, end):
        j = tl.load(inv_list_ptr + t).to(tl.int64)
        in_j = valid & _in_box(box_ptr, j, r, c, col_scale, HAS_BOX)
        wj = tl.load(w_ptr + j)
        gj = tl.load(g_ptr + j * sample_size + offs, mask=in_j, other=0).to(wk.dtype)
        acc += tl.where(in_j, (1 - wj) * gj, 0.0)
    tl.store(dx_ptr + k * sample_size + offs, cast_out(acc, dx_ptr.dtype.element_ty, SOFT_BF16),
             mask=valid)
    if NEED_DW:
        s = tl.load(src_ptr + k).to(tl.int64)
        # the forward checked src; a direct call of the backward op may not have: read x_k
        s = tl.where((s >= 0) & (s < tl.num_programs(1)), s, k)
        a = tl.load(x_ptr + k * sample_size + offs, mask=inside, other=0).to(wk.dtype)
        b = tl.load(x_ptr + s * sample_size + offs, mask=inside, other=0).to(wk.dtype)
        part = tl.sum(tl.where(inside, g * (a - b), 0.0), axis=0)
        tl.store(dw_part_ptr + k * tl.num_programs(0) + blk, part)


# ------------------------------------------------------------------------------------ launchers

@functools.cache
def divider(d: int) -> int:
    """``_divide``'s (magic, shift) for a divisor 1 <= d < 2**31, packed as magic + (shift + 1)
    * 2**32 (always a 64-bit integer, also for d = 1). n // d equals umulhi(2n, magic) >> shift
    for every 0 <= n < 2**31, with shift = ceil(log2 d) and magic = ceil(2**(31 + shift) / d),
    which is below 2**32 (Granlund and Montgomery's bound: magic * d exceeds 2**(31 + shift) by
    less than d <= 2**shift)."""
    if not 1 <= d < 2**31:
        raise ValueError(f"mix: a divisor of {d} is outside [1, 2**31)")
    shift = (d - 1).bit_length()
    return -(-(1 << (31 + shift)) // d) | (shift + 1) << 32


def _geometry(x: Tensor, box: Tensor | None) -> tuple[Tensor, Tensor | None, tuple[int, ...]]:
    """(x as read, box or None, plane): ``plane`` is the kernels' (rows, row_len, col_scale,
    divider(rows), divider(row_len)). Box rows are (y0, y1, x0, x1) in pixels, the kernels scale
    the columns by col_scale (C in a channels_last row), so no box arithmetic (and no
    host-to-device copy) happens here. Offsets inside a sample are 32-bit in the kernels (64-bit
    ones cost registers), the samples' bases 64-bit: a batch may pass 2**31 elements, one sample
    may not."""
    if x[0].numel() >= 2**31:
        raise ValueError(f"mix: one sample of x has {x[0].numel()} elements; the Triton kernels "
                         f"take samples of fewer than 2**31 elements (split the sample dimension)")
    x = mix_readable(x)
    if x.dim() == 2:
        rows, row_len, scale = 1, max(x.shape[1], 1), 1
    elif mix_memory_format(x) == torch.channels_last:
        rows, row_len, scale = x.shape[2], x.shape[3] * x.shape[1], x.shape[1]
    else:
        rows, row_len, scale = x.shape[2], x.shape[3], 1
    plane = (rows, row_len, scale, divider(max(rows, 1)), divider(max(row_len, 1)))
    return x, None if box is None else box.contiguous(), plane


def _box_arg(box: Tensor | None, src: Tensor) -> Tensor:
    """The box pointer for a launch; without a box (HAS_BOX=False) it is never read."""
    return src if box is None else box


def _compute_w(x: Tensor, w: Tensor) -> Tensor:
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    return w.to(ct).contiguous()


_BAD_VALUES = ("{op}: a partner index is outside [0, N), a blend weight outside [0, 1] (or NaN), "
               "or a box outside the image; the same call on CPU tensors names which")


def _values_checked_in_kernel(x: Tensor, *weights: Tensor) -> bool:
    """The kernel sees the weights in the compute dtype: a float64 weight for a float32 batch
    could round into [0, 1] there, so such calls get the Python checks first."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    return all(w.dtype == ct for w in weights)


def mix(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None) -> Tensor:
    if x[0].numel() == 0 or not _values_checked_in_kernel(x, w):  # no launch, or no fit
        check_mix_values(x, src, w, box)
    xr, boxes, plane = _geometry(x, box)
    out = mix_output(x)
    n, size = xr.shape[0], xr[0].numel()
    if size == 0:
        return out
    ok = ok_flag(xr.device)
    grid = (triton.cdiv(size, BLOCK), n)
    _mix_fwd_kernel[grid](xr, out, src.contiguous(), _compute_w(xr, w), _box_arg(boxes, src), ok,
                          size, *plane, HAS_BOX=boxes is not None,
                          IS_UINT8=xr.dtype == torch.uint8, SOFT_BF16=soft_bf16(xr.dtype), BLOCK=BLOCK,
                          **LAUNCH_OPTIONS)
    assert_ok(ok, _BAD_VALUES.format(op="mix"), lambda: check_mix_values(x, src, w, box))
    return out


def mix2(x: Tensor, src: Tensor, w: Tensor, box: Tensor | None, src2: Tensor, w2: Tensor) -> Tensor:
    def explain() -> None:
        check_mix2_values(x, src, w, box, src2, w2)

    if x[0].numel() == 0 or not _values_checked_in_kernel(x, w, w2):
        explain()
    xr, boxes, plane = _geometry(x, box)
    out = mix_output(x)
    n, size = xr.shape[0], xr[0].numel()
    if size == 0:
        return out
    ok = ok_flag(xr.device)
    grid = (triton.cdiv(size, BLOCK), n)
    _mix2_fwd_kernel[grid](xr, out, src.contiguous(), _compute_w(xr, w), _box_arg(boxes, src),
                           src2.contiguous(), _compute_w(xr, w2), ok, size, *plane,
                           HAS_BOX=boxes is not None, IS_UINT8=xr.dtype == torch.uint8,
                           SOFT_BF16=soft_bf16(xr.dtype), BLOCK=BLOCK, **LAUNCH_OPTIONS)
    assert_ok(ok, _BAD_VALUES.format(op="mix2"), explain)
    return out


mix.checks_values = True  # type: ignore[attr-defined]  (the op body skips its Python checks)
mix2.checks_values = True  # type: ignore[attr-defined]


def _invert_partners(src: Tensor) -> tuple[Tensor, Tensor]:
    """CSR of {j : src_j = k}: offsets [N + 1] and the j's in increasing order, by a stable sort
    and a binary search, with no host synchronisation (``torch.bincount`` on CUDA reads the
    largest index back to size its output, which stalled every backward until the GPU had
    caught up). An index outside [0, N) lands in no row, so no j is ever out of range."""
    sorted_src, order = torch.sort(src, stable=True)
    bounds = torch.arange(src.shape[0] + 1, device=src.device, dtype=sorted_src.dtype)
    return torch.searchsorted(sorted_src, bounds), order


def mix_backward(grad: Tensor, x: Tensor, src: Tensor, w: Tensor, box: Tensor | None,
                 need_dw: bool = True) -> tuple[Tensor, Tensor]:
    """(dx, dw) in one kernel; ``need_dw=False`` compiles the variant that writes dx only (and
    never reads x) and returns zeros for dw."""
    if not x.is_floating_point():
        raise ValueError(f"mix_backward: 'x' must be a floating tensor ({x.dtype} is not "
                         f"differentiable)")
    xr, boxes, plane = _geometry(x, box)
    g = grad.to(xr.dtype).contiguous(memory_format=mix_memory_format(x))
    dx = mix_output(x)
    n, size = xr.shape[0], xr[0].numel()
    wc = _compute_w(xr, w)
    if size == 0:
        return dx, torch.zeros_like(w)
    blocks = triton.cdiv(size, BLOCK)
    # without dw the kernel never touches dw_part; one column keeps its pointer non-null
    dw_part = torch.empty(n, blocks if need_dw else 1, dtype=wc.dtype, device=xr.device)
    offsets, order = _invert_partners(src)
    _mix_bwd_kernel[(blocks, n)](g, xr, src.contiguous(), wc, _box_arg(boxes, src), offsets, order,
                                 dx, dw_part, size, *plane,
                                 HAS_BOX=boxes is not None, SOFT_BF16=soft_bf16(xr.dtype),
                                 NEED_DW=need_dw, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return dx, dw_part.sum(1).to(w.dtype) if need_dw else torch.zeros_like(w)


_backend.register_kernel("mix", "triton", mix)
_backend.register_kernel("mix_backward", "triton", mix_backward)
_backend.register_kernel("mix2", "triton", mix2)
